"""The scheduler's alarm and its timing from the Redis clock (no servers)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from unittest.mock import MagicMock

import pytest
from redis.exceptions import ResponseError

from listener.alarm import Alarm
from listener.scheduler import ROUND_TRIP_ORDERS, SETTLE_SLICE, DeadlineScheduler, _Sweep
from listener.store import SweepResult
from listener.supervise import Service


async def test_the_alarm_rings_once_at_the_time_last_set_never_before() -> None:
    rang: list[float] = []
    rung = asyncio.Event()

    def ring() -> None:
        rang.append(time.monotonic())
        rung.set()

    alarm = Alarm(asyncio.get_running_loop(), ring)
    try:
        start = time.monotonic()
        alarm.set(start + 10.0)
        when = start + 0.05
        alarm.set(when)  # an earlier deadline replaces the later one
        await asyncio.wait_for(rung.wait(), 2.0)
        await asyncio.sleep(0.1)
        assert len(rang) == 1  # once: the earlier setting is gone, not queued
        assert rang[0] >= when
    finally:
        alarm.close()


async def test_a_closed_alarm_does_not_ring() -> None:
    rang: list[float] = []
    alarm = Alarm(asyncio.get_running_loop(), lambda: rang.append(time.monotonic()))
    alarm.set(time.monotonic() + 0.05)
    alarm.close()
    await asyncio.sleep(0.1)
    assert rang == []


def test_a_sleep_is_timed_from_the_sweeps_microsecond_clock() -> None:
    """A deadline 5 ms after the sweep's Redis clock is due 5 ms after the reply
    was read, whatever millisecond fraction the clock was at."""
    scheduler = DeadlineScheduler(MagicMock(), Service("redis"))
    now_ms, micros = 1_800_000_000_123, 900  # Redis at ...123.9 ms
    before = time.monotonic()
    scheduler._absorb([SweepResult(3, now_ms, now_ms * 1000 + micros, now_ms + 5, [])], scheduler.batch)
    after = time.monotonic()
    head = scheduler._heads[3]
    assert before + 0.0041 <= head <= after + 0.0041  # 5 ms - 0.9 ms, not 5 ms
    assert scheduler._offsets[4] is None  # each part has its own node's clock


def test_a_round_trip_sweeps_at_most_its_share_of_orders_per_part() -> None:
    """A burst: each due part of a shard gets its share of ROUND_TRIP_ORDERS
    (Redis serves no other client during a round trip), and a part that
    returned its full share has more due, so it is swept again at once."""
    scheduler = DeadlineScheduler(MagicMock(), Service("redis"), batch=1000)
    assert ROUND_TRIP_ORDERS == 4000
    assert [scheduler._limit(parts) for parts in (1, 4, 8, 16)] == [1000, 1000, 500, 250]
    now_ms = 1_800_000_000_000
    full = [(f"o-{n}", now_ms - 10) for n in range(250)]
    scheduler._absorb([SweepResult(3, now_ms, now_ms * 1000, now_ms + 60_000, full)], 250)
    assert scheduler._heads[3] == 0.0, "its share was full: more is due"
    scheduler._absorb([SweepResult(4, now_ms, now_ms * 1000, now_ms + 60_000, full[:249])], 250)
    assert scheduler._heads[4] > time.monotonic() + 50, "the rest waits for its deadline"


def test_the_round_trip_sent_ahead_takes_the_full_parts_and_the_others_due() -> None:
    """While a reply is absorbed the next round trip is already asked for: the
    parts whose share came back full, plus any part not in that round trip
    whose deadline has come meanwhile; none when no part came back full (the
    burst is over: the scheduler's own loop takes it from there)."""

    scheduler = DeadlineScheduler(MagicMock(), Service("redis"), batch=1000)
    now_ms = 1_800_000_000_000
    full = [(f"o-{n}", now_ms - 10) for n in range(500)]
    scheduler._heads = [float("inf")] * 16
    scheduler._heads[9] = 0.0  # came due while the round trip was under way
    scheduler._heads[4] = 0.0  # swept in this round trip: its reply decides
    replies = [
        SweepResult(3, now_ms, now_ms * 1000, None, full),
        SweepResult(4, now_ms, now_ms * 1000, None, full[:1]),
    ]
    sweep = _Sweep([[3, 4]], [500], [list(replies)], [0.0])
    assert scheduler._more_due(sweep) == [3, 9]
    quiet = _Sweep([[3, 4]], [500], [[replies[1], replies[1]]], [0.0])
    assert scheduler._more_due(quiet) == []
    lost = _Sweep([[3, 4]], [500], [ConnectionError("shard away")], [0.0])
    assert scheduler._more_due(lost) == []


NOW_MS = 1_800_000_000_000


def _store_of(sweeps: dict[int, list[SweepResult | Exception]], *, one_shard: bool = False) -> MagicMock:
    """A store whose every part is a shard of its own (or all in `one_shard`)
    and whose sweeps of a part answer `sweeps[part]` in turn (an exception is
    raised)."""
    store = MagicMock()
    store.by_shard = (lambda due: [due]) if one_shard else (lambda due: [[part] for part in due])

    async def try_sweep(group: list[int], limit: int) -> list[SweepResult]:
        answers = [sweeps[part].pop(0) for part in group]
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return [answer for answer in answers if isinstance(answer, SweepResult)]

    store.try_sweep = try_sweep
    return store


def _part_3_full_then_7_more(part_4: SweepResult | Exception, *, one_shard: bool = False) -> MagicMock:
    """Part 3's first sweep comes back full (500 of a batch of 500: `o-0`...),
    its next one with 7 more (`p-0`...); part 4 answers `part_4`."""
    full = [(f"o-{n}", NOW_MS - 10) for n in range(500)]
    more = [(f"p-{n}", NOW_MS - 10) for n in range(7)]
    return _store_of(
        {
            3: [
                SweepResult(3, NOW_MS, NOW_MS * 1000, None, full),
                SweepResult(3, NOW_MS, NOW_MS * 1000, None, more),
            ],
            4: [part_4],
        },
        one_shard=one_shard,
    )


async def test_a_wake_while_a_round_trip_is_under_way_is_not_undone_by_its_reply() -> None:
    """A create makes its order the earliest of a part just after the sweep
    emptied that part: the reply, absorbed later, says "nothing pending" but
    the wake's deadline stays the part's head."""
    now_ms = 1_800_000_000_000
    scheduler: DeadlineScheduler

    async def answer(group: list[int], limit: int) -> list[SweepResult]:
        scheduler.wake(3, now_ms + 50)  # arrives after Redis ran the sweep
        return [SweepResult(3, now_ms, now_ms * 1000, None, [])]

    store = MagicMock()
    store.by_shard = lambda due: [due]
    store.try_sweep = answer
    scheduler = DeadlineScheduler(store, Service("redis"))
    scheduler._offsets[3] = now_ms / 1000 - time.monotonic()
    woken = scheduler._local(3, now_ms + 50)
    await scheduler._settle(await scheduler._send([3]))
    assert scheduler._heads[3] == woken


async def test_a_parts_clock_is_timed_from_when_its_reply_was_read() -> None:
    """Absorbing the parts of a reply one by one takes time (and other tasks
    may run between them): each part's clock is timed from the reply's reading,
    and from the clock of the round trip's last script (part 3's ran first,
    400 µs earlier, but the reply came after part 4's)."""
    now_ms = 1_800_000_000_000

    def slow_hook(order_id: str, deadline_ms: int, at_ms: int) -> None:
        until = time.monotonic() + 0.05
        while time.monotonic() < until:  # a slow absorb of part 3
            pass

    scheduler = DeadlineScheduler(MagicMock(), Service("redis"), on_cancelled=slow_hook)
    read_at = time.monotonic()
    replies: list[SweepResult | ResponseError] = [
        SweepResult(3, now_ms, now_ms * 1000, None, [("o-1", now_ms - 1)]),
        SweepResult(4, now_ms, now_ms * 1000 + 400, None, []),
    ]
    await scheduler._settle(_Sweep([[3, 4]], [1000], [replies], [read_at]))
    assert scheduler._offsets[3] == scheduler._offsets[4] == (now_ms * 1000 + 400) / 1e6 - read_at


async def test_a_trickles_reply_is_absorbed_in_one_turn_and_a_bursts_a_slice_at_a_time() -> None:
    """Each turn of the loop the scheduler gives away can wait behind another
    task's step while the next deadlines pass. A reply of 16 parts with an
    order each is absorbed without giving one away; 16 parts of 250 orders
    give one between slices of SETTLE_SLICE; while a round trip sent ahead is
    on its way, one goes before each part (its task needs a few turns to
    write its request: test_sweep_rounds.py)."""
    now_ms = 1_800_000_000_000
    scheduler = DeadlineScheduler(MagicMock(), Service("redis"))
    parts = list(range(16))

    def sweep(per_part: int) -> _Sweep:
        replies: list[SweepResult | ResponseError] = [
            SweepResult(
                part, now_ms, now_ms * 1000, None, [(f"o-{part}-{i}", now_ms - 1) for i in range(per_part)]
            )
            for part in parts
        ]
        return _Sweep([parts], [1000], [replies], [time.monotonic()])

    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    async def turns_given(settle: Awaitable[None]) -> int:
        before = turns
        await settle
        return turns - before

    other = asyncio.create_task(other_task())
    try:
        await asyncio.sleep(0)  # the other task is at its first sleep
        assert await turns_given(scheduler._settle(sweep(1))) == 0
        assert await turns_given(scheduler._settle(sweep(1), ahead=True)) == 16
        assert SETTLE_SLICE < 2 * 250  # so each part after the first starts a slice
        assert await turns_given(scheduler._settle(sweep(250))) == 15
    finally:
        other.cancel()
    assert scheduler.cancelled == 16 + 16 + 16 * 250


async def test_a_round_trip_sent_ahead_is_absorbed_when_the_one_before_fails() -> None:
    """Part 3 came back full, so its next round trip went ahead; part 4's
    shard answered with a bug, which ends the session. The round trip sent
    ahead ran in Redis: its cancellations are counted and remembered too."""
    store = _part_3_full_then_7_more(RuntimeError("a bug in a reply's handling"))
    scheduler = DeadlineScheduler(store, Service("redis"), batch=500)
    with pytest.raises(RuntimeError):
        await scheduler._sweep_by_shard([3, 4])
    assert scheduler.cancelled == 507
    assert "p-6" in scheduler.recent


async def test_a_round_trip_sent_ahead_whose_reply_is_in_is_absorbed_when_the_scheduler_is_cancelled() -> (
    None
):
    """The daemon's shutdown cancels the scheduler while it absorbs a reply;
    the round trip sent ahead has answered already (its scripts ran): its
    cancellations are counted and remembered before the cancellation goes on."""
    # one shard: parts 3 and 4 in one round trip
    store = _part_3_full_then_7_more(SweepResult(4, NOW_MS, NOW_MS * 1000, None, []), one_shard=True)

    def cancel_at_first(order_id: str, deadline_ms: int, at_ms: int) -> None:
        if order_id == "o-0":
            sweeping.cancel()  # lands at the next await: the yield before part 4

    scheduler = DeadlineScheduler(store, Service("redis"), batch=500, on_cancelled=cancel_at_first)
    sweeping = asyncio.create_task(scheduler._sweep_by_shard([3, 4]))
    with pytest.raises(asyncio.CancelledError):
        await sweeping
    assert scheduler.cancelled == 507
    assert "p-6" in scheduler.recent
