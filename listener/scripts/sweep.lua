-- sweep: cancels (reason timeout) up to ARGV[2] orders of one part whose
-- deadline has passed by the Redis clock, oldest first. The deadline index
-- is the truth: this runs at each deadline, on start and after reconnects.
--   KEYS: deadline index of the part, outbox of the part
--   ARGV: key base of the part ("<prefix>:{P}:"), batch limit, retention ms
-- (the orders' own hashes, timers and buckets are built from the key base:
-- all in the part's Cluster slot)
-- Returns {now, next deadline or -1, {id1, deadline1, id2, deadline2, ...},
-- the microseconds of now past its millisecond, {id1, problem1, ...}} (ms but
-- for the fourth). The last list names the due index members that were not
-- cancelled: an id the rules do not allow, no record, a malformed record or
-- one that is not pending (written by an older or broken producer). They
-- leave the index and lose their timer, so each is reported once; their
-- record is left as it is for inspection.
-- The pause switch of the part (lib.lua, held) decides first: while paused
-- nothing is cancelled and the next deadline is -1 (the daemons look again
-- on a wake from `resume` or at their periodic sweep); during a resume's
-- grace only the orders due after the resume are, and the next deadline is
-- at the latest the end of the grace.
local index, outbox = KEYS[1], KEYS[2]
if #KEYS ~= 2 or #ARGV ~= 3 then
  return refuse_shape('sweep', 'must be 2 KEYS (deadlines, outbox) and 3 ARGV (key base, batch limit, ' ..
    'retention ms)')
end
local base = ARGV[1]
if not split_key(base .. 'deadlines', 'deadlines') then
  return refuse('sweep', 'ARGV[1] (key base)', base,
    "must be <prefix>:{P}: with P from 0 to 15 and a prefix of 1 to 64 letters, digits, '-', '_', '.'")
end
local limit = whole(ARGV[2], 1, MAX_SWEEP_BATCH)
if not limit then
  return refuse('sweep', 'ARGV[2] (batch limit)', ARGV[2], 'must be a whole number from 1 to ' ..
    MAX_SWEEP_BATCH)
end
local retention = whole(ARGV[3], 1, MAX_RETENTION_MS)
if not retention then
  return refuse('sweep', 'ARGV[3] (retention ms)', ARGV[3], RETENTION_RULE)
end
if index ~= base .. 'deadlines' then
  return refuse('sweep', 'KEYS[1] (deadlines)', index, 'must be ' .. base .. 'deadlines')
end
if outbox ~= base .. 'outbox' then
  return refuse('sweep', 'KEYS[2] (outbox)', outbox, 'must be ' .. base .. 'outbox')
end
local now, micros = now_ms()
local switch = redis.call('HMGET', base .. 'pause', 'since', 'resumed', 'until')
local low, grace_until = '-inf', nil
if switch[1] then
  local resumed, upto = tonumber(switch[2] or ''), tonumber(switch[3] or '')
  if not resumed or not upto then
    return {now, -1, {}, micros, {}}
  end
  if now < upto then
    low, grace_until = '(' .. string.format('%d', resumed), upto
  end
end
local due = redis.call('ZRANGEBYSCORE', index, low, now, 'LIMIT', 0, limit)
local cancelled, dropped = {}, {}
if #due > 0 then
  -- Every read first, so a key of the wrong type (written by hand) fails the
  -- script before it wrote anything: the outbox, then each record.
  redis.call('XLEN', outbox)
  -- A pending order that never changed has no own hash: when none of the
  -- batch has one (the usual case), one EXISTS spares an HMGET per order. A
  -- daemon user whose ACL predates it (no +exists) is refused: then every
  -- order's hash is read, as before.
  local okeys, valid = {}, {}
  for i, id in ipairs(due) do
    if valid_id(id) then
      okeys[i] = base .. 'o:' .. id
      valid[#valid + 1] = okeys[i]
    end
  end
  local no_own = #valid == 0 or redis.pcall('EXISTS', unpack(valid)) == 0
  local records, bucket_keys, bucket_ids = {}, {}, {}
  for i, id in ipairs(due) do
    local problem
    local okey = okeys[i]
    if not okey then
      problem = 'the order id ' .. ID_RULE
    else
      local bkey = base .. 'p:' .. bucket_of(id)
      local status, version, _, created, deadline, in_bucket = read_record(okey, bkey, id, no_own)
      if not status then
        problem = 'no order record'
      else
        problem = record_problem(version, created, deadline)
        if not problem and status ~= 'created' then
          problem = 'the order is ' .. shown(status) .. ', not pending'
        end
      end
      if not problem then
        records[i] = {okey, tonumber(version), created, deadline}
        if in_bucket then
          if not bucket_ids[bkey] then
            bucket_keys[#bucket_keys + 1] = bkey
            bucket_ids[bkey] = {}
          end
          local ids = bucket_ids[bkey]
          ids[#ids + 1] = id
        end
      end
    end
    if problem then
      dropped[#dropped + 1] = id
      dropped[#dropped + 1] = problem
    end
  end
  -- Memory-freeing writes next (see lib.lua): cancellations go on when Redis is full.
  local timers = {}
  for i, id in ipairs(due) do
    timers[i] = base .. 't:' .. id
  end
  redis.call('DEL', unpack(timers))
  redis.call('ZREM', index, unpack(due))
  for _, bkey in ipairs(bucket_keys) do
    redis.call('HDEL', bkey, unpack(bucket_ids[bkey]))
  end
  local at, kept_for = string.format('%d', now), string.format('%d', retention)  -- once, not per order
  for i, id in ipairs(due) do
    local record = records[i]
    if record then
      local okey, version, created, deadline = record[1], record[2], record[3], record[4]
      if version == 1 then
        -- The usual order, never changed since `create`: written out with
        -- constants rather than through advance(), and without history fields
        -- (its two events follow from the record: see lib.lua, history).
        -- Redis spends about a sixth less per order.
        redis.call('XADD', outbox, '*', 'o', id, 's', 'cancelled', 'p', 'created', 'r', 'timeout',
                   'v', '2', 't', at, 'c', created)
        redis.call('HSET', okey, 's', 'cancelled', 'v', '2', 'r', 'timeout', 'c', created, 'u', at,
                   'd', deadline)
        redis.call('PEXPIRE', okey, kept_for)
      else
        advance(okey, outbox, id, 'created', version, created, deadline, {'cancelled'}, 'timeout', at,
                kept_for)
      end
      cancelled[#cancelled + 1] = id
      cancelled[#cancelled + 1] = deadline
    end
  end
end
local head
if grace_until then
  head = redis.call('ZRANGEBYSCORE', index, low, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
else
  head = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
end
local nxt = -1
if head[2] then
  nxt = tonumber(head[2])
end
if grace_until and (nxt < 0 or grace_until < nxt) then
  nxt = grace_until
end
return {now, nxt, cancelled, micros, dropped}
