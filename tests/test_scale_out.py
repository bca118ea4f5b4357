"""Scale-out: a real 3-primary Redis Cluster (one replica each) and MQTT v5
shared subscriptions downstream.

The cluster is started by the fixture from the project's redis.conf with
cluster mode on (each node's bus on its own free port, `cluster-port`). The
daemons are pointed at one node only, a replica, and find the rest. Order
ids are spread over all 16 parts, and the parts over all three primaries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from listener.api import OrderClient
from listener.config import Settings, load_settings
from listener.daemon import Daemon
from listener.keys import PARTS, KeyLayout, part_of
from listener.servers import ServerProcess
from listener.urls import mqtt_target
from tests.cluster import RedisClusterProcs, redis_cluster
from tests.conftest import CLI, Subscriber, env_for, wait_until
from tests.life import lanes_barrier

WAVE = 600


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[RedisClusterProcs]:
    procs = redis_cluster(workdir / "cluster", primaries=3, replicas=1)
    try:
        procs.start()
        yield procs
    finally:
        procs.stop()


async def _roles(procs: RedisClusterProcs) -> dict[int, str]:
    """port -> 'master', or 'slave' for a replica in sync with its primary,
    or 'syncing', as each running node says of itself."""
    roles = {}
    for node in procs.nodes:
        if not node.running:
            continue
        client = Redis(port=node.port)
        try:
            info = await client.info("replication")
            role = str(info["role"])
            if role == "slave" and info.get("master_link_status") != "up":
                role = "syncing"
            roles[node.port] = role
        except Exception:
            pass
        finally:
            await client.aclose()
    return roles


@pytest.fixture
async def cluster_settings(
    cluster: RedisClusterProcs, mqtt_server_proc: ServerProcess, settings: Settings
) -> Settings:
    """Settings pointing at one replica of a healthy, empty cluster."""
    for node in cluster.nodes:
        if not node.running:
            node.start()
    cluster.start()  # waits until every node says the cluster is ok

    async def converged() -> bool:  # every node agrees on 3 primaries with a replica each
        roles = await _roles(cluster)
        return len(roles) == 6 and Counter(roles.values()) == {"master": 3, "slave": 3}

    await wait_until(converged, 30, "the cluster to have 3 primaries and 3 replicas")
    roles = await _roles(cluster)
    for port, role in roles.items():
        if role == "master":
            client = Redis(port=port)
            await client.flushall()
            await client.aclose()
    replica = next(port for port, role in roles.items() if role == "slave")
    return load_settings(
        redis_url=f"redis://127.0.0.1:{replica}/0",
        mqtt_url=settings.mqtt_url,
        resync_interval=1.0,
        shutdown_timeout=5.0,
    )


@pytest.fixture
async def start_cluster_daemon(
    cluster_settings: Settings,
) -> AsyncIterator[Callable[[], Awaitable[Daemon]]]:
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    async def start() -> Daemon:
        daemon = Daemon(cluster_settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        running.append((stop, task))
        await asyncio.wait_for(daemon.ready.wait(), 30)
        return daemon

    yield start
    crashed = [task for _, task in running if task.done() and task.exception() is not None]
    for stop, _ in running:
        stop.set()
    for _, task in running:
        try:
            await asyncio.wait_for(task, 20)
        except (asyncio.CancelledError, Exception):
            task.cancel()
    if crashed:  # a daemon that died mid-test must fail it, whatever the test saw
        raise AssertionError("a daemon stopped with an error") from crashed[0].exception()


def wave_ids(stem: str) -> list[str]:
    ids = [f"{stem}-{i:04d}" for i in range(WAVE)]
    assert {part_of(order_id) for order_id in ids} == set(range(PARTS))
    return ids


async def primaries_of(settings: Settings, ids: list[str]) -> Counter[str]:
    """How many of `ids` live on each primary (by their order key's slot)."""
    client = RedisCluster.from_url(settings.redis_url)
    layout = KeyLayout(settings.key_prefix)
    try:
        await client.initialize()

        def primary(order_id: str) -> str:
            node = client.get_node_from_key(layout.order(order_id))
            assert node is not None  # None only when a replica is asked for and there is none
            return node.name

        return Counter(primary(order_id) for order_id in ids)
    finally:
        await client.aclose()


def cancelled_of(subscriber: Subscriber, ids: list[str]) -> list[dict[str, Any]]:
    wanted = set(ids)
    return [e for e in subscriber.with_status("cancelled") if e["order_id"] in wanted]


def assert_cancelled_once(subscriber: Subscriber, ids: list[str]) -> None:
    cancelled = cancelled_of(subscriber, ids)
    per_order = Counter(e["order_id"] for e in cancelled)
    assert set(per_order) == set(ids), f"{len(set(ids) - set(per_order))} never announced"
    twice = {order_id: n for order_id, n in per_order.items() if n > 1}
    assert not twice, f"announced more than once: {twice}"
    assert all(e["reason"] == "timeout" and e["version"] == 2 for e in cancelled)


async def test_two_daemons_on_a_cluster_cancel_every_shards_orders_once(
    cluster_settings: Settings,
    start_cluster_daemon: Callable[[], Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    first = await start_cluster_daemon()
    second = await start_cluster_daemon()
    assert isinstance(first.redis, RedisCluster)
    assert not first.outbox.trim, "on a cluster published entries are deleted by id (XDEL), never trimmed"
    primaries = {node.name for node in first.redis.get_primaries()}
    assert len(primaries) == 3
    # each daemon hears expired events from every primary: plain TTL keys on every shard
    probe = RedisCluster.from_url(cluster_settings.redis_url)
    try:
        for i in range(60):
            await probe.set(f"probe-{i}", "x", px=50)
        for daemon in (first, second):
            await wait_until(
                lambda d=daemon: set(d.listener.received_from) == primaries,  # type: ignore[misc]
                15,
                lambda d=daemon: f"expired events from every primary, heard {dict(d.listener.received_from)}",  # type: ignore[misc]
            )
    finally:
        await probe.aclose()

    ids = wave_ids("shard")
    placed = await primaries_of(cluster_settings, ids)
    assert set(placed) == primaries and min(placed.values()) >= 100, placed
    async with OrderClient(cluster_settings) as client:
        created = await client.create_many([(order_id, 1.5) for order_id in ids])
        assert len(created.created) == WAVE
        await wait_until(lambda: len(subscriber.with_status("cancelled")) >= WAVE, 30, "600 cancellations")
        for order_id in ids[:20]:
            assert (await client.get(order_id)).status == "cancelled"
        await lanes_barrier(client, subscriber, ids)  # a second announcement would have come before
    assert_cancelled_once(subscriber, ids)
    assert (
        first.scheduler.cancelled
        + first.listener.cancelled
        + second.scheduler.cancelled
        + (second.listener.cancelled)
        == WAVE
    )
    created_events = Counter(e["order_id"] for e in subscriber.with_status("created"))
    assert all(created_events[order_id] == 1 for order_id in ids)


@pytest.mark.parametrize("how", ["failover", "kill"])
async def test_a_primary_failover_during_a_wave_loses_nothing(
    how: str,
    cluster: RedisClusterProcs,
    cluster_settings: Settings,
    start_cluster_daemon: Callable[[], Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """`failover`: CLUSTER FAILOVER on a replica (the primary hands over).
    `kill`: SIGKILL of a primary; its replica takes over after the node timeout."""
    daemon = await start_cluster_daemon()
    assert isinstance(daemon.redis, RedisCluster)
    ids = wave_ids(f"fo-{how}")
    async with OrderClient(cluster_settings) as client:
        # deadlines spread over 4 s, starting in 1 s
        for start in range(0, WAVE, 100):
            chunk = ids[start : start + 100]
            await client.create_many([(order_id, 1.0 + 4.0 * start / WAVE) for order_id in chunk])
    # the primary holding the most of the wave, and its replica
    placed = await primaries_of(cluster_settings, ids)
    victim_name, _ = placed.most_common(1)[0]
    victim = cluster.node(int(victim_name.rsplit(":", 1)[1]))
    replica_port = await _replica_of(cluster, victim.port)
    await wait_until(lambda: len(cancelled_of(subscriber, ids)) >= 60, 20, "the wave under way")
    before = len(cancelled_of(subscriber, ids))
    if how == "failover":
        admin = Redis(port=replica_port)
        # execute_command is unannotated in redis-py
        await admin.execute_command("CLUSTER", "FAILOVER")  # type: ignore[no-untyped-call]
        await admin.aclose()
    else:
        victim.kill()
    await wait_until(
        lambda: f"127.0.0.1:{replica_port}" in {n.name for n in daemon.redis.get_primaries()},  # type: ignore[union-attr]
        30,
        "the daemon to follow the new primary",
    )
    await wait_until(
        lambda: len({e["order_id"] for e in subscriber.with_status("cancelled")}) >= WAVE,
        40,
        lambda: f"600 cancellations, have {len(subscriber.cancelled_ids())}",
    )
    async with OrderClient(cluster_settings) as client:
        await lanes_barrier(client, subscriber, ids)  # a second announcement would have come before
    assert 0 < before < WAVE  # the switch came during the wave
    if how == "failover":
        assert_cancelled_once(subscriber, ids)
    else:
        # A primary crash may take its last writes with it (Redis replicates
        # asynchronously): an order cancelled there and not yet replicated is
        # cancelled again on the new primary. It is announced with the same
        # event id and content (bar `at`), so consumers deduplicate it; it is
        # never lost and never cancelled two different ways.
        cancelled = cancelled_of(subscriber, ids)
        assert {e["order_id"] for e in cancelled} == set(ids)
        by_order: dict[str, set[tuple[Any, ...]]] = {}
        for event in cancelled:
            by_order.setdefault(event["order_id"], set()).add(
                (event["event_id"], event["version"], event["reason"], event["previous"])
            )
        assert all(len(kinds) == 1 for kinds in by_order.values()), by_order
    async with OrderClient(cluster_settings) as client:
        statuses = Counter([(await client.get(order_id)).status for order_id in ids])
    assert statuses == {"cancelled": WAVE}
    victim.start()  # back as a replica, for the next test


async def _replica_of(cluster: RedisClusterProcs, primary_port: int) -> int:
    for node in cluster.nodes:
        client = Redis(port=node.port)
        try:
            info = await client.info("replication")
        finally:
            await client.aclose()
        if info["role"] == "slave" and int(info["master_port"]) == primary_port:
            return node.port
    raise AssertionError(f"no replica of {primary_port}")


async def test_check_names_a_cluster_node_without_notifications(
    cluster: RedisClusterProcs, cluster_settings: Settings
) -> None:
    env = env_for(cluster_settings)
    ok = await _run_check(env)
    assert ok.returncode == 0, ok.stdout
    assert "a Redis Cluster" in ok.stdout and "on all 6 cluster nodes" in ok.stdout
    quiet = cluster.nodes[-1]
    admin = Redis(port=quiet.port)
    await admin.config_set("notify-keyspace-events", "")
    try:
        bad = await _run_check(env)
    finally:
        await admin.config_set("notify-keyspace-events", "Ex")
        await admin.aclose()
    assert bad.returncode == 1
    assert f"on cluster node 127.0.0.1:{quiet.port}: keyspace notifications for expired keys are off" in (
        bad.stdout
    )


@contextlib.asynccontextmanager
async def shared_member(
    settings: Settings, group: str, name: str, protocol: aiomqtt.ProtocolVersion
) -> AsyncIterator[list[dict[str, Any]]]:
    target = mqtt_target(settings.mqtt_url)
    got: list[dict[str, Any]] = []
    subscribed = asyncio.Event()

    async def run() -> None:
        identifier = f"shared-{name}-{os.getpid()}-{time.monotonic_ns()}"
        async with aiomqtt.Client(target.host, target.port, identifier=identifier, protocol=protocol) as c:
            await c.subscribe(f"$share/{group}/{settings.topic_prefix}/+/status", qos=1)
            subscribed.set()
            async for message in c.messages:
                assert isinstance(message.payload, bytes)
                got.append(json.loads(message.payload))

    task = asyncio.create_task(run())
    try:
        await asyncio.wait_for(subscribed.wait(), 10)
        yield got
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class _Proc:
    def __init__(self, returncode: int, stdout: str) -> None:
        self.returncode = returncode
        self.stdout = stdout


async def _run_check(env: dict[str, str]) -> _Proc:
    proc = await asyncio.create_subprocess_exec(
        CLI, "check", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return _Proc(proc.returncode, out.decode())


@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311])
async def test_shared_subscription_members_each_get_a_share_of_the_events(
    protocol: aiomqtt.ProtocolVersion,
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """Downstream scale-out: two consumers in one `$share/<group>/...` group
    split the stream, each event reaching exactly one of them; another group
    (or a plain subscriber) still gets every event."""
    await start_daemon()
    ids = [f"share-{i:03d}" for i in range(200)]
    async with (
        shared_member(settings, "billing", "a", protocol) as a,
        shared_member(settings, "billing", "b", protocol) as b,
        shared_member(settings, "audit", "c", protocol) as audit,
        OrderClient(settings) as client,
    ):
        await client.create_many([(order_id, 0.5) for order_id in ids])
        expected = 2 * len(ids)  # created + cancelled
        await wait_until(lambda: len(a) + len(b) >= expected and len(audit) >= expected, 20, "all events")
        await asyncio.sleep(0.5)
    ids_a = {e["event_id"] for e in a}
    ids_b = {e["event_id"] for e in b}
    assert len(a) == len(ids_a) and len(b) == len(ids_b)
    assert not ids_a & ids_b  # each event reached one member of the group
    assert len(ids_a | ids_b) == expected == len({e["event_id"] for e in audit})
    assert ids_a and ids_b  # both members took a share
    assert ids_a | ids_b == {e["event_id"] for e in subscriber.events if e["order_id"] in set(ids)}


async def test_a_cluster_url_with_another_database_is_refused_clearly(cluster_settings: Settings) -> None:
    url = cluster_settings.redis_url.rsplit("/", 1)[0] + "/3"
    env = env_for(cluster_settings, ORDER_LISTENER_REDIS_URL=url)
    for args in (["show", "any-order"], ["run"]):
        proc = await asyncio.create_subprocess_exec(
            CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 2, (args, out, err)
        assert b"a cluster has only database 0" in err and b"Traceback" not in err, err


async def test_the_pause_switch_and_extend_on_a_cluster(
    cluster_settings: Settings,
    start_cluster_daemon: Callable[[], Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """The switch is one key per part, each in its part's slot: a pause holds
    every shard's orders, and resume releases them, once each."""
    await start_cluster_daemon()
    ids = [f"cpause-{i}" for i in range(64)]
    assert {part_of(order_id) for order_id in ids} == set(range(PARTS))
    async with OrderClient(cluster_settings) as client:
        assert (await client.pause("cluster drill", by="test")).parts_changed == PARTS
        state = await client.pause_state()
        assert len(state.paused_parts) == PARTS and state.first is not None
        await client.create_many([(order_id, 0.2) for order_id in ids])
        await client.create("cpause-extended", timeout=60)
        extended = await client.extend("cpause-extended", 30)
        assert extended.version == 2
        store = await client.opened()
        settle = await store.now_ms() + 200 + int(2.5 * cluster_settings.resync_interval * 1000)

        async def settled() -> bool:
            return await store.now_ms() > settle

        await wait_until(settled, 15, "two periodic sweeps past the deadlines")
        assert subscriber.cancelled_ids() == set()
        assert (await client.pay(ids[0])).changed  # late, accepted
        assert (await client.resume()).parts_changed == PARTS
        await wait_until(
            lambda: subscriber.cancelled_ids() == set(ids[1:]), 10, "the overdue orders cancelled"
        )
        await lanes_barrier(client, subscriber, ids)
    assert_cancelled_once(subscriber, ids[1:])
    assert [e["reason"] for e in subscriber.of("cpause-extended")] == ["created", "extended"]


async def test_history_and_replay_on_a_cluster_with_two_daemons(
    cluster_settings: Settings,
    start_cluster_daemon: Callable[[], Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """Histories live in each order's slot and the event log in parts: on a
    cluster with two daemons every order's history is what was published,
    and `replay` gives each published event once, merged from every primary."""
    await start_cluster_daemon()
    await start_cluster_daemon()
    ids = [f"story-{i:02d}" for i in range(64)]
    assert {part_of(order_id) for order_id in ids} == set(range(PARTS))
    async with OrderClient(cluster_settings) as client:
        since_ms = await client.store.now_ms()
        await client.create_many([(order_id, 1) for order_id in ids])
        refunded = ids[::8]
        for order_id in refunded:
            await client.pay(order_id)
            await client.refund(order_id)
        expected = 8 * 4 + 56 * 2
        await wait_until(lambda: len(subscriber.unique()) >= expected, 30, f"{expected} events")
        for order_id in ids:
            assert await client.history(order_id) == subscriber.of(order_id)
    env = env_for(cluster_settings)
    lines: list[str] = []

    async def replayed_all() -> bool:
        # the last acknowledged events are logged with their lane's next round trip
        nonlocal lines
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "replay",
            "--since",
            str(since_ms / 1000),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        lines = out.decode().splitlines()
        return len(lines) >= expected

    await wait_until(replayed_all, 15, lambda: f"{expected} replayed events, not {len(lines)}: {lines[:3]}")
    replayed = [json.loads(line) for line in lines]
    assert sorted(e["event_id"] for e in replayed) == sorted(subscriber.unique())
    versions: dict[str, list[int]] = {}
    for event in replayed:
        versions.setdefault(event["order_id"], []).append(event["version"])
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values()), versions
