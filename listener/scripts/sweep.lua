-- sweep: cancels (reason timeout) up to ARGV[2] orders of one part whose
-- deadline has passed by the Redis clock, oldest first. The deadline index
-- is the truth: this runs at each deadline, on start and after reconnects.
--   KEYS: deadline index of the part, outbox of the part
--   ARGV: key base of the part ("<prefix>:{P}:"), batch limit, retention ms
-- (the orders' own hashes, timers and buckets are built from the key base:
-- all in the part's Cluster slot)
-- Returns {now, next deadline or -1, {id1, deadline1, id2, deadline2, ...},
-- the microseconds of now past its millisecond} (ms but for the last).
local index, outbox = KEYS[1], KEYS[2]
local base, limit, retention = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now, micros = now_ms()
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
  -- Read every record, free the bucket fields (one HDEL per bucket), then write.
  local records, bucket_keys, bucket_ids = {}, {}, {}
  for i, id in ipairs(due) do
    local okey = base .. 'o:' .. id
    local bkey = base .. 'p:' .. bucket_of(id)
    local status, version, _, created, deadline, in_bucket = read_record(okey, bkey, id)
    if in_bucket then
      if not bucket_ids[bkey] then
        bucket_keys[#bucket_keys + 1] = bkey
        bucket_ids[bkey] = {}
      end
      local ids = bucket_ids[bkey]
      ids[#ids + 1] = id
    end
    if status == 'created' and version and created and tonumber(deadline) then
      records[i] = {okey, version, created, deadline}
    end
  end
  for _, bkey in ipairs(bucket_keys) do
    redis.call('HDEL', bkey, unpack(bucket_ids[bkey]))
  end
  for i, id in ipairs(due) do
    local record = records[i]
    if record then
      advance(record[1], outbox, id, 'created', record[2], record[3], record[4], {'cancelled'},
              'timeout', now, retention)
      cancelled[#cancelled + 1] = id
      cancelled[#cancelled + 1] = record[4]
    end
  end
end
local head = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
local nxt = -1
if head[2] then
  nxt = tonumber(head[2])
end
return {now, nxt, cancelled, micros}
