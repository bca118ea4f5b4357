-- cancel: created -> cancelled (reason customer). Repeated when already cancelled.
return transition({
  name = 'cancel',
  from = {created = true},
  steps = {'cancelled'},
  reason = 'customer',
  already = function(status, _) return status == 'cancelled' end,
})
