"""The core loop end to end: real redis-server, real mosquitto, the real daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime

import pytest
from redis.asyncio import Redis

from listener import expiry
from listener.api import OrderClient
from listener.config import FastPathSetting, Settings
from listener.daemon import Daemon
from listener.fastpath import hiredis_drain
from listener.keys import KeyLayout
from tests.conftest import Subscriber, wait_until, watch_topic
from tests.life import cancelled_by_its_expired_event, deadline_of, lane_barrier, lanes_barrier

# CI runs these once more with ORDER_LISTENER_FAST_PATHS=off (both ways stay green)
pytestmark = pytest.mark.fastpath

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
CONTRACT_FIELDS = {"event_id", "order_id", "status", "previous", "reason", "at", "version"}


def unix_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


async def test_forty_orders_thirty_cancelled_once_ten_stay_paid(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        ids = [f"core-{i:02d}" for i in range(40)]
        created = await client.create_many([(oid, 3) for oid in ids])
        assert len(created.created) == 40 and not created.existing
        deadline = {r.order_id: deadline_of(r) for r in created.created}
        paid = ids[::4]
        for oid in paid:
            change = await client.pay(oid)
            assert change.changed and change.status == "paid"

        unpaid = set(ids) - set(paid)
        await wait_until(lambda: len(subscriber.with_status("cancelled")) >= 30, 15, "30 cancellations")
        # a wrong second cancellation would have reached the subscriber before these markers
        markers = await lanes_barrier(client, subscriber, ids)

        cancelled = [e for e in subscriber.with_status("cancelled") if e["order_id"] not in markers]
        per_order = Counter(e["order_id"] for e in cancelled)
        assert set(per_order) == unpaid
        assert all(n == 1 for n in per_order.values()), per_order
        for event in cancelled:
            assert event["reason"] == "timeout"
            assert event["previous"] == "created"
            assert event["version"] == 2
            assert unix_ms(event["at"]) >= deadline[event["order_id"]], event
        for oid in paid:
            assert (await client.get(oid)).status == "paid"
            assert [e["status"] for e in subscriber.of(oid)] == ["created", "paid"]
        for oid in unpaid:
            assert (await client.get(oid)).status == "cancelled"

    ours = [e for e in subscriber.events if e["order_id"] not in markers]
    for event in ours:
        assert set(event) >= CONTRACT_FIELDS, event
        assert ISO.match(event["at"])
        if event["status"] == "created":
            assert event["previous"] is None and ISO.match(event["deadline"])
            assert unix_ms(event["deadline"]) == deadline[event["order_id"]]
        else:
            assert "deadline" not in event
    assert len({e["event_id"] for e in ours}) == len(ours) == 40 + 10 + 30


async def test_event_ids_and_versions_per_order(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        await client.create("ev-1", timeout=60)
        await client.pay("ev-1")
        await client.deliver("ev-1")
        await client.refund("ev-1")
    await wait_until(lambda: len(subscriber.of("ev-1")) >= 5, 10, "five events of ev-1")
    events = subscriber.of("ev-1")
    assert [(e["status"], e["previous"], e["reason"], e["version"]) for e in events] == [
        ("created", None, "created", 1),
        ("paid", "created", "paid", 2),
        ("delivered", "paid", "delivered", 3),
        ("refunded", "delivered", "refund", 4),
        ("cancelled", "refunded", "refund", 5),
    ]
    assert len({e["event_id"] for e in events}) == 5


async def test_repeated_operations_publish_nothing_new(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    daemon = await start_daemon()
    async with OrderClient(settings) as client:
        await client.create("rep-1", timeout=60)
        first = await client.pay("rep-1")
        again = await client.pay("rep-1")
        assert first.changed and not again.changed and again.version == first.version
        await client.create("rep-2", timeout=0.2)
        await wait_until(lambda: len(subscriber.of("rep-2")) == 2, 10, "rep-2 cancelled")
        # A second expiry of the same order (a late keyspace event) changes nothing.
        from listener.orders import Operation

        result = await daemon.store.apply(Operation.EXPIRE, "rep-2")
        assert result.outcome == "already"
        assert (await client.get("rep-2")).version == 2
        # anything the repeats had appended would reach the subscriber before these markers
        await lane_barrier(client, subscriber, "rep-1")
        await lane_barrier(client, subscriber, "rep-2")
    assert [e["status"] for e in subscriber.of("rep-1")] == ["created", "paid"]
    assert [e["status"] for e in subscriber.of("rep-2")] == ["created", "cancelled"]


async def test_unrelated_keys_expire_without_effect(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    daemon = await start_daemon()
    layout = KeyLayout(settings.key_prefix)
    await redis.set("session:42", "x", px=50)
    await redis.set("order:{3}:t:not-in-part-3", "1", px=50)  # wrong part for this id
    await redis.set("other:{1}:t:x", "1", px=50)
    await redis.set(layout.timer("ghost"), "1", px=50)  # timer of an order that does not exist
    await wait_until(lambda: daemon.listener.ignored >= 3, 10, "three foreign keys seen expiring")
    await wait_until(
        lambda: daemon.listener.received >= 4 and not daemon.listener._pending, 10, "the ghost timer handled"
    )
    async with OrderClient(settings) as client:  # anything the ghost caused would arrive before this marker
        marker = await lane_barrier(client, subscriber, "ghost")
    assert {e["order_id"] for e in subscriber.events} == {marker}
    assert await redis.exists(layout.order("ghost")) == 0
    assert daemon.listener.cancelled == 0


@pytest.mark.parametrize("fast_paths", ["auto", "off"], ids=["fast-paths-auto", "fast-paths-off"])
async def test_expired_event_alone_cancels(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    fast_paths: str,
) -> None:
    """The keyspace fast path works by itself: with the order taken out of the
    deadline index, only Redis' expired event can cancel it; also where the
    listener does not take messages from redis-py's parser buffer."""
    daemon = await start_daemon(dataclasses.replace(settings, fast_paths=FastPathSetting(fast_paths)))
    drain = daemon.fast_paths.get(hiredis_drain.NAME)
    assert drain is not None and drain.fast == (fast_paths == "auto")
    await cancelled_by_its_expired_event(settings, redis, subscriber, "via-event", daemon)
    assert daemon.listener.cancelled == 1


async def test_subscription_pings_are_read_past(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The listener reads without a timeout and PINGs its subscription now and
    then (a dead connection fails the send): the replies are skipped, the
    subscription stays and still cancels."""
    monkeypatch.setattr(expiry, "PING_EVERY", 0.05)
    daemon = await start_daemon()

    async def pinged() -> bool:
        (listener,) = await redis.client_list(_type="pubsub")
        return bool(listener["cmd"] == "ping")

    await wait_until(pinged, 10, "a PING on the subscription (its last command)")
    await cancelled_by_its_expired_event(settings, redis, subscriber, "after-pings", daemon)
    assert daemon.listener.cancelled == 1
    assert daemon.redis_service.reconnects == 0


async def test_daemon_started_after_deadlines_cancels_overdue(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    async with OrderClient(settings) as client:
        await client.create_many([(f"late-{i}", 0.2) for i in range(50)])
        await client.create("not-yet", timeout=60)
    await asyncio.sleep(0.6)  # every timer has passed, no daemon running
    started = time.monotonic()
    await start_daemon()
    await wait_until(lambda: len(subscriber.with_status("cancelled")) >= 50, 10, "catch-up")
    assert time.monotonic() - started < 5
    async with OrderClient(settings) as client:
        assert (await client.get("not-yet")).status == "created"
        for i in range(50):
            assert (await client.get(f"late-{i}")).status == "cancelled"
    assert {e["order_id"] for e in subscriber.with_status("cancelled")} == {f"late-{i}" for i in range(50)}


async def test_bulk_created_backlog_does_not_delay_cancellation(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], redis: Redis
) -> None:
    """60,000 `created` events waiting to go out; an order due meanwhile is
    still announced promptly, its `created` event first. A subscriber of that
    order's topic alone sees what we publish without queueing at the broker
    behind the other orders' events."""
    daemon = await start_daemon()
    async with (
        watch_topic(settings, f"{settings.topic_prefix}/urgent/status", "urgent-watcher") as seen,
        OrderClient(settings) as client,
    ):
        # enough that the daemon (about 30,000 `created` events a second) is far from done
        await client.create_many([(f"bulk-{i}", 3600) for i in range(60_000)])
        await client.create("urgent", timeout=0.3)
        deadline = (await client.get("urgent")).deadline_ms
        await wait_until(lambda: len(seen) >= 2, 20, "urgent cancelled")
        assert [r.event["status"] for r in seen] == ["created", "cancelled"]
        lag_ms = seen[1].at * 1000 - deadline
        assert lag_ms < 500, f"the cancellation waited {lag_ms:.0f} ms behind the backlog"
        backlog = await daemon.outbox.backlog()
        assert backlog > 1000, "the backlog was gone already: the test proved nothing"
