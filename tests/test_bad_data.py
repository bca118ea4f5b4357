"""Whatever other producers write, no data ends the daemon or blocks other orders.

The parsers refuse every malformed outbox field with a message naming it; a
running daemon moves each malformed entry to its lane's dead-letter stream
once, with the metric counting it, while the valid orders written around
them are cancelled and announced once each. Expired timers with odd ids,
garbage on the wake channel, malformed order records and keys of the wrong
type are logged and skipped where they are met.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from listener import outbox
from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.events import from_created_entry, from_outbox_entry
from listener.keys import PARTS, KeyLayout, part_of
from listener.outbox_pump import Entry
from tests.conftest import Subscriber, wait_until
from tests.life import carrier, outbox_streams

NOW = b"1795564749929"
CREATED = b"1795564740000-0"
GOOD_OUTBOX: dict[bytes, bytes] = {
    b"o": b"A-1",
    b"s": b"cancelled",
    b"p": b"created",
    b"r": b"timeout",
    b"v": b"2",
    b"t": NOW,
    b"c": CREATED,
}
GOOD_CREATED: dict[bytes, bytes] = {b"o": b"A-1", b"t": b"1800000"}

BAD_IDS: list[bytes] = [
    b"bad+id",
    b"a#b",
    b"a/b",
    b"",
    b"x" * 5000,
    "ünïcødé".encode(),
    b"\xff\xfe",
    b"has space",
    b"x" * 129,
]

# (what is wrong, the entry's fields, the field the message names)
BAD_OUTBOX: list[tuple[str, dict[bytes, bytes], str]] = [
    *[(f"id {oid[:20]!r}", {**GOOD_OUTBOX, b"o": oid}, "'o'") for oid in BAD_IDS],
    *[
        (f"no {name.decode()}", {k: v for k, v in GOOD_OUTBOX.items() if k != name}, repr(name.decode()))
        for name in GOOD_OUTBOX
    ],
    ("version a word", {**GOOD_OUTBOX, b"v": b"two"}, "'v'"),
    ("version negative", {**GOOD_OUTBOX, b"v": b"-1"}, "'v'"),
    ("version 1 after created", {**GOOD_OUTBOX, b"v": b"1"}, "'v'"),
    ("version 30 digits", {**GOOD_OUTBOX, b"v": b"9" * 30}, "'v'"),
    ("version non-ASCII digits", {**GOOD_OUTBOX, b"v": "٣".encode()}, "'v'"),
    ("at a word", {**GOOD_OUTBOX, b"t": b"soon"}, "'t'"),
    ("at in exponent form", {**GOOD_OUTBOX, b"t": b"1e12"}, "'t'"),
    ("at past year 9999", {**GOOD_OUTBOX, b"t": b"253402300800000"}, "'t'"),
    ("status unknown", {**GOOD_OUTBOX, b"s": b"shipped"}, "'s'"),
    ("status created after created", {**GOOD_OUTBOX, b"s": b"created"}, "'s'"),
    ("previous unknown", {**GOOD_OUTBOX, b"p": b"nope"}, "'p'"),
    ("reason unknown", {**GOOD_OUTBOX, b"r": b"because"}, "'r'"),
    ("reason not UTF-8", {**GOOD_OUTBOX, b"r": b"\xc3"}, "'r'"),
    ("created entry id garbage", {**GOOD_OUTBOX, b"c": b"garbage"}, "'c'"),
    ("created entry id without seq", {**GOOD_OUTBOX, b"c": b"1795564740000"}, "'c'"),
    ("only junk", {b"x": b"y"}, "'o'"),
]

BAD_CREATED: list[tuple[str, dict[bytes, bytes], str]] = [
    *[(f"id {oid[:20]!r}", {**GOOD_CREATED, b"o": oid}, "'o'") for oid in BAD_IDS],
    ("no id", {b"t": b"1800000"}, "'o'"),
    ("no timeout", {b"o": b"A-1"}, "'t'"),
    ("timeout a word", {**GOOD_CREATED, b"t": b"abc"}, "'t'"),
    ("timeout with decimals", {**GOOD_CREATED, b"t": b"1800.5"}, "'t'"),
    ("timeout below 0.1 s", {**GOOD_CREATED, b"t": b"50"}, "'t'"),
    ("timeout over 30 days", {**GOOD_CREATED, b"t": b"2592000001"}, "'t'"),
]


def test_well_formed_entries_parse() -> None:
    event = from_outbox_entry(GOOD_OUTBOX)
    assert (event.order_id, event.status, event.previous, event.reason, event.version) == (
        "A-1",
        "cancelled",
        "created",
        "timeout",
        2,
    )
    assert event.event_id == "A-1/1795564740000/2/cancelled/timeout"
    created = from_created_entry(CREATED, GOOD_CREATED)
    assert created.deadline_ms == 1795564740000 + 1800000
    assert created.event_id == "A-1/1795564740000/1/created/created"


@pytest.mark.parametrize(("what", "fields", "named"), BAD_OUTBOX, ids=[case[0] for case in BAD_OUTBOX])
def test_malformed_outbox_entries_are_refused_naming_the_field(
    what: str, fields: dict[bytes, bytes], named: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"field {named}")):
        from_outbox_entry(fields)


@pytest.mark.parametrize(("what", "fields", "named"), BAD_CREATED, ids=[case[0] for case in BAD_CREATED])
def test_malformed_created_entries_are_refused_naming_the_field(
    what: str, fields: dict[bytes, bytes], named: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(f"field {named}")):
        from_created_entry(CREATED, fields)


def test_odd_timer_keys_are_not_ours() -> None:
    layout = KeyLayout("order")
    assert layout.parse_timer(layout.timer("A-1")) == "A-1"
    odd = [
        layout.timer("bad+id"),  # the part is right, the id is not one we accept
        layout.timer("y" * 5000),
        layout.timer("ünï"),
        layout.timer("a b"),
        f"order:{{{part_of('')}}}:t:",
        "order:{" + "9" * 5000 + "}:t:A-1",  # int() refuses more than 4,300 digits
        "order:{٣}:t:A-1",  # a digit, but not an ASCII one
        f"order:{{0{part_of('A-1')}}}:t:A-1",
        f"order:{{{(part_of('A-1') + 1) % PARTS}}}:t:A-1",  # the wrong part
        layout.timer("A-1") + "\n",
    ]
    for key in odd:
        assert layout.parse_timer(key) is None, key[:60]


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[Daemon, asyncio.Task[None]]]:
    """A daemon in this process, with its task, so the test can see that it
    never ended."""
    daemon = Daemon(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    try:
        await asyncio.wait_for(daemon.ready.wait(), 20)
        yield daemon, task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 15)
        except (asyncio.CancelledError, Exception):
            task.cancel()


def dead_count(daemon: Daemon) -> float:
    match = re.search(rb"^order_listener_dead_letters_total (\S+)$", daemon.metrics.render(), re.MULTILINE)
    assert match, "order_listener_dead_letters_total not exported"
    return float(match.group(1))


async def dead_entries(redis: Redis, layout: KeyLayout) -> list[tuple[str, dict[bytes, bytes]]]:
    found: list[tuple[str, dict[bytes, bytes]]] = []
    for key in outbox_streams(layout):
        # The tests' client does not decode: bytes ids and fields, where redis-py's type
        # says bytes or str (and an optional id and fields for each entry).
        entries = cast("list[Entry]", await redis.xrange(layout.dead_letters(key)))
        found += [(key, fields) for _, fields in entries]
    return found


async def test_malformed_entries_go_to_dead_letters_once_and_valid_orders_go_on(
    settings: Settings, redis: Redis, subscriber: Subscriber
) -> None:
    layout = KeyLayout(settings.key_prefix)
    first = [f"ok-a{i:02d}" for i in range(20)]
    then = [f"ok-b{i:02d}" for i in range(20)]
    async with running(settings) as (daemon, task), OrderClient(settings) as client:
        await client.create_many([(oid, 2.0) for oid in first])

        # An older or broken producer's entries, in the lanes of the valid orders.
        # (redis-py types XADD's fields as a dict of its own key and value unions, which,
        # a dict being invariant, refuses a dict[bytes, bytes]: hence the ignores; and the
        # id it returns as bytes or str, where this client, not decoding, gets bytes.)
        written: dict[tuple[str, bytes], dict[bytes, bytes]] = {}
        for index, (_, fields, _) in enumerate(BAD_OUTBOX):
            key = layout.outbox(part_of(first[index % len(first)]))
            added = await redis.xadd(key, fields)  # type: ignore[arg-type]
            assert isinstance(added, bytes)
            written[(key, added)] = fields
        for index, (_, fields, _) in enumerate(BAD_CREATED):
            key = layout.outbox_created(part_of(first[index % len(first)]))
            added = await redis.xadd(key, fields)  # type: ignore[arg-type]
            assert isinstance(added, bytes)
            written[(key, added)] = fields
        # An order `bad+id` stored as create.lua stores one, by hand: its
        # `created` entry and later its cancellation are dead letters.
        now = await client.store.now_ms()
        bad_part = part_of("bad+id")
        entry = await redis.xadd(layout.outbox_created(bad_part), {"o": "bad+id", "t": 1000})
        assert isinstance(entry, bytes)
        written[(layout.outbox_created(bad_part), entry)] = {b"o": b"bad+id", b"t": b"1000"}
        await redis.hset(layout.bucket("bad+id"), "bad+id", f"{entry.decode()}|{now + 1000}")
        await redis.set(layout.timer("bad+id"), "1", pxat=now + 1000)
        await redis.zadd(layout.deadlines(bad_part), {"bad+id": now + 1000})

        # Expired timers of odd ids, garbage on the wake channel, malformed records.
        for key in (
            layout.timer("y" * 5000),
            layout.timer("ünï"),
            layout.timer("a b"),
            "order:{" + "9" * 5000 + "}:t:x",
            f"order:{{{part_of('')}}}:t:",
        ):
            await redis.set(key, "1", px=100)
        for message in ("3 " + "9" * 5000, "x y", "99 5", "", "٣ ٣"):
            await redis.publish(layout.wake_channel, message)
        await redis.hset(layout.order("junk-rec"), mapping={"s": "created", "v": "abc", "c": "1-0", "d": "1"})
        await redis.set(layout.order("junk-type"), "a string where a hash belongs")
        await redis.hset(layout.bucket("junk-bucket"), "junk-bucket", "garbage")
        for oid in ("junk-rec", "junk-type", "junk-bucket"):
            await redis.set(layout.timer(oid), "1", px=100)  # only the expire script meets these
        # a deadline the sweep script reads as a number and Python's int() does not
        await redis.hset(
            layout.order("junk-e"),
            mapping={"s": "created", "v": "1", "r": "created", "c": "1-0", "u": "1", "d": "1e3"},
        )
        await redis.zadd(layout.deadlines(part_of("junk-e")), {"junk-e": 1000})

        await client.create_many([(oid, 2.0) for oid in then])
        valid = first + then
        await wait_until(
            lambda: subscriber.cancelled_ids() >= set(valid), 20, lambda: f"valid orders cancelled: {task}"
        )

        # every bad entry in its dead-letter stream; `bad+id` itself the sweep
        # refuses to cancel (an id the rules refuse): reported, not announced
        async def all_dead() -> bool:
            return len(await dead_entries(redis, layout)) >= len(written)

        await wait_until(all_dead, 10, "the dead letters")
        # the odd timers have expired and the records' scripts have answered
        await wait_until(
            lambda: daemon.listener.refused == 3, 10, lambda: f"refused {daemon.listener.refused}"
        )

        # still running: a valid order after all that is cancelled and announced
        await client.create("ok-last", timeout=0.3)
        await wait_until(lambda: len(subscriber.of("ok-last")) == 2, 10, "ok-last cancelled")
        assert not task.done()

        dead = await dead_entries(redis, layout)
        by_origin = Counter((f"{key}", fields[b"id"]) for key, fields in dead)
        assert set(by_origin.values()) == {1}, "an entry was moved more than once"
        for (key, entry_id), fields in written.items():
            (moved,) = [f for k, f in dead if k == key and f[b"id"] == entry_id]
            assert {k: v for k, v in moved.items() if k not in (b"id", b"error")} == fields
            assert moved[b"error"]  # names what is wrong
            assert await redis.xrange(key, entry_id, entry_id) == [], "still in its lane"
        assert len(dead) == len(written), "only what was written by hand"
        assert daemon.outbox.dead_letters == len(dead) == dead_count(daemon)
        assert await redis.zscore(layout.deadlines(bad_part), "bad+id") is None, "reported by the sweep"

    # each valid order announced exactly once: created, then cancelled
    for oid in [*valid, "ok-last"]:
        assert [e["status"] for e in subscriber.of(oid)] == ["created", "cancelled"], oid
    assert "bad+id" not in {e["order_id"] for e in subscriber.events}


async def test_a_part_whose_sweep_fails_on_its_data_does_not_stop_the_others(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """A part's deadline index of the wrong type (written by hand): its sweep
    script fails on every run. The other parts are swept on time, and the
    part works again once the key is repaired."""
    layout = KeyLayout(settings.key_prefix)
    broken = 5
    await redis.set(layout.deadlines(broken), "not a sorted set")
    daemon = await start_daemon()
    ids = [oid for oid in (f"sw-{i:02d}" for i in range(40)) if part_of(oid) != broken]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 0.5) for oid in ids])
        await wait_until(lambda: subscriber.cancelled_ids() >= set(ids), 10, "the other parts swept")
        assert broken in daemon.scheduler._retries
        # counted once the sweeps' replies are absorbed, which may come after the events went out
        await wait_until(lambda: daemon.scheduler.cancelled == len(ids), 5, "the scheduler's count of them")

        await redis.delete(layout.deadlines(broken))
        again = next(oid for oid in (f"sw-again-{i}" for i in range(1000)) if part_of(oid) == broken)
        await client.create(again, timeout=0.3)
        await wait_until(lambda: again in subscriber.cancelled_ids(), 10, "the repaired part swept")
    assert broken not in daemon.scheduler._retries


async def test_logistics_messages_for_odd_ids_and_bad_records_are_dropped(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    daemon = await start_daemon()
    layout = KeyLayout(settings.key_prefix)
    await redis.hset(layout.order("lg-junk"), mapping={"s": "paid", "v": "x", "c": "1-0", "d": "1"})
    await redis.set(layout.order("lg-type"), "a string where a hash belongs")
    await redis.hset(
        layout.order("lg-bytes"), mapping={"s": b"\xff\xfe", "v": "2", "r": b"\xc3", "c": "1-0", "d": "1"}
    )
    odd: list[tuple[str, dict[str, Any]]] = [
        ("z" * 5000, {"status": "delivered"}),
        ("ünï", {"status": "delivered"}),
        ("", {"status": "delivered"}),  # logistics//status
        ("lg-junk", {"status": "delivered"}),
        ("lg-type", {"status": "delivered"}),
        ("lg-bytes", {"status": "returned"}),
    ]
    async with OrderClient(settings) as client, carrier(settings) as send:
        await client.create("lg-ok", timeout=60)
        await client.pay("lg-ok")
        for oid, payload in odd:
            await send(oid, payload)
        await send("lg-ok", {"status": "delivered"})
        await wait_until(lambda: len(subscriber.of("lg-ok")) == 3, 10, "lg-ok delivered")
    handler = daemon.logistics
    await wait_until(lambda: handler.dropped + handler.handled == len(odd) + 1, 10, "every message handled")
    # lg-bytes reaches its order and is refused by its (unreadable) status
    assert (handler.dropped, handler.handled) == (len(odd) - 1, 2)


async def test_an_entry_copied_before_a_stop_is_not_copied_again(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """A daemon stopped between the copy to `:dead` and the delete leaves the
    entry in both streams: the next one deletes it without a second copy. A
    different entry under an id the dead-letter stream has passed (after a
    failover to a Redis whose clock lags) is still copied, under a new id."""
    layout = KeyLayout(settings.key_prefix)
    key = layout.outbox(part_of("A-1"))
    fields = {**GOOD_OUTBOX, b"o": b"bad+id"}
    # redis-py types XADD's fields as a dict of its own unions, refusing (a dict being
    # invariant) a dict[bytes, bytes]; and its reply as bytes or str (this client: bytes)
    entry = await redis.xadd(key, fields)  # type: ignore[arg-type]
    assert isinstance(entry, bytes)
    with pytest.raises(ValueError, match="order id") as refused:
        from_outbox_entry(fields)
    copy = {**fields, b"id": entry, b"error": str(refused.value).encode()}
    await redis.xadd(layout.dead_letters(key), copy, id=entry)  # type: ignore[arg-type]
    lagging = {**fields, b"o": b"other+id"}
    await redis.xadd(layout.dead_letters(key), {"x": "a later dead letter"}, id="9999999999999-0")
    behind = await redis.xadd(key, lagging)  # type: ignore[arg-type]

    daemon = await start_daemon()
    async with OrderClient(settings) as client:
        await client.create("after-them", timeout=0.3)
    await wait_until(lambda: "after-them" in subscriber.cancelled_ids(), 10, "the lane past both entries")
    assert await redis.xlen(key) == 0
    dead = cast("list[Entry]", await redis.xrange(layout.dead_letters(key)))  # as in dead_entries()
    assert [fields for _, fields in dead if fields.get(b"id") == entry] == [copy]
    (moved,) = [(dead_id, fields) for dead_id, fields in dead if fields.get(b"id") == behind]
    assert moved[0] > b"9999999999999-0" and moved[1][b"o"] == b"other+id"
    assert daemon.outbox.dead_letters == 1


async def test_an_outbox_stream_of_the_wrong_type_holds_back_only_its_lane(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One XREAD reads every lane: a lane key holding a string (written by
    hand) would fail it for all. That lane is left out; the others go on, and
    it resumes once the key is moved aside (looked at again after
    BROKEN_RETRY, 10 s in the daemon, 2 s here)."""
    monkeypatch.setattr(outbox, "BROKEN_RETRY", 2.0)
    layout = KeyLayout(settings.key_prefix)
    orders = [f"wt-{i:02d}" for i in range(40)]
    broken = part_of(orders[0])
    await redis.set(layout.outbox(broken), "not a stream")
    daemon = await start_daemon()
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 0.5) for oid in orders])
        others = {oid for oid in orders if part_of(oid) != broken}
        stuck = set(orders) - others
        await wait_until(lambda: subscriber.cancelled_ids() >= others, 15, "the other lanes' cancellations")
        assert not subscriber.cancelled_ids() & stuck, "the broken lane cannot publish its cancellations"
        assert broken in daemon.outbox.broken
        await redis.rename(layout.outbox(broken), f"{layout.outbox(broken)}:broken")
        # the scripts could not append to it meanwhile: its orders' cancellations failed and wait in the index
        await wait_until(lambda: subscriber.cancelled_ids() >= stuck, 30, "the repaired lane's cancellations")
