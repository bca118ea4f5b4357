-- release: gives up the lease KEYS[1] ("<prefix>:{P}:lease") if owner
-- ARGV[1] holds it. Returns 1 when it did, 0 otherwise.
local refused = check_lease('release')
if refused then
  return refused
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
