"""The Redis key layout. Every key name of the product is built here and nowhere else.

With the default prefix ``order`` and ``PARTS = 16``::

    order:{P}:o:<id>          hash    the order record (fields below)
    order:{P}:t:<id>          string  the timer: value "1", expires at the deadline
    order:{P}:deadlines       zset    member <id>, score deadline (Unix ms), pending orders only
    order:{P}:outbox          stream  status events after `created`, in version order per order
    order:{P}:outbox:created  stream  `created` events (kept apart so a bulk import's
                                      backlog never delays a cancellation)
    order:{P}:lease           string  which daemon publishes part P's outbox (SET NX PX)
    order:wake                channel "<P> <deadline-ms>" when an order becomes the
                                      earliest of its part

``P`` is the part of the order: ``crc32(order_id) % 16`` (zlib's CRC-32, the
one of zip and PNG). The part is also the Redis Cluster hash tag, so an order's
keys, its deadline-index part and its outbox lanes live in one slot and every
transition is one script on one node.

Order record fields (short names keep the hash in a compact listpack):
``s`` status, ``v`` version, ``r`` last reason, ``c`` the id of its ``created``
outbox entry (``<Unix ms>-<seq>``: the creation time, and where to find the
`created` event while it is unpublished), ``u`` updated (Unix ms), ``d``
deadline (Unix ms).
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass

PARTS = 16


def part_of(order_id: str) -> int:
    """The part (0..PARTS-1) an order belongs to."""
    return zlib.crc32(order_id.encode()) % PARTS


@dataclass(frozen=True)
class KeyLayout:
    prefix: str = "order"

    def base(self, part: int) -> str:
        """Common start of every key of part `part`, with its hash tag."""
        return f"{self.prefix}:{{{part}}}:"

    def order(self, order_id: str) -> str:
        return f"{self.base(part_of(order_id))}o:{order_id}"

    def timer(self, order_id: str) -> str:
        return f"{self.base(part_of(order_id))}t:{order_id}"

    def deadlines(self, part: int) -> str:
        return f"{self.base(part)}deadlines"

    def outbox(self, part: int) -> str:
        return f"{self.base(part)}outbox"

    def outbox_created(self, part: int) -> str:
        return f"{self.base(part)}outbox:created"

    def lease(self, part: int) -> str:
        return f"{self.base(part)}lease"

    @property
    def wake_channel(self) -> str:
        return f"{self.prefix}:wake"

    @functools.cached_property
    def timer_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.prefix)}:\{{(\d+)\}}:t:(.+)$")

    def parse_timer(self, key: str) -> str | None:
        """The order id of a timer key of this product, or None for any other key."""
        match = self.timer_pattern.match(key)
        if match is None:
            return None
        part, order_id = int(match.group(1)), match.group(2)
        if part >= PARTS or part_of(order_id) != part:
            return None
        return order_id
