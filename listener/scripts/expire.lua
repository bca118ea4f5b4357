-- expire: created -> cancelled (reason timeout), only once the deadline has passed
-- (by the Redis clock). A second expiry of the same order changes nothing.
return transition({
  name = 'expire',
  from = {created = true},
  steps = {'cancelled'},
  reason = 'timeout',
  due = true,
  already = function(status, _) return status == 'cancelled' end,
})
