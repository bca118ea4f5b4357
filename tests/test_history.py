"""`show --history` and `OrderClient.history`: every transition of an order as
the event that announced it, against a real redis-server, mosquitto and daemon."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import cast

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.keys import KeyLayout, part_of
from tests.conftest import CliResult, Subscriber, compact, redis_clock_past, wait_until

LAYOUT = KeyLayout()


async def test_a_whole_life_lists_five_transitions_with_the_published_event_ids(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    cli: Callable[..., Awaitable[CliResult]],
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        await client.create("life-1", timeout=60)
        await client.pay("life-1")
        await client.deliver("life-1")
        await client.refund("life-1")
        await wait_until(lambda: len(subscriber.of("life-1")) >= 5, 10, "five events of life-1")
        from_api = await client.history("life-1")
    shown = await cli("show", "life-1", "--history", "--json")
    assert shown.code == 0, shown.err
    body = json.loads(shown.out)
    assert body["status"] == "cancelled" and body["version"] == 5
    history = body["history"]
    published = subscriber.of("life-1")
    assert [e["version"] for e in history] == [1, 2, 3, 4, 5]
    assert [e["event_id"] for e in history] == [e["event_id"] for e in published]
    assert history == published  # the very objects that went out, field for field
    assert [compact(e) for e in from_api] == [compact(e) for e in published]
    assert [(e["status"], e["reason"]) for e in history] == [
        ("created", "created"),
        ("paid", "paid"),
        ("delivered", "delivered"),
        ("refunded", "refund"),
        ("cancelled", "refund"),
    ]
    table = await cli("show", "life-1", "--history")
    assert table.code == 0, table.err
    for event in published:
        assert str(event["event_id"]) in table.out


async def test_a_timed_out_order_shows_two_kept_in_its_record(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    cli: Callable[..., Awaitable[CliResult]],
    redis: Redis,
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        await client.create("late-1", timeout=0.3)
        await wait_until(lambda: len(subscriber.of("late-1")) >= 2, 10, "created and cancelled")
    shown = await cli("show", "late-1", "--history", "--json")
    assert shown.code == 0, shown.err
    history = json.loads(shown.out)["history"]
    assert history == subscriber.of("late-1")
    assert [(e["status"], e["reason"], e["version"]) for e in history] == [
        ("created", "created", 1),
        ("cancelled", "timeout", 2),
    ]
    # the history is the record's (its items h1 and h2 in its own hash, or the
    # sweep's record in its bucket: the two events follow from it), so it goes
    # with the record when the retention ends
    # the tests' client does not decode: bytes, where redis-py's types say bytes or str
    record = cast("dict[bytes, bytes]", await redis.hgetall(LAYOUT.order("late-1")))
    if record:
        assert sorted(name for name in record if name.startswith(b"h")) == [b"h1", b"h2"]
        assert 0 < await redis.pttl(LAYOUT.order("late-1")) <= settings.retention_ms
    else:
        kept = await redis.hget(LAYOUT.bucket("late-1"), "late-1")
        assert isinstance(kept, bytes)
        updated = int(kept.split(b"|")[2])
        queue = cast("list[bytes]", await redis.lrange(LAYOUT.expiring(part_of("late-1")), 0, -1))
        assert [entry.split(b"|")[0] for entry in queue if entry.endswith(b"|late-1")] == [
            str(updated + settings.retention_ms).encode()
        ]


async def test_a_pending_order_costs_no_history_and_shows_its_created_event(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    cli: Callable[..., Awaitable[CliResult]],
    redis: Redis,
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        await client.create("wait-1", timeout=600)
        await wait_until(lambda: len(subscriber.of("wait-1")) >= 1, 10, "the created event")
        assert await client.history("wait-1") == subscriber.of("wait-1")
    # still only its bucket field: the history costs a pending order nothing
    assert await redis.exists(LAYOUT.order("wait-1")) == 0
    assert await redis.hmget(LAYOUT.bucket("wait-1"), ["wait-1"]) != [None]
    shown = await cli("show", "wait-1", "--history", "--json")
    assert json.loads(shown.out)["history"] == subscriber.of("wait-1")
    unknown = await cli("show", "never-1", "--history")
    assert unknown.code == 1 and "does not exist" in unknown.err


async def test_orders_cancelled_while_no_daemon_ran_get_their_history_from_the_sweep(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    redis: Redis,
) -> None:
    async with OrderClient(settings) as client:
        await client.create_many([(f"swept-{i}", 0.1) for i in range(5)])
        now = await client.store.now_ms()
        await wait_until(lambda: redis_clock_past(client, now + 200), 5, "the deadlines to pass")
        await start_daemon()  # its catch-up sweep cancels them
        await wait_until(lambda: len(subscriber.with_status("cancelled")) >= 5, 10, "five cancellations")
        for i in range(5):
            assert await client.history(f"swept-{i}") == subscriber.of(f"swept-{i}")
            # the sweep writes no history items: both events follow from the record,
            # which stays in its bucket field ("<c>|<d>|<u>"), no hash of its own
            assert not await redis.exists(LAYOUT.order(f"swept-{i}"))
            kept = await redis.hget(LAYOUT.bucket(f"swept-{i}"), f"swept-{i}")
            assert isinstance(kept, bytes) and kept.count(b"|") == 2
    # a late pay applies the timeout first: the same two events, and nothing else
    async with OrderClient(settings) as client:
        await client.create("late-pay", timeout=0.1)
        now = await client.store.now_ms()
        await wait_until(lambda: redis_clock_past(client, now + 200), 5, "the deadline to pass")
        change = await client.change_many("pay", ["late-pay"])
        assert not hasattr(change[0], "changed")  # refused: the order was cancelled by its timeout
        await wait_until(lambda: len(subscriber.of("late-pay")) >= 2, 10, "late-pay's events")
        assert await client.history("late-pay") == subscriber.of("late-pay")


async def test_a_record_without_items_gives_the_events_it_implies_and_no_others(
    settings: Settings, cli: Callable[..., Awaitable[CliResult]], redis: Redis
) -> None:
    """Records as a sweep (or a daemon from before histories) leaves them, with
    no h<version> items: version 2, cancelled at the deadline, gives its
    `created` and `cancelled` events; one changed otherwise gives none (the
    record does not say what its events were), and `show` says so."""
    record: dict[FieldT, EncodableT] = {
        "s": "cancelled",
        "v": "2",
        "r": "timeout",
        "c": "1795564749929-0",
        "u": "1795566549935",
    }
    await redis.hset(LAYOUT.order("implied-1"), mapping={**record, "d": "1795566549929"})
    await redis.hset(LAYOUT.order("implied-2"), mapping={**record, "r": "customer", "d": "1795566549929"})
    await redis.hset(LAYOUT.order("implied-3"), mapping={**record, "v": "3", "d": "1795566549929"})
    async with OrderClient(settings) as client:
        history = await client.history("implied-1")
        assert [await client.history(f"implied-{i}") for i in (2, 3)] == [[], []]
    assert history == [
        {
            "event_id": "implied-1/1795564749929/1/created/created",
            "order_id": "implied-1",
            "status": "created",
            "previous": None,
            "reason": "created",
            "at": "2026-11-24T23:59:09.929Z",
            "version": 1,
            "deadline": "2026-11-25T00:29:09.929Z",
        },
        {
            "event_id": "implied-1/1795564749929/2/cancelled/timeout",
            "order_id": "implied-1",
            "status": "cancelled",
            "previous": "created",
            "reason": "timeout",
            "at": "2026-11-25T00:29:09.935Z",
            "version": 2,
        },
    ]
    shown = await cli("show", "implied-2", "--history")
    assert shown.code == 0 and "history: none kept" in shown.out


async def test_a_history_item_no_script_writes_is_shown_as_an_error(
    settings: Settings, cli: Callable[..., Awaitable[CliResult]], redis: Redis
) -> None:
    async with OrderClient(settings) as client:
        await client.create("hand-1", timeout=60)
        await client.pay("hand-1")
    await redis.hset(LAYOUT.order("hand-1"), "h3", "paid|created|paid|x|1|1|")
    shown = await cli("show", "hand-1", "--history")
    assert shown.code == 1
    assert "the stored history of 'hand-1' is malformed" in shown.err and "Traceback" not in shown.err


async def test_an_extended_order_shows_its_first_deadline_then_each_extension(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """The `created` event keeps the deadline the order was created with; each
    `extended` event the deadline it announced; all as published."""
    await start_daemon()
    async with OrderClient(settings) as client:
        created = await client.create("ext-h1", timeout=60)
        first = await client.extend("ext-h1", 30)
        second = await client.extend("ext-h1", 15)
        await client.pay("ext-h1")
        await wait_until(lambda: len(subscriber.of("ext-h1")) >= 4, 10, "four events of ext-h1")
        history = await client.history("ext-h1")
    assert [compact(e) for e in history] == [compact(e) for e in subscriber.of("ext-h1")]
    assert [(e["status"], e["reason"], e["version"]) for e in history] == [
        ("created", "created", 1),
        ("created", "extended", 2),
        ("created", "extended", 3),
        ("paid", "paid", 4),
    ]
    deadlines = [e.get("deadline") for e in history]
    assert created.deadline_ms is not None
    assert deadlines[0] != deadlines[1] != deadlines[2]
    assert first.deadline_ms - created.deadline_ms == 30_000
    assert second.deadline_ms - first.deadline_ms == 15_000
