"""What a lane's session leaves behind when it ends, each end brought about
for real: a stop with the broker away, a stop with Redis away, Redis lost
while publishes await their PUBACK, a delete Redis refuses. (Not run a second
time with the fast paths off, as test_faults.py is: these are about the
outbox's bookkeeping at a session's end, which both paths share.)"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.outbox_pump import Deletes
from listener.servers import ServerProcess, mosquitto
from tests.conftest import Subscriber, wait_until, watch_topic
from tests.life import lanes_barrier


async def _run_then_stop(
    config: Settings, meanwhile: Callable[[Daemon], Awaitable[None]]
) -> tuple[float, list[MutableMapping[str, Any]]]:
    """Run a daemon, do `meanwhile`, stop it: how long the stop took, and its log."""
    daemon = Daemon(config)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logged:
        task = asyncio.create_task(daemon.run(stop))
        await asyncio.wait_for(daemon.ready.wait(), 20)
        await meanwhile(daemon)
        began = time.monotonic()
        stop.set()
        await asyncio.wait_for(task, 30)
    return time.monotonic() - began, logged


async def test_a_stop_while_the_broker_is_away_waits_only_when_events_are_left(
    settings: Settings, workdir: Path
) -> None:
    """The broker goes away. A stop with nothing left to publish does not wait
    for it (the outbox's half of the shutdown timeout, 3 s here) and warns of
    nothing. A stop with events left waits for the broker that long, says how
    many stay in Redis, and the next daemon publishes them."""
    broker = mosquitto(workdir / f"away-{random.randrange(10**9)}")
    broker.start()
    config = dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{broker.port}", shutdown_timeout=6.0)
    order_id = f"away-{random.randrange(10**9)}"
    left_warning = "stopped before the outbox was empty; the events stay in Redis"

    async def broker_gone(daemon: Daemon) -> None:
        broker.stop()
        await wait_until(lambda: not daemon.link.connected.is_set(), 10, "the daemon to lose the broker")

    async def broker_gone_then_an_order_cancelled(daemon: Daemon) -> None:
        await broker_gone(daemon)
        async with OrderClient(config) as client:
            await client.create(order_id, timeout=0.3)

            async def cancelled() -> bool:
                return str((await client.get(order_id)).status) == "cancelled"

            await wait_until(cancelled, 10, "the order cancelled in Redis")

    try:
        took, logged = await _run_then_stop(config, broker_gone)
        assert took < 2.5, f"the stop waited {took:.1f} s for a broker with nothing to publish"
        assert not [line for line in logged if line["event"] == left_warning]

        broker.start()
        took, logged = await _run_then_stop(config, broker_gone_then_an_order_cancelled)
        assert took >= 3.0, f"the stop gave up on the broker after {took:.1f} s, with events left"
        (warning,) = [line for line in logged if line["event"] == left_warning]
        assert warning["unpublished"] == 2  # the order's `created` and `cancelled` events

        broker.start()
        async with watch_topic(config, f"{config.topic_prefix}/{order_id}/status", f"{order_id}-w") as seen:

            async def published(daemon: Daemon) -> None:
                await wait_until(
                    lambda: [r.event["status"] for r in seen] == ["created", "cancelled"], 20, "both events"
                )

            await _run_then_stop(config, published)
    finally:
        broker.stop()


async def test_a_delete_that_fails_at_a_sessions_end_is_a_warning_with_its_count(
    settings: Settings, redis: Redis, start_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    """When a lane's session ends, what the broker acknowledged is deleted; if
    that delete fails, the next session sends those events again (with the
    same event ids). Operators see it: a warning with how many entries."""
    daemon = await start_daemon()
    key = f"{settings.key_prefix}:not-a-stream-{random.randrange(10**9)}"
    await redis.set(key, "x")  # XDEL on it: WRONGTYPE
    deletes = Deletes(upto={key: b"1-3"}, ids={key: [b"1-1", b"1-2"]}, early={key: [b"1-3"]})
    with structlog.testing.capture_logs() as logged:
        await daemon.outbox._forget(deletes)
        await wait_until(lambda: not daemon.outbox.forgetting, 5, "the delete to end")
    (warning,) = [line for line in logged if line["event"].startswith("could not delete published entries")]
    assert warning["log_level"] == "warning"
    assert warning["entries"] == 3
    assert "WRONGTYPE" in warning["error"]


async def _acknowledged_while_redis_is_away(
    daemon: Daemon,
    settings: Settings,
    ids: list[str],
    in_flight: int,
    redis_server_proc: ServerProcess,
    mqtt_server_proc: ServerProcess,
) -> None:
    """With the broker frozen, orders `ids` are created and `in_flight` of
    their `created` events sent; Redis is stopped, the lane's session ends,
    the broker runs again and acknowledges them while Redis stays away: the
    daemon keeps their deletes. (Redis is left stopped.)"""
    assert mqtt_server_proc.proc is not None
    mqtt_server_proc.proc.send_signal(signal.SIGSTOP)
    try:
        async with OrderClient(settings) as client:
            await client.create_many([(oid, 120.0) for oid in ids])
        pumps = daemon.outbox.pumps
        await wait_until(lambda: sum(pump.open for pump in pumps) == in_flight, 10, "the publishes")
        redis_server_proc.stop()
        await wait_until(lambda: not daemon.outbox.pumps, 10, "the session to end")
    finally:
        mqtt_server_proc.proc.send_signal(signal.SIGCONT)
    await wait_until(lambda: daemon.outbox.left_over.entries() == in_flight, 10, "the deletes kept")


@pytest.mark.parametrize("orders", [50, 400], ids=["room-left", "window-full"])
async def test_a_session_cut_short_by_redis_deletes_what_the_broker_acknowledged_after(
    orders: int,
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    redis_server_proc: ServerProcess,
    mqtt_server_proc: ServerProcess,
) -> None:
    """Redis goes away while publishes await their PUBACK (the broker is
    frozen, so they wait for sure). The lane's session ends; the PUBACKs come
    once the broker runs again, while Redis is still away, so their deletes
    cannot be sent then. They go before the lane's next read, once Redis is
    back: no event is published twice.

    `room-left`: every event in flight, the reader goes on reading and its
    read fails. `window-full`: more events than the broker's window, so the
    reader waits for a PUBACK and only learns from the lease keeper that
    Redis is gone: its lanes start over, and the PUBACKs of what went
    before are still taken as published."""
    await redis.config_set("appendonly", "yes")  # as in redis.conf: the entries outlive the restart
    daemon = await start_daemon()
    publishers = (await daemon.link.connection()).publishers
    ids = [f"cut-{orders}-{i:03d}" for i in range(orders)]
    in_flight = min(orders, sum(publisher.window for publisher in publishers))
    try:
        await _acknowledged_while_redis_is_away(
            daemon, settings, ids, in_flight, redis_server_proc, mqtt_server_proc
        )
    finally:
        redis_server_proc.start()  # (if it runs, nothing happens; also for the tests after this one)
    await wait_until(lambda: bool(daemon.outbox.pumps), 20, "the lanes to read again")
    async with OrderClient(settings) as client:
        markers = await lanes_barrier(client, subscriber, ids)  # a second publication comes before these
    created = Counter(
        e["order_id"] for e in subscriber.with_status("created") if e["order_id"] not in markers
    )
    assert created == dict.fromkeys(ids, 1)


async def test_a_stop_with_redis_away_warns_of_the_deletes_it_could_not_send(
    settings: Settings,
    subscriber: Subscriber,
    redis_server_proc: ServerProcess,
    mqtt_server_proc: ServerProcess,
) -> None:
    """As above, but the daemon stops before Redis is back: it says how many
    published entries it could not delete, and the next daemon sends those
    events again, with the same event ids (at least once)."""
    config = dataclasses.replace(settings, shutdown_timeout=4.0)
    ids = [f"away-{i:03d}" for i in range(20)]  # all in flight: fewer than the window

    async def acknowledged_with_redis_away(daemon: Daemon) -> None:
        await _acknowledged_while_redis_is_away(
            daemon, config, ids, len(ids), redis_server_proc, mqtt_server_proc
        )

    try:
        _, logged = await _run_then_stop(config, acknowledged_with_redis_away)
    finally:
        redis_server_proc.start()
    (warning,) = [line for line in logged if line["event"].startswith("could not delete published entries")]
    assert warning["entries"] == len(ids)
    first = {e["order_id"]: e["event_id"] for e in subscriber.with_status("created")}

    async def sent_again(daemon: Daemon) -> None:
        await wait_until(lambda: len(subscriber.with_status("created")) == 2 * len(ids), 10, "the repeats")

    await _run_then_stop(config, sent_again)
    again = [e for e in subscriber.with_status("created") if e["order_id"] in ids]
    assert Counter(e["order_id"] for e in again) == dict.fromkeys(ids, 2)
    assert all(e["event_id"] == first[e["order_id"]] for e in again)
