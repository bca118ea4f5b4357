"""Helpers shared by the order-life tests: a carrier publishing logistics
messages, a strict JSON Schema validator, and ways to prove that nothing new
was published (the outboxes' append counters, and a same-lane marker event)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

import aiomqtt
from jsonschema import Draft202012Validator, FormatChecker
from redis.asyncio import Redis

from listener import schemas
from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.keys import PARTS, KeyLayout, part_of
from listener.store import CreateResult
from listener.urls import mqtt_target
from tests.conftest import Subscriber, wait_until

Send = Callable[[str, bytes | dict[str, Any]], Awaitable[None]]
EventRow = tuple[str, str | None, str, int]  # status, previous, reason, version


def rows(events: list[dict[str, Any]]) -> list[EventRow]:
    return [(e["status"], e["previous"], e["reason"], e["version"]) for e in events]


def deadline_of(result: CreateResult) -> int:
    """The deadline of an order `create` made (only one that was there already has none)."""
    assert result.deadline_ms is not None, result
    return result.deadline_ms


@contextlib.asynccontextmanager
async def carrier(settings: Settings, topic: str = "logistics/{}/status") -> AsyncIterator[Send]:
    """A logistics system on the test broker: `await send(order_id, payload)`
    publishes with QoS 1 on `topic` (the order id fills the braces)."""
    target = mqtt_target(settings.mqtt_url)
    identifier = f"test-carrier-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    async with aiomqtt.Client(target.host, target.port, identifier=identifier) as client:

        async def send(order_id: str, payload: bytes | dict[str, Any]) -> None:
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            await client.publish(topic.format(order_id), body, qos=1)

        yield send


def _strict_date_time(value: object) -> bool:
    """RFC 3339 date-time, checked by the standard library (jsonschema only
    checks it when the optional rfc3339-validator is installed)."""
    if not isinstance(value, str):
        return True
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in value and (value.endswith("Z") or value[-6] in "+-")


def validator(name: str) -> Draft202012Validator:
    """A validator for the shipped schema `name`, with format checking."""
    schema = schemas.load(name)
    Draft202012Validator.check_schema(schema)
    checker = FormatChecker()
    checker.checks("date-time")(_strict_date_time)
    return Draft202012Validator(schema, format_checker=checker)


def outbox_streams(layout: KeyLayout) -> list[str]:
    """Both outbox lanes of every part: the transitions, then the `created` events."""
    return [key for part in range(PARTS) for key in (layout.outbox(part), layout.outbox_created(part))]


async def outbox_appends(redis: Redis, layout: KeyLayout) -> int:
    """How many entries were ever appended to the outbox streams (both lanes of
    every part). The daemon deletes entries once published, so the length
    says nothing; Redis' `entries-added` counter does."""
    total = 0
    for key in outbox_streams(layout):
        if await redis.exists(key):
            info = await redis.xinfo_stream(key)
            total += int(info["entries-added"])
    return total


_markers = itertools.count()


def id_in_part_of(order_id: str, stem: str = "mark") -> str:
    """A fresh order id in the same part (so the same outbox lane) as `order_id`."""
    part = part_of(order_id)
    while True:
        candidate = f"{stem}-{os.getpid()}-{next(_markers)}"
        if part_of(candidate) == part:
            return candidate


async def lane_barrier(client: OrderClient, subscriber: Subscriber, order_id: str) -> str:
    """Create and cancel a marker order in `order_id`'s lane and wait for its
    `cancelled` event. The lane publishes in append order, so anything appended
    for `order_id` before this call has reached the subscriber by then."""
    marker = id_in_part_of(order_id)
    await client.create(marker, timeout=600)
    await client.cancel(marker)
    await wait_until(lambda: len(subscriber.of(marker)) >= 2, 10, f"marker {marker} through the lane")
    return marker


async def lanes_barrier(client: OrderClient, subscriber: Subscriber, order_ids: Iterable[str]) -> set[str]:
    """`lane_barrier` for the lane of each of `order_ids`: whatever was appended
    for them before has reached the subscriber. Returns the marker ids."""
    firsts = {part_of(order_id): order_id for order_id in order_ids}
    return {await lane_barrier(client, subscriber, order_id) for order_id in firsts.values()}


async def cancelled_by_its_expired_event(
    settings: Settings, redis: Redis, subscriber: Subscriber, order_id: str, daemon: Daemon | None = None
) -> None:
    """Create `order_id` with a short window and take it out of the deadline
    index at once: only Redis' `expired` event of its timer can cancel it.
    Waits for its `cancelled` event (reason timeout) and, given the in-process
    `daemon`, for its listener to count it: the count goes up once the expire
    script's reply is read, which may come after the outbox sent the event."""
    counted = daemon.listener.cancelled if daemon is not None else 0
    async with OrderClient(settings) as client:
        await client.create(order_id, timeout=0.3)
    layout = KeyLayout(settings.key_prefix)
    assert await redis.zrem(layout.deadlines(part_of(order_id)), order_id) == 1
    await wait_until(lambda: len(subscriber.of(order_id)) == 2, 15, f"{order_id} cancelled by its timer")
    assert subscriber.of(order_id)[1]["reason"] == "timeout"
    if daemon is not None:
        listener = daemon.listener
        await wait_until(lambda: listener.cancelled == counted + 1, 5, f"the listener's count of {order_id}")
