"""`order-listener check`: the operator's doctor. Each problem comes with its exact fix."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable

import aiomqtt
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from listener.config import Settings
from listener.connection import RedisClient, open_redis
from listener.keys import KeyLayout
from listener.mqtt import default_client_id, make_client
from listener.mqtt.client import CheckedClient, is_failure
from listener.mqtt.drops import DROPPED_TOPIC, FIX, GRANT, read_count
from listener.mqtt.link import connections_for
from listener.notifications import check_notifications, expired_channel
from listener.scripts import NAMES, source
from listener.store import Store
from listener.urls import mqtt_target, redis_target

Echo = Callable[[str], None]


class _Report:
    def __init__(self, echo: Echo) -> None:
        self.echo = echo
        self.problems = 0

    def ok(self, text: str) -> None:
        self.echo(f"ok    {text}")

    def problem(self, text: str, fix: str) -> None:
        self.problems += 1
        self.echo(f"FAIL  {text}\n      fix: {fix}")

    def note(self, text: str, fix: str = "") -> None:
        self.echo(f"warn  {text}" + (f"\n      fix: {fix}" if fix else ""))


async def run_checks(settings: Settings, echo: Echo) -> int:
    """Print one line per check; return the number of problems."""
    report = _Report(echo)
    await _check_redis(settings, report)
    await _check_mqtt(settings, report)
    return report.problems


async def _check_redis(settings: Settings, report: _Report) -> None:
    target = redis_target(settings.redis_url)
    redis: RedisClient | None = None
    try:
        redis = await open_redis(settings)
        info = await redis.info("server")
    except Exception as exc:
        if redis is not None:
            await redis.aclose()
        report.problem(
            f"redis: cannot reach {target.shown}: {exc}",
            "start redis-server, or point ORDER_LISTENER_REDIS_URL at it "
            "(redis://host:6379/0, rediss:// for TLS, user:password@ for ACL users)",
        )
        return
    try:
        report.ok(f"redis: reachable at {target.shown} (version {info.get('redis_version', '?')})")
        if isinstance(redis, RedisCluster):
            primaries = sorted(node.name for node in redis.get_primaries())
            report.ok(f"redis: a Redis Cluster; primaries {', '.join(primaries)}")
        await _check_permissions(settings, redis, target.db, report)
        await _check_pause(settings, redis, report)
        notifications = await check_notifications(redis)
        if notifications.ok:
            report.ok(f"redis: {notifications.message}")
        else:
            report.problem(
                f"redis: expired events are not published: {notifications.message}", notifications.fix
            )
        try:
            appendonly = (await redis.config_get("appendonly")).get("appendonly")
            policy = (await redis.config_get("maxmemory-policy")).get("maxmemory-policy")
        except Exception as exc:
            report.note(f"redis: cannot read persistence and eviction settings ({exc})")
            return
        if appendonly == "yes":
            report.ok("redis: AOF persistence on")
        else:
            report.note(
                "redis: AOF persistence is off: a restart of Redis loses timers and unpublished "
                "events since the last snapshot. Set 'appendonly yes' (see redis.conf)"
            )
        if policy == "noeviction":
            report.ok("redis: maxmemory-policy noeviction")
        else:
            report.problem(
                f"redis: maxmemory-policy is {policy!r}: Redis may evict timers and orders",
                "redis-cli CONFIG SET maxmemory-policy noeviction, and the same in redis.conf",
            )
    finally:
        await redis.aclose()


async def _check_pause(settings: Settings, redis: RedisClient, report: _Report) -> None:
    """Is cancellation for timeout paused (the incident switch)? Said, not
    counted as a problem: it is an operator's choice, and a forgotten one is
    what the alert rule is for."""
    try:
        state = await Store(redis, KeyLayout(settings.key_prefix), settings.retention_ms).pause_state()
    except Exception as exc:
        report.note(f"redis: cannot read the pause switch ({exc})")
        return
    if state.paused:
        report.note(f"redis: {state.describe()}", "order-listener resume (when payments work again)")
    else:
        report.ok(f"redis: {state.describe()}")


async def _check_permissions(settings: Settings, redis: RedisClient, db: int, report: _Report) -> None:
    """Try, harmlessly, what the daemon does: load its scripts, read its keys,
    subscribe to the expired events. A NOPERM names what the ACL lacks."""
    layout = KeyLayout(settings.key_prefix)
    probes: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        (f"SCRIPT LOAD ({name})", functools.partial(redis.script_load, source(name))) for name in NAMES
    ]
    probes += [
        ("TIME", redis.time),
        (f"ZCARD {layout.deadlines(0)}", lambda: redis.zcard(layout.deadlines(0))),
        (f"XLEN {layout.outbox(0)}", lambda: redis.xlen(layout.outbox(0))),
        (f"HGETALL {layout.order('check')}", lambda: redis.hgetall(layout.order("check"))),
    ]
    refused: list[str] = []
    for what, probe in probes:
        try:
            await probe()
        except NoPermissionError as exc:
            refused.append(f"{what}: {exc}")
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(expired_channel(db), layout.wake_channel)
        confirmed = 0
        async with asyncio.timeout(3):
            while confirmed < 2:  # a refusal arrives as the reply, not from subscribe()
                message = await pubsub.get_message(timeout=1)
                if message is not None and message["type"] == "subscribe":
                    confirmed += 1
        await pubsub.unsubscribe()
    except NoPermissionError as exc:
        refused.append(f"SUBSCRIBE {expired_channel(db)} {layout.wake_channel}: {exc}")
    except TimeoutError:
        refused.append(f"SUBSCRIBE {expired_channel(db)}: no confirmation from Redis within 3 s")
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    if refused:
        report.problem(
            "redis: this user is not allowed what the daemon needs:\n        " + "\n        ".join(refused),
            f"grant the commands, keys ~{settings.key_prefix}:* and channels of deploy/redis-users.acl "
            "(user order-listener) to this user",
        )
    else:
        report.ok(f"redis: allowed to run the scripts, read ~{settings.key_prefix}:* and subscribe")
    await _check_retention_queue(redis, layout, report)


async def _check_retention_queue(redis: RedisClient, layout: KeyLayout, report: _Report) -> None:
    """The sweep keeps what it cancels in the orders' buckets only where the
    user may use the retention queue (a list); otherwise it writes a key per
    order, as before (sweep.lua). Works either way: a note, not a problem."""
    queue = layout.expiring(0)
    try:
        await redis.llen(queue)
        await redis.lindex(queue, 0)
    except NoPermissionError as exc:
        report.note(
            f"redis: this user may not use the retention queue ({exc}): the sweep writes a key "
            "of its own for every order it cancels, which costs Redis more (docs/figures.md)",
            "grant +llen +lindex +lpop +rpush, as deploy/redis-users.acl does",
        )
    except ResponseError as exc:  # a key of another type, written by hand
        report.note(
            f"redis: {queue} is not a list ({exc}): the sweep of that part writes a key per order",
            f"delete {queue}: a key of another type holds none of the sweep's entries",
        )


async def _check_mqtt(settings: Settings, report: _Report) -> None:
    target = mqtt_target(settings.mqtt_url)
    topic = f"{settings.topic_prefix}/_check-{uuid.uuid4().hex[:8]}/probe"
    try:
        async with make_client(settings, identifier=default_client_id("check"), timeout=5) as client:
            report.ok(f"mqtt: reachable at {target.shown} (MQTT {settings.mqtt_protocol})")
            await client.subscribe(topic, qos=1)
            await client.publish(topic, b"check", qos=1)
            async with asyncio.timeout(5):
                async for _ in client.messages:
                    break
            report.ok(f"mqtt: allowed to publish and subscribe under {settings.topic_prefix}/")
            await _probe_broker(client, topic, settings, report)
        await _check_drops(settings, report)
    except TimeoutError:
        report.problem(
            f"mqtt: a message published to {topic} did not come back within 5 s",
            "allow this user to publish and subscribe under the topic prefix (broker ACL)",
        )
    except aiomqtt.MqttError as exc:
        report.problem(
            f"mqtt: cannot connect to {target.shown}: {exc}",
            "start the broker, or point ORDER_LISTENER_MQTT_URL at it "
            "(mqtt://host:1883, mqtts:// for TLS, user:password@ to log in); "
            "older brokers: ORDER_LISTENER_MQTT_PROTOCOL=3.1.1",
        )


PROBE_BURSTS = 12  # bursts of PROBE_BURST publishes, PROBE_GAP apart, like a steady trickle of events
PROBE_BURST = 3
PROBE_GAP = 0.03
SLOW_ACK_MS = 20.0  # a PUBACK slower than this on the 99th percentile holds the daemon back
SMALL_WINDOW = 100  # fewer in flight than this caps a backlog's drain


async def _probe_broker(client: CheckedClient, topic: str, settings: Settings, report: _Report) -> None:
    """How fast the broker acknowledges QoS 1 publishes, and how many it lets
    a client have in flight: the two settings of a broker that decide how fast
    the daemon's events go out."""
    loop = asyncio.get_running_loop()

    async def timed() -> float:
        start = loop.time()
        await client.publish(topic, b"probe", qos=1)
        return (loop.time() - start) * 1000

    times: list[float] = []
    async with asyncio.timeout(10):
        for _ in range(PROBE_BURSTS):
            times += await asyncio.gather(*(timed() for _ in range(PROBE_BURST)))
            await asyncio.sleep(PROBE_GAP)
    times.sort()
    p50, p99 = times[len(times) // 2], times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    text = f"mqtt: PUBACK round trip p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(times)} QoS 1 probes)"
    if p99 > SLOW_ACK_MS:
        report.note(
            f"{text}: the broker delays its acknowledgements (Nagle's algorithm on its side); "
            "the daemon asks its own TCP stack to acknowledge at once (Linux), which hides most of it",
            "mosquitto: `set_tcp_nodelay true` in mosquitto.conf (other brokers: their TCP no-delay "
            "setting); expected: PUBACKs within a millisecond or two on a LAN",
        )
    else:
        report.ok(text)
    if settings.mqtt_protocol != "5":
        report.ok("mqtt: MQTT 3.1.1 announces no Receive Maximum; the daemon keeps up to 1000 in flight")
        return
    window = client.receive_maximum
    if window < SMALL_WINDOW:
        connections = settings.mqtt_connections or connections_for(window)
        spread = (
            f"; the daemon publishes over {connections} connections ({connections * window} in flight)"
            if connections > 1
            else ""
        )
        report.note(
            f"mqtt: the broker allows {window} QoS 1 messages in flight (Receive Maximum) per connection: "
            f"a backlog of events drains at most {window} per round trip and connection{spread}",
            "mosquitto: `max_inflight_messages 0` (no limit) or 1000 in mosquitto.conf (other brokers: "
            "their receive maximum / max inflight setting); expected: a 100,000-event backlog out "
            "several times faster on a busy link. A broker at mosquitto's defaults also queues at most "
            "1,000 messages for a subscriber that falls behind and drops the rest: in a burst of "
            "cancellations a slow subscriber loses events; `max_queued_messages 0` keeps them",
        )
    else:
        report.ok(f"mqtt: the broker allows {window} QoS 1 messages in flight (Receive Maximum)")


DROPS_WAIT_S = 1.0  # the count is retained: a broker that has it sends it at once


async def _check_drops(settings: Settings, report: _Report) -> None:
    """What the broker says it dropped since it started (mosquitto's retained
    $SYS count; mqtt/drops.py): the queues of subscribers that fell behind.
    On a connection of its own: a broker that closes the connection on a
    topic it will not serve must not fail the checks before it."""
    count, why = None, f"sent none within {DROPS_WAIT_S:g} s"
    try:
        async with make_client(settings, identifier=default_client_id("check-drops"), timeout=5) as client:
            granted = await client.subscribe(DROPPED_TOPIC, qos=0)
            if any(is_failure(code) for code in granted):
                why = "refused the subscription"
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DROPS_WAIT_S):
                        async for message in client.messages:
                            if message.topic.value == DROPPED_TOPIC:
                                count = read_count(message.payload)
                                break
    except aiomqtt.MqttError as exc:
        why = f"closed the connection when asked ({exc})"
    if count is None:
        report.note(
            f"mqtt: the broker tells no count of dropped messages ({DROPPED_TOPIC}: {why}): the daemon "
            "cannot see a subscriber's queue overflow there (brokers other than mosquitto have none)",
            GRANT,
        )
    elif count:
        report.note(
            f"mqtt: the broker has dropped {count:,} messages since it started: queues of subscribers "
            "that fell behind (or were offline) were full; every topic and client counts",
            FIX,
        )
    else:
        report.ok("mqtt: the broker has dropped no messages since it started")
