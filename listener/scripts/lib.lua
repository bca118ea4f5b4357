-- lib.lua: helpers prepended to every transition script (see listener/scripts.py).
-- Times are Unix milliseconds from the Redis clock, so every daemon and
-- producer agrees on "now" whatever their own clocks say.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Appends one status event (any after `created`) to the part's outbox stream.
local function emit(outbox, id, status, previous, reason, version, at, created)
  redis.call('XADD', outbox, '*', 'o', id, 's', status, 'p', previous, 'r', reason,
             'v', version, 't', at, 'c', created)
end

-- Moves an order through `steps`, one event and one version per step, and
-- remembers `reason`. A cancelled order keeps its record for `retention` ms.
local function advance(okey, outbox, id, status, version, created, steps, reason, now, retention)
  for _, nxt in ipairs(steps) do
    version = version + 1
    emit(outbox, id, nxt, status, reason, version, now, created)
    status = nxt
  end
  redis.call('HSET', okey, 's', status, 'v', version, 'r', reason, 'u', now)
  if status == 'cancelled' then
    redis.call('PEXPIRE', okey, retention)
  end
  return version
end

-- The shape of every transition script:
--   KEYS: order hash, timer key, deadline index of the part, outbox of the part
--   ARGV: order id, retention ms of finished orders, [reason]
-- spec: from (set of statuses), steps, reason, already(status, reason) -> bool,
--       due (the expiry itself: only once the deadline has passed).
-- Returns {outcome, status, version, reason} with outcome one of
--   done | already | refused | unknown | notdue.
--
-- The deadline is the truth: once it has passed (by the Redis clock) the
-- payment window is closed, whether or not a daemon has swept the order yet.
-- Any operation on such an order first applies the timeout, so a late payment
-- is refused (the order is cancelled, reason timeout) and a late customer
-- cancel is a repeat of an achieved result.
--
-- Writes that free memory (DEL, ZREM) come first: under maxmemory with
-- noeviction Redis refuses a script's memory-using write only while the
-- script has written nothing, so cancellations keep working when Redis is full.
local function transition(spec)
  local okey, timer, index, outbox = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  local id, retention = ARGV[1], tonumber(ARGV[2])
  local cur = redis.call('HMGET', okey, 's', 'v', 'r', 'c', 'd')
  local status, version, reason = cur[1], tonumber(cur[2]), cur[3]
  if not status then
    return {'unknown', '', 0, ''}
  end
  if not version or not cur[4] or not tonumber(cur[5]) then
    return redis.error_reply('order record ' .. okey .. ' is malformed; nothing changed')
  end
  local now = now_ms()
  if status == 'created' and tonumber(cur[5]) <= now then
    redis.call('DEL', timer)
    redis.call('ZREM', index, id)
    version = advance(okey, outbox, id, status, version, cur[4], {'cancelled'}, 'timeout', now,
                      retention)
    if spec.due then
      return {'done', 'cancelled', version, 'timeout'}
    end
    status, reason = 'cancelled', 'timeout'
  elseif spec.from[status] then
    if spec.due then
      return {'notdue', status, version, reason}
    end
    if status == 'created' then
      redis.call('DEL', timer)
      redis.call('ZREM', index, id)
    end
    version = advance(okey, outbox, id, status, version, cur[4], spec.steps, spec.reason, now,
                      retention)
    return {'done', spec.steps[#spec.steps], version, spec.reason}
  end
  if spec.already(status, reason) then
    return {'already', status, version, reason}
  end
  return {'refused', status, version, reason}
end
