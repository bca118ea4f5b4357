"""The scheduler's round trips to a real Redis in a catch-up: the next one is
under way while a reply is being absorbed."""

from __future__ import annotations

import asyncio
import contextlib
import time

import redis as sync_redis
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.keys import PARTS, KeyLayout
from listener.scheduler import DeadlineScheduler
from listener.supervise import Service
from tests.conftest import redis_clock_past, wait_until

ORDERS = 400
BATCH = 5  # per part and round trip: a catch-up of many round trips


def pending_in(client: sync_redis.Redis, layout: KeyLayout) -> int:
    pipe = client.pipeline(transaction=False)
    for part in range(PARTS):
        pipe.zcard(layout.deadlines(part))
    return sum(int(n) for n in pipe.execute())


async def test_the_next_round_trip_sweeps_in_redis_while_a_reply_is_absorbed(
    redis: Redis, settings: Settings
) -> None:
    """The cancellation hook blocks the event loop at the last order of the
    first reply (its 16 parts absorbed one by one, other tasks running in
    between) and watches Redis from another connection: the orders still
    pending drop below what the first round trip left, so the next round
    trip was sent before that reply was absorbed. (Sent only after it, as
    before, the count would stand still until the hook gave up.)"""
    layout = KeyLayout(settings.key_prefix)
    ids = [f"rt-{i:04d}" for i in range(ORDERS)]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 0.2) for oid in ids])
        last = max([(await client.get(oid)).deadline_ms for oid in ids])
        await wait_until(lambda: redis_clock_past(client, last), 5, "every order due")
    watcher = sync_redis.Redis.from_url(settings.redis_url)
    left_by_first = ORDERS - PARTS * BATCH  # every part has more than BATCH orders
    seen: list[int] = []  # orders pending while the first reply's last order is absorbed
    calls = 0

    def on_cancelled(order_id: str, deadline_ms: int, at_ms: int) -> None:
        nonlocal calls
        calls += 1
        if calls != PARTS * BATCH:
            return
        give_up = time.monotonic() + 2.0  # well within the client's socket timeout (5 s)
        while time.monotonic() < give_up:
            seen.append(pending_in(watcher, layout))
            if seen[-1] < left_by_first:
                break
            time.sleep(0.002)  # the loop is held on purpose: only Redis can move

    async with OrderClient(settings) as client:
        store = await client.opened()
        scheduler = DeadlineScheduler(store, Service("redis"), batch=BATCH, on_cancelled=on_cancelled)
        running = asyncio.create_task(scheduler.run())
        try:
            await wait_until(lambda: scheduler.cancelled == ORDERS, 20, "every order cancelled")
        finally:
            scheduler.stop()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(running, 5)
    assert seen and seen[-1] < left_by_first
    assert pending_in(watcher, layout) == 0
    async with OrderClient(settings) as client:
        statuses = {str((await client.get(oid)).status) for oid in ids}
    assert statuses == {"cancelled"}
    assert scheduler.cancelled == ORDERS  # each once
    watcher.close()
