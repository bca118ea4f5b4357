"""The scheduler's alarm and its reading of the Redis clock (no servers)."""

from __future__ import annotations

import asyncio
import time
from unittest.mock import MagicMock

from listener.alarm import Alarm
from listener.scheduler import CLOCK_STEP, DeadlineScheduler
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


def test_the_clock_offset_keeps_the_least_delayed_reading_and_follows_a_step_back() -> None:
    scheduler = DeadlineScheduler(MagicMock(), Service("redis"))
    scheduler._learn_clock(3, 100.000)
    scheduler._learn_clock(3, 99.9995)  # read later after the fact: errs late, ignored
    assert scheduler._offsets[3] == 100.000
    scheduler._learn_clock(3, 100.0004)  # a quicker reading: better
    assert scheduler._offsets[3] == 100.0004
    scheduler._learn_clock(3, 100.0004 - CLOCK_STEP - 0.001)  # the clock was set back
    assert scheduler._offsets[3] == 100.0004 - CLOCK_STEP - 0.001
    assert scheduler._offsets[4] is None  # each part has its own node's clock
    # a deadline converts on the part's clock: Redis ms -> our monotonic seconds
    assert abs(scheduler._local(3, 200_000) - (200.0 - scheduler._offsets[3])) < 1e-9
