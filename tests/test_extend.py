"""`extend`: more time to pay for one order, on the real servers.

The timer's TTL, the deadline index and the record follow the new deadline
together; the order is not cancelled at the old deadline and is cancelled
within milliseconds of the new one; its `extended` event goes out between
its `created` and its cancellation, in version order, also when the daemon
starts with both waiting in the outbox. Refusals: another status (exit 1),
a passed deadline (exit 1, and the order is cancelled for timeout), a
malformed or non-positive extension (exit 2); a racing payment has one winner.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.errors import BadInput, Refused
from listener.events import from_outbox_entry, iso_ms
from listener.keys import KeyLayout, part_of
from listener.orders import parse_extension
from listener.outbox_pump import Entry
from listener.store import Store
from tests.conftest import CliResult, Subscriber, redis_clock_past, wait_until
from tests.life import rows, validator

LAYOUT = KeyLayout("order")


async def test_an_extended_order_is_cancelled_at_its_new_deadline_not_the_old_one(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        made = await client.create("ext-1", timeout=0.8)
        assert made.deadline_ms is not None
        old = made.deadline_ms
        extended = await client.extend("ext-1", 1.25)
        new = extended.deadline_ms
        assert new == old + 1250 and extended.version == 2

        # the timer, the index and the record follow the new deadline together
        now = await client.store.now_ms()
        ttl = await redis.pttl(LAYOUT.timer("ext-1"))
        assert new - now - 20 <= ttl <= new - now, (ttl, new - now)
        assert await redis.zscore(LAYOUT.deadlines(part_of("ext-1")), "ext-1") == new
        order = await client.get("ext-1")
        assert (order.status, order.version, order.reason, order.deadline_ms) == (
            "created",
            2,
            "extended",
            new,
        )

        # past the old deadline: still waiting for payment, nothing cancelled
        await wait_until(lambda: redis_clock_past(client, old + 300), 5, "the old deadline to pass")
        assert (await client.get("ext-1")).status == "created"
        assert subscriber.cancelled_ids() == set()

        await wait_until(lambda: "ext-1" in subscriber.cancelled_ids(), 5, "the cancellation")
        cancelled = await client.get("ext-1")
    assert (cancelled.status, cancelled.reason, cancelled.version) == ("cancelled", "timeout", 3)
    assert 0 <= cancelled.updated_ms - new <= 50, cancelled.updated_ms - new  # within milliseconds

    events = subscriber.of("ext-1")
    assert rows(events) == [
        ("created", None, "created", 1),
        ("created", "created", "extended", 2),
        ("cancelled", "created", "timeout", 3),
    ]
    assert events[0]["deadline"] == iso_ms(old) and events[1]["deadline"] == iso_ms(new)
    assert events[1]["event_id"] == f"ext-1/{order.created_ms}/2/created/extended"
    assert len({event["event_id"] for event in events}) == 3
    check = validator("status-event")
    for event in events:
        assert check.is_valid(event), event


async def test_the_extended_event_follows_an_unpublished_created_event(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """Created, extended twice and paid before any daemon runs: the `created`
    entry waits in outbox:created, the others in outbox; the daemon sends them
    in version order."""
    async with OrderClient(settings) as client:
        await client.create_many([(f"ext-q-{i}", 60) for i in range(20)])
        for i in range(20):
            await client.extend(f"ext-q-{i}", 30)
            await client.extend(f"ext-q-{i}", 0.5)
            await client.pay(f"ext-q-{i}")
    await start_daemon()
    await wait_until(
        lambda: len(subscriber.events) == 80, 10, lambda: f"80 events, got {len(subscriber.events)}"
    )
    for i in range(20):
        assert [event["version"] for event in subscriber.of(f"ext-q-{i}")] == [1, 2, 3, 4]
        assert [event["reason"] for event in subscriber.of(f"ext-q-{i}")] == [
            "created",
            "extended",
            "extended",
            "paid",
        ]


async def test_extending_after_the_deadline_cancels_the_order_and_is_refused(settings: Settings) -> None:
    """No daemon runs: the deadline decides, as for any operation."""
    async with OrderClient(settings) as client:
        await client.create("ext-late", timeout=0.1)
        store = await client.opened()

        async def overdue() -> bool:
            return await store.now_ms() > (await client.get("ext-late")).deadline_ms

        await wait_until(overdue, 5, "the deadline to pass")
        with pytest.raises(Refused, match=r"'ext-late' is cancelled \(timeout\): extend is not allowed"):
            await client.extend("ext-late", 60)
        order = await client.get("ext-late")
    assert (order.status, order.reason, order.version) == ("cancelled", "timeout", 2)


async def test_a_window_over_30_days_is_refused_and_changes_nothing(settings: Settings, redis: Redis) -> None:
    async with OrderClient(settings) as client:
        await client.create("ext-long", timeout=3600)
        before = await client.get("ext-long")
        with pytest.raises(BadInput, match="more than 30 days"):
            await client.extend("ext-long", 30 * 24 * 3600)
        assert await client.get("ext-long") == before
        # up to exactly 30 days from now is allowed
        extended = await client.extend("ext-long", 29 * 24 * 3600)
    assert extended.deadline_ms == before.deadline_ms + 29 * 24 * 3600 * 1000


def test_the_extension_is_checked_before_redis() -> None:
    assert parse_extension("2.5") == 2500
    assert parse_extension(0.001) == 1
    for bad in ("0", "-1", "0.0004", "abc", "", "nan", "inf", "2592000.001", True):
        with pytest.raises(BadInput):
            parse_extension(bad)


async def test_a_racing_payment_and_extension_have_one_winner(settings: Settings) -> None:
    """Both at once on many orders: each order ends paid, and its version
    counts exactly the operations that went through, in one order."""
    ids = [f"ext-race-{i}" for i in range(40)]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 60) for oid in ids])
        results = await asyncio.gather(
            *(coro for oid in ids for coro in (client.pay(oid), client.extend(oid, 5))),
            return_exceptions=True,
        )
        for index, oid in enumerate(ids):
            paid, extended = results[2 * index], results[2 * index + 1]
            order = await client.get(oid)
            assert order.status == "paid" and not isinstance(paid, BaseException)
            if isinstance(extended, Refused):  # the payment came first
                assert extended.status == "paid" and order.version == 2
            else:  # the extension came first, then the payment
                assert not isinstance(extended, BaseException) and order.version == 3


async def test_the_extended_entry_is_checked_like_any_outbox_entry(settings: Settings, redis: Redis) -> None:
    async with OrderClient(settings) as client:
        await client.create("ext-entry", timeout=60)
        extended = await client.extend("ext-entry", 10)
    reply = await redis.xread({LAYOUT.outbox(part_of("ext-entry")): "0"})
    assert isinstance(reply, list)  # RESP2's [[stream, entries]] (redis-py's type has RESP3's dict too)
    entries: list[Entry]
    ((_, entries),) = reply
    (_, fields) = entries[-1]
    event = from_outbox_entry(fields)
    assert (event.status, event.previous, event.reason, event.version) == (
        "created",
        "created",
        "extended",
        2,
    )
    assert event.deadline_ms == extended.deadline_ms and event.created_entry == fields[b"c"]
    for name, value, says in (
        (b"d", None, "'d' (deadline ms) is missing"),
        (b"d", b"soon", "'d' (deadline ms)"),
        (b"r", b"paid", "field 'r' (reason) is 'paid', not 'extended'"),
        (b"p", b"paid", "'p' (previous status)"),
        (b"v", b"1", "'v' (version) 1 is out of range"),
    ):
        broken = {k: v for k, v in fields.items() if k != name}
        if value is not None:
            broken[name] = value
        with pytest.raises(ValueError, match=re.escape(says)):
            from_outbox_entry(broken)


async def test_extend_on_the_command_line(
    cli: Callable[..., Awaitable[CliResult]], settings: Settings
) -> None:
    async with OrderClient(settings) as client:
        await client.create_many([("ext-cli", 60), ("ext-cancelled", 60)])
        await client.cancel("ext-cancelled")
        deadline = (await client.get("ext-cli")).deadline_ms

        done = await cli("extend", "ext-cli", "--by", "90.5")
        assert done.code == 0, done.err
        assert "ext-cli: created (version 2, reason extended), deadline " in done.out
        assert iso_ms(deadline + 90_500) in done.out
        assert (await client.get("ext-cli")).deadline_ms == deadline + 90_500

        refused = await cli("extend", "ext-cancelled", "--by", "60")
        assert refused.code == 1 and "'ext-cancelled' is cancelled (customer)" in refused.err, refused
        unknown = await cli("extend", "ext-nobody", "--by", "60")
        assert unknown.code == 1 and "does not exist" in unknown.err
        for bad in ("-5", "0", "abc"):
            result = await cli("extend", "ext-cli", "--by", bad)
            assert result.code == 2 and "extension" in result.err, (bad, result)
        assert (await cli("extend", "ext-cli")).code == 2  # --by is required
        assert (await cli("extend", "bad id", "--by", "5")).code == 2
        assert (await client.get("ext-cli")).version == 2  # the refusals changed nothing


async def test_the_store_reports_the_extension_outcomes(settings: Settings) -> None:
    store = Store.from_settings(settings)
    try:
        assert (await store.extend("ext-none", 1000)).outcome == "unknown"
        await store.create_many([("ext-s", 60_000)])
        result = await store.extend("ext-s", 1000)
        assert (result.outcome, result.status, result.version, result.reason) == (
            "done",
            "created",
            2,
            "extended",
        )
    finally:
        await store.close()
