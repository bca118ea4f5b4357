"""The shipped JSON Schemas describe what really goes over MQTT: every event a
running daemon publishes through the whole transition table validates, and
the schema refuses events that break the contract (so the check can fail)."""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from listener import schemas
from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from tests.conftest import Subscriber, wait_until
from tests.life import carrier, rows, validator

# Every row of the contract's table, as (status, previous, reason) of its events.
TABLE_EVENTS = {
    ("created", None, "created"),
    ("paid", "created", "paid"),
    ("cancelled", "created", "timeout"),
    ("cancelled", "created", "customer"),
    ("delivered", "paid", "delivered"),
    ("refunded", "paid", "refund"),
    ("refunded", "delivered", "refund"),
    ("cancelled", "refunded", "refund"),
    ("delivered", "paid", "logistics"),
    ("refunded", "delivered", "returned"),
    ("cancelled", "refunded", "returned"),
    ("created", "created", "extended"),
}


def test_schemas_load_and_are_valid_2020_12() -> None:
    for name in schemas.NAMES:
        schema = schemas.load(name)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        check = validator(name)
        for example in schema["examples"]:
            check.validate(example)
    assert schemas.load("status-event.schema.json") == schemas.load("status-event")
    with pytest.raises(ValueError, match="no schema"):
        schemas.load("nothing")


async def test_every_published_event_matches_the_schema(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    await start_daemon()
    async with OrderClient(settings) as client, carrier(settings) as send:
        await client.create("sch-timeout", timeout=0.2)
        await client.create("sch-customer", timeout=60)
        await client.cancel("sch-customer")
        await client.create("sch-shipped", timeout=60)
        await client.pay("sch-shipped")
        await client.deliver("sch-shipped")
        await client.refund("sch-shipped")
        await client.create("sch-paid", timeout=60)
        await client.pay("sch-paid")
        await client.refund("sch-paid")
        await client.create("sch-extended", timeout=60)
        await client.extend("sch-extended", 30)
        await client.create("sch-carrier", timeout=60)
        await client.pay("sch-carrier")
        await send("sch-carrier", {"status": "delivered"})
        await send("sch-carrier", {"status": "returned"})
        expected = {"sch-timeout": 2, "sch-customer": 2, "sch-shipped": 5, "sch-paid": 4, "sch-carrier": 5}
        expected["sch-extended"] = 2
        await wait_until(
            lambda: all(len(subscriber.of(oid)) >= n for oid, n in expected.items()),
            15,
            lambda: f"all events; got {[(e['order_id'], e['status']) for e in subscriber.events]}",
        )
    assert len(subscriber.events) == sum(expected.values())
    assert rows(subscriber.of("sch-carrier")) == [
        ("created", None, "created", 1),
        ("paid", "created", "paid", 2),
        ("delivered", "paid", "logistics", 3),
        ("refunded", "delivered", "returned", 4),
        ("cancelled", "refunded", "returned", 5),
    ]

    check = validator("status-event")
    for event in subscriber.events:
        errors = [error.message for error in check.iter_errors(event)]
        assert errors == [], (event, errors)
    assert {(e["status"], e["previous"], e["reason"]) for e in subscriber.events} == TABLE_EVENTS

    # The same check refuses events that break the contract.
    created = next(e for e in subscriber.events if e["status"] == "created")
    cancelled = next(e for e in subscriber.events if e["status"] == "cancelled")
    paid = next(e for e in subscriber.events if e["status"] == "paid")
    extended = next(e for e in subscriber.events if e["reason"] == "extended")
    broken = [
        _without(created, "deadline"),
        {**cancelled, "deadline": created["deadline"]},
        {**paid, "at": paid["at"].replace("T", " ")},
        {**paid, "at": paid["at"][:19] + "Z"},  # no milliseconds
        {**paid, "at": paid["at"][:-1] + "+00:00"},
        {**paid, "at": "2026-13-40T25:61:00.000Z"},  # the right shape, not a time
        {**created, "deadline": "tomorrow"},
        {**paid, "previous": None},
        {**created, "previous": "paid"},
        {**paid, "status": "shipped"},
        {**paid, "reason": "because"},
        {**paid, "reason": "timeout"},  # paid is reached by pay only
        {**cancelled, "previous": "paid"},
        {**paid, "version": 0},
        {**paid, "version": "2"},
        {**paid, "order_id": "has space"},
        {**paid, "order_id": "x" * 129},
        {**paid, "extra": 1},
        _without(paid, "event_id"),
        _without(paid, "previous"),
        _without(extended, "deadline"),
        {**extended, "version": 1},
        {**extended, "previous": None},
        {**created, "reason": "extended"},
        {**paid, "reason": "extended"},
    ]
    for event in broken:
        assert not check.is_valid(event), event


def test_logistics_message_schema() -> None:
    check = validator("logistics-message")
    for good in ({"status": "delivered"}, {"status": "returned"}, {"status": "in_transit", "hub": "X"}):
        assert check.is_valid(good), good
    bad: object
    for bad in ({}, {"status": 3}, {"status": None}, [], "delivered", {"parcel": "delivered"}):
        assert not check.is_valid(bad), bad
    description = schemas.load("logistics-message")["description"]
    assert "ignored" in description and "4096" in description


def _without(event: dict[str, Any], name: str) -> dict[str, Any]:
    copied = copy.deepcopy(event)
    del copied[name]
    return copied
