-- release: gives up the lease KEYS[1] ("<prefix>:{P}:lease") if owner
-- ARGV[1] holds it. Returns 1 when it did, 0 otherwise.
if #KEYS ~= 1 or #ARGV ~= 1 then
  return refuse_shape('release', 'must be 1 KEYS (lease) and 1 ARGV (owner)')
end
if not split_key(KEYS[1], 'lease') then
  return refuse('release', 'KEYS[1] (lease)', KEYS[1], 'must be <prefix>:{P}:lease with P from 0 to 15')
end
if #ARGV[1] < 1 or #ARGV[1] > 255 then
  return refuse('release', 'ARGV[1] (owner)', ARGV[1], 'must be 1 to 255 bytes')
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
