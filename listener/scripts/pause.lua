-- pause: from now on no order of the part is cancelled for timeout (the
-- incident switch; `order-listener pause` calls it for every part).
--   KEYS: pause switch of the part ("<prefix>:{P}:pause")
--   ARGV: reason (0 to 1024 bytes), by (who paused: 1 to 1024 bytes)
-- Returns {1, since ms} when it paused the part, {0, since ms} when the part
-- was paused already (nothing changed: the first pause's time and reason
-- stay). A part resumed with a grace still running is paused again.
local refused = check_switch('pause')
if refused then
  return refused
end
local switch = KEYS[1]
local current = redis.call('HMGET', switch, 'since', 'resumed')
if current[1] and not current[2] then
  return {0, tonumber(current[1]) or 0}
end
local now = now_ms()
redis.call('DEL', switch)
redis.call('HSET', switch, 'since', now, 'reason', ARGV[1], 'by', ARGV[2])
return {1, now}
