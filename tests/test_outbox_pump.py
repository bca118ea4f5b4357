"""The outbox reader's bookkeeping: what it sends in which order, what it
lets be deleted and how much one read takes in. (The tests with a daemon
and a broker are in test_outbox_window.py and test_core_loop.py; these pin
down one sequence each that is hard to bring about there, the last on a
real Redis.)"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Sequence
from typing import Any, cast

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from listener.events import StatusEvent, from_created_entry, from_outbox_entry
from listener.keys import PARTS, KeyLayout
from listener.mqtt import Publisher
from listener.outbox_pump import QUIET_READ, READ_MOST, Deletes, Entry, Item, Pump, read_plan


class Window:
    """A connection's window as the reader sees it: room, and what was sent."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent: list[Item] = []

    def send(self, events: Sequence[StatusEvent], tokens: Sequence[Any], sink: Any) -> None:
        self.room -= len(events)
        self.sent += list(tokens)


def publishers(*windows: Window) -> list[Publisher]:
    """The fake windows where the reader takes the connections' publishers: of a
    Publisher, Pump.send() uses `room` and `send()`, which a Window has (and
    `window` only to pace by the broker, which pump() does not ask for)."""
    return cast("list[Publisher]", list(windows))


async def parse(key: str, entries: Sequence[Entry], created: bool) -> list[tuple[bytes, StatusEvent]]:
    return [(i, from_created_entry(i, f) if created else from_outbox_entry(f)) for i, f in entries]


async def unused(*_: Any) -> Any:
    raise AssertionError("no Redis in this test")


def pump(parts: Sequence[int] = (0,), xrange_one: Any = unused, run_pipeline: Any = unused) -> Pump:
    return Pump(
        list(parts),
        KeyLayout(),
        holds=lambda part: True,
        run_pipeline=run_pipeline,
        xrange_one=xrange_one,
        parse=parse,
        batch=500,
    )


async def test_a_created_entry_kept_back_is_never_trimmed_by_one_sent_ahead_of_it() -> None:
    """`created` X (order A) and C (order B) are read; B's cancellation T
    pulls C ahead; C and T fill the window and are acknowledged while X waits
    for room. Nothing may let the `created` stream be trimmed past X."""
    reader = pump()
    lo, hi = reader.lo_key[0], reader.hi_key[0]
    await reader._take_created(
        0, [(b"1000-0", {b"o": b"A", b"t": b"60000"}), (b"2000-0", {b"o": b"B", b"t": b"60000"})]
    )
    cancel = {
        b"o": b"B",
        b"s": b"cancelled",
        b"p": b"created",
        b"r": b"customer",
        b"v": b"2",
        b"t": b"3000",
        b"c": b"2000-0",
    }
    await reader._take_transitions(0, [(b"3000-0", cancel)])
    window = Window(room=2)
    assert reader.send(publishers(window)) == 2
    assert [(item.key, item.entry_id) for item in window.sent] == [(lo, b"2000-0"), (hi, b"3000-0")]
    for item in window.sent:
        reader.acked(item, 0)
    # no room on this lane's connection (another connection has room): X
    # waits, and so does C's place in turn
    reader.send(publishers(window, Window(room=5)))
    assert lo not in reader.deletes.upto, f"the created stream would be trimmed past X: {reader.deletes}"
    assert reader.deletes.early == {lo: [b"2000-0"]} and reader.deletes.upto == {hi: b"3000-0"}
    window.room = 1
    reader.send(publishers(window))
    assert window.sent[-1].entry_id == b"1000-0"
    reader.acked(window.sent[-1], 0)
    window.room = 1
    reader.send(publishers(window))  # C's place in turn comes: nothing to send for it
    assert reader.deletes.upto[lo] == b"2000-0", "X acknowledged: now the stream goes up to C"
    assert_counts_match(reader)


async def test_a_publish_acknowledged_after_its_lane_started_over_is_deleted_by_id() -> None:
    """A lane starts over (a lost lease, a refusal) while its events are in
    flight; their PUBACKs still come. The entries are published: they are
    deleted by id, never by a trim (the lane reads its stream again from the
    first entry, and the new reader's order is not theirs), and counted as
    published. A refusal of a stale one is not a refusal of the new session."""
    reader = pump(xrange_one=none_found)
    hi = reader.hi_key[0]
    await reader._take_transitions(0, [(b"1-0", cancellation("A", 1)), (b"2-0", cancellation("B", 2))])
    window = Window(room=5)
    assert reader.send(publishers(window)) == 2
    first, second = window.sent
    reader.reset_part(0)
    reader.acked(first, 0)
    reader.acked(second, 0x87)  # not authorized
    assert reader.open == 0
    assert reader.deletes.early == {hi: [b"1-0"]}
    assert reader.deletes.upto == {} and reader.deletes.ids == {}
    assert [event.order_id for event in reader.published] == ["A"]
    assert reader.refused == []


class Watched(deque[Item]):
    """A queue that counts the items taken off its front."""

    def __init__(self, items: Iterable[Item]) -> None:
        super().__init__(items)
        self.looked_at = 0

    def popleft(self) -> Item:
        self.looked_at += 1
        return super().popleft()


def assert_counts_match(reader: Pump) -> None:
    """The reader's per-lane counts of its two queues are what the queues hold."""
    for queue, counts in ((reader.hi, reader.hi_queued), (reader.lo, reader.lo_queued)):
        held = Counter(item.part for item in queue)
        assert {part: n for part, n in counts.items() if n} == dict(held)


def cancellation(order: str, at: int) -> dict[bytes, bytes]:
    fields = {b"o": order.encode(), b"s": b"cancelled", b"p": b"created", b"r": b"timeout", b"v": b"2"}
    return fields | {b"t": str(at).encode(), b"c": b"1-0"}


async def none_found(pairs: Sequence[tuple[str, bytes]]) -> list[list[Entry]]:
    return [[] for _ in pairs]  # the `created` entries asked for are gone


async def test_a_full_connection_holds_back_only_its_own_lanes_and_their_order() -> None:
    """Lanes 0 and 2 share a full connection, lane 1 has room on the other:
    lane 1's event queued behind hundreds of theirs still goes, and theirs
    keep their order; with both connections full nothing goes and nothing
    moves; room again, and lane 0's oldest events go first."""
    reader = pump([0, 1, 2], xrange_one=none_found)
    for part in (0, 2):
        entries = [(f"{i}-0".encode(), cancellation(f"P{part}-{i}", i)) for i in range(1, 301)]
        await reader._take_transitions(part, entries)
    await reader._take_transitions(1, [(b"1-0", cancellation("Q", 1)), (b"2-0", cancellation("R", 2))])
    full, roomy = Window(room=0), Window(room=1)
    before = [(item.key, item.entry_id) for item in reader.hi]
    assert reader.send(publishers(full, roomy)) == 1
    assert [item.event.order_id for item in roomy.sent] == ["Q"] and full.sent == []
    left = [(item.key, item.entry_id) for item in reader.hi]
    assert left == [entry for entry in before if entry != (reader.hi_key[1], b"1-0")], "the rest in its order"
    assert reader.send(publishers(full, roomy)) == 0
    assert [(item.key, item.entry_id) for item in reader.hi] == left
    full.room = 2
    assert reader.send(publishers(full, roomy)) == 2
    assert [item.event.order_id for item in full.sent] == ["P0-1", "P0-2"], "in the order read"
    assert_counts_match(reader)


async def test_a_send_does_not_walk_a_queue_that_only_full_connections_wait_on() -> None:
    """Lane 0 has 3,000 transitions queued for its full connection, lane 1 one
    behind them for a connection with room: that one goes, and the queue keeps
    its order. Then no connection with room has anything queued: a send looks
    at no item instead of walking the 3,000 (on every PUBACK, it did)."""
    reader = pump([0, 1], xrange_one=none_found)
    entries = [(f"{i}-0".encode(), cancellation(f"P{i}", i)) for i in range(1, 3001)]
    await reader._take_transitions(0, entries)
    await reader._take_transitions(1, [(b"1-0", cancellation("Q", 1))])
    reader.hi = watched = Watched(reader.hi)
    full, roomy = Window(room=0), Window(room=5)
    assert reader.send(publishers(full, roomy)) == 1
    assert [item.event.order_id for item in roomy.sent] == ["Q"]
    assert watched.looked_at == 3001
    assert [item.event.order_id for item in reader.hi] == [f"P{i}" for i in range(1, 3001)]
    assert_counts_match(reader)
    watched.looked_at = 0
    assert reader.send(publishers(full, roomy)) == 0
    assert watched.looked_at == 0, f"looked at {watched.looked_at} items no connection with room waits on"
    full.room = 3
    assert reader.send(publishers(full, roomy)) == 3
    assert [item.event.order_id for item in full.sent] == ["P1", "P2", "P3"]
    assert watched.looked_at == 3
    assert_counts_match(reader)


async def test_a_read_takes_in_a_bounded_share_of_every_lane_and_keeps_their_order(redis: Redis) -> None:
    """Every lane holds a backlog of cancellations and of `created` events
    (a burst after a bulk import): one read takes in at most READ_MOST
    entries, some from every lane, since what a read brings holds the event
    loop while it is queued. Read after read, each lane's cancellations come
    in their stream's order, and all of them."""
    per_lane = 200
    layout = KeyLayout()
    reader = pump(range(PARTS), none_found, lambda deletes, reads: _on(redis, deletes, reads))
    for part in range(PARTS):
        pipe = redis.pipeline(transaction=False)
        for n in range(per_lane):
            created: dict[FieldT, EncodableT] = {b"o": f"C{part}-{n}".encode(), b"t": b"600000"}
            later: dict[FieldT, EncodableT] = {k: v for k, v in cancellation(f"P{part}-{n}", n).items()}
            pipe.xadd(layout.outbox_created(part), created)
            pipe.xadd(layout.outbox(part), later)
        await pipe.execute()
    reads = 0
    while len(reader.hi) < PARTS * per_lane:
        before = len(reader.hi) + len(reader.lo)
        assert await reader.read(list(range(PARTS)), None)
        taken = len(reader.hi) + len(reader.lo) - before
        assert 0 < taken <= READ_MOST, f"read {reads} took in {taken} entries"
        if reads == 0:
            assert {item.part for item in reader.hi} == set(range(PARTS)), "every lane has its share"
        reads += 1
        assert reads < 2 * PARTS * per_lane, "reading on without taking in what is there"
    for part in range(PARTS):
        orders = [item.event.order_id for item in reader.hi if item.part == part]
        assert orders == [f"P{part}-{n}" for n in range(per_lane)]


def test_streams_that_filled_their_last_read_get_more_of_a_read() -> None:
    """Every plan stays within READ_MOST and each stream's own limit. All
    streams busy: an even share each. None busy: QUIET_READ each. One busy
    among idle ones: half of READ_MOST, so its whole limit. In a burst (every
    lane's transitions busy, their `created` streams empty) the transitions
    get their even share of the whole: half of READ_MOST."""
    streams = [f"s{n}" for n in range(2 * PARTS)]
    limits = dict.fromkeys(streams, 500)

    def counts(busy: set[str]) -> dict[str, int]:
        plan = read_plan(limits, busy)
        found = {key: count for keys, count in plan for key in keys}
        assert sorted(found) == sorted(streams), "every stream read once"
        assert sum(found.values()) <= READ_MOST
        assert all(1 <= found[key] <= limits[key] for key in streams)
        return found

    assert set(counts(set()).values()) == {QUIET_READ}
    one = counts({"s3"})
    assert one["s3"] == 500 and one["s0"] == QUIET_READ
    assert set(counts(set(streams)).values()) == {READ_MOST // len(streams)}
    burst = counts(set(streams[::2]))
    assert burst["s0"] == READ_MOST // len(streams) and burst["s1"] == QUIET_READ
    assert sum(burst[key] for key in streams[::2]) == READ_MOST // 2
    assert read_plan({"a": 10, "b": 500}, {"a", "b"}) == [(["a"], 10), (["b"], 500)], "a limit holds"


async def test_a_lane_with_a_backlog_of_its_own_is_read_in_large_reads(redis: Redis) -> None:
    """One lane holds 3,000 cancellations (taken over from a daemon that died),
    the other lanes nothing: after a first read finds the lane full, the reads
    take it in by the reader's batch, not by an even share of READ_MOST
    among all 32 streams (which would take some 90 reads)."""
    backlog, lane = 3000, 5
    layout = KeyLayout()
    reader = pump(range(PARTS), none_found, lambda deletes, reads: _on(redis, deletes, reads))
    pipe = redis.pipeline(transaction=False)
    for n in range(backlog):
        fields: dict[FieldT, EncodableT] = {k: v for k, v in cancellation(f"P{n}", n).items()}
        pipe.xadd(layout.outbox(lane), fields)
    await pipe.execute()
    reads = 0
    while len(reader.hi) < backlog and reads < 20:
        before = len(reader.hi)
        assert await reader.read(list(range(PARTS)), None)
        assert len(reader.hi) - before <= READ_MOST
        reads += 1
    assert reads <= 1 + -(-(backlog - QUIET_READ) // reader.batch), f"{reads} reads"
    assert [item.event.order_id for item in reader.hi] == [f"P{n}" for n in range(backlog)]


async def _on(redis: Redis, deletes: Deletes, reads: Any) -> list[Any]:
    """The reader's round trip, on a real Redis (nothing was sent: no deletes)."""
    assert not deletes
    pipe = redis.pipeline(transaction=False)
    reads(pipe)
    replies: list[Any] = await pipe.execute()
    return replies
