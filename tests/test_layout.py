"""The stored order record (keys.py, docs/reference.md "Redis key layout"): a pending
order is one field of a listpack bucket hash `order:{P}:p:<B>`, value
"<created entry id>|<deadline ms>", with no hash of its own; its first
transition moves it out of the bucket into its own hash with all six fields,
but the sweep's, which leaves it there cancelled (tests/test_retention.py).
Records written by the earlier layouts (an own hash with all six fields from
create on, or one with only `c` and `d`) are still read, changed and swept."""

from __future__ import annotations

import zlib
from typing import cast

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from listener import OrderClient, OrderExists, Refused
from listener.config import Settings
from listener.keys import BUCKETS, PARTS, KeyLayout, bucket_of, part_of
from listener.orders import Operation, Order, Reason, Status
from listener.store import Store
from tests.conftest import wait_until

ID20 = "ORD-0000000000000042"  # the 20 characters of the memory target
SIX = {b"s", b"v", b"r", b"c", b"u", b"d"}


def record_fields(record: dict[bytes, bytes]) -> set[bytes]:
    """The record's field names but its history's (h1, h2, ...: lib.lua, emit)."""
    return {name for name in record if not (name[:1] == b"h" and name[1:].isdigit())}


async def now_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def pending_value(redis: Redis, layout: KeyLayout, order_id: str) -> bytes | None:
    value = await redis.hget(layout.bucket(order_id), order_id)
    assert value is None or isinstance(value, bytes)
    return value


async def assert_moved_out(
    redis: Redis, layout: KeyLayout, order_id: str, packed: bytes
) -> dict[bytes, bytes]:
    """After the first transition: no bucket field, no timer, no index member,
    and the own hash has all six fields with the bucket's c and d."""
    assert await pending_value(redis, layout, order_id) is None
    assert not await redis.exists(layout.timer(order_id))
    assert await redis.zscore(layout.deadlines(part_of(order_id)), order_id) is None
    # the tests' client does not decode: bytes, where redis-py's types say bytes or str
    record = cast("dict[bytes, bytes]", await redis.hgetall(layout.order(order_id)))
    assert record_fields(record) == SIX, record
    assert record[b"c"] + b"|" + record[b"d"] == packed
    return record


def test_the_bucket_is_the_crc32_bits_above_the_part() -> None:
    """What a producer in another language computes (docs/reference.md, Redis key layout)."""
    layout = KeyLayout()
    crc = zlib.crc32(ID20.encode())
    assert layout.order(ID20) == f"order:{{{crc % 16}}}:o:{ID20}"
    assert layout.bucket(ID20) == f"order:{{{crc % 16}}}:p:{(crc >> 4) % 256}"
    assert layout.bucket(ID20) == "order:{14}:p:143"  # the example in docs/reference.md
    assert (PARTS, BUCKETS) == (16, 256)
    used = {(part_of(f"id-{n}"), bucket_of(f"id-{n}")) for n in range(200_000)}
    assert len(used) == PARTS * BUCKETS  # every bucket of every part is used


async def test_a_pending_order_is_a_field_of_its_bucket(settings: Settings, redis: Redis) -> None:
    layout = KeyLayout(settings.key_prefix)
    async with OrderClient(settings) as client:
        made = await client.create(ID20, timeout=600)
        assert not await redis.exists(layout.order(ID20))  # no hash of its own
        packed = await pending_value(redis, layout, ID20)
        assert packed is not None
        entry, deadline = packed.decode().split("|")
        created_ms = int(entry.split("-")[0])
        assert int(deadline) == made.deadline_ms == created_ms + 600_000
        assert await redis.object("encoding", layout.bucket(ID20)) == b"listpack"
        assert await redis.get(layout.timer(ID20)) == b"1"
        assert await redis.zscore(layout.deadlines(part_of(ID20)), ID20) == made.deadline_ms

        order = await client.get(ID20)
        assert order == Order(
            ID20, Status.CREATED, 1, Reason.CREATED, created_ms, created_ms, made.deadline_ms
        )
        with pytest.raises(OrderExists, match=r"\(status created\)"):
            await client.create(ID20)
        assert await pending_value(redis, layout, ID20) == packed

        change = await client.pay(ID20)
        assert (change.status, change.version) == ("paid", 2)
        paid = await assert_moved_out(redis, layout, ID20, packed)
        assert (paid[b"s"], paid[b"v"], paid[b"r"]) == (b"paid", b"2", b"paid")
        assert await redis.pttl(layout.order(ID20)) == -1
        assert not await redis.exists(layout.bucket(ID20))  # its only field: the bucket is gone
        got = await client.get(ID20)
        assert (got.status, got.version, got.created_ms, got.deadline_ms) == (
            Status.PAID,
            2,
            created_ms,
            made.deadline_ms,
        )
        assert got.updated_ms == int(paid[b"u"]) >= created_ms
        with pytest.raises(OrderExists, match=r"\(status paid\)"):
            await client.create(ID20)


async def test_buckets_stay_listpacks_and_scripts_agree_with_keys_py(
    settings: Settings, redis: Redis
) -> None:
    """The scripts compute the bucket in Lua (lib.lua); keys.py the same in Python."""
    layout = KeyLayout(settings.key_prefix)
    ids = [f"ORD-{n:016d}" for n in range(5000)] + ["a", "x" * 128, "Z:9.-_"]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 600) for oid in ids])
    async with redis.pipeline(transaction=False) as pipe:
        for oid in ids:
            pipe.hexists(layout.bucket(oid), oid)
        assert all(await pipe.execute())
    buckets = [key async for key in redis.scan_iter(match=f"{settings.key_prefix}:*:p:*", count=1000)]
    assert sum([await redis.hlen(key) for key in buckets]) == len(ids)
    assert {await redis.object("encoding", key) for key in buckets} == {b"listpack"}
    assert not [key async for key in redis.scan_iter(match=f"{settings.key_prefix}:*:o:*")]
    assert (await redis.config_get("hash-max-listpack-entries"))["hash-max-listpack-entries"] == "512"


async def test_every_first_transition_but_the_sweep_moves_the_record_out_of_its_bucket(
    settings: Settings, redis: Redis
) -> None:
    layout = KeyLayout(settings.key_prefix)
    short = ["by-sweep", "by-expire", "late-payer", "late-canceller"]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 0.1) for oid in short] + [("by-customer", 600)])
        packed = {oid: await pending_value(redis, layout, oid) for oid in [*short, "by-customer"]}
        assert None not in packed.values()

        await client.cancel("by-customer")
        record = await assert_moved_out(redis, layout, "by-customer", packed["by-customer"] or b"")
        assert (record[b"s"], record[b"r"], record[b"v"]) == (b"cancelled", b"customer", b"2")
        assert 0 < await redis.pttl(layout.order("by-customer")) <= settings.retention_ms

        last_deadline = max(int((packed[oid] or b"").split(b"|")[1]) for oid in short)
        await wait_until(lambda: _past(redis, last_deadline), 5, "the short deadlines to pass")
        with pytest.raises(Refused, match=r"cancelled \(timeout\)"):
            await client.pay("late-payer")  # the deadline decides: cancelled first, then refused
        late = await client.cancel("late-canceller")
        assert (late.status, late.reason, late.changed) == ("cancelled", "timeout", False)
    store = Store.from_settings(settings)
    try:
        expired = await store.apply_many(Operation.EXPIRE, ["by-expire"])
        assert [(r.outcome, r.status, r.version) for r in expired] == [("done", "cancelled", 2)]
        (swept,) = await store.sweep([part_of("by-sweep")], 1000)
        assert [oid for oid, _ in swept.cancelled] == ["by-sweep"]
        assert swept.cancelled[0][1] == int((packed["by-sweep"] or b"").split(b"|")[1])
    finally:
        await store.close()
    for oid in short[1:]:
        record = await assert_moved_out(redis, layout, oid, packed[oid] or b"")
        assert (record[b"s"], record[b"r"], record[b"v"]) == (b"cancelled", b"timeout", b"2"), oid
        assert 0 < await redis.pttl(layout.order(oid)) <= settings.retention_ms
    # but the sweep's: its record stays in the bucket, cancelled (tests/test_retention.py)
    stays = await pending_value(redis, layout, "by-sweep")
    assert stays is not None and stays.startswith((packed["by-sweep"] or b"") + b"|")
    assert not await redis.exists(layout.order("by-sweep"), layout.timer("by-sweep"))
    buckets = [key async for key in redis.scan_iter(match=f"{settings.key_prefix}:*:p:*")]
    assert buckets == [layout.bucket("by-sweep").encode()]


async def _past(redis: Redis, deadline: int) -> bool:
    return await now_ms(redis) > deadline


async def earlier_layout_order(
    redis: Redis, layout: KeyLayout, order_id: str, timeout_ms: int, *, six: bool
) -> tuple[str, int]:
    """An order as an earlier create script stored it: an own hash with all six
    fields (`six`) or with only c and d. Returns its created entry id and deadline."""
    now = await now_ms(redis)
    added = await redis.xadd(layout.outbox_created(part_of(order_id)), {"o": order_id, "t": timeout_ms})
    assert isinstance(added, bytes)
    entry = added.decode()
    created = int(entry.split("-")[0])
    deadline = created + timeout_ms
    assert created >= now
    fields: dict[FieldT, EncodableT] = {"c": entry, "d": deadline}
    if six:
        fields = {"s": "created", "v": 1, "r": "created", "c": entry, "u": created, "d": deadline}
    await redis.hset(layout.order(order_id), mapping=fields)
    await redis.set(layout.timer(order_id), "1", pxat=deadline)
    await redis.zadd(layout.deadlines(part_of(order_id)), {order_id: deadline})
    return entry, deadline


@pytest.mark.parametrize("six", [True, False], ids=["six-field", "c-and-d"])
async def test_records_of_earlier_layouts_are_read_changed_and_swept(
    settings: Settings, redis: Redis, six: bool
) -> None:
    layout = KeyLayout(settings.key_prefix)
    entry, deadline = await earlier_layout_order(redis, layout, "old-payer", 600_000, six=six)
    _, short_deadline = await earlier_layout_order(redis, layout, "old-late", 200, six=six)
    async with OrderClient(settings) as client:
        order = await client.get("old-payer")
        created = int(entry.split("-")[0])
        assert order == Order("old-payer", Status.CREATED, 1, Reason.CREATED, created, created, deadline)
        with pytest.raises(OrderExists, match=r"\(status created\)"):
            await client.create("old-payer")
        change = await client.pay("old-payer")
        assert (change.status, change.version, change.changed) == ("paid", 2, True)
        assert not await redis.exists(layout.timer("old-payer"))
        record = cast("dict[bytes, bytes]", await redis.hgetall(layout.order("old-payer")))
        assert record_fields(record) == SIX
        assert (record[b"c"], record[b"d"]) == (entry.encode(), str(deadline).encode())
        assert await pending_value(redis, layout, "old-payer") is None

    store = Store.from_settings(settings)
    try:

        async def swept() -> bool:
            part = part_of("old-late")
            (result,) = await store.sweep([part], 1000)
            return ("old-late", short_deadline) in result.cancelled

        await wait_until(swept, 5, "the sweep to cancel old-late")
        late = await store.get("old-late")
        assert late is not None
        assert (late.status, late.version, late.reason) == (Status.CANCELLED, 2, Reason.TIMEOUT)
        assert late.deadline_ms == short_deadline
        assert record_fields(cast("dict[bytes, bytes]", await redis.hgetall(layout.order("old-late")))) == SIX
    finally:
        await store.close()


async def test_own_hash_fields_win_over_the_bucket_value(settings: Settings, redis: Redis) -> None:
    """A `d` written into the own hash of a pending order (as tests/test_faults.py
    does to make orders due at once) is its deadline for every reader."""
    layout = KeyLayout(settings.key_prefix)
    async with OrderClient(settings) as client:
        await client.create("moved-up", timeout=600)
        packed = await pending_value(redis, layout, "moved-up")
        assert packed is not None
        now = await now_ms(redis)
        await redis.hset(layout.order("moved-up"), "d", now)
        assert (await client.get("moved-up")).deadline_ms == now
        with pytest.raises(OrderExists):
            await client.create("moved-up")
    store = Store.from_settings(settings)
    try:
        (result,) = await store.apply_many(Operation.EXPIRE, ["moved-up"])
        assert (result.outcome, result.status) == ("done", "cancelled")
    finally:
        await store.close()
    record = await redis.hgetall(layout.order("moved-up"))
    assert record[b"c"] == packed.split(b"|")[0] and record[b"d"] == str(now).encode()
    assert await pending_value(redis, layout, "moved-up") is None


async def test_get_of_an_unknown_order_is_none(settings: Settings, redis: Redis) -> None:
    store = Store.from_settings(settings)
    try:
        assert await store.get("nobody") is None
    finally:
        await store.close()


async def test_create_refuses_an_order_given_the_wrong_part(settings: Settings, redis: Redis) -> None:
    """A producer in another language that computes P wrong gets an error and
    nothing is written (such an order would be unreachable by `show` and `pay`)."""
    store = Store.from_settings(settings, redis)
    layout = KeyLayout(settings.key_prefix)
    right = part_of(ID20)
    wrong = (right + 1) % PARTS
    keys = [layout.deadlines(wrong), layout.outbox_created(wrong), layout.order(ID20), layout.timer(ID20)]
    with pytest.raises(ResponseError, match=f"belongs to part {right}, not {wrong}"):
        await store.run_scripts([(store.scripts.create, keys, [layout.wake_channel, wrong, ID20, 60_000])])
    assert await redis.dbsize() == 0
