"""The outbox against a broker as shops install it (mosquitto's defaults:
Receive Maximum 20, Nagle on): a backlog of `created` events never delays a
cancellation, an order's events stay in version order while the window is
full, and `check` reports what such a broker holds back."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from redis.asyncio import Connection

from listener.api import OrderClient
from listener.config import Settings, load_settings
from listener.daemon import Daemon
from listener.keys import part_of
from listener.mqtt import MqttLink
from listener.mqtt.link import connections_for
from listener.outbox_pump import AUTO_RATE, auto_rate
from listener.servers import ServerProcess, mosquitto
from listener.supervise import Service
from tests.conftest import CliResult, env_for, wait_until, watch_topic

BACKLOG = 5000
BUSY_BACKLOG = 3000
BUSY_AHEAD = 1000  # read ahead, waiting for the window, when Redis is held
HOLD_MS = 1000
# Holds Redis for ARGV[1] ms (by its clock): no other client is served meanwhile.
HOLD_SCRIPT = """
local function now() local t = redis.call('TIME') return t[1] * 1000 + t[2] / 1000 end
local until_ms = now() + tonumber(ARGV[1])
while now() < until_ms do end
return 1
"""
STOCK_RECEIVE_MAXIMUM = 20  # mosquitto's default max_inflight_messages


@pytest.fixture
def stock_broker(workdir: Path) -> Iterator[ServerProcess]:
    """A mosquitto of its own with the stock performance settings (no queue
    limit, so the test's own subscriber loses nothing)."""
    broker = mosquitto(workdir / f"stock-{random.randrange(10**9)}", profile="stock")
    broker.start()
    yield broker
    broker.stop()


def on_broker(settings: Settings, broker: ServerProcess) -> Settings:
    return dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{broker.port}")


async def test_a_cancellation_overtakes_a_created_backlog_and_keeps_its_order(
    settings: Settings,
    stock_broker: ServerProcess,
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    config = on_broker(settings, stock_broker)
    daemon = await start_daemon(config)
    tag = f"win{random.randrange(10**6)}"
    ids = [f"{tag}-{n}" for n in range(BACKLOG)]
    last = ids[-1]
    async with watch_topic(config, f"{config.topic_prefix}/+/status", f"{tag}-watch") as seen:
        assert stock_broker.proc is not None
        # The broker stops taking publishes: the whole backlog waits in Redis,
        # a window's worth of it in flight, when the customer cancels.
        stock_broker.proc.send_signal(signal.SIGSTOP)
        try:
            async with OrderClient(config) as orders:
                result = await orders.create_many([(order_id, 600) for order_id in ids])
                assert len(result.created) == BACKLOG
                assert (await orders.cancel(last)).status == "cancelled"
        finally:
            stock_broker.proc.send_signal(signal.SIGCONT)
        await wait_until(lambda: len(seen) >= BACKLOG + 1, 60, "the backlog and the cancellation received")
    # What the cancellation waited behind on its own connection (the others'
    # events reach the subscriber in any order beside it): at most what was in
    # flight there (the broker's Receive Maximum) and a window read ahead.
    connections = daemon.link.count
    assert connections == connections_for(STOCK_RECEIVE_MAXIMUM) > 1, "auto spreads the lanes"
    mine = part_of(last) % connections
    statuses = [
        (r.event["order_id"], r.event["status"])
        for r in seen
        if part_of(r.event["order_id"]) % connections == mine
    ]
    position = statuses.index((last, "cancelled"))
    window = STOCK_RECEIVE_MAXIMUM
    assert position < 2 * window + 2, f"the cancellation waited behind {position} events of the backlog"
    assert [r.event["version"] for r in seen if r.event["order_id"] == last] == [1, 2]
    assert len({r.event["event_id"] for r in seen}) == BACKLOG + 1, "every event once"
    assert daemon.outbox.published >= BACKLOG + 1


async def test_a_read_waiting_in_redis_does_not_idle_the_window(
    settings: Settings, workdir: Path, start_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    """Redis held by another client's script (as a sweep of thousands of
    orders holds it for milliseconds): the read that waits behind it runs
    beside the sends, so the cancellations read ahead keep the window full.
    A broker that allows 2 in flight and one connection make the read-ahead
    last."""
    broker = mosquitto(workdir / f"rm2-{random.randrange(10**9)}", extra_conf="max_inflight_messages 2\n")
    broker.start()
    config = dataclasses.replace(on_broker(settings, broker), mqtt_connections=1)
    url = urlsplit(config.redis_url)
    holder = Connection(host=url.hostname or "127.0.0.1", port=url.port or 6379)
    try:
        daemon = await start_daemon(config)
        outbox = daemon.outbox
        tag = f"busy{random.randrange(10**6)}"
        ids = [f"{tag}-{n}" for n in range(BUSY_BACKLOG)]
        async with watch_topic(config, f"{config.topic_prefix}/+/status", f"{tag}-watch") as seen:
            async with OrderClient(config) as orders:
                await orders.create_many([(order_id, 600) for order_id in ids])
                await wait_until(lambda: outbox.published >= BUSY_BACKLOG, 60, "the created events out")
                changes = await orders.change_many("cancel", ids)
                assert {getattr(change, "status", None) for change in changes} == {"cancelled"}
            await wait_until(lambda: outbox.read_ahead() >= BUSY_AHEAD, 30, "cancellations read ahead")
            before = outbox.published
            await holder.send_command("EVAL", HOLD_SCRIPT, 0, HOLD_MS)
            assert await holder.read_response() == 1
            during = outbox.published - before
            await wait_until(lambda: len(seen) >= 2 * BUSY_BACKLOG, 60, "every event received")
    finally:
        await holder.disconnect()
        broker.stop()
    assert during >= BUSY_AHEAD // 2, f"{during} events went out while Redis was held"
    assert len({r.event["event_id"] for r in seen}) == 2 * BUSY_BACKLOG, "every event once"
    cancelled = [r.event["order_id"] for r in seen if r.event["status"] == "cancelled"]
    assert len(cancelled) == BUSY_BACKLOG


async def test_check_names_a_small_receive_maximum_and_a_tuned_broker_passes(
    settings: Settings, stock_broker: ServerProcess, workdir: Path, cli: Callable[..., Awaitable[CliResult]]
) -> None:
    stock = await cli("check", env=env_for(on_broker(settings, stock_broker)))
    assert stock.code == 0, stock.out
    assert "allows 20 QoS 1 messages in flight" in stock.out
    assert "the daemon publishes over 4 connections (80 in flight)" in stock.out
    assert "max_inflight_messages 0" in stock.out, "the fix is named"
    assert "max_queued_messages 0" in stock.out, "and the one for subscribers that fall behind"
    assert "PUBACK round trip p50" in stock.out
    tuned_broker = mosquitto(workdir / f"tuned-{random.randrange(10**9)}", profile="tuned", durable=False)
    tuned_broker.start()
    try:
        tuned = await cli("check", env=env_for(on_broker(settings, tuned_broker)))
    finally:
        tuned_broker.stop()
    assert tuned.code == 0, tuned.out
    assert "ok    mqtt: the broker allows 65535 QoS 1 messages in flight" in tuned.out


async def test_a_window_of_one_never_stalls_between_publishes(
    settings: Settings, workdir: Path, start_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    """A broker that allows one message in flight, orders due in clumps: every
    PUBACK lets the next event go at once, and a full window is never waited
    on longer than its PUBACK takes."""
    broker = mosquitto(workdir / f"one-{random.randrange(10**9)}", extra_conf="max_inflight_messages 1\n")
    broker.start()
    try:
        config = on_broker(settings, broker)
        await start_daemon(config)
        tag = f"one{random.randrange(10**6)}"
        async with (
            watch_topic(config, f"{config.topic_prefix}/+/status", f"{tag}-watch") as seen,
            OrderClient(config) as orders,
        ):
            deadlines: dict[str, int] = {}
            for n in range(40):
                result = await orders.create(f"{tag}-{n}", timeout=0.4 + (n // 4) * 0.15)  # clumps of 4
                assert result.deadline_ms is not None
                deadlines[result.order_id] = result.deadline_ms
            await wait_until(
                lambda: sum(r.event["status"] == "cancelled" for r in seen) >= 40, 20, "all cancelled"
            )
        lags = sorted(
            r.at * 1000 - deadlines[r.event["order_id"]] for r in seen if r.event["status"] == "cancelled"
        )
        assert lags[-1] < 500, f"a cancellation waited {lags[-1]:.0f} ms"
    finally:
        broker.stop()


async def test_a_created_backlog_goes_at_its_pace_and_a_cancellation_does_not_wait_for_it(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    """ORDER_LISTENER_CREATED_RATE bounds how fast a bulk import's `created`
    events go out (so a stock broker's queue for a subscriber does not
    overflow); a cancellation in the middle of it is not held by the pace."""
    rate, count = 400.0, 400
    config = dataclasses.replace(settings, created_rate=rate)
    await start_daemon(config)
    tag = f"pace{random.randrange(10**6)}"
    ids = [f"{tag}-{n}" for n in range(count)]
    async with watch_topic(config, f"{config.topic_prefix}/+/status", f"{tag}-watch") as seen:
        async with OrderClient(config) as orders:
            await orders.create_many([(order_id, 600) for order_id in ids])
            await orders.create(f"{tag}-due", timeout=0.3)
        await wait_until(lambda: len(seen) >= count + 2, 30, "the backlog and the cancellation received")
    created = [r.at for r in seen if r.event["status"] == "created" and r.event["order_id"] != f"{tag}-due"]
    assert len(created) == count
    # a few steps' worth may go at once; the rest no faster than the pace
    assert created[-1] - created[0] >= (count - 4 * rate * 0.005 - 1) / rate * 0.9
    cancelled_at = next(r.at for r in seen if r.event["status"] == "cancelled")
    assert cancelled_at < created[-1], "the cancellation waited for the paced backlog"
    versions = [r.event["version"] for r in seen if r.event["order_id"] == f"{tag}-due"]
    assert versions == [1, 2], "its own `created` event still goes first"


@pytest.mark.parametrize(("profile", "paced"), [("stock", True), ("tuned", False)])
async def test_without_a_set_pace_a_broker_that_looks_untuned_gets_one(
    settings: Settings, workdir: Path, profile: str, paced: bool
) -> None:
    """ORDER_LISTENER_CREATED_RATE=auto (the default): a broker announcing a
    small Receive Maximum (mosquitto's default 20) most likely keeps its
    default queue per subscriber too, so a backlog is paced; a tuned one is not."""
    broker = mosquitto(workdir / f"{profile}-{random.randrange(10**9)}", profile=profile, durable=False)
    broker.start()
    try:
        link = MqttLink(on_broker(settings, broker), Service("mqtt"))
        task = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 10)
            publishers = (await link.connection()).publishers
            rate = auto_rate(publisher.window for publisher in publishers)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        broker.stop()
    assert (rate == AUTO_RATE) if paced else (rate == 0.0)
    assert load_settings().created_rate is None, "auto is the default"
