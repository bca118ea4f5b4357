-- create: new orders of one part, each `created` with its timer and deadline.
--   KEYS: deadline index of the part, outbox:created of the part,
--         then for each order: order hash, timer key
--   ARGV: wake channel, part, then for each order: order id, timeout ms
-- A new order's record is one field of its bucket hash (lib.lua, bucket_key;
-- built from the order hash's name, so in the same Cluster slot), not a hash
-- of its own: field <id>, value "<created entry id>|<deadline ms>".
-- Returns, per order, two items: 1, deadline (created) or 0, status (id taken:
-- nothing changed). Publishes "<part> <deadline>" on the wake channel when an
-- order becomes the earliest of its part, so a sleeping daemon wakes for it.
local index, created_box = KEYS[1], KEYS[2]
-- Check every argument before the first write: a script is not rolled back.
if #ARGV < 4 or #ARGV % 2 ~= 0 or #KEYS ~= #ARGV then
  return redis.error_reply('create: KEYS and ARGV do not match (see README, Redis key layout)')
end
local buckets = {}
for i = 1, (#ARGV - 2) / 2 do
  local timeout = tonumber(ARGV[2 + 2 * i])
  if not timeout or timeout ~= math.floor(timeout) or timeout < 100 or timeout > 2592000000 then
    return redis.error_reply('create: timeout of ' .. ARGV[1 + 2 * i] ..
      ' must be whole milliseconds from 100 to 2592000000; nothing was created')
  end
  local crc = crc32(ARGV[1 + 2 * i])
  if crc % 16 ~= tonumber(ARGV[2]) then
    return redis.error_reply('create: order ' .. ARGV[1 + 2 * i] .. ' belongs to part ' .. crc % 16 ..
      ', not ' .. ARGV[2] .. ' (crc32(id) % 16, see README, Redis key layout); nothing was created')
  end
  buckets[i] = bucket_key(KEYS[1 + 2 * i], ARGV[1 + 2 * i], crc)
  if not buckets[i] then
    return redis.error_reply('create: the order hash of ' .. ARGV[1 + 2 * i] ..
      ' must be <prefix>:{P}:o:<id> (see README, Redis key layout); nothing was created')
  end
end
local channel, part = ARGV[1], ARGV[2]
local head = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
local earliest = head[2] and tonumber(head[2])
local new_min
local out = {}
for i = 1, (#ARGV - 2) / 2 do
  local id, timeout = ARGV[1 + 2 * i], tonumber(ARGV[2 + 2 * i])
  local okey, timer, bkey = KEYS[1 + 2 * i], KEYS[2 + 2 * i], buckets[i]
  -- The id exists when its own hash has c (a changed order, or one stored by
  -- an earlier create) or its bucket holds it (a pending order).
  if redis.call('HGET', okey, 'c') then
    out[#out + 1] = 0
    out[#out + 1] = redis.call('HGET', okey, 's') or 'created'
  elseif redis.call('HGET', bkey, id) then
    out[#out + 1] = 0
    out[#out + 1] = 'created'
  else
    -- The entry id's millisecond is the creation time; the deadline is exactly
    -- the timeout after it (the entry keeps the timeout, not the deadline).
    local entry = redis.call('XADD', created_box, '*', 'o', id, 't', timeout)
    local created = tonumber(string.match(entry, '^(%d+)'))
    local deadline = created + timeout
    -- Status created, version 1, reason created and updated = the creation
    -- time are implied until the first transition writes the own hash.
    redis.call('HSET', bkey, id, entry .. '|' .. string.format('%d', deadline))
    redis.call('SET', timer, '1', 'PXAT', deadline)
    redis.call('ZADD', index, deadline, id)
    if not new_min or deadline < new_min then
      new_min = deadline
    end
    out[#out + 1] = 1
    out[#out + 1] = deadline
  end
end
if new_min and (not earliest or new_min < earliest) then
  redis.call('PUBLISH', channel, part .. ' ' .. string.format('%d', new_min))
end
return out
