"""The guarantees, each proven with a fault injected for real: kill -9, broker
down, Redis restarted, several daemons, pay racing the expiry, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.fastpath import hiredis_drain
from listener.keys import KeyLayout, part_of
from listener.orders import Operation
from listener.servers import ServerProcess, free_port
from listener.store import Store
from tests.conftest import DaemonProcess, Subscriber, wait_until
from tests.life import deadline_of, lanes_barrier, outbox_streams

# CI runs the tests marked `fastpath` once more with ORDER_LISTENER_FAST_PATHS=off
# (both ways stay green). Not marked: recovery of whole processes (a kill -9, a
# second signal, a lane taken over), which goes through the outbox's own
# bookkeeping, the same on either path; a minute of CI the second time.
fastpath = pytest.mark.fastpath


def assert_in_version_order(subscriber: Subscriber) -> None:
    """First deliveries of each order's events arrive in version order, with no gap."""
    seen: set[str] = set()
    versions: dict[str, list[int]] = defaultdict(list)
    for event in subscriber.events:
        if event["event_id"] in seen:
            continue  # a redelivery (at least once): subscribers deduplicate by event_id
        seen.add(event["event_id"])
        versions[event["order_id"]].append(event["version"])
    for order_id, got in versions.items():
        assert got == list(range(1, len(got) + 1)), (order_id, got)


async def every_order_cancelled_once_in_order(subscriber: Subscriber, ids: list[str], timeout: float) -> None:
    """Wait until every order's `cancelled` event arrived, then: each cancelled
    exactly once, and every order's events in version order."""
    await wait_until(lambda: subscriber.cancelled_ids() >= set(ids), timeout, f"{len(ids)} orders cancelled")
    cancelled_once(subscriber, ids)
    assert_in_version_order(subscriber)


async def final_statuses(settings: Settings, ids: list[str]) -> Counter[str]:
    async with OrderClient(settings) as client:
        return Counter([str((await client.get(oid)).status) for oid in ids])


def cancelled_once(subscriber: Subscriber, ids: list[str]) -> None:
    unique = subscriber.unique().values()
    per_order = Counter(e["order_id"] for e in unique if e["status"] == "cancelled")
    assert {oid: per_order.get(oid, 0) for oid in ids} == dict.fromkeys(ids, 1)


async def test_kill_9_while_orders_fall_due_then_restart(
    settings: Settings,
    spawn_daemon: Callable[..., Awaitable[DaemonProcess]],
    subscriber: Subscriber,
) -> None:
    first = await spawn_daemon()
    await first.wait_ready()
    ids = [f"k9-{i:03d}" for i in range(300)]
    async with OrderClient(settings) as client:
        # deadlines spread over 0.4 .. 2.4 s: some before, many during, some after the kill
        await client.create_many([(oid, 0.4 + 2.0 * i / len(ids)) for i, oid in enumerate(ids)])
    await asyncio.sleep(1.0)
    first.kill()
    assert await first.wait() == -9
    await asyncio.sleep(2.0)  # the rest fall due with no daemon at all
    second = await spawn_daemon()
    await second.wait_ready()
    await every_order_cancelled_once_in_order(subscriber, ids, 20)
    assert await final_statuses(settings, ids) == Counter({"cancelled": 300})
    assert {e["order_id"] for e in subscriber.with_status("created")} == set(ids)


@fastpath
async def test_broker_down_while_orders_fall_due_nothing_lost(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    mqtt_server_proc: ServerProcess,
) -> None:
    daemon = await start_daemon()
    ids = [f"bk-{i:03d}" for i in range(200)]
    async with OrderClient(settings) as client:
        mqtt_server_proc.stop()
        await client.create_many([(oid, 1.0 + 1.5 * i / len(ids)) for i, oid in enumerate(ids)])
        await client.pay(ids[-1])  # a transition while the broker is away
        await asyncio.sleep(4.0)  # every other order falls due with no broker
        assert await daemon.outbox.backlog() >= 200 + 199 + 1, "events must wait in Redis"
        mqtt_server_proc.start()
    await wait_until(lambda: len(subscriber.cancelled_ids()) == 199, 30, "every event")
    assert [e["status"] for e in subscriber.of(ids[-1]) if e["status"] != "created"][:1] == ["paid"]
    cancelled_once(subscriber, ids[:-1])
    assert_in_version_order(subscriber)
    await wait_until(lambda: daemon.mqtt_service.up, 10, "mqtt back")
    assert daemon.mqtt_service.reconnects >= 1

    async def drained() -> bool:
        return await daemon.outbox.backlog() == 0

    await wait_until(drained, 10, "the outbox to drain")


@fastpath
async def test_redis_restart_with_aof(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    redis_server_proc: ServerProcess,
    redis: Redis,
) -> None:
    await redis.config_set("appendonly", "yes")  # as in redis.conf; make sure after earlier tests
    daemon = await start_daemon()
    before = [f"rr-a{i:03d}" for i in range(100)]  # due while Redis is down or just after
    after = [f"rr-b{i:03d}" for i in range(100)]  # due well after the restart
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 1.5) for oid in before] + [(oid, 6.0) for oid in after])
    await wait_until(lambda: len(subscriber.with_status("created")) >= 200, 10, "created events")
    await asyncio.sleep(0.3)
    redis_server_proc.stop()  # SIGTERM: Redis writes its AOF and exits
    await asyncio.sleep(2.0)
    assert not daemon.redis_service.up
    redis_server_proc.start()
    ids = before + after
    await wait_until(lambda: len(subscriber.cancelled_ids()) == 200, 20, "all cancelled")
    assert await final_statuses(settings, ids) == Counter({"cancelled": 200})
    cancelled_once(subscriber, ids)
    # every task reached Redis again at some point; one with a connection
    # that went stale may still be in its retry, so ask until it is back
    await wait_until(lambda: daemon.redis_service.up, 10, "redis back")
    assert daemon.redis_service.reconnects >= 1
    # the late ones were cancelled at their deadline, not at a catch-up
    async with OrderClient(settings) as client:
        late = [await client.get(oid) for oid in after]
    assert max(o.updated_ms - o.deadline_ms for o in late) < 500


@fastpath
async def test_three_daemons_cancel_and_publish_each_once(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    daemons = [await start_daemon() for _ in range(3)]
    ids = [f"tri-{i:04d}" for i in range(1000)]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 1.0 + (i % 10) / 10) for i, oid in enumerate(ids)])
    await wait_until(lambda: len(subscriber.with_status("cancelled")) >= 1000, 20, "1000 cancellations")
    async with OrderClient(settings) as client:  # a second publication would arrive before these markers
        markers = await lanes_barrier(client, subscriber, ids)
    assert await final_statuses(settings, ids) == Counter({"cancelled": 1000})
    ours = [e for e in subscriber.events if e["order_id"] not in markers]
    assert len(ours) == 2000, "every event published exactly once"
    assert len({e["event_id"] for e in ours}) == 2000
    cancelled_once(subscriber, ids)
    assert sum(d.scheduler.cancelled + d.listener.cancelled for d in daemons) == 1000


@fastpath
async def test_pay_racing_expiry_exactly_one_winner(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    await start_daemon()
    ids = [f"race-{i:03d}" for i in range(300)]
    async with OrderClient(settings) as client:
        made = await client.create_many([(oid, 1.0) for oid in ids])
        deadline = max(deadline_of(r) for r in made.created)
        # wait until just before the shared deadline, then pay everything
        await asyncio.sleep(max(0.0, deadline / 1000 - time.time() - 0.01))
        results = await client.store.apply_many(Operation.PAY, ids)
    outcome = Counter(r.outcome for r in results)
    assert outcome["done"] + outcome["refused"] == 300, outcome
    paid = {r.order_id for r in results if r.outcome == "done"}
    await wait_until(
        lambda: len(subscriber.with_status("cancelled")) + len(subscriber.with_status("paid")) >= 300,
        10,
        "every order settled",
    )
    async with OrderClient(settings) as client:  # a late second event would arrive before these markers
        await lanes_barrier(client, subscriber, ids)
    statuses = await final_statuses(settings, ids)
    assert statuses["paid"] == len(paid) and statuses["cancelled"] == 300 - len(paid)
    for oid in ids:
        later = [e["status"] for e in subscriber.of(oid) if e["status"] != "created"]
        assert later == (["paid"] if oid in paid else ["cancelled"]), (oid, later)


@fastpath
async def test_sigterm_mid_wave_exits_0_nothing_lost(
    settings: Settings,
    spawn_daemon: Callable[..., Awaitable[DaemonProcess]],
    subscriber: Subscriber,
) -> None:
    daemon = await spawn_daemon()
    await daemon.wait_ready()
    ids = [f"term-{i:04d}" for i in range(2000)]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 0.5 + (i % 20) / 20) for i, oid in enumerate(ids)])
    await asyncio.sleep(0.8)  # mid-wave
    started = time.monotonic()
    daemon.terminate()
    assert await daemon.wait() == 0
    assert time.monotonic() - started < 6
    stopped_log = [json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{")]
    assert any(entry["event"] == "stopped" for entry in stopped_log)
    # nothing lost: whatever was not done is done by the next daemon
    again = await spawn_daemon()
    await again.wait_ready()
    await every_order_cancelled_once_in_order(subscriber, ids, 20)


@fastpath
async def test_sigterm_while_redis_never_answered_exits_0(
    spawn_daemon: Callable[..., Awaitable[DaemonProcess]],
) -> None:
    """Started before Redis (at boot, say): the daemon waits for it with
    backoff, and `systemctl stop` still stops it at once."""
    closed = free_port()  # nothing listens there
    daemon = await spawn_daemon(ORDER_LISTENER_REDIS_URL=f"redis://127.0.0.1:{closed}/0")

    async def waiting() -> bool:
        return "redis unavailable; retrying with backoff" in daemon.log.read_text()

    await wait_until(waiting, 10, "the daemon to wait for Redis")
    daemon.terminate()
    assert await daemon.wait(10) == 0
    assert "stopped before Redis answered" in daemon.log.read_text()


@fastpath
async def test_logs_off_a_terminal_are_json_lines_with_order_ids(
    settings: Settings,
    spawn_daemon: Callable[..., Awaitable[DaemonProcess]],
    subscriber: Subscriber,
) -> None:
    daemon = await spawn_daemon(ORDER_LISTENER_LOG_FORMAT="auto")
    await daemon.wait_ready()
    async with OrderClient(settings) as client:
        await client.create("log-1", timeout=0.2)
    await wait_until(lambda: len(subscriber.of("log-1")) == 2, 10, "log-1 cancelled")
    daemon.terminate()
    assert await daemon.wait() == 0
    lines: list[dict[str, Any]] = [json.loads(line) for line in daemon.log.read_text().splitlines() if line]
    cancelled = [entry for entry in lines if entry["event"] == "order cancelled"]
    assert cancelled and cancelled[0]["order_id"] == "log-1" and cancelled[0]["level"] == "info"


async def burst_handled(daemon: Daemon) -> None:
    listener = daemon.listener

    def handled() -> bool:
        accounted = listener.cancelled + listener.dropped + listener.skipped + listener.ignored
        return listener.received >= 45_000 and accounted == listener.received

    await wait_until(
        handled,
        60,
        lambda: (
            f"every expired event handled: received {listener.received}, cancelled {listener.cancelled}, "
            f"dropped {listener.dropped}, pending {len(listener._pending)}"
        ),
    )


@fastpath
async def test_expired_event_burst_does_not_disconnect_the_listener(
    settings: Settings,
    redis: Redis,
    redis_server_proc: ServerProcess,
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    """50,000 timers expire together (their orders taken out of the deadline
    index, so only the expired events can act): the listener stays connected
    (no pub/sub output-buffer disconnect), works the events off in batches,
    and past its bound drops ids instead of growing (the index has them in
    real life, and it asks for a full sweep)."""
    ids = [f"burst-{i:05d}" for i in range(50_000)]
    store = Store.from_settings(settings)
    await store.create_many([(oid, 600_000) for oid in ids])  # ms
    await store.close()
    layout = KeyLayout(settings.key_prefix)
    daemon = await start_daemon()
    # The fault: a pub/sub output buffer far smaller than the burst (50,000
    # events are about 4 MB): a subscriber that does not keep reading is cut off.
    (limits,) = (await redis.config_get("client-output-buffer-limit")).values()
    assert limits is not None
    await redis.config_set("client-output-buffer-limit", "pubsub 2mb 1mb 5")
    (listener_before,) = await redis.client_list(_type="pubsub")
    # Proof that the fault bites: a subscriber that never reads (a small socket
    # buffer, so the events pile up in Redis and not in the kernel) is cut off.
    lazy = socket.socket()
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.connect(("127.0.0.1", redis_server_proc.port))
    lazy.sendall(b"SUBSCRIBE __keyevent@0__:expired\r\n")

    async def both_subscribed() -> bool:
        return len(await redis.client_list(_type="pubsub")) == 2

    await wait_until(both_subscribed, 5, "the lazy subscriber")
    try:
        # Their deadline passes now, and only the timers know: out of the index,
        # deadline in the past, timers expiring on Redis' next active-expiry cycles.
        now_ms = int(time.time() * 1000)
        async with redis.pipeline(transaction=False) as pipe:
            for oid in ids:
                pipe.zrem(layout.deadlines(part_of(oid)), oid)
                pipe.hset(layout.order(oid), "d", now_ms)
                pipe.pexpire(layout.timer(oid), 1)
            await pipe.execute()
        await burst_handled(daemon)

        async def only_the_listener_left() -> bool:
            # The soft limit cuts a non-reader off only after its seconds are up,
            # which may be after a fast daemon has handled the whole burst.
            return [c["id"] for c in await redis.client_list(_type="pubsub")] == [listener_before["id"]]

        await wait_until(only_the_listener_left, 15, "the limit to cut off the non-reader, not the listener")
    finally:
        await redis.config_set("client-output-buffer-limit", limits)
        lazy.close()
    assert daemon.listener.cancelled >= 20_000
    drain = daemon.fast_paths.get(hiredis_drain.NAME)
    if drain is not None and drain.fast:
        # most of the burst came several events to a socket read, taken from the parser's buffer
        assert daemon.listener.read_buffered > daemon.listener.received // 2
    else:  # the fallback (ORDER_LISTENER_FAST_PATHS=off): every event through get_message
        assert daemon.listener.read_buffered == 0
    assert daemon.redis_service.reconnects == 0
    (listener_after,) = await redis.client_list(_type="pubsub")
    assert listener_after["id"] == listener_before["id"], "the subscriber was disconnected"
    async with redis.pipeline(transaction=False) as pipe:
        for oid in ids:
            pipe.hget(layout.order(oid), "s")
        statuses = Counter(await pipe.execute())
    assert statuses[b"cancelled"] == daemon.listener.cancelled
    # What the outbox still holds (up to 100,000 events of no concern here) would
    # take the daemon's stop at teardown up to its whole timeout on a slow host.
    await redis.delete(*outbox_streams(layout))


async def test_second_signal_exits_at_once_still_losing_nothing(
    settings: Settings,
    spawn_daemon: Callable[..., Awaitable[DaemonProcess]],
    subscriber: Subscriber,
    mqtt_server_proc: ServerProcess,
) -> None:
    """With the broker frozen (connected but silent), a graceful stop waits for
    the outbox; a second SIGTERM ends the daemon at once. The events stay in
    Redis and go out later."""
    daemon = await spawn_daemon(ORDER_LISTENER_SHUTDOWN_TIMEOUT="30")
    await daemon.wait_ready()
    ids = [f"twice-{i:03d}" for i in range(100)]
    assert mqtt_server_proc.proc is not None
    mqtt_server_proc.proc.send_signal(signal.SIGSTOP)
    try:
        async with OrderClient(settings) as client:
            await client.create_many([(oid, 0.3) for oid in ids])

        async def all_cancelled() -> bool:
            return await final_statuses(settings, ids) == Counter({"cancelled": len(ids)})

        await wait_until(all_cancelled, 10, "all cancelled in Redis")  # their publishes hang
        daemon.terminate()
        await asyncio.sleep(1.0)
        assert daemon.proc.returncode is None, "the first signal must wait for the outbox"
        started = time.monotonic()
        daemon.terminate()
        assert await daemon.wait(10) != 0
        assert time.monotonic() - started < 3
    finally:
        mqtt_server_proc.proc.send_signal(signal.SIGCONT)
    again = await spawn_daemon()
    await again.wait_ready()
    await every_order_cancelled_once_in_order(subscriber, ids, 30)


async def test_second_daemon_takes_over_a_killed_daemons_lanes(
    settings: Settings,
    redis: Redis,
    spawn_daemon: Callable[..., Awaitable[DaemonProcess]],
    subscriber: Subscriber,
) -> None:
    """Two daemons; the one holding the outbox leases is killed -9 while orders
    fall due: the other takes its lanes over and every event still goes out."""
    first = await spawn_daemon()
    await first.wait_ready()
    layout = KeyLayout(settings.key_prefix)

    async def first_holds_all() -> bool:
        holders = {await redis.get(layout.lease(part)) for part in range(16)}
        return len(holders) == 1 and None not in holders

    await wait_until(first_holds_all, 10, "the first daemon to hold every lane")
    (owner,) = {await redis.get(layout.lease(part)) for part in range(16)}
    second = await spawn_daemon()
    await second.wait_ready()
    ids = [f"take-{i:03d}" for i in range(200)]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 0.5 + 1.5 * i / len(ids)) for i, oid in enumerate(ids)])
    await asyncio.sleep(0.8)
    first.kill()
    assert await first.wait() == -9
    await every_order_cancelled_once_in_order(subscriber, ids, 30)
    holders = {await redis.get(layout.lease(part)) for part in range(16)}
    assert owner not in holders, "the killed daemon's leases were taken over"
