-- refund: paid or delivered -> refunded -> cancelled, two events in one script.
-- ARGV[3] is the reason: 'refund' (asked by the shop) or 'returned' (the
-- carrier reported the parcel returned; only a delivered order).
-- Repeated when the order is refunded, or cancelled by a refund.
local reason = ARGV[3]
local from
if reason == 'refund' then
  from = {paid = true, delivered = true}
elseif reason == 'returned' then
  from = {delivered = true}
else
  return redis.error_reply('refund: reason must be refund or returned')
end
return transition({
  from = from,
  steps = {'refunded', 'cancelled'},
  reason = reason,
  already = function(status, last)
    return status == 'refunded' or
      (status == 'cancelled' and (last == 'refund' or last == 'returned'))
  end,
})
