"""Redis loses acknowledged writes (a primary that dies before it replicated
them, here a Redis killed and restarted from an older snapshot): orders whose
`pay` was lost are cancelled at their deadline with the version the `paid`
event had, and that cancellation gets an event_id of its own, so subscribers
that deduplicate by event_id still see it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.keys import KeyLayout
from listener.servers import ServerProcess, redis_server
from tests.conftest import Subscriber, wait_until


@pytest.fixture
async def snapshot_redis(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    """A redis-server with the project's redis.conf, but persisting only by
    the snapshots the test takes (no AOF, which would replay the writes the
    test means to lose, and no automatic snapshots)."""
    server = redis_server(tmp_path / "redis", extra=["--appendonly", "no", "--save", ""])
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.kill)


async def test_a_cancellation_after_a_lost_payment_has_its_own_event_id(
    settings: Settings,
    snapshot_redis: ServerProcess,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    config = dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{snapshot_redis.port}/0")
    layout = KeyLayout(config.key_prefix)
    daemon = await start_daemon(config)
    ids = [f"lost-{i:02d}" for i in range(10)]
    dump = snapshot_redis.workdir / "dump.rdb"
    aside = snapshot_redis.workdir / "before-the-pays.rdb"
    admin = Redis(port=snapshot_redis.port)
    try:
        async with OrderClient(config) as client:
            await client.create_many([(oid, 4.0) for oid in ids])
            await wait_until(lambda: len(subscriber.with_status("created")) == len(ids), 10, "created events")
            await admin.save()  # the state a replica had: every order pending
            shutil.copy(dump, aside)
            for oid in ids:
                assert (await client.pay(oid)).changed  # acknowledged by Redis
        await wait_until(lambda: len(subscriber.with_status("paid")) == len(ids), 10, "paid events")
        assert not (snapshot_redis.workdir / "appendonlydir").exists(), "no AOF may bring the pays back"

        # The fault: Redis dies (kill -9) and comes back from the older snapshot.
        await asyncio.to_thread(snapshot_redis.kill)
        shutil.copy(aside, dump)
        await asyncio.to_thread(snapshot_redis.start)
        await wait_until(_loaded(admin), 15, "redis to load the snapshot")
        # a pending order is a field of its bucket; a paid one has none (pay moved it to its own hash)
        lost = [await admin.hmget(layout.bucket(oid), [oid]) for oid in ids]
        assert all(packed != [None] for packed in lost), "the pays must be lost: orders pending again"

        await wait_until(
            lambda: subscriber.cancelled_ids() == set(ids), 20, "the orders cancelled at their deadline"
        )
        await wait_until(lambda: daemon.redis_service.reconnects >= 1, 10, "the daemon back on Redis")
    finally:
        await admin.aclose()

    bodies: dict[str, set[str]] = defaultdict(set)
    for event in subscriber.events:
        bodies[event["event_id"]].add(json.dumps(event, sort_keys=True))
    # no event_id ever named two different transitions
    assert {event_id: len(seen) for event_id, seen in bodies.items() if len(seen) > 1} == {}
    for oid in ids:
        (paid,) = _unique(subscriber, oid, "paid")
        (cancelled,) = _unique(subscriber, oid, "cancelled")
        # the same version twice: by <order>/<created ms>/<version> alone these were one event
        assert paid["version"] == cancelled["version"] == 2
        assert cancelled["reason"] == "timeout"
        assert paid["event_id"] != cancelled["event_id"]
        # what a subscriber deduplicating by event_id keeps: all three transitions
        kept = {event["event_id"]: event["status"] for event in subscriber.of(oid)}
        assert sorted(kept.values()) == ["cancelled", "created", "paid"], kept


def _unique(subscriber: Subscriber, order_id: str, status: str) -> list[dict[str, Any]]:
    """The order's events of `status`, each once (redeliveries share the event_id)."""
    return [e for e in subscriber.unique().values() if e["order_id"] == order_id and e["status"] == status]


def _loaded(client: Redis) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return bool(await client.ping())
        except Exception:  # connection refused or LOADING
            return False

    return check
