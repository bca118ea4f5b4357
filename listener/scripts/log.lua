-- log: appends events the broker acknowledged to the part's event log (for
-- `order-listener replay`), trimming it by time. Only the daemon calls it,
-- in the round trip that deletes the events' outbox entries.
--   KEYS: the event log of the part ('<prefix>:{P}:log')
--   ARGV: trim point (Unix ms: entries before it may go, whole stream nodes at
--         a time), then one event per ARGV, "<order id>|<history item>"
--         (listener/events.py, logged; the history item as in lib.lua)
-- Each event becomes one entry, field `e`, entry id = now (the Redis clock).
-- Returns the number of entries appended.
if #KEYS ~= 1 or #ARGV < 2 then
  return refuse_shape('log', 'must be 1 KEYS (event log) and 2 or more ARGV (trim point ms, then ' ..
    'one event each)')
end
local key = KEYS[1]
if not split_key(key, 'log') then
  return refuse('log', 'KEYS[1] (event log)', key, 'must be <prefix>:{P}:log with P from 0 to 15')
end
if not whole(ARGV[1], 0, 1e15) then
  return refuse('log', 'ARGV[1] (trim point ms)', ARGV[1], 'must be whole milliseconds (Unix time)')
end
for i = 2, #ARGV do
  local event = ARGV[i]
  local id = string.match(event, '^([^|]*)|')
  if #event > 512 or not valid_id(id) then
    return refuse('log', 'ARGV[' .. i .. '] (event)', event,
      "must be '<order id>|<status>|...' of at most 512 bytes (listener/events.py, logged)")
  end
end
redis.call('XLEN', key)  -- a key of another type fails here, before any write
-- the trim comes with the first append: it frees memory before the others use it
redis.call('XADD', key, 'MINID', '~', ARGV[1], '*', 'e', ARGV[2])
for i = 3, #ARGV do
  redis.call('XADD', key, '*', 'e', ARGV[i])
end
return #ARGV - 1
