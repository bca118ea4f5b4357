-- resume: timeouts of the part are applied again (`order-listener resume`
-- calls it for every part).
--   KEYS: pause switch of the part ("<prefix>:{P}:pause")
--   ARGV: wake channel, grace ms (0 to 30 days)
-- With grace 0 the switch goes and the orders whose deadline passed are
-- cancelled by the next sweep. With a grace, the orders already due now are
-- held back until now + grace (the switch keeps `resumed` and `until` and
-- expires then); orders due later are cancelled at their deadline as usual.
-- Publishes "<P> <ms>" on the wake channel, so the daemons sweep the part at
-- that moment instead of at their next periodic look.
-- Returns {1, ms the held orders are due} when it resumed the part, {0, 0}
-- when it was not paused, {0, until ms} when it was resumed already.
local refused, _, part = check_switch('resume')
if refused then
  return refused
end
local switch = KEYS[1]
local current = redis.call('HMGET', switch, 'since', 'resumed', 'until')
if not current[1] then
  return {0, 0}
end
if current[2] then
  return {0, tonumber(current[3]) or 0}
end
local now = now_ms()
local grace = tonumber(ARGV[2])
local due = now + grace
if grace == 0 then
  redis.call('DEL', switch)
else
  redis.call('HSET', switch, 'resumed', now, 'until', due)
  redis.call('PEXPIRE', switch, grace)
end
redis.call('PUBLISH', ARGV[1], part .. ' ' .. string.format('%d', due))
return {1, due}
