"""What the broker says it dropped: the daemon reads mosquitto's count of
dropped messages (`$SYS/broker/publish/messages/dropped`) and turns it into a
metric and a warning with the fix, because a subscriber's queue overflowing
at the broker is invisible to the publisher and to the subscriber."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest
import structlog

from listener import logs
from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.mqtt import client as client_module
from listener.mqtt import link as link_module
from listener.mqtt.drops import DROPPED_TOPIC, DropWatch, read_count
from listener.servers import ServerProcess, mosquitto
from tests.conftest import CliResult, env_for, quiet_logs, wait_until
from tests.test_publish_path import events_for, running

FIX_WORDS = "max_queued_messages"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_first_count_is_a_baseline_and_later_ones_count_what_is_new() -> None:
    counted: list[int] = []
    clock = Clock()
    watch = DropWatch(counted.append, clock)
    with structlog.testing.capture_logs() as logged:
        watch.seen(b"40")  # dropped before this daemon connected: said, not counted
        watch.seen(b"40")  # the same retained count again (a reconnect)
        watch.seen(b"55")
        clock.now += 10
        watch.seen(b"70")  # within a minute of the last warning: counted, not said
        clock.now += 60
        watch.seen(b"71")
    assert counted == [15, 15, 1]
    warnings = [(line["event"], line.get("dropped")) for line in logged if line["log_level"] == "warning"]
    assert warnings == [
        ("the broker dropped messages before this daemon connected", 40),
        ("the broker dropped messages: a subscriber's queue at the broker is full", 15),
        ("the broker dropped messages: a subscriber's queue at the broker is full", 16),
    ]
    assert all(FIX_WORDS in line["fix"] for line in logged)


def test_a_lower_count_is_a_restarted_broker_counting_from_zero() -> None:
    counted: list[int] = []
    watch = DropWatch(counted.append, Clock())
    for payload in (b"500", b"3", b"0", b"7", b"9"):
        watch.seen(payload)
    assert counted == [3, 7, 2], "3 dropped since the restart; 0: restarted again, none yet"


def test_drops_held_back_by_the_minute_are_said_when_it_is_over() -> None:
    clock = Clock()
    watch = DropWatch(lambda _: None, clock)
    with structlog.testing.capture_logs() as logged:
        watch.seen(b"0")
        watch.seen(b"5")  # said at once
        clock.now += 20
        watch.seen(b"9")  # within the minute: held back
        watch.tick()
        clock.now += 40
        watch.tick()  # the minute is over: the 4 are said, with no new count needed
        watch.tick()
    said = [(line["dropped"], line["broker_total"]) for line in logged if "dropped" in line]
    assert said == [(5, 5), (4, 9)]


def test_a_warning_of_new_drops_carries_the_replay_from_before_them() -> None:
    """mosquitto publishes the count when it changed, at its next tick: the
    drops a count shows came after the count before it and within a minute
    of it. The warning names the `replay` from the later of the two, less a
    margin for the clocks of this machine and Redis; drops held back by the
    minute are replayed from before the first of them."""
    clock, wall = Clock(), Clock()
    wall.now = 1_800_000_000.0  # 2027-01-15T08:00:00Z
    watch = DropWatch(lambda _: None, clock, wall, replay=True)
    with structlog.testing.capture_logs() as logged:
        watch.seen(b"0")  # the baseline, long before the drops
        clock.now += 100
        wall.now += 100
        watch.seen(b"5")  # said at once; the drops within the minute before: from +40 s
        clock.now += 10
        wall.now += 10
        watch.seen(b"9")  # within the minute: held back; its drops after the count at +100 s
        clock.now += 10
        wall.now += 10
        watch.seen(b"12")  # held back too
        clock.now += 60
        watch.tick()
    said = [(line["dropped"], line["replay"]) for line in logged if "dropped" in line]
    assert said == [
        (5, "order-listener replay --since 2027-01-15T08:00:30.000Z --publish"),  # +100 - 60 - 10 s
        (7, "order-listener replay --since 2027-01-15T08:01:30.000Z --publish"),  # +100 - 10 s
    ]


def test_without_an_event_log_the_warning_names_no_replay() -> None:
    watch = DropWatch(lambda _: None, Clock(), Clock(), replay=False)
    with structlog.testing.capture_logs() as logged:
        watch.seen(b"0")
        watch.seen(b"5")
    said = [line for line in logged if "dropped" in line]
    assert len(said) == 1 and "replay" not in said[0]


@pytest.fixture
def info_logs() -> Iterator[None]:
    logs.configure("info", stream=sys.stderr)
    yield
    quiet_logs()


@pytest.mark.usefixtures("info_logs")
def test_no_count_within_half_a_minute_of_subscribing_is_said_once_with_the_grant() -> None:
    clock = Clock()
    watch = DropWatch(lambda _: None, clock)
    with structlog.testing.capture_logs() as logged:
        watch.subscribed()
        clock.now += 29
        watch.tick()
        clock.now += 1
        watch.tick()
        watch.tick()
    assert [line["event"] for line in logged] == [
        "no count of dropped messages from the broker within 30 s: not watched "
        "(brokers other than mosquitto publish none)"
    ]
    assert "topic read $SYS/broker/publish/messages/dropped" in logged[0]["fix"]
    assert not watch.watched
    with structlog.testing.capture_logs() as later:
        watch.seen(b"0")
        clock.now += 100
        watch.tick()
    assert watch.watched and later == []


@pytest.mark.parametrize(
    "payload",
    [b"", b"-3", b"3.5", b"12a", "٣".encode(), b"1" * 21, b"\xff", None, 3, "7x"],
)
def test_a_count_that_is_not_a_whole_number_is_ignored_and_said_once(payload: object) -> None:
    counted: list[int] = []
    watch = DropWatch(counted.append, Clock())
    with structlog.testing.capture_logs() as logged:
        watch.seen(b"10")
        watch.seen(payload)
        watch.seen(payload)
        watch.seen(b"12")  # still counted from the last good one
    assert counted == [2]
    ignored = [line for line in logged if "not a whole number" in line["event"]]
    assert len(ignored) == 1


def test_a_count_as_text_or_bytearray_is_read() -> None:
    counted: list[int] = []
    watch = DropWatch(counted.append, Clock())
    for payload in ("3", bytearray(b"5"), "8"):
        watch.seen(payload)
    assert counted == [2, 3]


@pytest.fixture
def dropping_broker(workdir: Path) -> Iterator[ServerProcess]:
    """A mosquitto that queues at most 5 messages per client and publishes its
    $SYS counts every second."""
    broker = mosquitto(
        workdir / f"drops-{random.randrange(10**9)}", extra_conf="max_queued_messages 5\nsys_interval 1\n"
    )
    broker.start()
    yield broker
    broker.stop()


async def make_drops(port: int, tag: str, count: int) -> None:
    """A persistent QoS 1 subscriber goes offline; `count` messages for it
    follow: the broker queues 5 and drops the rest."""
    v311 = aiomqtt.ProtocolVersion.V311
    slow = aiomqtt.Client("127.0.0.1", port, identifier=f"{tag}-slow", clean_session=False, protocol=v311)
    async with slow:
        await slow.subscribe(f"{tag}/#", qos=1)
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"{tag}-pub") as publisher:
        for n in range(count):
            await publisher.publish(f"{tag}/x", str(n), qos=1)


def dropped_metric(daemon: Daemon) -> float:
    value = daemon.metrics.registry.get_sample_value("order_listener_broker_dropped_messages_total")
    return value or 0.0


async def test_the_daemon_counts_and_says_what_a_stock_broker_drops_across_a_broker_restart(
    settings: Settings,
    dropping_broker: ServerProcess,
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    config = dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{dropping_broker.port}")
    tag = f"drops{random.randrange(10**6)}"
    with structlog.testing.capture_logs() as logged:
        daemon = await start_daemon(config)
        watch = daemon.drop_watch
        await wait_until(lambda: watch.last is not None, 10, "the broker's count read (retained)")
        await make_drops(dropping_broker.port, tag, 30)
        await wait_until(lambda: dropped_metric(daemon) == 25, 10, "25 drops counted")

        dropping_broker.restart()  # its count starts again from 0
        await make_drops(dropping_broker.port, f"{tag}b", 15)
        await wait_until(lambda: dropped_metric(daemon) == 35, 20, "10 more after the restart")
    said = [line for line in logged if line["event"].startswith("the broker dropped messages:")]
    assert [line["dropped"] for line in said] == [25], "the 10 came within a minute: counted, not said again"
    assert FIX_WORDS in said[0]["fix"]
    assert not [line for line in logged if "before this daemon connected" in line["event"]]


async def test_the_warnings_replay_gives_a_subscriber_what_the_broker_dropped_for_it(
    settings: Settings,
    dropping_broker: ServerProcess,
    start_daemon: Callable[..., Awaitable[Daemon]],
    cli: Callable[..., Awaitable[CliResult]],
) -> None:
    """A persistent subscriber is away while 30 orders are created: the broker
    queues 5 of their events for it and drops 25. The daemon's warning names a
    `replay`; run as given (at a pace for this broker's small queue), it
    brings the subscriber every event it missed, with the event_ids the
    daemon published."""
    config = dataclasses.replace(settings, mqtt_url=f"mqtt://127.0.0.1:{dropping_broker.port}")
    tag = f"again{random.randrange(10**6)}"
    topic = f"{config.topic_prefix}/+/status"
    v311 = aiomqtt.ProtocolVersion.V311

    def subscriber() -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", dropping_broker.port, identifier=f"{tag}-away", clean_session=False, protocol=v311
        )

    with structlog.testing.capture_logs() as logged:
        daemon = await start_daemon(config)
        await wait_until(lambda: daemon.drop_watch.last is not None, 10, "the broker's count read (retained)")
        async with subscriber() as away:
            await away.subscribe(topic, qos=1)
        async with OrderClient(config) as orders:
            await orders.create_many([(f"{tag}-{n}", 600) for n in range(30)])
        await wait_until(lambda: dropped_metric(daemon) == 25, 15, "25 drops counted")
        await wait_until(lambda: any("replay" in line for line in logged), 10, "the warning")
    replay = next(line["replay"] for line in logged if "replay" in line).split()
    assert replay[:2] == ["order-listener", "replay"] and replay[-1] == "--publish", replay

    seen: dict[str, dict[str, object]] = {}

    async def collect(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            event = json.loads(message.payload)
            seen[str(event["event_id"])] = event

    async with subscriber() as back:  # the same session: its 5 queued events come first
        collecting = asyncio.create_task(collect(back))
        try:
            await wait_until(lambda: len(seen) == 5, 10, "the 5 events the broker kept")
            env = env_for(config, ORDER_LISTENER_MQTT_URL=config.mqtt_url)
            # this broker queues 5, not a stock 1,000: a pace that fits 5 beside the 20 in flight
            again = await cli(*replay[1:], "--rate", "200", env=env)
            assert again.code == 0, again.err
            await wait_until(lambda: len(seen) == 30, 15, "all 30 events")
        finally:
            collecting.cancel()
            await asyncio.gather(collecting, return_exceptions=True)
    got = sorted(str(event["order_id"]) for event in seen.values())
    assert got == sorted(f"{tag}-{n}" for n in range(30))
    assert {str(event["status"]) for event in seen.values()} == {"created"}
    assert "published 30 event(s) again" in again.err, "the log since then: the 30, each once"


async def broker_count(port: int) -> int | None:
    """The count the broker holds now (retained), as a subscriber reads it."""
    async with aiomqtt.Client("127.0.0.1", port) as client, asyncio.timeout(5):
        await client.subscribe(DROPPED_TOPIC)
        async for message in client.messages:
            return read_count(message.payload)
    return None


async def test_check_says_what_the_broker_dropped_and_the_fix(
    cli: Callable[..., Awaitable[CliResult]], settings: Settings, dropping_broker: ServerProcess
) -> None:
    env = env_for(settings, ORDER_LISTENER_MQTT_URL=f"mqtt://127.0.0.1:{dropping_broker.port}")
    before = await cli("check", env=env)
    assert before.code == 0, before.out + before.err
    assert "the broker has dropped no messages since it started" in before.out
    await make_drops(dropping_broker.port, f"check{random.randrange(10**6)}", 30)

    async def published() -> bool:
        return await broker_count(dropping_broker.port) == 25

    await wait_until(published, 10, "the broker's count (every second) at 25")
    after = await cli("check", env=env)
    assert after.code == 0, "a note, not a problem: " + after.out + after.err
    assert "the broker has dropped 25 messages since it started" in after.out
    assert FIX_WORDS in after.out


async def test_check_on_a_broker_without_the_count(
    cli: Callable[..., Awaitable[CliResult]], settings: Settings, workdir: Path
) -> None:
    broker = mosquitto(workdir / f"nosys-{random.randrange(10**9)}", extra_conf="sys_interval 0\n")
    broker.start()
    try:
        url = f"mqtt://127.0.0.1:{broker.port}"
        result = await cli("check", env=env_for(settings, ORDER_LISTENER_MQTT_URL=url))
    finally:
        broker.stop()
    assert result.code == 0, result.out + result.err
    assert "the broker tells no count of dropped messages" in result.out


async def test_a_broker_that_closes_the_connection_on_the_subscription_costs_one_session(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some brokers close the connection when a client subscribes to a topic
    it may not read. mosquitto does so for a topic filter with a NUL in it (a
    protocol error): asked for that instead, the link loses its first session,
    says so, does not ask again, and connects and publishes."""
    monkeypatch.setattr(link_module, "DROPPED_TOPIC", "drops\x00probe")
    monkeypatch.setattr(client_module, "CLIENT_TIMEOUT_S", 3.0)  # (10 s in the daemon)
    with structlog.testing.capture_logs() as logged:
        # the first session waits for a SUBACK that never comes, up to the client's timeout
        async with running(settings, drops=DropWatch(lambda _: None), connect_within=30) as link:
            await link.publish(events_for(f"drops-nul{random.randrange(10**6)}", orders=3, versions=1))
    given_up = [line for line in logged if "not asked again" in line["event"]]
    assert len(given_up) == 1, [line["event"] for line in logged]
    assert link.drops is None
