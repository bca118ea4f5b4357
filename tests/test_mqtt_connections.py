"""How many MQTT connections the daemon publishes over: `auto` reads the
broker's Receive Maximum and spreads the lanes over enough connections to
keep about 64 publishes in flight, in order per order, and goes on with
fewer when the broker refuses one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from listener.config import Settings
from listener.mqtt import MqttLink
from listener.mqtt import client as client_module
from listener.mqtt.link import connections_for
from listener.outbox import _changed
from listener.servers import ServerProcess, mosquitto
from listener.supervise import Service
from tests.conftest import wait_until, watch_topic
from tests.test_publish_path import events_for, publish_lanes, running


@pytest.mark.parametrize(
    ("receive_maximum", "connections"), [(20, 4), (32, 2), (5, 8), (1, 8), (64, 1), (65535, 1), (None, 1)]
)
def test_auto_connections_keep_about_64_in_flight(receive_maximum: int | None, connections: int) -> None:
    assert connections_for(receive_maximum) == connections


@pytest.mark.parametrize(
    ("protocol", "configured", "small", "expected"),
    [
        ("5", None, False, 4),
        ("5", None, True, 8),
        ("3.1.1", None, False, 1),
        ("5", 1, False, 1),
        ("5", 3, True, 3),
    ],
)
async def test_auto_opens_connections_by_the_brokers_receive_maximum(
    settings: Settings,
    small_broker: ServerProcess,
    protocol: str,
    configured: int | None,
    small: bool,
    expected: int,
) -> None:
    """The test broker keeps mosquitto's default of 20 in flight; the small
    one announces 5. Whatever the count, every lane's events arrive in order."""
    config = dataclasses.replace(settings, mqtt_protocol=protocol, mqtt_connections=configured)
    if small:
        config = dataclasses.replace(config, mqtt_url=f"mqtt://127.0.0.1:{small_broker.port}")
    tag = f"auto{protocol.replace('.', '')}{configured}{'s' if small else ''}{random.randrange(10**6)}"
    events = events_for(tag, orders=50, versions=2)
    async with watch_topic(config, f"{config.topic_prefix}/+/status", f"{tag}-watch") as seen:
        async with running(config) as link:
            current = await link.connection()
            assert len(current.publishers) == expected
            assert len({id(p.client) for p in current.publishers}) == expected
            await publish_lanes(link, events, lanes=16, batch=7)
        await wait_until(lambda: len(seen) >= len(events), 15, "every event at the subscriber")
    for n in range(50):
        assert [r.event["version"] for r in seen if r.event["order_id"] == f"{tag}-{n}"] == [2, 3]


class _Answers:
    """What the broker answered to the publishes of one test (an AckSink)."""

    def __init__(self) -> None:
        self.tokens: list[Any] = []

    def acked(self, token: Any, reason: int) -> None:
        self.tokens.append(token)

    def lost(self, reason: str) -> None:
        pass


async def test_a_puback_handled_as_the_wait_begins_ends_the_wait(settings: Settings) -> None:
    """Waiting for a PUBACK on any of several connections: one handled in the
    same turn of the event loop as the wait begins (before the wait first
    ran) ends it, instead of the wait lasting its whole timeout while the
    window stands empty."""
    async with running(settings) as link:
        publishers = (await link.connection()).publishers
        assert len(publishers) > 1, "auto opens several connections on a stock broker"
        first = publishers[0]
        answers = _Answers()
        first.send(events_for("wake", orders=1, versions=1), ["the one"], answers)
        (mid,) = first.client.pending
        # The PUBACK as the socket reader hands it over, in the next turn of the
        # loop and before anything the wait schedules (the broker's own PUBACK
        # for it comes later and finds nothing pending).
        asyncio.get_running_loop().call_soon(first.client.acker, mid, 0)
        started = time.monotonic()
        await _changed(publishers, 5.0)
        assert time.monotonic() - started < 1.0, "the wait missed the PUBACK"
        assert answers.tokens == ["the one"]


@pytest.fixture
def connection_limited_broker(workdir: Path) -> Any:
    """A mosquitto that takes 2 clients at once (mosquitto 2.0 admits one more
    than its `max_connections`; the next gets no CONNACK) and allows 20 in flight."""
    broker = mosquitto(
        workdir / f"limited-{random.randrange(10**9)}", extra_conf="max_connections 1\n", durable=False
    )
    broker.start()
    yield broker
    broker.stop()


async def test_auto_goes_on_with_the_connections_the_broker_accepts(
    settings: Settings, connection_limited_broker: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto asks a stock broker for 4 connections; this one refuses the third:
    the link publishes over the two it has, says so, and asks for no more on
    its next session."""
    config = dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{connection_limited_broker.port}")
    monkeypatch.setattr(client_module, "CLIENT_TIMEOUT_S", 3.0)  # (10 s in the daemon)
    with structlog.testing.capture_logs() as logged:
        link = MqttLink(config, Service("mqtt"))
        task = asyncio.create_task(link.run())
        try:
            # the refused connection is given up after the client's connect timeout
            await asyncio.wait_for(link.connected.wait(), 30)
            assert len((await link.connection()).publishers) == 2
            assert link.count == 2
            assert link._auto_cap == 2
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    refused = "the broker refused another publish connection"
    warnings = [line for line in logged if line["event"].startswith(refused)]
    assert len(warnings) == 1 and warnings[0]["wanted"] == 4
