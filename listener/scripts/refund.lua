-- refund: paid or delivered -> refunded -> cancelled, two events in one script.
-- ARGV[3] is the reason: 'refund' (asked by the shop) or 'returned' (the
-- carrier reported the parcel returned; only a delivered order).
-- Repeated when the order is refunded, or cancelled by a refund.
local from = {refund = {paid = true, delivered = true}, returned = {delivered = true}}
return transition({
  name = 'refund',
  reasons = {refund = true, returned = true},
  reasons_text = 'refund or returned',
  from = from[ARGV[3]] or {},  -- (any other reason is refused before `from` is used)
  steps = {'refunded', 'cancelled'},
  reason = ARGV[3],
  already = function(status, last)
    return status == 'refunded' or
      (status == 'cancelled' and (last == 'refund' or last == 'returned'))
  end,
})
