-- deliver: paid -> delivered. ARGV[3] is the reason: 'delivered' (shipping
-- confirmed by the shop) or 'logistics' (the carrier reported it).
return transition({
  name = 'deliver',
  reasons = {delivered = true, logistics = true},
  reasons_text = 'delivered or logistics',
  from = {paid = true},
  steps = {'delivered'},
  reason = ARGV[3],
  already = function(status, _) return status == 'delivered' end,
})
