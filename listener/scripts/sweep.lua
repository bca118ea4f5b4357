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
-- An order cancelled straight from pending (never changed since `create`)
-- keeps its record in its bucket field, "<c>|<d>|<u>" (lib.lua,
-- unpack_bucket_value), instead of a hash of its own with an expiry: a new key
-- per order was the largest part of a cancellation's cost in Redis. The
-- part's retention queue '<key base>expiring' (a list, oldest first) holds
-- "<ms>|<bucket>|<id>,<id>,..." per bucket and call, and every call, once it
-- cancelled what is due, deletes some of such records whose retention has
-- ended (retire below). A daemon user whose ACL lacks the list commands, or a
-- queue key of another type, keeps the earlier form (own hash, PEXPIRE).
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

-- May records be kept in their buckets (see above)? The list commands of the
-- queue allowed, and the queue a list or missing: checked before any write.
local queue = base .. 'expiring'
local keep_in_bucket = redis.acl_check_cmd ~= nil and redis.acl_check_cmd('rpush', queue, 'x')
  and redis.acl_check_cmd('lpop', queue) and redis.acl_check_cmd('lindex', queue, '0')
  and redis.acl_check_cmd('llen', queue)
if keep_in_bucket then
  local length = redis.pcall('LLEN', queue)
  keep_in_bucket = type(length) == 'number'
end

-- Deletes the bucket records of orders the sweep cancelled whose retention
-- ended by `now`, up to `budget` (an order and a queue entry count one each;
-- whole entries, at least one when one is due). The queue is in the order of
-- its ends as long as the retention stays the same: an entry not yet due
-- holds back those behind it (after the retention was lowered, until those
-- queued before have ended). A record that is no longer in the cancelled form
-- (deleted or written by hand since) is left alone; an entry of the queue
-- that is not "<ms>|<bucket>|<ids>" is dropped. Retention is thus a
-- minimum: a record goes with a call of its part after it ended.
local function retire(budget)
  local done = 0
  while done < budget do
    local entry = redis.call('LINDEX', queue, 0)
    if not entry then
      return
    end
    local ends, bucket, list = string.match(entry, '^(%d+)|(%d+)|([^|]+)$')
    if ends and tonumber(ends) > now then
      return
    end
    redis.call('LPOP', queue)
    bucket = whole(bucket, 0, BUCKETS - 1)
    if bucket then
      local ids = {}
      for id in string.gmatch(list, '[^,]+') do
        if valid_id(id) and #ids < MAX_SWEEP_BATCH then
          ids[#ids + 1] = id
        end
      end
      local bkey = base .. 'p:' .. bucket
      -- pcall: a bucket of another type (written by hand) must not stop the
      -- part's sweeps; the records of that entry stay
      local values = #ids > 0 and redis.pcall('HMGET', bkey, unpack(ids)) or {}
      if values.err then
        values = {}
      end
      local gone = {}
      for i, value in ipairs(values) do
        if value and bucket_status(value) == 'cancelled' then
          gone[#gone + 1] = ids[i]
        end
      end
      if #gone > 0 then
        redis.call('HDEL', bkey, unpack(gone))
      end
      done = done + #ids
    end
    done = done + 1  -- an entry costs something even when it holds nothing to delete
  end
end

-- Order ids grouped by their bucket: `groups` in the order first met, each
-- {key, bucket, ids, fields}; add() puts an id in its group and returns it.
local function by_bucket()
  local groups, of = {}, {}
  local function add(bkey, bucket, id)
    local group = of[bkey]
    if not group then
      group = {key = bkey, bucket = bucket, ids = {}, fields = {}}
      of[bkey] = group
      groups[#groups + 1] = group
    end
    group.ids[#group.ids + 1] = id
    return group
  end
  return {groups = groups, add = add}
end

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
  -- Ids by bucket, buckets in the order first met: those whose fields go
  -- (`freed`) and those whose records stay, cancelled (`kept`: see above).
  local records, freed, kept = {}, by_bucket(), by_bucket()
  for i, id in ipairs(due) do
    local problem
    local okey = okeys[i]
    if not okey then
      problem = 'the order id ' .. ID_RULE
    else
      local bucket = bucket_of(id)
      local bkey = base .. 'p:' .. bucket
      local status, version, _, created, deadline, in_bucket, own = read_record(okey, bkey, id, no_own)
      if not status then
        problem = 'no order record'
      else
        problem = record_problem(version, created, deadline)
        if not problem and status ~= 'created' then
          problem = 'the order is ' .. shown(status) .. ', not pending'
        end
      end
      if not problem then
        version = tonumber(version)
        -- stays: cancelled in its bucket field (see above)
        local stays = keep_in_bucket and version == 1 and in_bucket and not own
        records[i] = {okey, version, created, deadline, stays and kept.add(bkey, bucket, id)}
        if in_bucket and not stays then
          freed.add(bkey, bucket, id)
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
  for _, group in ipairs(freed.groups) do
    redis.call('HDEL', group.key, unpack(group.ids))
  end
  local at, kept_for = string.format('%d', now), string.format('%d', retention)  -- once, not per order
  for i, id in ipairs(due) do
    local record = records[i]
    if record then
      local okey, version, created, deadline, stays = record[1], record[2], record[3], record[4], record[5]
      if version == 1 then
        -- The usual order, never changed since `create`: written out with
        -- constants rather than through advance(), and without history fields
        -- (its two events follow from the record: see lib.lua, history).
        redis.call('XADD', outbox, '*', 'o', id, 's', 'cancelled', 'p', 'created', 'r', 'timeout',
                   'v', '2', 't', at, 'c', created)
        if stays then
          local fields = stays.fields
          fields[#fields + 1] = id
          fields[#fields + 1] = created .. '|' .. deadline .. '|' .. at
        else
          redis.call('HSET', okey, 's', 'cancelled', 'v', '2', 'r', 'timeout', 'c', created, 'u', at,
                     'd', deadline)
          redis.call('PEXPIRE', okey, kept_for)
        end
      else
        advance(okey, outbox, id, 'created', version, created, deadline, {'cancelled'}, 'timeout', at,
                kept_for)
      end
      cancelled[#cancelled + 1] = id
      cancelled[#cancelled + 1] = deadline
    end
  end
  if #kept.groups > 0 then
    local ends, entries = string.format('%d', now + retention), {}
    for _, group in ipairs(kept.groups) do
      local fields = group.fields
      for first = 1, #fields, 4000 do  -- unpack() gives at most 8000 values; pairs stay whole
        redis.call('HSET', group.key, unpack(fields, first, math.min(first + 3999, #fields)))
      end
      entries[#entries + 1] = ends .. '|' .. group.bucket .. '|' .. table.concat(group.ids, ',')
    end
    redis.call('RPUSH', queue, unpack(entries))
  end
end
-- Records whose retention ended go last, so the orders due now are cancelled
-- first, and at most twice as many as this call cancelled plus 100: a queue
-- that fell behind (a burst's records a retention later) is worked off faster
-- than the calls that cancel add to it, a little each call, never holding
-- Redis long in a round trip that other parts wait behind.
if keep_in_bucket then
  retire(#cancelled + 100)  -- (#cancelled: two items per order)
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
