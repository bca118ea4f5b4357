"""MQTT v5 by default (content type and user properties on every event), and
3.1.1 when asked for: the whole loop still works, events and logistics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiomqtt

from listener.api import OrderClient
from listener.config import Settings, load_settings
from listener.daemon import Daemon
from listener.urls import mqtt_target
from tests.conftest import Subscriber, wait_until
from tests.life import carrier, rows


@contextlib.asynccontextmanager
async def v5_messages(settings: Settings) -> AsyncIterator[list[aiomqtt.Message]]:
    """Every status message as an MQTT v5 subscriber receives it, properties included."""
    target = mqtt_target(settings.mqtt_url)
    received: list[aiomqtt.Message] = []
    subscribed = asyncio.Event()

    async def collect() -> None:
        async with aiomqtt.Client(
            target.host,
            target.port,
            identifier=f"test-v5-{os.getpid()}-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(f"{settings.topic_prefix}/+/status", qos=1)
            subscribed.set()
            async for message in client.messages:
                received.append(message)

    task = asyncio.create_task(collect())
    await asyncio.wait_for(subscribed.wait(), 10)
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def body(message: aiomqtt.Message) -> dict[str, Any]:
    assert isinstance(message.payload, bytes)
    decoded: dict[str, Any] = json.loads(message.payload)
    return decoded


async def test_v5_by_default_with_content_type_and_user_properties(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    assert settings.mqtt_protocol == "5"
    daemon = await start_daemon()
    assert daemon.link.v5
    async with v5_messages(settings) as received, OrderClient(settings) as client:
        await client.create("v5-1", timeout=60)
        await client.pay("v5-1")
        await wait_until(lambda: len(received) == 2, 10, "two v5 messages")
    for message, status in zip(received, ("created", "paid"), strict=True):
        event = body(message)
        assert event["status"] == status
        assert str(message.topic) == f"{settings.topic_prefix}/v5-1/status"
        assert message.qos == 1 and not message.retain
        properties = message.properties
        assert properties is not None
        # paho's Properties sets these by name at run time; its types do not declare them
        assert properties.ContentType == "application/json"  # type: ignore[attr-defined]
        assert properties.UserProperty == [("event_id", event["event_id"]), ("status", status)]  # type: ignore[attr-defined]


async def test_mqtt_3_1_1_when_configured(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    old = load_settings(
        redis_url=settings.redis_url,
        mqtt_url=settings.mqtt_url,
        mqtt_protocol="3.1.1",
        resync_interval=settings.resync_interval,
        shutdown_timeout=settings.shutdown_timeout,
    )
    daemon = await start_daemon(old)
    assert not daemon.link.v5
    async with v5_messages(settings) as received, OrderClient(old) as client, carrier(settings) as send:
        await client.create("v311-1", timeout=60)
        await client.pay("v311-1")
        await send("v311-1", {"status": "delivered"})  # logistics in over the 3.1.1 session too
        await client.create("v311-2", timeout=0.2)
        await wait_until(
            lambda: len(subscriber.of("v311-1")) == 3 and len(subscriber.of("v311-2")) == 2,
            10,
            lambda: f"events over 3.1.1; got {subscriber.events}",
        )
        await wait_until(lambda: len(received) == 5, 10, "the v5 subscriber to see them too")
    assert rows(subscriber.of("v311-1")) == [
        ("created", None, "created", 1),
        ("paid", "created", "paid", 2),
        ("delivered", "paid", "logistics", 3),
    ]
    assert rows(subscriber.of("v311-2"))[-1] == ("cancelled", "created", "timeout", 2)
    for message in received:  # a 3.1.1 publish has no properties to pass on
        properties = message.properties
        assert getattr(properties, "ContentType", None) is None
        assert getattr(properties, "UserProperty", None) is None
