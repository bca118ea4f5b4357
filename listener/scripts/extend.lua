-- extend: created -> created with a later deadline (reason extended): more
-- time to pay for one order, before its deadline.
--   KEYS: order hash, timer, deadline index of the part, outbox of the part
--   ARGV: order id, retention ms, extension ms (1 to 30 days)
-- The new deadline is the current one plus the extension; the new window,
-- counted from now, is at most 30 days. The timer, the index and the record
-- change together, and one event goes to the outbox (status created, previous
-- created, reason extended, with the new deadline in `d`).
-- Returns {outcome, status, version, reason, deadline ms} with outcome one of
--   done     extended; the deadline is the new one
--   unknown  no such order
--   refused  the status is not `created`; or the deadline had passed: then
--            the order is cancelled here first (reason timeout), as any
--            operation on it would
--   late     the deadline had passed while the pause switch holds the order's
--            timeout back: nothing changed (the resume decides)
--   toolong  the new window would be longer than 30 days: nothing changed
-- Extending is not idempotent: each call adds its extension.
local refused, base, crc = check_transition({
  name = 'extend',
  extra = {
    what = 'extension ms',
    rule = 'must be whole milliseconds from 1 to ' .. MAX_TIMEOUT_MS .. ' (30 days)',
    ok = function(value) return whole(value, 1, MAX_TIMEOUT_MS) ~= nil end,
  },
})
if refused then
  return refused
end
local okey, timer, index, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, retention, extension = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local bkey = base .. 'p:' .. bucket_of(id, crc)
local status, version, reason, created, deadline, in_bucket = read_record(okey, bkey, id)
if not status then
  return {'unknown', '', 0, '', 0}
end
local problem = record_problem(version, created, deadline)
if problem then
  return redis.error_reply('ERR extend: the stored record of ' .. shown(id) .. ' is malformed (' .. problem ..
    '); nothing changed')
end
version, reason, deadline = tonumber(version), reason or '', tonumber(deadline)
-- Reads of the keys it may write (see transition in lib.lua).
redis.call('XLEN', outbox)
if status ~= 'created' then
  return {'refused', status, version, reason, deadline}
end
redis.call('ZCARD', index)
local now = now_ms()
if deadline <= now then
  if held(base, deadline, now) then
    return {'late', status, version, reason, deadline}
  end
  unpend(timer, index, bkey, id, in_bucket)
  version = advance(okey, outbox, id, status, version, created, deadline, {'cancelled'}, 'timeout', now,
                    retention)
  return {'refused', 'cancelled', version, 'timeout', deadline}
end
local later = deadline + extension
if later - now > MAX_TIMEOUT_MS then
  return {'toolong', status, version, reason, deadline}
end
local shown_later = string.format('%d', later)
-- Memory-freeing write first (see lib.lua): the own hash takes the record over.
if in_bucket then
  redis.call('HDEL', bkey, id)
end
version = advance(okey, outbox, id, status, version, created, shown_later, {'created'}, 'extended', now,
                  retention, string.format('%d', deadline))
redis.call('SET', timer, '1', 'PXAT', shown_later)
-- Later than before: the part's earliest deadline never moves earlier, so no
-- daemon needs waking (one that wakes at the old deadline finds nothing due).
redis.call('ZADD', index, shown_later, id)
return {'done', 'created', version, 'extended', later}
