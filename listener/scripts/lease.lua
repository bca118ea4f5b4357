-- lease: takes or renews the lease KEYS[1] ("<prefix>:{P}:lease") for owner
-- ARGV[1] for ARGV[2] ms. Returns 1 when the caller holds it afterwards, 0
-- when another owner does.
if #KEYS ~= 1 or #ARGV ~= 2 then
  return refuse_shape('lease', 'must be 1 KEYS (lease) and 2 ARGV (owner, ms)')
end
if not split_key(KEYS[1], 'lease') then
  return refuse('lease', 'KEYS[1] (lease)', KEYS[1], 'must be <prefix>:{P}:lease with P from 0 to 15')
end
if #ARGV[1] < 1 or #ARGV[1] > 255 then
  return refuse('lease', 'ARGV[1] (owner)', ARGV[1], 'must be 1 to 255 bytes')
end
local ms = whole(ARGV[2], 1, MAX_LEASE_MS)
if not ms then
  return refuse('lease', 'ARGV[2] (ms)', ARGV[2], 'must be whole milliseconds from 1 to ' .. MAX_LEASE_MS)
end
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ms)
  return 1
end
return 0
