-- pay: created -> paid (reason paid). Stops the timer: a paid order never times out.
-- Repeated when the order is already paid or delivered.
return transition({
  name = 'pay',
  from = {created = true},
  steps = {'paid'},
  reason = 'paid',
  already = function(status, _) return status == 'paid' or status == 'delivered' end,
})
