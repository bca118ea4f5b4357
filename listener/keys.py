"""The Redis key layout. Every key name of the product is built here and nowhere else.

With the default prefix ``order``, ``PARTS = 16`` and ``BUCKETS = 256``::

    order:{P}:p:<B>           hash    pending orders of bucket B of part P: field <id>,
                                      value "<created entry id>|<deadline ms>"; and
                                      those the sweep cancelled at their deadline,
                                      until their retention ended: "<c>|<d>|<u>"
    order:{P}:expiring        list    the retention queue of those cancelled records,
                                      oldest first: "<ends ms>|<B>|<id>,<id>,..."
    order:{P}:o:<id>          hash    the order record once it changed after `create`
                                      (fields below)
    order:{P}:t:<id>          string  the timer: value "1", expires at the deadline
    order:{P}:deadlines       zset    member <id>, score deadline (Unix ms), pending orders only
    order:{P}:outbox          stream  status events after `created`, in version order per order
    order:{P}:outbox:created  stream  `created` events (kept apart so a bulk import's
                                      backlog never delays a cancellation)
    order:{P}:outbox:dead     stream  outbox entries that make no valid event: their
                                      fields plus `id` and `error`; likewise
                                      order:{P}:outbox:created:dead
    order:{P}:lease           string  which daemon publishes part P's outbox (SET NX PX)
    order:{P}:pause           hash    the pause switch of part P, while cancellation for
                                      timeout is paused: since (ms), reason, by; after a
                                      resume with a grace also resumed, until (ms), and
                                      it expires at until (one per part: every script
                                      reads the one in its own slot)
    order:{P}:log             stream  the event log: what the broker acknowledged, an entry per
                                      round trip, id = publish time, field e: its events
                                      one per line (events.logged; earlier versions wrote
                                      fields "0", "1", ...)
    order:wake                channel "<P> <deadline-ms>" when an order becomes the
                                      earliest of its part

``P`` is the part of the order: ``crc32(order_id) % 16`` (zlib's CRC-32, the
one of zip and PNG). The part is also the Redis Cluster hash tag, so an order's
keys, its bucket, its deadline-index part and its outbox lanes live in one slot
and every transition is one script on one node. ``B`` is the bucket:
``(crc32(order_id) >> 4) % 256``, the CRC bits above the part's (lib.lua
computes the same).

A pending order (``created``, never changed since) has no hash of its own:
its record is the field ``<id>`` of its bucket, the value ``<c>|<d>`` (below),
status ``created``, version 1, reason ``created``, updated at its creation
time. A bucket is a small listpack hash (a few hundred fields), so a pending
order costs there a fraction of what a hash of its own would (docs/figures.md,
"Memory per pending order").

An order the sweep cancels at its deadline straight from pending stays in its
bucket: the value becomes ``<c>|<d>|<u>``, status ``cancelled``, version 2,
reason ``timeout``, updated ``u`` (its two events implied, as below), and an
entry of the retention queue ``order:{P}:expiring`` names it; the sweeps of the
part delete such records once their retention has ended (a key of its own
per order, with an expiry, cost Redis more than the rest of the cancellation:
docs/figures.md). Under an ACL without the queue's list commands the sweep
writes the own hash below instead.

Any other first transition deletes the bucket field and writes the order's own hash
``order:{P}:o:<id>`` with all six fields (short names keep it a compact
listpack): ``s`` status, ``v`` version, ``r`` last reason, ``c`` the id of its
``created`` outbox entry (``<Unix ms>-<seq>``: the creation time, and where to
find the `created` event while it is unpublished), ``u`` updated (Unix ms),
``d`` deadline (Unix ms); and its history, a field ``h<version>`` per event
from ``h1`` (its `created` event) on (lib.lua, emit), except an order the
sweep cancelled straight from pending: version 2, `cancelled`, reason
`timeout` and no items, its two events implied by the record (store.py,
_implied_history). Records of earlier layouts are read and changed as
they are: an own hash with all six fields from ``create`` on, or one with only
``c`` and ``d`` (pending, like a bucket field). Fields of the own hash win
over the bucket's value.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

from listener.orders import ORDER_ID_PATTERN

PARTS = 16
BUCKETS = 256  # pending-order buckets per part; a power of two (lib.lua has the same)


def part_of(order_id: str) -> int:
    """The part (0..PARTS-1) an order belongs to."""
    return zlib.crc32(order_id.encode()) % PARTS


def bucket_of(order_id: str) -> int:
    """The bucket (0..BUCKETS-1) of a pending order within its part: the CRC-32
    bits above those of the part."""
    return (zlib.crc32(order_id.encode()) >> 4) % BUCKETS


@dataclass(frozen=True)
class KeyLayout:
    prefix: str = "order"

    def base(self, part: int) -> str:
        """Common start of every key of part `part`, with its hash tag."""
        return f"{self.prefix}:{{{part}}}:"

    def order(self, order_id: str) -> str:
        """The order's own hash (once it changed after `create`)."""
        return f"{self.base(part_of(order_id))}o:{order_id}"

    def bucket(self, order_id: str) -> str:
        """The bucket hash holding the order while it is pending (field: the id)."""
        return f"{self.base(part_of(order_id))}p:{bucket_of(order_id)}"

    def timer(self, order_id: str) -> str:
        return f"{self.base(part_of(order_id))}t:{order_id}"

    def deadlines(self, part: int) -> str:
        return f"{self.base(part)}deadlines"

    def expiring(self, part: int) -> str:
        """The retention queue of the records the sweep cancelled in their buckets."""
        return f"{self.base(part)}expiring"

    def outbox(self, part: int) -> str:
        return f"{self.base(part)}outbox"

    def outbox_created(self, part: int) -> str:
        return f"{self.base(part)}outbox:created"

    def dead_letters(self, stream: str) -> str:
        """Where entries of the outbox stream `stream` that make no valid event go."""
        return f"{stream}:dead"

    def event_log(self, part: int) -> str:
        """The part's log of published events (for `replay`)."""
        return f"{self.base(part)}log"

    def lease(self, part: int) -> str:
        return f"{self.base(part)}lease"

    def pause(self, part: int) -> str:
        """The pause switch of `part` (written by the pause and resume scripts)."""
        return f"{self.base(part)}pause"

    @property
    def wake_channel(self) -> str:
        return f"{self.prefix}:wake"

    @functools.cached_property
    def timer_pattern(self) -> re.Pattern[str]:
        # The part in ASCII digits, and only ids the product accepts: an expired
        # key is anyone's input (a broken producer's `order:{3}:t:a+b`, or
        # `order:{<5,000 digits>}:t:x`, which int() would refuse).
        return re.compile(rf"{re.escape(self.prefix)}:\{{(0|[1-9][0-9]?)\}}:t:({ORDER_ID_PATTERN.pattern})")

    def parse_timer(self, key: str) -> str | None:
        """The order id of a timer key of this product, or None for any other
        key. Also None for an id the rules refuse (stored by an older or broken
        producer): the scripts refuse such an id, and the deadline index still
        has that order, if it is one, so the sweep reports it."""
        match = self.timer_pattern.fullmatch(key)
        if match is None:
            return None
        part, order_id = int(match.group(1)), match.group(2)
        if part >= PARTS or not ORDER_ID_PATTERN.fullmatch(order_id) or part_of(order_id) != part:
            return None
        return order_id
