-- lease: takes or renews the lease KEYS[1] ("<prefix>:{P}:lease") for owner
-- ARGV[1] for ARGV[2] ms. Returns 1 when the caller holds it afterwards, 0
-- when another owner does.
local refused = check_lease('lease')
if refused then
  return refused
end
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
