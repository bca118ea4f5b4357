"""An order the sweep cancels at its deadline straight from pending keeps its
record in its bucket field, "<c>|<d>|<u>", named by an entry of the part's
retention queue `order:{P}:expiring`, and the sweep deletes it once its
retention has ended (keys.py, sweep.lua). Every reader and every script sees
it as the cancelled order it is; an ACL without the queue's list commands, or
a queue key of another type, keeps the earlier form (an own hash with an
expiry). Against a real redis-server."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from listener import OrderClient, OrderExists, Refused
from listener.config import Settings
from listener.keys import KeyLayout, bucket_of, part_of
from listener.orders import Order, Reason, Status
from listener.store import Store
from tests.conftest import redis_clock_past, wait_until
from tests.test_refusals import daemon_user_without

LAYOUT = KeyLayout()


@contextlib.asynccontextmanager
async def opened_store(settings: Settings) -> AsyncIterator[Store]:
    opened = Store.from_settings(settings)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    async with opened_store(settings) as opened:
        yield opened


async def swept_when_due(client: OrderClient, store: Store, order_ids: list[str]) -> int:
    """Waits until the orders' deadlines passed, then sweeps their parts until
    none of them is pending; the Redis clock (ms) of the last sweep."""
    deadlines = [(await client.get(order_id)).deadline_ms for order_id in order_ids]
    await wait_until(lambda: redis_clock_past(client, max(deadlines)), 5, "the deadlines to pass")
    parts = sorted({part_of(order_id) for order_id in order_ids})
    while True:
        results = await store.sweep(parts, 1000)
        if not any(result.cancelled for result in results):
            return max(result.now_ms for result in results)


async def queue_entries(redis: Redis, part: int) -> list[bytes]:
    entries = await redis.lrange(LAYOUT.expiring(part), 0, -1)
    return [entry for entry in entries if isinstance(entry, bytes)]


async def test_a_swept_order_stays_in_its_bucket_as_cancelled_for_every_reader(
    settings: Settings, redis: Redis, store: Store
) -> None:
    async with OrderClient(settings) as client:
        await client.create("stays-1", timeout=0.1)
        pending = await redis.hget(LAYOUT.bucket("stays-1"), "stays-1")
        assert isinstance(pending, bytes)
        await swept_when_due(client, store, ["stays-1"])

        value = await redis.hget(LAYOUT.bucket("stays-1"), "stays-1")
        assert isinstance(value, bytes)
        created, deadline, updated = value.split(b"|")
        assert created + b"|" + deadline == pending
        assert not await redis.exists(LAYOUT.order("stays-1"), LAYOUT.timer("stays-1"))
        assert await redis.zscore(LAYOUT.deadlines(part_of("stays-1")), "stays-1") is None
        (entry,) = await queue_entries(redis, part_of("stays-1"))
        ends, bucket, ids = entry.split(b"|")
        assert int(ends) == int(updated) + settings.retention_ms
        assert (int(bucket), ids) == (bucket_of("stays-1"), b"stays-1")

        created_ms = int(created.split(b"-")[0])
        assert await client.get("stays-1") == Order(
            "stays-1", Status.CANCELLED, 2, Reason.TIMEOUT, created_ms, int(updated), int(deadline)
        )
        history = await client.history("stays-1")
        assert [(e["status"], e["version"]) for e in history] == [("created", 1), ("cancelled", 2)]
        with pytest.raises(Refused, match=r"cancelled \(timeout\)"):
            await client.pay("stays-1")
        with pytest.raises(Refused, match="cancelled"):
            await client.extend("stays-1", 60)
        again = await client.cancel("stays-1")
        assert (again.status, again.reason, again.changed) == ("cancelled", "timeout", False)
        with pytest.raises(OrderExists, match=r"\(status cancelled\)"):
            await client.create("stays-1")
    # none of that wrote anything: the record is as the sweep left it
    assert await redis.hget(LAYOUT.bucket("stays-1"), "stays-1") == value
    assert not await redis.exists(LAYOUT.order("stays-1"))


async def test_the_sweep_deletes_records_whose_retention_ended_and_only_those(
    settings: Settings, redis: Redis
) -> None:
    """Retention 1.5 s: records of a first sweep go with the first sweep after
    their end; the id may then be created again. A record made pending again
    by hand since is left alone, and a malformed queue entry is dropped."""
    short = dataclasses.replace(settings, retention=1.5)
    async with opened_store(short) as store, OrderClient(short) as client:
        ids = [f"retire-{i}" for i in range(30)]
        await client.create_many([(order_id, 0.1) for order_id in ids])
        swept_at = await swept_when_due(client, store, ids)
        parts = sorted({part_of(order_id) for order_id in ids})
        queued = [entry for part in parts for entry in await queue_entries(redis, part)]
        assert sorted(b for e in queued for b in e.split(b"|")[2].split(b",")) == sorted(
            order_id.encode() for order_id in ids
        )
        # by hand: retire-0 pending again (a record in the pending form is not the sweep's)
        pending_again = b"1-0|9999999999999"
        await redis.hset(LAYOUT.bucket("retire-0"), "retire-0", pending_again)
        await redis.lpush(LAYOUT.expiring(part_of("retire-1")), b"not an entry")

        # within the retention a sweep deletes nothing
        await store.sweep(parts, 1000)
        assert (await client.get("retire-1")).status is Status.CANCELLED

        await wait_until(
            lambda: redis_clock_past(client, swept_at + short.retention_ms), 5, "the retention to end"
        )
        await store.sweep(parts, 1000)
        for part in parts:
            assert await queue_entries(redis, part) == []
        for order_id in ids[1:]:
            assert await redis.hget(LAYOUT.bucket(order_id), order_id) is None, order_id
            assert await store.get(order_id) is None
        assert await redis.hget(LAYOUT.bucket("retire-0"), "retire-0") == pending_again
        made = await client.create("retire-1", timeout=60)
        assert made.created


def ids_of_one_bucket(prefix: str, count: int) -> list[str]:
    """`count` ids that share one part and one bucket (found by trying)."""
    first = f"{prefix}-0"
    ids, i = [first], 1
    while len(ids) < count:
        candidate = f"{prefix}-{i}"
        i += 1
        if part_of(candidate) == part_of(first) and bucket_of(candidate) == bucket_of(first):
            ids.append(candidate)
    return ids


async def test_a_sweep_with_nothing_due_retires_about_100(settings: Settings, redis: Redis) -> None:
    """Three queue entries of 60 records each: a call that cancels nothing
    takes whole entries until 100 records (two), the next call the third."""
    short = dataclasses.replace(settings, retention=2.0)  # outlasts the three sweeps
    async with opened_store(short) as store, OrderClient(short) as client:
        ids = ids_of_one_bucket("hundred", 180)
        part = part_of(ids[0])
        swept_at = 0
        for start in (0, 60, 120):
            await client.create_many([(order_id, 0.1) for order_id in ids[start : start + 60]])
            swept_at = await swept_when_due(client, store, ids[start : start + 60])
        assert [len(entry.split(b"|")[2].split(b",")) for entry in await queue_entries(redis, part)] == [
            60,
            60,
            60,
        ]
        await wait_until(
            lambda: redis_clock_past(client, swept_at + short.retention_ms), 5, "the retention to end"
        )
        (result,) = await store.sweep([part], 1000)
        assert result.cancelled == []
        assert len(await queue_entries(redis, part)) == 1
        await store.sweep([part], 1000)
        assert await queue_entries(redis, part) == []
        assert await redis.hlen(LAYOUT.bucket(ids[0])) == 0


async def test_an_order_with_a_hash_of_its_own_in_the_batch_changes_nothing_for_the_others(
    settings: Settings, redis: Redis, store: Store
) -> None:
    """One due order of the batch was extended (it has a hash of its own, so
    the sweep reads every order's hash): it is cancelled into that hash, the
    others still stay in their buckets."""
    extended, plain = ids_of_one_bucket("mixed", 2)
    async with OrderClient(settings) as client:
        await client.create_many([(extended, 0.2), (plain, 0.3)])
        await client.extend(extended, 0.1)
        await swept_when_due(client, store, [extended, plain])
    assert (await redis.hgetall(LAYOUT.order(extended)))[b"s"] == b"cancelled"
    assert not await redis.exists(LAYOUT.order(plain))
    kept = await redis.hget(LAYOUT.bucket(plain), plain)
    assert isinstance(kept, bytes) and kept.count(b"|") == 2


async def test_without_the_list_commands_the_sweep_writes_an_own_hash(
    settings: Settings, redis: Redis
) -> None:
    """The daemon's user as deploy/redis-users.acl had it before the retention
    queue (no +rpush): the sweep cancels as before, into a hash of the order's
    own with the retention as its expiry, and Redis refused nothing."""
    async with daemon_user_without(redis, settings, "rpush") as config:
        async with opened_store(config) as store, OrderClient(settings) as client:
            await client.create("old-acl", timeout=0.1)
            await swept_when_due(client, store, ["old-acl"])
        assert await redis.acl_log() == []
    assert await redis.hget(LAYOUT.bucket("old-acl"), "old-acl") is None
    record = await redis.hgetall(LAYOUT.order("old-acl"))
    assert (record[b"s"], record[b"v"], record[b"r"]) == (b"cancelled", b"2", b"timeout")
    assert 0 < await redis.pttl(LAYOUT.order("old-acl")) <= settings.retention_ms
    assert await queue_entries(redis, part_of("old-acl")) == []


async def test_a_queue_key_of_another_type_does_not_stop_the_sweep(
    settings: Settings, redis: Redis, store: Store
) -> None:
    await redis.set(LAYOUT.expiring(part_of("odd-queue")), "written by hand")
    async with OrderClient(settings) as client:
        await client.create("odd-queue", timeout=0.1)
        await swept_when_due(client, store, ["odd-queue"])
        assert (await client.get("odd-queue")).status is Status.CANCELLED
    assert await redis.hget(LAYOUT.bucket("odd-queue"), "odd-queue") is None
    assert (await redis.hgetall(LAYOUT.order("odd-queue")))[b"s"] == b"cancelled"
    assert await redis.get(LAYOUT.expiring(part_of("odd-queue"))) == b"written by hand"
