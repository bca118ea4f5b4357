"""The producer API (`listener.OrderClient`) through the contract's transition
table, with the daemon publishing: what each call returns, what is stored, and
which events subscribers see. Refused, unknown, repeated and duplicate
operations change nothing and publish nothing. (The two logistics rows are
driven over MQTT in test_logistics.py.)"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import pytest
from redis.asyncio import Redis

from listener import BadInput, Change, OrderClient, OrderExists, Refused, UnknownOrder
from listener.config import Settings
from listener.daemon import Daemon
from listener.keys import KeyLayout
from listener.orders import Operation, Outcome, Reason, Status, decide
from tests.conftest import Subscriber, wait_until
from tests.life import EventRow, carrier, lane_barrier, outbox_appends, rows

DONE, ALREADY, REFUSED = Outcome.DONE, Outcome.ALREADY, Outcome.REFUSED
OPERATIONS = ("pay", "cancel", "deliver", "refund")

# What each API operation does to an order at rest, written from the contract
# (not from listener.orders): state -> {operation: outcome}. The `done` cells
# are driven in test_every_row_of_the_table.
STATES: dict[str, tuple[Status, Reason]] = {
    "created": (Status.CREATED, Reason.CREATED),
    "paid": (Status.PAID, Reason.PAID),
    "delivered": (Status.DELIVERED, Reason.DELIVERED),
    "by-customer": (Status.CANCELLED, Reason.CUSTOMER),
    "by-timeout": (Status.CANCELLED, Reason.TIMEOUT),
    "by-refund": (Status.CANCELLED, Reason.REFUND),
    "by-return": (Status.CANCELLED, Reason.RETURNED),
}
CELLS: dict[str, dict[str, Outcome]] = {
    "created": {"pay": DONE, "cancel": DONE, "deliver": REFUSED, "refund": REFUSED},
    "paid": {"pay": ALREADY, "cancel": REFUSED, "deliver": DONE, "refund": DONE},
    "delivered": {"pay": ALREADY, "cancel": REFUSED, "deliver": ALREADY, "refund": DONE},
    "by-customer": {"pay": REFUSED, "cancel": ALREADY, "deliver": REFUSED, "refund": REFUSED},
    "by-timeout": {"pay": REFUSED, "cancel": ALREADY, "deliver": REFUSED, "refund": REFUSED},
    "by-refund": {"pay": REFUSED, "cancel": ALREADY, "deliver": REFUSED, "refund": ALREADY},
    "by-return": {"pay": REFUSED, "cancel": ALREADY, "deliver": REFUSED, "refund": ALREADY},
}


def call(client: OrderClient, operation: str, order_id: str) -> Awaitable[Change]:
    method: Callable[[str], Awaitable[Change]] = getattr(client, operation)
    return method(order_id)


def test_contract_cells_agree_with_the_rules() -> None:
    for state, (status, reason) in STATES.items():
        for operation, expected in CELLS[state].items():
            assert decide(Operation(operation), status, reason) is expected, (state, operation)


async def test_every_row_of_the_table(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        made = await client.create("api-ship", timeout=60)
        assert made.created and made.deadline_ms is not None
        assert await client.pay("api-ship") == Change("api-ship", "paid", 2, "paid", True)
        assert await client.deliver("api-ship") == Change("api-ship", "delivered", 3, "delivered", True)
        assert await client.refund("api-ship") == Change("api-ship", "cancelled", 5, "refund", True)

        await client.create("api-paid", timeout=60)
        await client.pay("api-paid")
        assert await client.refund("api-paid") == Change("api-paid", "cancelled", 4, "refund", True)

        await client.create("api-customer", timeout=60)
        assert await client.cancel("api-customer") == Change("api-customer", "cancelled", 2, "customer", True)

        timed = await client.create("api-timeout", timeout=0.2)
        defaulted = await client.create("api-default")  # the default timeout: 1800 s

        expected: dict[str, list[EventRow]] = {
            "api-ship": [
                ("created", None, "created", 1),
                ("paid", "created", "paid", 2),
                ("delivered", "paid", "delivered", 3),
                ("refunded", "delivered", "refund", 4),
                ("cancelled", "refunded", "refund", 5),
            ],
            "api-paid": [
                ("created", None, "created", 1),
                ("paid", "created", "paid", 2),
                ("refunded", "paid", "refund", 3),
                ("cancelled", "refunded", "refund", 4),
            ],
            "api-customer": [("created", None, "created", 1), ("cancelled", "created", "customer", 2)],
            "api-timeout": [("created", None, "created", 1), ("cancelled", "created", "timeout", 2)],
            "api-default": [("created", None, "created", 1)],
        }
        await wait_until(
            lambda: all(len(subscriber.of(oid)) >= len(want) for oid, want in expected.items()),
            10,
            lambda: f"every row's events; got {[(e['order_id'], e['status']) for e in subscriber.events]}",
        )
        for oid, want in expected.items():
            assert rows(subscriber.of(oid)) == want, oid
        assert len(subscriber.unique()) == len(subscriber.events) == sum(map(len, expected.values()))

        final = {oid: want[-1] for oid, want in expected.items()}
        for oid, (status, _, reason, version) in final.items():
            order = await client.get(oid)
            assert (order.status, order.reason, order.version) == (status, reason, version), oid
        timed_out = await client.get("api-timeout")
        assert timed_out.deadline_ms == timed.deadline_ms and timed_out.updated_ms >= timed.deadline_ms
        default = await client.get("api-default")
        assert default.deadline_ms - default.created_ms == 1800 * 1000 == settings.default_timeout_ms
        assert defaulted.deadline_ms == default.deadline_ms


async def test_refused_and_repeated_operations_change_and_publish_nothing(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    await start_daemon()
    layout = KeyLayout(settings.key_prefix)
    oid = {state: f"at-{state}" for state in STATES}
    async with OrderClient(settings) as client, carrier(settings) as send:
        for state in STATES:
            await client.create(oid[state], timeout=0.2 if state == "by-timeout" else 60)
        for state in ("paid", "delivered", "by-refund", "by-return"):
            await client.pay(oid[state])
        for state in ("delivered", "by-return"):
            await client.deliver(oid[state])
        await client.cancel(oid["by-customer"])
        await client.refund(oid["by-refund"])
        await send(oid["by-return"], {"status": "returned"})
        counts = {"created": 1, "paid": 2, "delivered": 3, "by-customer": 2, "by-timeout": 2}
        counts |= {"by-refund": 4, "by-return": 5}
        await wait_until(
            lambda: all(len(subscriber.of(oid[s])) == n for s, n in counts.items()),
            10,
            "every order at rest",
        )
        for state, (status, reason) in STATES.items():
            order = await client.get(oid[state])
            assert (order.status, order.reason) == (status, reason), state

        async def record(state: str) -> tuple[dict[bytes, bytes], bytes | None]:
            # the own hash, and the bucket field where the sweep's record stays
            value = await redis.hget(layout.bucket(oid[state]), oid[state])
            assert value is None or isinstance(value, bytes)
            # the tests' client does not decode: bytes, where redis-py's type says bytes or str
            return cast("dict[bytes, bytes]", await redis.hgetall(layout.order(oid[state]))), value

        stored = {state: await record(state) for state in STATES}
        assert stored["by-timeout"] != ({}, None)
        appended = await outbox_appends(redis, layout)
        published = len(subscriber.events)
        tried = 0
        for state, (status, reason) in STATES.items():
            version = counts[state]
            for operation, outcome in CELLS[state].items():
                if outcome is DONE:
                    continue
                tried += 1
                if outcome is ALREADY:
                    change = await call(client, operation, oid[state])
                    assert change == Change(oid[state], status, version, reason, False), (state, operation)
                    continue
                with pytest.raises(Refused) as refused:
                    await call(client, operation, oid[state])
                error = refused.value
                assert (error.order_id, error.status, error.operation) == (oid[state], status, operation)
                message = str(error)
                assert repr(oid[state]) in message and status in message and operation in message, message
                if status == "cancelled":
                    assert str(reason) in message, message  # says why it is cancelled
        assert tried == 23

        # Nothing changed: records, outbox appends, and (after a marker went
        # through each order's lane) no new event.
        for state in STATES:
            assert await record(state) == stored[state], state
        assert await outbox_appends(redis, layout) == appended
        assert len(subscriber.events) == published
        for state in STATES:
            await lane_barrier(client, subscriber, oid[state])
        for state, n in counts.items():
            assert len(subscriber.of(oid[state])) == n, state


async def test_refund_after_timeout_is_refused_but_a_retried_refund_succeeds(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client:
        await client.create("late-payer", timeout=0.2)
        await client.create("unhappy", timeout=60)
        await client.pay("unhappy")
        first = await client.refund("unhappy")
        await wait_until(lambda: len(subscriber.of("late-payer")) == 2, 10, "late-payer to time out")

        with pytest.raises(Refused, match=r"'late-payer' is cancelled \(timeout\): refund is not allowed"):
            await client.refund("late-payer")
        retried = await client.refund("unhappy")
        assert first.changed and not retried.changed
        assert (retried.status, retried.version, retried.reason) == ("cancelled", 4, "refund")
        await lane_barrier(client, subscriber, "late-payer")
        await lane_barrier(client, subscriber, "unhappy")
    assert [e["status"] for e in subscriber.of("late-payer")] == ["created", "cancelled"]
    assert [e["status"] for e in subscriber.of("unhappy")] == ["created", "paid", "refunded", "cancelled"]


async def test_unknown_order(settings: Settings, redis: Redis) -> None:
    async with OrderClient(settings) as client:
        for operation in OPERATIONS:
            with pytest.raises(UnknownOrder, match="'nobody' does not exist") as raised:
                await call(client, operation, "nobody")
            assert raised.value.order_id == "nobody"
        with pytest.raises(UnknownOrder):
            await client.get("nobody")
    assert await redis.dbsize() == 0


async def test_create_of_an_existing_id_raises_order_exists_and_changes_nothing(
    settings: Settings, redis: Redis
) -> None:
    layout = KeyLayout(settings.key_prefix)
    async with OrderClient(settings) as client:
        await client.create("dup", timeout=60)
        await client.pay("dup")
        before = await redis.hgetall(layout.order("dup"))
        appended = await outbox_appends(redis, layout)
        with pytest.raises(OrderExists, match=r"'dup' already exists \(status paid\)") as raised:
            await client.create("dup", timeout=5)
        assert (raised.value.order_id, raised.value.status) == ("dup", "paid")
        assert await redis.hgetall(layout.order("dup")) == before
        assert not await redis.exists(layout.timer("dup"))  # a paid order has no timer, still
        assert await outbox_appends(redis, layout) == appended

        bulk = await client.create_many([("dup", 5), "fresh-1", ("fresh-2", 0.5)])
        assert [r.order_id for r in bulk.created] == ["fresh-1", "fresh-2"]
        assert [(r.order_id, r.existing_status) for r in bulk.existing] == [("dup", "paid")]
        assert await redis.hgetall(layout.order("dup")) == before
        assert await outbox_appends(redis, layout) == appended + 2


async def test_bad_input_is_refused_before_anything_is_written(settings: Settings, redis: Redis) -> None:
    async with OrderClient(settings) as client:
        bad_batches: list[list[str | tuple[str, float | str | None]]] = [
            [("ok-1", 60), ("bad id", 60), "ok-2"],
            ["ok-1", "x" * 129],
            ["ok-1", ("ok-2", 0.05)],
            ["ok-1", ("ok-2", "soon")],
            [("ok-1", 3_000_000), "ok-2"],
            ["ok-1", ""],
        ]
        for batch in bad_batches:
            with pytest.raises(BadInput):
                await client.create_many(batch)
        with pytest.raises(BadInput, match="not allowed"):
            await client.create("a/b")
        with pytest.raises(BadInput, match="out of range"):
            await client.create("ok-3", timeout=0)
        for operation in OPERATIONS:
            with pytest.raises(BadInput):
                await call(client, operation, "no spaces please")
    assert await redis.dbsize() == 0
