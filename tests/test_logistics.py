"""Events in: a carrier publishes on logistics/<order_id>/status and a running
daemon moves the order. Bad messages are dropped and counted; the daemon
keeps running."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.keys import KeyLayout
from listener.logistics import MAX_PAYLOAD
from tests.conftest import Subscriber, wait_until
from tests.life import carrier, lane_barrier, outbox_appends, rows


async def test_delivered_then_returned_and_redeliveries_change_nothing(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    daemon = await start_daemon()
    handler = daemon.logistics
    layout = KeyLayout(settings.key_prefix)
    async with OrderClient(settings) as client, carrier(settings) as send:
        await client.create("parcel-1", timeout=60)
        await client.pay("parcel-1")

        await send("parcel-1", {"status": "delivered", "carrier": "ACME"})
        await wait_until(lambda: len(subscriber.of("parcel-1")) == 3, 10, "delivered by logistics")
        assert rows(subscriber.of("parcel-1"))[-1] == ("delivered", "paid", "logistics", 3)
        order = await client.get("parcel-1")
        assert (order.status, order.reason, order.version) == ("delivered", "logistics", 3)

        await send("parcel-1", {"status": "delivered"})  # redelivered: already delivered
        await wait_until(lambda: handler.handled == 2, 10, "the redelivery handled")
        assert (await client.get("parcel-1")).version == 3

        await send("parcel-1", {"status": "returned"})
        await wait_until(lambda: len(subscriber.of("parcel-1")) == 5, 10, "refunded and cancelled")
        assert rows(subscriber.of("parcel-1"))[3:] == [
            ("refunded", "delivered", "returned", 4),
            ("cancelled", "refunded", "returned", 5),
        ]
        order = await client.get("parcel-1")
        assert (order.status, order.reason, order.version) == ("cancelled", "returned", 5)

        record = await redis.hgetall(layout.order("parcel-1"))
        appended = await outbox_appends(redis, layout)
        await send("parcel-1", {"status": "returned"})  # redelivered
        await send("parcel-1", {"status": "delivered"})  # late and out of turn: refused, nothing changes
        await wait_until(lambda: handler.handled == 5, 10, "both late messages handled")
        assert await redis.hgetall(layout.order("parcel-1")) == record
        assert await outbox_appends(redis, layout) == appended
        await lane_barrier(client, subscriber, "parcel-1")
        assert len(subscriber.of("parcel-1")) == 5

        # `returned` needs a delivered parcel: for a paid order it changes nothing.
        await client.create("parcel-2", timeout=60)
        await client.pay("parcel-2")
        await send("parcel-2", {"status": "returned"})
        await wait_until(lambda: handler.handled == 6, 10, "returned for a paid order handled")
        assert (await client.get("parcel-2")).status == "paid"
        await lane_barrier(client, subscriber, "parcel-2")
        assert [e["status"] for e in subscriber.of("parcel-2")] == ["created", "paid"]
    assert handler.dropped == 0


async def test_bad_messages_are_dropped_and_the_daemon_keeps_running(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    daemon = await start_daemon()
    handler = daemon.logistics
    layout = KeyLayout(settings.key_prefix)
    async with OrderClient(settings) as client, carrier(settings) as send:
        for oid in ("victim", "healthy"):
            await client.create(oid, timeout=60)
            await client.pay(oid)
        await wait_until(lambda: len(subscriber.events) == 4, 10, "both orders paid")
        record = await redis.hgetall(layout.order("victim"))

        too_big = json.dumps({"status": "delivered", "pad": "x" * MAX_PAYLOAD}).encode()
        assert len(too_big) > MAX_PAYLOAD
        bad: list[tuple[str, bytes | dict[str, object]]] = [
            ("victim", b'{"status": "delivered"'),  # malformed JSON
            ("victim", b"\xff\xfe not utf-8"),
            ("victim", too_big),  # valid JSON, but larger than 4096 bytes
            ("victim", b'["delivered"]'),  # not an object
            ("victim", {"status": 1}),
            ("victim", {"parcel": "delivered"}),  # no status
            ("has space", {"status": "delivered"}),  # invalid id in the topic
            ("x" * 129, {"status": "delivered"}),
            ("victim", {"status": "in_transit"}),  # a status we ignore
            ("victim", {"status": "DELIVERED"}),
            ("nobody", {"status": "delivered"}),  # unknown order
        ]
        for oid, payload in bad:
            await send(oid, payload)
        await send("healthy", {"status": "delivered"})

        await wait_until(lambda: len(subscriber.of("healthy")) == 3, 10, "the healthy order delivered")
        assert subscriber.of("healthy")[-1]["reason"] == "logistics"
        assert handler.dropped == len(bad), (handler.dropped, handler.handled)
        assert handler.handled == 1
        assert await redis.hgetall(layout.order("victim")) == record
        assert not await redis.exists(layout.order("nobody"))
        await lane_barrier(client, subscriber, "victim")
        assert [e["status"] for e in subscriber.of("victim")] == ["created", "paid"]
        assert subscriber.of("nobody") == []
    assert daemon.ready.is_set()
