-- create: new orders of one part, each `created` with its timer and deadline.
--   KEYS: deadline index of the part, outbox:created of the part,
--         then for each order: order hash, timer key
--   ARGV: wake channel, part, then for each order: order id, timeout ms
-- A new order's record is one field of its bucket hash (lib.lua, bucket_of;
-- its key is built from the part's key base, so in the same Cluster slot), not
-- a hash of its own: field <id>, value "<created entry id>|<deadline ms>".
-- Returns, per order, two items: 1, deadline (created) or 0, status (id taken:
-- nothing changed). Publishes "<part> <deadline>" on the wake channel when an
-- order becomes the earliest of its part, so a sleeping daemon wakes for it.
-- Every order of the call is checked before the first write: one bad item
-- refuses the whole call (lib.lua, refuse) and nothing is created.
local index, created_box = KEYS[1], KEYS[2]
if #ARGV < 4 or #ARGV % 2 ~= 0 or #KEYS ~= #ARGV then
  return refuse_shape('create', 'must be 2 KEYS (deadlines, outbox:created) and 2 ARGV (wake channel, ' ..
    'part), then per order 2 KEYS (order hash, timer) and 2 ARGV (order id, timeout ms), ' ..
    'at least one order')
end
local part = whole(ARGV[2], 0, 15)
if not part or tostring(part) ~= ARGV[2] then
  return refuse('create', 'ARGV[2] (part)', ARGV[2],
    'must be a whole number from 0 to 15 (crc32(order id) % 16, see docs/reference.md, Redis key layout)')
end
local prefix, index_part = split_key(index, 'deadlines')
if not prefix or index_part ~= part then
  return refuse('create', 'KEYS[1] (deadlines)', index, 'must be <prefix>:{' .. part .. '}:deadlines')
end
local base = prefix .. ':{' .. part .. '}:'
if created_box ~= base .. 'outbox:created' then
  return refuse('create', 'KEYS[2] (outbox:created)', created_box, 'must be ' .. base .. 'outbox:created')
end
if ARGV[1] ~= prefix .. ':wake' then
  return refuse('create', 'ARGV[1] (wake channel)', ARGV[1], 'must be ' .. prefix .. ':wake')
end
local buckets, timeouts = {}, {}
for i = 1, (#ARGV - 2) / 2 do
  local id, timeout = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  if not valid_id(id) then
    return refuse('create', 'ARGV[' .. (1 + 2 * i) .. '] (order id)', id, ID_RULE)
  end
  timeouts[i] = whole(timeout, 100, MAX_TIMEOUT_MS)
  if not timeouts[i] then
    return refuse('create', 'ARGV[' .. (2 + 2 * i) .. '] (timeout ms of ' .. id .. ')', timeout,
      'must be whole milliseconds from 100 to ' .. MAX_TIMEOUT_MS .. ' (0.1 s to 30 days)')
  end
  local crc = crc32(id)
  if crc % 16 ~= part then
    return refuse('create', 'ARGV[' .. (1 + 2 * i) .. '] (order id)', id, 'belongs to part ' .. crc % 16 ..
      ', not ' .. part .. ' (P = crc32(id) % 16, see docs/reference.md, Redis key layout)')
  end
  if KEYS[1 + 2 * i] ~= base .. 'o:' .. id then
    return refuse('create', 'KEYS[' .. (1 + 2 * i) .. '] (order hash)', KEYS[1 + 2 * i],
      'must be ' .. base .. 'o:' .. id)
  end
  if KEYS[2 + 2 * i] ~= base .. 't:' .. id then
    return refuse('create', 'KEYS[' .. (2 + 2 * i) .. '] (timer)', KEYS[2 + 2 * i],
      'must be ' .. base .. 't:' .. id)
  end
  buckets[i] = base .. 'p:' .. bucket_of(id, crc)
end
local channel = ARGV[1]
local head = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
local earliest = head[2] and tonumber(head[2])
local new_min
local out = {}
for i = 1, (#ARGV - 2) / 2 do
  local id, timeout = ARGV[1 + 2 * i], timeouts[i]
  local okey, timer, bkey = KEYS[1 + 2 * i], KEYS[2 + 2 * i], buckets[i]
  -- The id exists when its own hash has c (a changed order, or one stored by
  -- an earlier create) or its bucket holds it (a pending order, or one the
  -- sweep cancelled whose retention has not ended).
  local known = redis.call('HGET', okey, 'c') and (redis.call('HGET', okey, 's') or 'created')
  if not known then
    local packed = redis.call('HGET', bkey, id)
    known = packed and bucket_status(packed)
  end
  if known then
    out[#out + 1] = 0
    out[#out + 1] = known
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
  redis.call('PUBLISH', channel, ARGV[2] .. ' ' .. string.format('%d', new_min))
end
return out
