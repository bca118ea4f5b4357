"""Cancellations before announcements: the hold the outbox readers keep while
the scheduler is behind (listener/catch_up.py), then end to end with a
daemon, a real Redis and a real mosquitto: a burst's events go out once it
is cancelled, or beside the sweeps once the hold ran out."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import pytest
import structlog

from listener import catch_up as catch_up_module
from listener.api import OrderClient
from listener.catch_up import CatchUp
from listener.config import Settings
from listener.daemon import Daemon
from listener.keys import PARTS
from listener.scheduler import DeadlineScheduler
from listener.supervise import Service
from tests.conftest import Received, redis_clock_past, wait_until, watch_topic

CAP_LINE = "still catching up with the deadlines: announcing beside the cancellations from now on"


async def test_no_hold_while_the_scheduler_is_not_behind() -> None:
    catch_up = CatchUp(hold_max_s=60)
    assert catch_up.hold_left() == 0
    assert catch_up.behind_s() == 0
    await asyncio.wait_for(catch_up.wait(asyncio.Event()), 1)
    assert catch_up.holds == 0, "a reader that is not held does not wait at all"


async def test_a_hold_lasts_until_the_catch_up_ends() -> None:
    catch_up = CatchUp(hold_max_s=60)
    catch_up.begin()
    since = catch_up.since
    assert since is not None and 59 < catch_up.hold_left() <= 60
    catch_up.begin()  # another full round trip of the same catch-up
    assert catch_up.since == since, "the hold counts from the start of the catch-up"
    waiting = asyncio.create_task(catch_up.wait(asyncio.Event()))
    await wait_until(lambda: catch_up.holds == 1, 5, "the reader waits")
    assert not waiting.done()
    catch_up.end()
    await asyncio.wait_for(waiting, 1)
    assert catch_up.since is None and catch_up.hold_left() == 0
    behind = catch_up.behind_s()
    assert behind > 0
    assert catch_up.behind_s() == behind, "a catch-up that ended counts no further"


async def test_a_stopping_reader_is_not_held() -> None:
    catch_up = CatchUp(hold_max_s=60)
    catch_up.begin()
    stopping = asyncio.Event()
    waiting = asyncio.create_task(catch_up.wait(stopping))
    await wait_until(lambda: catch_up.holds == 1, 5, "the reader waits")
    stopping.set()
    await asyncio.wait_for(waiting, 1)
    assert catch_up.since is not None, "the catch-up itself goes on"
    await asyncio.wait_for(catch_up.wait(stopping), 1)  # and a reader that stops is not held again
    assert catch_up.holds == 1


async def test_the_hold_runs_out_once_per_catch_up_with_one_line() -> None:
    catch_up = CatchUp(hold_max_s=0.05)
    with structlog.testing.capture_logs() as logged:
        catch_up.begin()
        began = time.monotonic()
        await asyncio.wait_for(catch_up.wait(asyncio.Event()), 5)
        assert time.monotonic() - began >= 0.05
        assert catch_up.since is not None and catch_up.hold_left() == 0
        await asyncio.wait_for(catch_up.wait(asyncio.Event()), 1)  # held no longer
        catch_up.end()
        catch_up.begin()  # the next catch-up holds again, and may say so again
        await asyncio.wait_for(catch_up.wait(asyncio.Event()), 5)
    assert catch_up.holds == 2
    lines = [entry for entry in logged if entry["event"] == CAP_LINE]
    assert len(lines) == 2 and all(entry["behind_s"] >= 0.05 for entry in lines)


@pytest.mark.parametrize(("orders", "behind"), [(4, False), (40 * PARTS, True)])
async def test_the_scheduler_is_behind_while_its_round_trips_come_back_full(
    settings: Settings, orders: int, behind: bool
) -> None:
    """A real Redis, orders all due: with more than a round trip cancels
    (5 a part) the catch-up is on while they are absorbed and off once every
    one is cancelled; with fewer than that in any part (4 in all) it never
    begins."""
    tag = f"sb{random.randrange(10**6)}"
    ids = [f"{tag}-{n}" for n in range(orders)]
    async with OrderClient(settings) as client:
        await client.create_many([(order_id, 0.2) for order_id in ids])
        last = max([(await client.get(order_id)).deadline_ms or 0 for order_id in ids])
        await wait_until(lambda: redis_clock_past(client, last), 5, "every order due")
        seen: list[bool] = []  # catch-up on, as each cancellation was absorbed
        scheduler: DeadlineScheduler | None = None

        def on_cancelled(_order_id: str, _deadline_ms: int, _at_ms: int) -> None:
            assert scheduler is not None
            seen.append(scheduler.catch_up.since is not None)

        scheduler = DeadlineScheduler(
            await client.opened(), Service("redis"), batch=5, on_cancelled=on_cancelled
        )
        running = asyncio.create_task(scheduler.run())
        try:
            await wait_until(lambda: scheduler.cancelled == orders, 20, "every order cancelled")
            await wait_until(lambda: scheduler.catch_up.since is None, 5, "the catch-up over")
        finally:
            scheduler.stop()
            await asyncio.wait_for(running, 5)
    assert len(seen) == orders
    assert any(seen) is behind
    assert scheduler.catch_up.hold_left() == 0


# -- end to end ----------------------------------------------------------------

ORDERS = 2000
LEAD_MS = 1500  # the orders' common deadline: time to create them and publish their `created` events


def at_s(received: Received) -> float:
    """The Unix time an event says its order changed (Redis' clock, to the ms)."""
    return datetime.fromisoformat(received.event["at"].replace("Z", "+00:00")).timestamp()


async def burst(config: Settings, tag: str) -> list[Received]:
    """ORDERS orders falling due in the same millisecond; their `cancelled`
    events as the test's subscriber received them."""
    ids = [f"{tag}-{n}" for n in range(ORDERS)]
    async with watch_topic(config, f"{config.topic_prefix}/+/status", f"{tag}-watch") as seen:
        async with OrderClient(config) as orders:
            deadline_ms = await (await orders.opened()).now_ms() + LEAD_MS
            for start in range(0, ORDERS, 500):
                now_ms = await (await orders.opened()).now_ms()
                chunk = [(order_id, deadline_ms - now_ms) for order_id in ids[start : start + 500]]
                made = await orders.create_prepared(chunk)
                assert len(made.created) == len(chunk)
        await wait_until(
            lambda: sum(r.event["status"] == "cancelled" for r in seen) >= ORDERS,
            60,
            lambda: f"{sum(r.event['status'] == 'cancelled' for r in seen)} of {ORDERS} received",
        )
    cancelled = [r for r in seen if r.event["status"] == "cancelled"]
    assert sorted(r.event["order_id"] for r in cancelled) == sorted(ids), "each order's once"
    return cancelled


def received_before_the_end(cancelled: list[Received]) -> int:
    """How many of the burst's events reached the subscriber before its last
    order was cancelled in Redis (the clocks are this machine's, to the ms)."""
    last_cancelled = max(at_s(r) for r in cancelled)
    return sum(r.at < last_cancelled - 0.002 for r in cancelled)


async def test_a_burst_is_announced_once_it_is_cancelled(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    """One order a part per round trip: the burst takes the scheduler many
    round trips, and its events reach the subscriber once the last order is
    cancelled in Redis. Only the first round trip's may go before: the
    scheduler knows it is behind when that reply comes back full. (Published
    as they were cancelled, nearly all would arrive before the end.)"""
    config = dataclasses.replace(settings, sweep_batch=1)
    daemon = await start_daemon(config)
    cancelled = await burst(config, f"cu{random.randrange(10**6)}")
    early = received_before_the_end(cancelled)
    assert early <= PARTS, f"{early} events announced before the burst was cancelled"
    assert daemon.scheduler.catch_up.holds > 0 and daemon.scheduler.catch_up.since is None
    behind = daemon.scheduler.catch_up.behind_s()
    assert behind > 0
    assert f"order_listener_catch_up_seconds_total {behind}" in daemon.metrics.render().decode()


async def test_a_catch_up_longer_than_the_hold_is_announced_beside_the_sweeps(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a hold far shorter than the burst takes, events reach the
    subscriber while orders are still being cancelled."""
    monkeypatch.setattr(catch_up_module, "HOLD_MAX_S", 0.02)
    config = dataclasses.replace(settings, sweep_batch=1)
    daemon = await start_daemon(config)
    assert daemon.scheduler.catch_up.hold_max_s == 0.02
    cancelled = await burst(config, f"cx{random.randrange(10**6)}")
    early = received_before_the_end(cancelled)
    assert early > 4 * PARTS, f"only {early} events went out before the burst was cancelled"
