-- sweep: cancels (reason timeout) up to ARGV[2] orders of one part whose
-- deadline has passed by the Redis clock, oldest first. The deadline index
-- is the truth: this runs at each deadline, on start and after reconnects.
--   KEYS: deadline index of the part, outbox of the part
--   ARGV: key base of the part ("<prefix>:{P}:"), batch limit, retention ms
-- Returns {now, next deadline or -1, {id1, deadline1, id2, deadline2, ...}}.
local index, outbox = KEYS[1], KEYS[2]
local base, limit, retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, limit)
local cancelled = {}
if #due > 0 then
  -- Memory-freeing writes first (see lib.lua): cancellations go on when Redis is full.
  local timers = {}
  for i, id in ipairs(due) do
    timers[i] = base .. 't:' .. id
  end
  redis.call('DEL', unpack(timers))
  redis.call('ZREM', index, unpack(due))
  for _, id in ipairs(due) do
    local okey = base .. 'o:' .. id
    local cur = redis.call('HMGET', okey, 's', 'v', 'c', 'd')
    if cur[1] == 'created' and tonumber(cur[2]) and cur[3] then
      advance(okey, outbox, id, 'created', tonumber(cur[2]), cur[3], {'cancelled'}, 'timeout',
              now, retention)
      cancelled[#cancelled + 1] = id
      cancelled[#cancelled + 1] = cur[4]
    end
  end
end
local head = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
local nxt = -1
if head[2] then
  nxt = tonumber(head[2])
end
return {now, nxt, cancelled}
