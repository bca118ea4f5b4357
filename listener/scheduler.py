"""The deadline scheduler: cancels each order at its deadline from the deadline index.

Redis sends `expired` only when its sampling sweep happens to delete a timer
key: seconds late, later still with many TTL keys, and never while we are
disconnected. So the index (one sorted set per part) is the truth. The
scheduler knows the earliest deadline of every part, sleeps until the
earliest of all (or until a create wakes it for an earlier one), then runs
the `sweep` script on the parts that are due. Each call cancels a bounded
batch and returns the part's next deadline and the Redis clock, so sleeping
is always measured on the Redis clock and never busy-waits.

It also runs the catch-up: a full sweep on start, after every reconnect, and
every `resync_interval` seconds.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from redis.exceptions import ResponseError

from listener import logs
from listener.alarm import Alarm
from listener.catch_up import CatchUp
from listener.keys import PARTS
from listener.store import Store, SweepResult
from listener.supervise import Service, delays, describe, is_transient, supervise

log = logs.get("listener.scheduler")

RECENT_MAX = 100_000
CancelledHook = Callable[[str, int, int], None]  # order id, deadline ms, cancelled-at ms
DroppedHook = Callable[[str, str], None]  # order id, what is wrong with its record
SHOWN_ID_MAX = 200  # an id the rules refuse may be of any length: logs show its start
# At most this many orders cancelled per round trip to a shard, over all its
# due parts: Redis runs a round trip's scripts back to back and serves no other
# client meanwhile (producers, the outbox reader, the expired events); at
# 15-40 µs an order, 16 parts of a full batch each held it for up to 0.7 s.
# Smaller costs the catch-up more round trips (docs/figures.md).
ROUND_TRIP_ORDERS = 4000
# At most about this many orders absorbed from a reply before the scheduler
# lets other tasks run (before each part while a round trip sent ahead is on
# its way): the few orders of a trickle cost no extra turns of the loop, each
# of which can wait behind another task's step while the next deadlines pass.
SETTLE_SLICE = 256


_Reply = list[SweepResult | ResponseError] | BaseException


@dataclass
class _Sweep:
    """One round trip per shard: the parts of each, the batch limit, the reply
    (a result or a script's refusal per part; an exception for a lost shard)."""

    groups: list[list[int]]
    limits: list[int]
    replies: list[_Reply]
    received: list[float]  # time.monotonic() as each shard's reply was read

    def __iter__(self) -> Iterator[tuple[list[int], int, _Reply, float]]:
        return zip(self.groups, self.limits, self.replies, self.received, strict=True)


def _clock_of(reply: list[SweepResult | ResponseError]) -> int | None:
    """The Redis clock (µs) of a shard's last script in a round trip."""
    return max((result.now_us for result in reply if isinstance(result, SweepResult)), default=None)


class DeadlineScheduler:
    def __init__(
        self,
        store: Store,
        service: Service,
        *,
        batch: int = 1000,
        resync_interval: float = 5.0,
        on_cancelled: CancelledHook | None = None,
        on_dropped: DroppedHook | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.batch = batch
        self.resync_interval = resync_interval
        self.on_cancelled = on_cancelled
        self.on_dropped = on_dropped
        # earliest deadline of each part, as time.monotonic() seconds; inf = none
        self._heads = [math.inf] * PARTS
        self._retries: dict[int, Iterator[float]] = {}  # backoff of parts whose shard is away
        # per part: its node's clock (redis ms / 1000) minus monotonic; on a
        # Redis Cluster each shard has its own clock, and a wake's deadline
        # was computed on the clock of the part's node
        self._offsets: list[float | None] = [None] * PARTS
        # per part: the earliest wake since its last round trip was sent; a
        # reply absorbed later must not undo it (the sweep ran before that create)
        self._woken = [math.inf] * PARTS
        self._wake = asyncio.Event()
        self._stopping = False
        self.caught_up = asyncio.Event()
        # behind the deadlines (a sweep came back full): the outbox holds back
        # its announcements meanwhile (listener/catch_up.py)
        self.catch_up = CatchUp()
        self.cancelled = 0
        self.dropped = 0  # due index members with an unusable record (sweep.lua)
        # Ids this scheduler cancelled lately. Deleting a timer whose time has
        # passed makes Redis announce it as `expired`; the listener skips those
        # instead of running the expire script again for nothing.
        self.recent: OrderedDict[str, None] = OrderedDict()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def wake(self, part: int, deadline_ms: int) -> None:
        """A new order became the earliest of `part` (from the wake channel)."""
        if not 0 <= part < PARTS:
            return
        due = self._local(part, deadline_ms)
        self._woken[part] = min(self._woken[part], due)
        if due < self._heads[part]:
            self._heads[part] = due
            self._wake.set()

    def resync(self) -> None:
        """Sweep every part at once (after a reconnect, or a burst we did not follow)."""
        self._heads = [0.0] * PARTS
        self._wake.set()

    def _local(self, part: int, redis_ms: int) -> float:
        offset = self._offsets[part]
        if offset is None:
            return 0.0  # clock unknown yet: look now
        return redis_ms / 1000 - offset

    async def run(self) -> None:
        alarm = Alarm(asyncio.get_running_loop(), self._wake.set)
        try:
            await supervise("scheduler", self.service, lambda: self._session(alarm))
        finally:
            alarm.close()

    async def _session(self, alarm: Alarm) -> None:
        self.resync()  # catch-up on start and after every failure
        next_resync = time.monotonic()
        while not self._stopping:
            now = time.monotonic()
            if now >= next_resync:
                self._heads = [0.0] * PARTS
                next_resync = now + self.resync_interval
            due = [part for part, head in enumerate(self._heads) if head <= now]
            if due:
                await self._sweep_by_shard(due)
                if not self.caught_up.is_set() and all(h > now for h in self._heads):
                    self.caught_up.set()
                    log.info("caught up with the deadline index")
                continue
            self._wake.clear()
            alarm.set(min(min(self._heads), next_resync))
            await self._wake.wait()  # the alarm, a wake for an earlier deadline, or stop()

    async def _sweep_by_shard(self, due: list[int]) -> None:
        """Sweep the due parts, one round trip per shard (one on a single Redis),
        all shards at once. A shard that fails (a failover under way) does not
        hold up the others: its parts are retried with their own backoff. When
        every shard fails, the failure is the session's (supervise backs off).

        While parts come back with a full batch (a burst, a catch-up), the
        next round trip for them, and for any other part due by then, is on
        its way before this one's reply is absorbed: Redis sweeps while we log
        and count, instead of waiting for us between round trips. Meanwhile
        the catch-up is on (self.catch_up)."""
        try:
            await self._sweep_until_caught_up(due)
        finally:
            self.catch_up.end()

    async def _sweep_until_caught_up(self, due: list[int]) -> None:
        sweep = await self._send(due)
        while True:
            more = [] if self._stopping else self._more_due(sweep)
            if more:
                self.catch_up.begin()
            ahead = asyncio.create_task(self._send(more)) if more else None
            try:
                await self._settle(sweep, ahead=ahead is not None)
            except asyncio.CancelledError:
                if ahead is not None:
                    ahead.cancel()  # nothing if its reply is in already
                    await asyncio.wait({ahead})
                    if not ahead.cancelled():
                        self._absorb_all(ahead.result())
                raise
            except Exception:
                if ahead is not None:
                    self._absorb_all(await ahead)
                raise
            if ahead is None:
                return
            sweep = await ahead

    async def _send(self, due: list[int]) -> _Sweep:
        """One round trip per shard of `due`; a lost shard's exception in its
        place. Raises nothing but a cancellation of its own."""
        for part in due:
            self._woken[part] = math.inf
        groups = self.store.by_shard(due)
        limits = [self._limit(len(group)) for group in groups]
        if len(groups) == 1:  # one Redis: the request is written in this task's first step
            answers = [await self._sweep_shard(groups[0], limits[0])]
        else:
            answers = await asyncio.gather(
                *(self._sweep_shard(group, limit) for group, limit in zip(groups, limits, strict=True))
            )
        return _Sweep(groups, limits, [reply for reply, _ in answers], [at for _, at in answers])

    async def _sweep_shard(self, group: list[int], limit: int) -> tuple[_Reply, float]:
        reply: _Reply
        try:
            reply = await self.store.try_sweep(group, limit)
        except Exception as exc:
            reply = exc
        return reply, time.monotonic()

    def _more_due(self, sweep: _Sweep) -> list[int]:
        """The parts to sweep next at once: those whose batch came back full,
        and those not in `sweep` whose head has come."""
        now = time.monotonic()
        swept: set[int] = set()
        full: list[int] = []
        for group, limit, reply, _ in sweep:
            swept.update(group)
            if isinstance(reply, BaseException):
                continue
            full.extend(
                result.part
                for result in reply
                if isinstance(result, SweepResult) and len(result.cancelled) + len(result.dropped) >= limit
            )
        if not full:
            return []
        others = [part for part, head in enumerate(self._heads) if head <= now and part not in swept]
        return sorted(full + others)

    async def _settle(self, sweep: _Sweep, *, ahead: bool = False) -> None:
        """Absorb each part's result, letting other tasks run before each
        part while a round trip sent ahead is on its way (`ahead`: its task
        needs a few turns of the loop to write the request, and a full
        round trip carries thousands of orders), else once about
        SETTLE_SLICE orders were absorbed."""
        failed: list[tuple[list[int], BaseException]] = []
        absorbed = 0  # orders since the last turn of the loop
        for group, limit, reply, received in sweep:
            if isinstance(reply, BaseException):
                failed.append((group, reply))
            else:
                absorbed = await self._settle_shard(group, limit, reply, received, absorbed, ahead)
        for _, exc in failed:
            if not is_transient(exc):
                raise exc
        if failed and len(failed) == len(sweep.groups):
            raise failed[0][1]
        self.service.ok()
        for group, exc in failed:
            self._retry_later(group, exc)

    async def _settle_shard(
        self,
        group: list[int],
        limit: int,
        reply: list[SweepResult | ResponseError],
        received: float,
        absorbed: int,
        ahead: bool,
    ) -> int:
        """Absorb one shard's reply (see _settle); `absorbed`: the orders since
        the last turn of the loop, before and (returned) after."""
        swept: list[int] = []
        clock_us = _clock_of(reply)
        for part, result in zip(group, reply, strict=True):
            size = len(result.cancelled) + len(result.dropped) if isinstance(result, SweepResult) else 0
            if ahead or (absorbed and absorbed + size > SETTLE_SLICE):
                await asyncio.sleep(0)
                absorbed = 0
            absorbed += size
            if isinstance(result, SweepResult):
                self._absorb([result], limit, received, clock_us)
                swept.append(part)
            else:
                self._refused(part, result)
        self._recovered(swept)
        return absorbed

    def _retry_later(self, parts: list[int], exc: BaseException) -> None:
        if not any(part in self._retries for part in parts):
            log.warning(
                "a shard is unavailable; its parts are retried with backoff, the others go on",
                parts=parts,
                error=describe(exc),
            )
        now = time.monotonic()
        for part in parts:
            self._heads[part] = now + next(self._retries.setdefault(part, delays(5.0)))

    def _refused(self, part: int, exc: Exception) -> None:
        """The sweep script failed on what it found in `part` (data no script
        wrote, such as a key of the wrong type): an error line, and the part is
        retried with backoff while the others go on (its orders' expired
        events still cancel them one by one)."""
        if part not in self._retries:
            log.error(
                "the sweep failed on the data of a part; retrying it with backoff, the others go on",
                part=part,
                error=describe(exc),
            )
        self._heads[part] = time.monotonic() + next(self._retries.setdefault(part, delays(5.0)))

    def _recovered(self, parts: list[int]) -> None:
        if any(part in self._retries for part in parts):
            log.info("the shard's parts are swept again", parts=parts)
        for part in parts:
            self._retries.pop(part, None)

    def _limit(self, parts: int) -> int:
        """Orders per part in a round trip that sweeps `parts` parts of a shard."""
        return max(1, min(self.batch, ROUND_TRIP_ORDERS // parts))

    def _absorb_all(self, sweep: _Sweep) -> None:
        """Absorb at once what a round trip sent ahead cancelled, while the
        scheduler fails or is cancelled: its scripts ran, so their
        cancellations are logged, counted and remembered all the same. A
        failure here is logged: the caller's own exception is the one raised."""
        try:
            for _, limit, reply, received in sweep:
                if not isinstance(reply, BaseException):
                    results = [result for result in reply if isinstance(result, SweepResult)]
                    self._absorb(results, limit, received, _clock_of(reply))
        except Exception as exc:
            log.error("could not absorb the round trip sent ahead", error=describe(exc))

    def _absorb(
        self,
        results: list[SweepResult],
        limit: int,
        received: float | None = None,
        clock_us: int | None = None,
    ) -> None:
        """Log, count and remember what `results` cancelled and set each part's
        next head. `received`: time.monotonic() when the reply was read (now
        if not given); `clock_us`: the Redis clock of the reply's last script
        (each result's own if not given). The two time the parts' clock."""
        if received is None:
            received = time.monotonic()
        cancel_log = log.bind()  # the configured logger, resolved once per reply, not per order
        for result in results:
            # A round trip's scripts run one after the other and its reply is
            # read when the last one is done: each part of a shard is timed
            # from the last script's clock, which is the node's. The offset
            # errs late by the time the reply took to be read (a tenth of a
            # millisecond when the loop is idle).
            now_us = result.now_us if clock_us is None else clock_us
            self._offsets[result.part] = now_us / 1e6 - received
            for order_id, deadline_ms in result.cancelled:
                self.cancelled += 1
                self.recent[order_id] = None
                if len(self.recent) > RECENT_MAX:
                    self.recent.popitem(last=False)
                cancel_log.info(
                    "order cancelled",
                    order_id=order_id,
                    reason="timeout",
                    lag_ms=result.now_ms - deadline_ms,
                    via="deadline",
                )
                if self.on_cancelled is not None:
                    self.on_cancelled(order_id, deadline_ms, result.now_ms)
            for order_id, problem in result.dropped:
                self.dropped += 1
                shown = order_id if len(order_id) <= SHOWN_ID_MAX else f"{order_id[:SHOWN_ID_MAX]}..."
                log.error(
                    "order not cancelled: its record is unusable; taken out of the deadline index, "
                    "the record is left as it is",
                    order_id=shown,
                    part=result.part,
                    problem=problem,
                )
                if self.on_dropped is not None:
                    self.on_dropped(order_id, problem)
            self._heads[result.part] = min(self._next_head(result, limit), self._woken[result.part])

    def _next_head(self, result: SweepResult, limit: int) -> float:
        if len(result.cancelled) + len(result.dropped) >= limit:
            return 0.0  # more due: go again at once
        if result.next_deadline_ms is None:
            return math.inf
        if result.next_deadline_ms <= result.now_ms:
            return 0.0
        return self._local(result.part, result.next_deadline_ms)  # from this reply's clock, to the µs
