"""The fast publish path: events encoded byte for byte as before, batches
acknowledged by their PUBACKs over one or several connections, per-order
order kept, the broker's Receive Maximum respected, a lost connection failing
a waiting publish at once, and paho's plain `publish` as the fallback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import socket
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from listener.config import FastPathSetting, Settings
from listener.events import StatusEvent, iso_ms
from listener.fastpath import paho_io
from listener.mqtt import MqttLink, Publisher
from listener.mqtt import window as window_module
from listener.mqtt.drops import DropWatch
from listener.mqtt.packets import _length, encode_publish, property_bytes, topic_level_ok
from listener.servers import ServerProcess, mosquitto
from listener.supervise import Service
from tests.conftest import Subscriber, wait_until

# CI runs these once more with ORDER_LISTENER_FAST_PATHS=off (both ways stay green)
pytestmark = pytest.mark.fastpath

SAMPLES = [
    StatusEvent("A-1001", "cancelled", "created", "timeout", 2, 1795564749929, 1795564747000),
    StatusEvent("B.2:x_y", "created", None, "created", 1, 1795564749000, 1795564749000, 1795564759001),
    StatusEvent("x" * 128, "refunded", "delivered", "returned", 4, 1, 0),
    StatusEvent('odd"\\é☃\n', "paid", "created", "paid", 2, 253402300799999, 946684800000),
]


def test_payload_is_what_json_dumps_gives() -> None:
    for event in SAMPLES:
        assert event.payload() == json.dumps(event.as_dict(), separators=(",", ":")).encode()


def test_iso_ms_is_the_utc_time_to_the_millisecond() -> None:
    rng = random.Random(7)
    for unix_ms in [
        0,
        999,
        1000,
        1795564749929,
        253402300799999,
        *(rng.randrange(0, 4 * 10**12) for _ in range(2000)),
    ]:
        moment = datetime.fromtimestamp(unix_ms / 1000, tz=UTC)
        assert iso_ms(unix_ms) == moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{unix_ms % 1000:03d}Z"


def paho_packet(event: StatusEvent, v5: bool) -> bytes:
    """The PUBLISH packet paho builds for the event, with properties built by paho."""
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5 if v5 else paho.MQTTv311)
    built: list[bytes] = []

    def capture(
        command: int, packet: bytes | bytearray, mid: int, qos: int, info: paho.MQTTMessageInfo | None = None
    ) -> MQTTErrorCode:
        built.append(bytes(packet))
        return paho.MQTT_ERR_SUCCESS

    left, right = socket.socketpair()
    try:
        client._sock = left
        client._packet_queue = capture  # type: ignore[method-assign]
        properties = None
        if v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ContentType = "application/json"
            properties.UserProperty = ("event_id", event.event_id)
            properties.UserProperty = ("status", event.status)
        topic = f"orders/{event.order_id}/status".encode()
        client._send_publish(4711, topic, event.payload(), 1, False, False, None, properties)
    finally:
        client._sock = None
        left.close()
        right.close()
    assert len(built) == 1
    return built[0]


@pytest.mark.parametrize("v5", [True, False], ids=["v5", "v3.1.1"])
def test_publish_packet_is_what_paho_builds(v5: bool) -> None:
    for event in SAMPLES[:3]:
        topic = f"orders/{event.order_id}/status".encode()
        ours = encode_publish(topic, 4711, property_bytes(event) if v5 else None, event.payload())
        assert ours == paho_packet(event, v5)


@pytest.mark.parametrize(
    ("order_id", "ok"),
    [("A-1001", True), ("B.2:x_y", True), ('odd"\\é☃', True), ("", False)]
    + [(f"a{bad}b", False) for bad in "+#/\0"]
    + [(bad, False) for bad in "+#/\0"],
)
def test_an_order_id_is_a_topic_level_without_a_wildcard_or_a_separator(order_id: str, ok: bool) -> None:
    assert topic_level_ok(order_id) is ok


@pytest.mark.parametrize("value", [0, 1, 127, 128, 16383, 16384, 2097151, 2097152, 268435455])
def test_remaining_length_is_the_mqtt_variable_byte_integer(value: int) -> None:
    """Every branch of `_length`, against the spec's algorithm (MQTT 5, 1.5.5)."""
    expected = bytearray()
    x = value
    while True:
        byte, x = x % 128, x // 128
        expected.append(byte | 0x80 if x > 0 else byte)
        if x == 0:
            break
    assert _length(value) == bytes(expected)


def events_for(tag: str, orders: int, versions: int) -> list[StatusEvent]:
    """Every order's events in version order, orders interleaved."""
    return [
        StatusEvent(f"{tag}-{n}", "paid", "created", "paid", version, 1795564749929 + version, 1795564740000)
        for version in range(2, 2 + versions)
        for n in range(orders)
    ]


@contextlib.asynccontextmanager
async def running(
    settings: Settings, drops: DropWatch | None = None, connect_within: float = 10
) -> AsyncIterator[MqttLink]:
    link = MqttLink(settings, Service("mqtt"), drops=drops)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), connect_within)
        yield link
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish_lanes(link: MqttLink, events: Sequence[StatusEvent], lanes: int, batch: int) -> None:
    """Like the outbox: a lane per part, each publishing its orders' events in batches."""
    by_lane: list[list[StatusEvent]] = [[] for _ in range(lanes)]
    for event in events:
        by_lane[hash(event.order_id) % lanes].append(event)

    async def lane(part: int) -> None:
        mine = by_lane[part]
        for start in range(0, len(mine), batch):
            await link.publish(mine[start : start + batch], part=part)

    await asyncio.gather(*(lane(part) for part in range(lanes)))


@pytest.mark.parametrize(
    ("protocol", "connections", "fast"),
    [("5", 1, True), ("5", 3, True), ("3.1.1", 2, True), ("5", 2, False), ("3.1.1", 1, False)],
)
async def test_lanes_over_connections_arrive_complete_and_in_order(
    settings: Settings,
    subscriber: Subscriber,
    monkeypatch: pytest.MonkeyPatch,
    protocol: str,
    connections: int,
    fast: bool,
) -> None:
    tag = f"pp{protocol.replace('.', '')}c{connections}{'f' if fast else 's'}"
    config = dataclasses.replace(
        settings,
        mqtt_protocol=protocol,
        mqtt_connections=connections,
        fast_paths=FastPathSetting.AUTO if fast else FastPathSetting.OFF,
    )
    events = events_for(tag, orders=300, versions=3)
    async with running(config) as link:
        current = await link.connection()
        assert len(current.publishers) == connections
        assert all((p.client.fast is not None) == fast for p in current.publishers)
        await publish_lanes(link, events, lanes=16, batch=37)
    await wait_until(
        lambda: len([e for e in subscriber.events if e["order_id"].startswith(f"{tag}-")]) == len(events),
        15,
        "every event at the subscriber",
    )
    for n in range(300):
        assert [e["version"] for e in subscriber.of(f"{tag}-{n}")] == [2, 3, 4]


async def test_the_brokers_receive_maximum_bounds_what_is_in_flight(
    settings: Settings, small_broker: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{small_broker.port}")
    highest = 0
    send = Publisher.send

    def counting(self: Publisher, events: Sequence[StatusEvent], tokens: Sequence[Any], sink: Any) -> None:
        nonlocal highest
        send(self, events, tokens, sink)
        highest = max(highest, self.inflight)

    monkeypatch.setattr(Publisher, "send", counting)
    async with running(config) as link:
        current = await link.connection()
        assert current.publishers[0].client.receive_maximum == 5
        assert current.publishers[0].window == 5
        await publish_lanes(link, events_for("rm", orders=100, versions=2), lanes=8, batch=40)
    assert 0 < highest <= 5


async def test_a_lost_connection_fails_a_waiting_publish_at_once(settings: Settings, workdir: Path) -> None:
    broker = mosquitto(workdir / f"lost-{random.randrange(10**9)}")
    broker.start()
    try:
        config = dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{broker.port}")
        async with running(config) as link:
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)  # takes the publish, never acknowledges it
            waiting = asyncio.create_task(link.publish(events_for("lost", orders=5, versions=1), timeout=30))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            broker.kill()
            with pytest.raises(aiomqtt.MqttError):
                await asyncio.wait_for(waiting, 5)  # not the 30 s timeout
            broker.start()  # the link reconnects; publishing works again
            await asyncio.wait_for(link.publish(events_for("back", orders=5, versions=1)), 20)
    finally:
        broker.stop()


async def test_a_paced_publish_hears_a_silent_broker_between_its_steps(
    settings: Settings, workdir: Path
) -> None:
    """A paced publish (replay's) is held by its pace with room in the window:
    a broker that stops answering fails it after `timeout`, not once the pace
    has filled the window (1,000 on this broker: 100 s at 10 a second)."""
    broker = mosquitto(workdir / f"silent-{random.randrange(10**9)}", profile="tuned")
    broker.start()
    try:
        config = dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{broker.port}")
        async with running(config) as link:
            publisher = (await link.connection()).publishers[0]
            assert publisher.window == 1000
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)
            try:
                paced = publisher.publish(events_for("silent", orders=200, versions=1), timeout=1.0, rate=10)
                with pytest.raises(aiomqtt.MqttError, match="no PUBACK"):
                    await asyncio.wait_for(paced, 10)
            finally:
                broker.proc.send_signal(signal.SIGCONT)
    finally:
        broker.stop()


async def test_a_paced_publish_fails_at_once_when_the_connection_is_lost_between_its_steps(
    settings: Settings, workdir: Path
) -> None:
    """Lost while nothing of the paced publish was in flight (between two
    steps): it fails instead of waiting for a window that never comes back."""
    broker = mosquitto(workdir / f"gone-{random.randrange(10**9)}")
    broker.start()
    try:
        config = dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{broker.port}")
        async with running(config) as link:
            publisher = (await link.connection()).publishers[0]
            acked: list[int] = []
            events = events_for("gone", orders=100, versions=1)
            paced = asyncio.create_task(publisher.publish(events, 30, rate=5, progress=acked.append))
            await wait_until(lambda: bool(acked), 10, "the first step acknowledged")
            broker.kill()
            with pytest.raises(aiomqtt.MqttError):
                await asyncio.wait_for(paced, 10)
    finally:
        broker.stop()


class FakeLoop:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


def test_a_pace_goes_a_step_at_a_time_and_catches_up_at_most_four_steps() -> None:
    loop = FakeLoop()
    pace = window_module._Pace(1000.0, cast(asyncio.AbstractEventLoop, loop))
    assert pace.step == 5
    assert pace.allows(0) == 5  # the first step at once
    assert pace.allows(5) == 0 and pace.wait(5) == pytest.approx(0.005)
    loop.now += 0.005
    assert pace.allows(5) == 5
    loop.now += 1.0  # a full window, or a late wake-up: 1,000 behind
    assert pace.allows(10) == 4 * 5, "caught up at most four steps at once"
    assert pace.allows(30) == 0 and pace.wait(30) == pytest.approx(0.005)
    assert window_module._Pace(0.0, cast(asyncio.AbstractEventLoop, loop)).allows(10**9) > 10**9


async def test_the_paho_fast_path_is_checked_and_falls_back_for_good_on_a_failure(
    settings: Settings, subscriber: Subscriber, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paho that changed under the same names: the first read of the fast
    path fails. The link gives the path up for good (registry, one reconnect)
    and publishes on through paho's public `publish`; nothing is lost."""
    config = dataclasses.replace(settings, fast_paths=FastPathSetting.AUTO)
    failures = 0
    take_acks = paho_io.FastPaho._take_acks

    def failing(self: paho_io.FastPaho) -> None:
        nonlocal failures
        failures += 1
        raise AttributeError("'FastPaho' object has no attribute '_rbuf_moved'")

    async with running(config) as link:
        decided = link.fast_paths.get(paho_io.SPEC.name)
        assert decided is not None and decided.fast, decided
        before = (await link.connection()).publishers[0].client
        assert before.fast is not None
        monkeypatch.setattr(paho_io.FastPaho, "_take_acks", failing)  # the PUBACKs' read fails
        with contextlib.suppress(aiomqtt.MqttError):
            await link.publish(events_for("fb1", orders=5, versions=1), timeout=5)
        monkeypatch.setattr(paho_io.FastPaho, "_take_acks", take_acks)
        assert failures == 1
        decided = link.fast_paths.get(paho_io.SPEC.name)
        assert decided is not None and not decided.fast and "_rbuf_moved" in decided.why
        await wait_until(
            lambda: link._current is not None and link._current.publishers[0].client is not before,
            10,
            "a new connection",
        )
        after = (await link.connection()).publishers[0].client
        assert after.fast is None, "the new connection publishes the public way"
        await link.publish(events_for("fb2", orders=20, versions=2), timeout=10)
    await wait_until(
        lambda: len([e for e in subscriber.events if e["order_id"].startswith("fb2-")]) == 40,
        10,
        "every event published after the fall back",
    )


def test_the_paho_fast_path_falls_back_on_an_untested_version_or_a_missing_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from listener.fastpath import FastPaths, Spec

    assert FastPaths().decide(paho_io.SPEC).fast, "fast on the versions pinned in pyproject.toml"
    untested = Spec(paho_io.SPEC.name, {"paho-mqtt": "1.6"}, paho_io.SPEC.check)
    decided = FastPaths().decide(untested)
    assert not decided.fast and "not tested (tested 1.6.x)" in decided.why
    monkeypatch.delattr(paho.Client, "_packet_read")
    decided = FastPaths().decide(paho_io.SPEC)
    assert not decided.fast and "paho.mqtt.client.Client._packet_read" in decided.why
