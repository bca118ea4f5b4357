-- deliver: paid -> delivered. ARGV[3] is the reason: 'delivered' (shipping
-- confirmed by the shop) or 'logistics' (the carrier reported it).
local reason = ARGV[3]
if reason ~= 'delivered' and reason ~= 'logistics' then
  return redis.error_reply('deliver: reason must be delivered or logistics')
end
return transition({
  from = {paid = true},
  steps = {'delivered'},
  reason = reason,
  already = function(status, _) return status == 'delivered' end,
})
