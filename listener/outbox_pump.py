"""One outbox reader: entries of its lanes go to the broker as the window allows.

The reader keeps the broker's in-flight window full instead of publishing in
rounds: what a lane's streams hold is read ahead, sent as soon as a PUBACK
makes room, and deleted once acknowledged (in stream order: XTRIM MINID up
to the last entry of the acknowledged prefix; XDEL where trimming is off).

Order. A lane's ``outbox`` stream (every transition after `created`) goes
first: its entries are sent before any waiting `created` entry, so a
cancellation overtakes a bulk import's backlog (it waits at most for the
window's worth already in flight). The ``outbox:created`` stream is read
ahead in chunks and sent when nothing else waits. Per-order order holds:
before an order's later event, the reader sends that order's `created`
event out of its turn if it has not gone yet (found by the entry id kept in
the later event), and skips it when its turn comes.

A lane whose lease is lost drops what it read (the new holder sends it);
a lost connection, a refusal or a broker silent for `timeout` seconds starts
every lane over from its first undeleted entry, after the acknowledged ones
were deleted. What a lane that started over still had in flight is deleted
by id once the broker acknowledges it; what the broker never acknowledges is
sent again (at least once).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from listener import logs
from listener.events import LOG_FIELD, StatusEvent, from_created_entry, logged
from listener.keys import KeyLayout
from listener.mqtt import Publisher
from listener.mqtt.window import refusal_text

log = logs.get("listener.outbox")

Entry = tuple[bytes, dict[bytes, bytes]]
Parse = Callable[[str, Sequence[Entry], bool], Awaitable[list[tuple[bytes, StatusEvent]]]]

BLOCK_MS = 1000  # a blocking read's wait when nothing is in flight
POLL_S = 0.005  # while publishes are in flight and nothing is queued: look at Redis this often
CREATED_READ = 256  # `created` entries read ahead per lane when its queue runs low
HI_AHEAD = 5000  # transitions read ahead, waiting for room in the window, before reading stops
# At most this many entries per read, shared by the streams read: taking a
# reply in (parsing it, queueing its events) holds the event loop, and while
# it does no PUBACK lets the next event go and no sweep starts. Many small
# reads keep the flow to the broker even; a few large ones send it in pulses,
# which the subscribers' queues at the broker must then absorb.
READ_MOST = 1024
# From a stream that did not fill its last read: most likely all it holds.
QUIET_READ = 16
# While what was read ahead fills the window: a round trip to Redis at most this
# often, and a write to the broker only once a quarter of its window is free.
# Each write on a socket costs as much as the work on a few events (the loopback
# peer's receive runs in the writer's system call); a backlog pays it less often.
READ_EVERY_S = 0.002
PACE_STEP_S = 0.005  # a paced `created` backlog goes out in steps of this many seconds' worth
# The pace when none is set: for a broker that allows fewer than UNTUNED_WINDOW
# messages in flight (mosquitto's default 20, EMQX's 32). Such a broker most
# likely keeps its default queue per subscriber too (1,000 messages for both),
# past which it drops. A broker that allows more was tuned: no pace.
AUTO_RATE = 10_000.0
UNTUNED_WINDOW = 100


def auto_rate(windows: Iterable[int]) -> float:
    """The pace of `created` events when none is set, from the windows the
    broker allows (its Receive Maximum): AUTO_RATE for one that looks untuned,
    else none (0)."""
    return AUTO_RATE if min(windows) < UNTUNED_WINDOW else 0.0


def read_plan(limits: Mapping[str, int], busy: Container[str]) -> list[tuple[list[str], int]]:
    """How one round trip reads the streams of `limits` (each with the most it
    takes from that stream): at most READ_MOST entries in all. Each stream
    gets an even share of READ_MOST, except that a stream that did not fill
    its last read (not in `busy`) gets at most QUIET_READ, and the ones that
    did (most likely holding more) then share half of READ_MOST if that is
    more. As (streams, count) pairs, one XREAD each."""
    loaded = [key for key in limits if key in busy]
    quiet = [key for key in limits if key not in busy]
    even, half = READ_MOST // max(1, len(limits)), READ_MOST // 2
    quiet_most = min(QUIET_READ, even, half // max(1, len(quiet)))
    counts = {key: max(1, min(limits[key], quiet_most)) for key in quiet}
    loaded_most = max(even, half // max(1, len(loaded)))
    counts |= {key: max(1, min(limits[key], loaded_most)) for key in loaded}
    plan: dict[int, list[str]] = {}
    for key, count in counts.items():
        plan.setdefault(count, []).append(key)
    return [(keys, count) for count, keys in plan.items()]


def id_tuple(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


@dataclass(slots=True, eq=False)
class Item:
    """One entry on its way: read, maybe sent, maybe acknowledged."""

    part: int
    key: str  # its stream
    entry_id: bytes
    event: StatusEvent  # (a dead-lettered entry gets no item: its lane reads on past it)
    gen: int  # the lane's generation when read: a reset lane ignores older acks
    early: bool = False  # a `created` entry sent ahead of its turn
    acked: bool = False


V = TypeVar("V")
Batches = dict[int, tuple[list[StatusEvent], list[Item]]]  # per connection: its events, their items


@dataclass
class Deletes:
    """Acknowledged entries to delete: `upto` per stream (everything up to and
    including that id was published), `ids` every id of them (for XDEL), and
    `early` the `created` entries sent out of turn and those acknowledged
    after their lane started over (always XDEL)."""

    upto: dict[str, bytes] = field(default_factory=dict)
    ids: dict[str, list[bytes]] = field(default_factory=dict)
    early: dict[str, list[bytes]] = field(default_factory=dict)
    # per event log stream: the acknowledged events to append (events.logged), in PUBACK order
    logged: dict[str, list[bytes]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.upto or self.early or self.logged)

    def keys(self) -> set[str]:
        """The streams and event logs these deletes are on."""
        return {*self.upto, *self.ids, *self.early, *self.logged}

    def entries(self) -> int:
        """How many outbox entries these deletes remove."""
        return sum(len(ids) for ids in (*self.ids.values(), *self.early.values()))

    def take(self, keys: Container[str]) -> Deletes:
        """The deletes (and event log appends) on `keys`, taken out of these."""
        taken = Deletes()
        _move(self.upto, taken.upto, keys)
        _move(self.ids, taken.ids, keys)
        _move(self.early, taken.early, keys)
        _move(self.logged, taken.logged, keys)
        return taken

    def merge(self, later: Deletes) -> None:
        """Take back deletes that were not sent; the ones made since are later in each stream."""
        for key, last in later.upto.items():
            self.upto.setdefault(key, last)
        for mine, theirs in ((self.ids, later.ids), (self.early, later.early), (self.logged, later.logged)):
            for key, ids in theirs.items():
                mine[key] = ids + mine.get(key, [])

    def queue_log(self, pipe: Any, trim_ms: int) -> int:
        """Queue the event log appends: per log stream one entry holding the
        events in PUBACK order, one per line, in its field `e` (one XADD of one
        field, however many events: far cheaper, for Redis and for packing
        the command, than an entry or a field each), trimming entries older
        than `trim_ms` (whole stream nodes). Returns how many commands."""
        for key, values in self.logged.items():
            pipe.execute_command("XADD", key, "MINID", "~", trim_ms, "*", LOG_FIELD, b"\n".join(values))
        return len(self.logged)

    def queue(self, pipe: Any, *, trim: bool) -> None:
        for key, ids in self.early.items():
            pipe.xdel(key, *ids)
        for key, last in self.upto.items():
            if trim:
                ms, seq = id_tuple(last)
                pipe.xtrim(key, minid=f"{ms}-{seq + 1}", approximate=False)
            elif self.ids.get(key):
                pipe.xdel(key, *self.ids[key])


class Pump:
    """The reader of a group of lanes (all of them on a single Redis, one on a
    cluster). `holds(part)` comes from the lease keeper;
    `run_pipeline(deletes, then)` sends the deletes and what `then` queues in
    one round trip; `parse` turns entries into events (moving malformed ones
    to the dead-letter stream)."""

    def __init__(
        self,
        parts: list[int],
        layout: KeyLayout,
        *,
        holds: Callable[[int], bool],
        run_pipeline: Callable[[Deletes, Callable[[Any], None]], Awaitable[list[Any]]],
        xrange_one: Callable[[list[tuple[str, bytes]]], Awaitable[list[list[Entry]]]],
        parse: Parse,
        batch: int,
        created_rate: float | None = 0.0,
        log: bool = False,
    ) -> None:
        self.parts = parts
        # acknowledged events go to the part's event log (Deletes.logged)
        self.log_key = {part: layout.event_log(part) for part in parts} if log else {}
        # `created` events sent in turn at most this many a second (0: as fast as the
        # window allows): a bulk import's backlog must not outrun the subscribers'
        # queues at the broker. Sent ahead of a later event of their order, they
        # are not counted (a cancellation never waits for the pace).
        self.configured_rate = created_rate  # None: by the broker (AUTO_RATE or none)
        self.created_rate = created_rate or 0.0  # the pace in force, set per send
        self.lo_tokens = 0.0
        self.lo_refilled = time.monotonic()
        self.pace_held = False  # the last send left `created` events behind for the pace
        self.layout = layout
        self.holds = holds
        self.run_pipeline = run_pipeline
        self.xrange_one, self.parse = xrange_one, parse
        self.batch = batch
        self.hi_key = {part: layout.outbox(part) for part in parts}
        self.lo_key = {part: layout.outbox_created(part) for part in parts}
        self.gen = dict.fromkeys(parts, 0)
        self.pos: dict[str, bytes] = {}
        self.hi: deque[Item] = deque()  # read, to send, in order
        self.lo: deque[Item] = deque()
        self.lo_queued = dict.fromkeys(parts, 0)  # per lane: its items in `lo`
        self.hi_queued = dict.fromkeys(parts, 0)  # per lane: its items in `hi`
        self.order: dict[str, deque[Item]] = {}  # per stream: sent in turn, awaiting the prefix's PUBACKs
        self.early: dict[str, dict[bytes, Item]] = {}  # per `created` stream: sent out of turn
        self.deletes = Deletes()
        self.published: list[StatusEvent] = []  # acknowledged since the caller last took them
        self.refused: list[str] = []
        self.gone = ""  # the connection was lost (why)
        self.last_ack = time.monotonic()
        self.last_read = 0.0
        self.busy: set[str] = set()  # streams that filled their last read (read_plan)
        self.open = 0  # sent, not answered
        self.lo_unsent: dict[tuple[str, bytes], Item] = {}  # read in turn, not sent yet
        for part in parts:
            self.reset_part(part)

    # -- AckSink ---------------------------------------------------------------

    def acked(self, token: Any, reason: int) -> None:
        item = cast(Item, token)
        self.open -= 1
        self.last_ack = time.monotonic()
        stale = item.gen != self.gen[item.part]  # its lane started over since (a lost lease, say)
        if reason >= 0x80:
            if not stale:
                self.refused.append(refusal_text(reason))
            return  # not deleted: sent again
        item.acked = True
        self.published.append(item.event)
        if self.log_key:
            self.deletes.logged.setdefault(self.log_key[item.part], []).append(logged(item.event))
        if item.early or stale:
            # By id: a stale one is no longer in its stream's order (the lane
            # reads again from its first entry, or another daemon holds it), and
            # whoever reads it next need not send it again: it was published.
            self.deletes.early.setdefault(item.key, []).append(item.entry_id)
        if not stale:
            self._advance(item.key)

    def lost(self, reason: str) -> None:
        self.gone = reason
        self.open = 0

    def _advance(self, key: str) -> None:
        """Move the stream's acknowledged prefix into the deletes."""
        sent = self.order.get(key)
        last = None
        while sent and sent[0].acked:
            item = sent.popleft()
            if not item.early:  # an early one is deleted by id already
                self.deletes.ids.setdefault(key, []).append(item.entry_id)
            last = item.entry_id
        if last is not None:
            self.deletes.upto[key] = last

    # -- state -----------------------------------------------------------------

    def reset_part(self, part: int) -> None:
        """Forget what the lane read and sent; read it again from its first entry."""
        self.gen[part] += 1
        for key in (self.hi_key[part], self.lo_key[part]):
            self.pos[key] = b"0-0"
            self.order[key] = deque()
        self.early[self.lo_key[part]] = {}
        self.lo_queued[part] = self.hi_queued[part] = 0
        self.hi = deque(item for item in self.hi if item.part != part)
        self.lo = deque(item for item in self.lo if item.part != part)
        for unsent in [k for k, item in self.lo_unsent.items() if item.part == part]:
            del self.lo_unsent[unsent]

    def reset(self) -> None:
        for part in self.parts:
            self.reset_part(part)
        self.refused.clear()
        self.gone = ""
        # `open` stays: what is in flight is answered (and deleted by id) or lost with the connection

    def keys(self) -> set[str]:
        """The streams of its lanes and their event logs: what its deletes are on."""
        return {*self.hi_key.values(), *self.lo_key.values(), *self.log_key.values()}

    def take_deletes(self) -> Deletes:
        deletes, self.deletes = self.deletes, Deletes()
        return deletes

    def queued(self) -> bool:
        return bool(self.hi or self.lo)

    def read_due(self, publishers: Sequence[Publisher]) -> bool:
        """Whether to read (and delete) now: at most every READ_EVERY_S while
        transitions are queued (such a read goes beside the sends: a queue that
        cannot go out must not make reads follow each other back to back) or
        what is queued fills the window; else always."""
        if not self.hi and len(self.lo) <= sum(publisher.room for publisher in publishers):
            return True
        return time.monotonic() - self.last_read >= READ_EVERY_S

    def send_due(self, publishers: Sequence[Publisher]) -> bool:
        """Whether to write to the broker now: when everything queued fits in
        the window (nothing waits behind it), or a quarter of a window is free."""
        if len(self.hi) + len(self.lo) <= sum(publisher.room for publisher in publishers):
            return True
        return any(publisher.room and publisher.room * 4 >= publisher.window for publisher in publishers)

    # -- reading ---------------------------------------------------------------

    async def read(self, mine: list[int], block: int | None) -> bool:
        """Read what the held lanes have after what was read, deleting what was
        acknowledged in the same round trip. True if anything new came."""
        # transitions are read ahead at most HI_AHEAD (the window sets the pace)
        hi = [self.hi_key[part] for part in mine] if len(self.hi) < HI_AHEAD else []
        lo = [self.lo_key[part] for part in mine if self.lo_queued[part] < CREATED_READ // 2]
        deletes = self.take_deletes()
        # Nothing queued: the deletes, then one read of every lane that waits
        # in Redis for the next entry (and returns at once if one is there),
        # in one round trip. Redis applies the deletes and the event log
        # appends before the read waits; if the round trip is cut short they
        # go again, which changes nothing (an entry is deleted once, and
        # replay gives an append sent again once: event_log._Seen).
        blocking = block is not None and not self.queued()
        if blocking:  # one XREAD, an even share of every lane's two streams
            every_lane = [self.hi_key[part] for part in mine] + [self.lo_key[part] for part in mine]
            plan = read_plan(dict.fromkeys(every_lane, CREATED_READ), every_lane)
        else:
            plan = read_plan(dict.fromkeys(hi, self.batch) | dict.fromkeys(lo, CREATED_READ), self.busy)

        wait = block if blocking else None

        def reads(pipe: Any) -> None:
            for keys, count in plan:
                pipe.xread({key: self.pos[key] for key in keys}, count=count, block=wait)

        self.last_read = time.monotonic()
        try:
            replies = await self.run_pipeline(deletes, reads)
        except BaseException:
            self.deletes.merge(deletes)  # acknowledged all the same: deleted by the next round trip
            raise
        got: dict[str, list[Entry]] = {}
        for reply in replies[len(replies) - len(plan) :]:
            got |= _by_stream(reply)
        for keys, count in plan:
            for key in keys:
                if len(got.get(key, ())) >= count:
                    self.busy.add(key)
                else:
                    self.busy.discard(key)
        if not got:
            return False
        await self._queue_read(mine, got)
        return True

    async def _queue_read(self, mine: list[int], got: dict[str, list[Entry]]) -> None:
        """Queue what a read brought, lane by lane. A lane's `created` entries go
        first: a transition read with them then finds its order's `created` entry
        read in turn (and sends it ahead from there, without a look-up)."""
        for part in mine:
            hi_entries = got.get(self.hi_key[part])
            lo_entries = got.get(self.lo_key[part])
            if lo_entries:
                await self._take_created(part, lo_entries)
            if hi_entries:
                await self._take_transitions(part, hi_entries)

    async def _take_created(self, part: int, entries: list[Entry]) -> None:
        key, gen = self.lo_key[part], self.gen[part]
        self.pos[key] = entries[-1][0]
        early = self.early[key]
        fresh = [entry for entry in entries if entry[0] not in early]
        good = dict(await self.parse(key, fresh, True)) if fresh else {}
        for entry_id, _ in entries:
            item = early.pop(entry_id, None)  # already sent ahead: takes its place in turn
            if item is None:
                event = good.get(entry_id)
                if event is None:
                    continue  # moved to the dead-letter stream
                item = Item(part, key, entry_id, event, gen)
                self.lo_unsent[(key, entry_id)] = item
            self.lo.append(item)
            self.lo_queued[part] += 1
        # early ones deleted before their turn was read: nothing keeps them
        position = id_tuple(self.pos[key])
        for entry_id in [i for i in early if id_tuple(i) <= position]:
            del early[entry_id]

    async def _take_transitions(self, part: int, entries: list[Entry]) -> None:
        key, lo_key, gen = self.hi_key[part], self.lo_key[part], self.gen[part]
        self.pos[key] = entries[-1][0]
        good = await self.parse(key, entries, False)
        # `created` events of these orders that are not read yet in turn
        read_upto = id_tuple(self.pos[lo_key])
        early = self.early[lo_key]
        wanted: dict[bytes, None] = {}
        for _, event in good:
            created = event.created_entry
            if created and created not in early and id_tuple(created) > read_upto:
                wanted[created] = None
        found: dict[bytes, StatusEvent] = {}
        if wanted:
            replies = await self.xrange_one([(lo_key, created) for created in wanted])
            for created, reply in zip(wanted, replies, strict=True):
                if reply and reply[0][0] == created:  # (an error reply or another id: not it)
                    # a malformed one is moved aside when its turn is read
                    with contextlib.suppress(KeyError, ValueError, UnicodeDecodeError):
                        found[created] = from_created_entry(*reply[0])
        queued = len(self.hi)
        for entry_id, event in good:
            created = event.created_entry
            first = found.pop(created, None)
            if first is not None:
                item = Item(part, lo_key, created, first, gen, early=True)
                early[created] = item
                self.hi.append(item)
            else:
                pulled = self.lo_unsent.pop((lo_key, created), None)
                if pulled is not None:  # read in turn but not sent yet: goes now, ahead
                    pulled.early = True  # (its place in the `created` queue stays, as a marker)
                    self.hi.append(pulled)
            self.hi.append(Item(part, key, entry_id, event, gen))
        self.hi_queued[part] += len(self.hi) - queued

    # -- pace of the `created` backlog -----------------------------------------

    def _pace_step(self) -> int:
        return max(1, min(len(self.lo), int(self.created_rate * PACE_STEP_S)))

    def _lo_allowance(self) -> int:
        """How many `created` events may be sent in turn now."""
        if not self.created_rate:
            return len(self.lo)
        now = time.monotonic()
        most = max(1.0, 4 * self.created_rate * PACE_STEP_S)  # a late wake-up caught up; no burst
        self.lo_tokens = min(most, self.lo_tokens + (now - self.lo_refilled) * self.created_rate)
        self.lo_refilled = now
        return int(self.lo_tokens) if self.lo_tokens >= self._pace_step() else 0

    def pace_wait(self) -> float:
        """Seconds until the pace lets the next step of `created` events go (0: the last
        send was not held back by it). Never 0 when it was: the caller would wait for
        something else (a PUBACK, up to a second) instead."""
        if not self.pace_held or not self.lo:
            return 0.0
        since = time.monotonic() - self.lo_refilled
        missing = self._pace_step() - self.lo_tokens - since * self.created_rate
        return max(PACE_STEP_S / 10, missing / self.created_rate)

    # -- sending ---------------------------------------------------------------

    def send(self, publishers: list[Publisher], *, created: bool = True) -> int:
        """Send queued events as far as each connection's window allows:
        transitions first, then (`created`) `created` events in turn. Returns
        how many were sent."""
        if self.configured_rate is None:
            self.created_rate = auto_rate(publisher.window for publisher in publishers)
        rooms = [publisher.room for publisher in publishers]
        sent = 0
        for queue in (self.hi, self.lo) if created else (self.hi,):
            if not any(rooms):
                break
            in_turn = queue is self.lo
            allowed = self._lo_allowance() if in_turn else len(queue)
            batches, left = self._take_sendable(queue, rooms, allowed)
            if in_turn:
                self._spend_pace(allowed - left, left)
            sent += self._publish_batches(publishers, batches)
        return sent

    def _take_sendable(self, queue: deque[Item], rooms: list[int], allowed: int) -> tuple[Batches, int]:
        """One pass over `queue` (the transitions, or the `created` events in turn):
        takes off it, in order, the events each connection has room for, at most
        `allowed` of them in turn, and takes `rooms` down by them. Returns them by
        connection, and how many more were allowed."""
        in_turn = queue is self.lo
        queued = self.lo_queued if in_turn else self.hi_queued
        walk = _Pass(queued, rooms)
        batches: Batches = {}
        kept: list[Item] = []
        while queue and walk.sendable > 0 and allowed > 0:
            item = queue.popleft()
            index = walk.look_at(item.part)
            if item.gen != self.gen[item.part]:
                queued[item.part] -= 1
                continue  # its lane started over
            # (the place in turn of a `created` event sent ahead needs no room)
            marker = in_turn and item.early
            if item.part in walk.blocked or not self.holds(item.part) or not (rooms[index] or marker):
                # this connection is full, or the lease is being renewed: in stream
                # order, so nothing behind it is deleted (or sent) before it
                kept.append(item)
                walk.block(item.part)
                continue
            queued[item.part] -= 1
            if marker:  # sent ahead of its turn: its turn now
                self.order[item.key].append(item)
                self._advance(item.key)
                continue
            if in_turn:
                del self.lo_unsent[(item.key, item.entry_id)]
            walk.take(index)
            if in_turn:
                allowed -= 1
            events, items = batches.setdefault(index, ([], []))
            events.append(item.event)
            items.append(item)
            if not item.early:
                self.order[item.key].append(item)
        queue.extendleft(reversed(kept))
        return batches, allowed

    def _spend_pace(self, taken: int, left: int) -> None:
        """After a pass over the `created` queue: the pace's tokens that `taken`
        events sent in turn used, and whether the pace left events behind."""
        if self.created_rate:
            # once a pass, not once an event: whole numbers off a float at least as
            # large (taken <= int(lo_tokens)) come out exactly the same either way
            self.lo_tokens -= taken
        self.pace_held = bool(self.created_rate) and left <= 0 and bool(self.lo)

    def _publish_batches(self, publishers: list[Publisher], batches: Batches) -> int:
        """Each connection's batch to its window; how many events that was."""
        sent = 0
        for index, (events, items) in batches.items():
            if not self.open:
                self.last_ack = time.monotonic()  # the broker's silence is counted from here
            self.open += len(events)
            publishers[index].send(events, items, self)
            sent += len(events)
        return sent

    def idle_for(self) -> float:
        return time.monotonic() - self.last_ack


class _Pass:
    """The bookkeeping of one pass over a queue (Pump._take_sendable): how
    many of its items further on could still be sent, from the per-lane counts
    of the queue, so that the pass ends as soon as no connection with room has
    one left. A long queue whose lanes all publish on full connections is then
    not walked on every PUBACK."""

    __slots__ = ("ahead", "blocked", "count", "rooms", "sendable", "waiting")

    def __init__(self, queued: dict[int, int], rooms: list[int]) -> None:
        self.rooms, self.count = rooms, len(rooms)
        self.ahead = dict(queued)  # per lane: its items not looked at yet (none once blocked)
        self.waiting = [0] * self.count  # per connection: those items
        for part, items in self.ahead.items():
            self.waiting[part % self.count] += items
        self.sendable = sum(n for n, room in zip(self.waiting, rooms, strict=True) if room)
        self.blocked: set[int] = set()  # lanes with an item kept back: the rest of theirs waits too

    def look_at(self, part: int) -> int:
        """An item of `part` comes off the queue; returns its connection."""
        index = part % self.count
        if part not in self.blocked:
            self.ahead[part] -= 1
            self.waiting[index] -= 1
            if self.rooms[index]:
                self.sendable -= 1
        return index

    def block(self, part: int) -> None:
        if part in self.blocked:
            return
        self.blocked.add(part)
        index = part % self.count
        rest, self.ahead[part] = self.ahead[part], 0
        self.waiting[index] -= rest
        if self.rooms[index]:
            self.sendable -= rest

    def take(self, index: int) -> None:
        """One item goes on connection `index`: its room less by one."""
        self.rooms[index] -= 1
        if not self.rooms[index]:
            self.sendable -= self.waiting[index]


def _move(source: dict[str, V], target: dict[str, V], keys: Container[str]) -> None:
    for key in [key for key in source if key in keys]:
        target[key] = source.pop(key)


def _by_stream(reply: Any) -> dict[str, list[Entry]]:
    """An XREAD reply as stream name -> entries."""
    return {_name(stream): entries for stream, entries in reply or []}


def _name(stream: bytes | str) -> str:
    return stream.decode() if isinstance(stream, bytes) else stream


def debug_published(events: Sequence[StatusEvent]) -> None:
    if log.is_enabled_for(logging.DEBUG):  # a line per event only when asked for
        for event in events:
            log.debug(
                "event published", order_id=event.order_id, event_id=event.event_id, status=event.status
            )
