"""What the Lua scripts accept, called as a producer in another language calls
them (EVALSHA with KEYS and ARGV), on the real redis-server.

Every writing script checks all its KEYS and ARGV before its first write, by
the rules of the Python side. Each argument of each script is malformed in
turn, on a keyspace where the valid call writes: the whole keyspace (every
key's type, DUMP and expiry time) is the same after the refused call, nothing
is published, the error names the script, the argument and the rule, and the
valid call then still works. The sweep takes unusable records out of the
deadline index and reports them, and the daemon logs and counts them.
`order-listener scripts NAME` prints the very text the daemon loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis import ResponseError
from redis.asyncio import Redis as AsyncRedis

from listener import logs
from listener.api import OrderClient
from listener.config import LogFormat, Settings
from listener.daemon import Daemon
from listener.keys import PARTS, KeyLayout, part_of
from listener.orders import Operation
from listener.scripts import NAMES, Scripts, source
from listener.servers import ServerProcess
from listener.store import Store
from tests.conftest import CLI, Subscriber, wait_until

LAYOUT = KeyLayout("order")
RETENTION = "3600000"


def ids_in_part(part: int, count: int, stem: str) -> list[str]:
    """The first `count` ids f"{stem}-<n>" of part `part`."""
    found = (f"{stem}-{n}" for n in range(10_000))
    return [oid for oid in found if part_of(oid) == part][:count]


P = part_of("ord-h")
OTHER = (P + 1) % PARTS
PENDING, PAID, DUE, NEW1, NEW2 = ids_in_part(P, 5, "in")
WRONG_PART = ids_in_part(OTHER, 1, "elsewhere")[0]
BASE = LAYOUT.base(P)
OWNER = "me"

BAD_IDS = {
    "plus": "bad+id",
    "space": "a b",
    "hash": "#",
    "wildcard": "ord-*",
    "slash": "a/b",
    "empty": "",
    "129-chars": "x" * 129,
    "5000-chars": "x" * 5000,
    "non-ascii": "ünï",
    "newline": "a\nb",
}
BAD_RETENTIONS = {
    "7d": "7d",
    "negative": "-1",
    "zero": "0",
    "decimal": "1.5",
    "empty": "",
    "exponent": "1e3",
    "over-100-years": "3153600000001",
}
BAD_TIMEOUTS = {
    "zero": "0",
    "99": "99",
    "2592000001": "2592000001",
    "decimal": "1.5",
    "abc": "abc",
    "empty": "",
    "space": " 100",
    "exponent": "1e3",
    "hex": "0x64",
    "negative": "-100",
}


def transition_keys(order_id: str) -> list[str]:
    part = part_of(order_id)
    return [LAYOUT.order(order_id), LAYOUT.timer(order_id), LAYOUT.deadlines(part), LAYOUT.outbox(part)]


# -- the valid call of each script, on the world seeded below ----------------

VALID: dict[str, tuple[list[str], list[str]]] = {
    "create": (
        [
            LAYOUT.deadlines(P),
            LAYOUT.outbox_created(P),
            LAYOUT.order(NEW1),
            LAYOUT.timer(NEW1),
            LAYOUT.order(NEW2),
            LAYOUT.timer(NEW2),
        ],
        [LAYOUT.wake_channel, str(P), NEW1, "60000", NEW2, "60000"],
    ),
    "pay": (transition_keys(PENDING), [PENDING, RETENTION]),
    "cancel": (transition_keys(PENDING), [PENDING, RETENTION]),
    "expire": (transition_keys(DUE), [DUE, RETENTION]),
    "deliver": (transition_keys(PAID), [PAID, RETENTION, "delivered"]),
    "refund": (transition_keys(PAID), [PAID, RETENTION, "refund"]),
    "sweep": ([LAYOUT.deadlines(P), LAYOUT.outbox(P)], [BASE, "1000", RETENTION]),
    "lease": ([LAYOUT.lease(P)], [OWNER, "6000"]),
    "release": ([LAYOUT.lease(P)], [OWNER]),
    "extend": (transition_keys(PENDING), [PENDING, RETENTION, "60000"]),
    # part P runs as usual and part OTHER is paused in the seeded world
    "pause": ([LAYOUT.pause(P)], ["payment provider down", "ops@host"]),
    "resume": ([LAYOUT.pause(OTHER)], [LAYOUT.wake_channel, "5000"]),
}
TRANSITIONS = ("pay", "cancel", "expire", "deliver", "refund", "extend")


@dataclass(frozen=True)
class Case:
    script: str
    keys: list[str]
    args: list[str]
    says: tuple[str, ...]  # what the error must contain besides "<script>: " and "nothing changed"


def changed(
    script: str,
    *,
    keys: dict[int, str] | None = None,
    args: dict[int, str | None] | None = None,
    says: tuple[str, ...],
) -> Case:
    """The valid call of `script` with KEYS[i] / ARGV[i] (1-based) replaced;
    an ARGV of None is left out."""
    valid_keys, valid_args = VALID[script]
    new_keys = [(keys or {}).get(i + 1, key) for i, key in enumerate(valid_keys)]
    new_args = [(args or {}).get(i + 1, arg) for i, arg in enumerate(valid_args)]
    return Case(script, new_keys, [arg for arg in new_args if arg is not None], says)


# Values refused where a script takes whole milliseconds up to 30 days.
BAD_MS_UP_TO_30_DAYS = {
    "negative": "-1",
    "decimal": "1.5",
    "abc": "abc",
    "empty": "",
    "over-30-days": "2592000001",
}


def cases() -> Iterator[tuple[str, Case]]:
    # create: the second order of the call is the bad one (the first would be
    # written if the checks came one order at a time)
    for name, bad in BAD_IDS.items():
        yield (
            f"create-id-{name}",
            changed(
                "create",
                keys={5: f"{BASE}o:{bad}", 6: f"{BASE}t:{bad}"},
                args={5: bad},
                says=("ARGV[5] (order id)", "must be 1 to 128 characters"),
            ),
        )
    yield (
        "create-id-of-another-part",
        changed(
            "create",
            keys={5: LAYOUT.order(WRONG_PART), 6: LAYOUT.timer(WRONG_PART)},
            args={5: WRONG_PART},
            says=(f"'{WRONG_PART}'", f"belongs to part {OTHER}, not {P}"),
        ),
    )
    for name, bad in BAD_TIMEOUTS.items():
        yield (
            f"create-timeout-{name}",
            changed(
                "create", args={6: bad}, says=(f"ARGV[6] (timeout ms of {NEW2})", "from 100 to 2592000000")
            ),
        )
    yield "create-timeout-missing", changed("create", args={6: None}, says=("6 KEYS and 5 ARGV given",))
    for name, bad in {"16": "16", "negative": "-1", "abc": "x", "leading-zero": f"0{P}", "empty": ""}.items():
        yield f"create-part-{name}", changed("create", args={2: bad}, says=("ARGV[2] (part)", "from 0 to 15"))
    yield (
        "create-part-not-the-keys",
        changed(
            "create", args={2: str(OTHER)}, says=("KEYS[1] (deadlines)", f"<prefix>:{{{OTHER}}}:deadlines")
        ),
    )
    yield (
        "create-wake-channel",
        changed("create", args={1: "other:wake"}, says=("ARGV[1] (wake channel)", "must be order:wake")),
    )
    yield (
        "create-keys-deadlines-of-another-part",
        changed("create", keys={1: LAYOUT.deadlines(OTHER)}, says=("KEYS[1] (deadlines)",)),
    )
    yield (
        "create-keys-deadlines-bad-prefix",
        changed("create", keys={1: f"or der:{{{P}}}:deadlines"}, says=("KEYS[1] (deadlines)",)),
    )
    yield (
        "create-keys-outbox-not-created",
        changed(
            "create",
            keys={2: LAYOUT.outbox(P)},
            says=("KEYS[2] (outbox:created)", f"must be {BASE}outbox:created"),
        ),
    )
    yield (
        "create-keys-order-hash-of-another-order",
        changed(
            "create", keys={5: LAYOUT.order(NEW1)}, says=("KEYS[5] (order hash)", f"must be {BASE}o:{NEW2}")
        ),
    )
    yield (
        "create-keys-timer",
        changed("create", keys={6: LAYOUT.order(NEW2)}, says=("KEYS[6] (timer)", f"must be {BASE}t:{NEW2}")),
    )
    keys, args = VALID["create"]
    yield "create-no-order", Case("create", keys[:2], args[:2], ("2 KEYS and 2 ARGV given", "at least one"))
    yield "create-keys-missing", Case("create", keys[:5], args, ("5 KEYS and 6 ARGV given",))

    for script in TRANSITIONS:
        oid = VALID[script][1][0]
        for name, bad in BAD_IDS.items():
            yield (
                f"{script}-id-{name}",
                Case(
                    script,
                    transition_keys(bad),
                    [bad, *VALID[script][1][1:]],
                    ("ARGV[1] (order id)", "must be 1 to 128 characters"),
                ),
            )
        for name, bad in BAD_RETENTIONS.items():
            yield (
                f"{script}-retention-{name}",
                changed(script, args={2: bad}, says=("ARGV[2] (retention ms)", "ORDER_LISTENER_RETENTION")),
            )
        count = len(VALID[script][1])
        yield (
            f"{script}-retention-missing",
            changed(script, args={2: None}, says=(f"4 KEYS and {count - 1} ARGV given",)),
        )
        yield (
            f"{script}-argv-extra",
            Case(script, VALID[script][0], [*VALID[script][1], "x"], (f"4 KEYS and {count + 1} ARGV given",)),
        )
        yield (
            f"{script}-keys-3",
            Case(script, VALID[script][0][:3], VALID[script][1], (f"3 KEYS and {count} ARGV given",)),
        )
        yield (
            f"{script}-keys-order-hash-of-another-order",
            changed(script, keys={1: LAYOUT.order(NEW1)}, says=("KEYS[1] (order hash)", f"o:{oid}")),
        )
        yield (
            f"{script}-keys-order-hash-of-another-part",
            changed(
                script, keys={1: f"order:{{{OTHER}}}:o:{oid}"}, says=("KEYS[1] (order hash)", f"{{{P}}}")
            ),
        )
        yield (
            f"{script}-keys-prefixes-differ",
            changed(
                script,
                keys={1: f"shop:{{{P}}}:o:{oid}"},
                says=("KEYS[2] (timer)", f"must be shop:{{{P}}}:t:{oid}"),
            ),
        )
        yield (
            f"{script}-keys-timer",
            changed(script, keys={2: LAYOUT.order(oid)}, says=("KEYS[2] (timer)", f"must be {BASE}t:{oid}")),
        )
        yield (
            f"{script}-keys-deadlines-of-another-part",
            changed(script, keys={3: LAYOUT.deadlines(OTHER)}, says=("KEYS[3] (deadlines)",)),
        )
        yield (
            f"{script}-keys-outbox-created",
            changed(
                script, keys={4: LAYOUT.outbox_created(P)}, says=("KEYS[4] (outbox)", f"must be {BASE}outbox")
            ),
        )
    for script, wrong in (("deliver", ("shipped", "refund", "")), ("refund", ("delivered", "REFUND", ""))):
        for bad in wrong:
            yield (
                f"{script}-reason-{bad or 'empty'}",
                changed(script, args={3: bad}, says=("ARGV[3] (reason)",)),
            )
        yield f"{script}-reason-missing", changed(script, args={3: None}, says=("4 KEYS and 2 ARGV given",))

    for name, bad in {
        "part-16": "order:{16}:",
        "no-colon": f"order:{{{P}}}",
        "empty": "",
        "leading-zero": f"order:{{0{P}}}:",
        "bad-prefix": f"or der:{{{P}}}:",
        "no-tag": f"order:{P}:",
    }.items():
        yield f"sweep-base-{name}", changed("sweep", args={1: bad}, says=("ARGV[1] (key base)",))
    for name, bad in {"zero": "0", "negative": "-1", "5001": "5001", "abc": "abc", "decimal": "1.5"}.items():
        yield (
            f"sweep-limit-{name}",
            changed("sweep", args={2: bad}, says=("ARGV[2] (batch limit)", "from 1 to 5000")),
        )
    for name, bad in BAD_RETENTIONS.items():
        yield (
            f"sweep-retention-{name}",
            changed("sweep", args={3: bad}, says=("ARGV[3] (retention ms)", "ORDER_LISTENER_RETENTION")),
        )
    yield "sweep-retention-missing", changed("sweep", args={3: None}, says=("2 KEYS and 2 ARGV given",))
    yield (
        "sweep-keys-deadlines-of-another-part",
        changed(
            "sweep",
            keys={1: LAYOUT.deadlines(OTHER)},
            says=("KEYS[1] (deadlines)", f"must be {BASE}deadlines"),
        ),
    )
    yield (
        "sweep-keys-outbox-created",
        changed(
            "sweep", keys={2: LAYOUT.outbox_created(P)}, says=("KEYS[2] (outbox)", f"must be {BASE}outbox")
        ),
    )
    yield (
        "sweep-keys-1",
        Case("sweep", VALID["sweep"][0][:1], VALID["sweep"][1], ("1 KEYS and 3 ARGV given",)),
    )

    for name, bad in {"zero": "0", "abc": "abc", "decimal": "1.5", "over-an-hour": "3600001", "": ""}.items():
        yield f"lease-ms-{name or 'empty'}", changed("lease", args={2: bad}, says=("ARGV[2] (ms)",))
    yield "lease-ms-missing", changed("lease", args={2: None}, says=("1 KEYS and 1 ARGV given",))
    for script in ("lease", "release"):
        yield (
            f"{script}-owner-empty",
            changed(script, args={1: ""}, says=("ARGV[1] (owner)", "1 to 1024 bytes")),
        )
        yield f"{script}-owner-1025", changed(script, args={1: "o" * 1025}, says=("ARGV[1] (owner)",))
        for name, bad in {"leases": f"{BASE}leases", "part-16": "order:{16}:lease", "bare": "lease"}.items():
            yield f"{script}-key-{name}", changed(script, keys={1: bad}, says=("KEYS[1] (lease)",))
        yield (
            f"{script}-keys-2",
            Case(
                script,
                [*VALID[script][0], "x"],
                VALID[script][1],
                (f"2 KEYS and {len(VALID[script][1])} ARGV",),
            ),
        )
    yield "release-owner-missing", Case("release", VALID["release"][0], [], ("1 KEYS and 0 ARGV given",))

    for name, bad in {"zero": "0", **BAD_MS_UP_TO_30_DAYS}.items():
        yield (
            f"extend-extension-{name}",
            changed("extend", args={3: bad}, says=("ARGV[3] (extension ms)", "from 1 to 2592000000")),
        )
    yield "extend-extension-missing", changed("extend", args={3: None}, says=("4 KEYS and 2 ARGV given",))
    for script in ("pause", "resume"):
        for name, bad in {
            "part-16": "order:{16}:pause",
            "paused": f"{BASE}paused",
            "bare": "pause",
            "bad-prefix": f"or der:{{{P}}}:pause",
        }.items():
            yield f"{script}-key-{name}", changed(script, keys={1: bad}, says=("KEYS[1] (pause switch)",))
        yield (
            f"{script}-keys-2",
            Case(script, [*VALID[script][0], "x"], VALID[script][1], ("2 KEYS and 2 ARGV given",)),
        )
        yield f"{script}-argv-1", changed(script, args={2: None}, says=("1 KEYS and 1 ARGV given",))
    yield "pause-reason-1025", changed("pause", args={1: "r" * 1025}, says=("ARGV[1] (reason)", "1024 bytes"))
    yield "pause-by-empty", changed("pause", args={2: ""}, says=("ARGV[2] (by)", "1 to 1024 bytes"))
    yield "pause-by-1025", changed("pause", args={2: "b" * 1025}, says=("ARGV[2] (by)",))
    yield (
        "resume-wake-channel",
        changed("resume", args={1: "other:wake"}, says=("ARGV[1] (wake channel)", "must be order:wake")),
    )
    for name, bad in BAD_MS_UP_TO_30_DAYS.items():
        yield (
            f"resume-grace-{name}",
            changed("resume", args={2: bad}, says=("ARGV[2] (grace ms)", "from 0 to 2592000000")),
        )


CASES = dict(cases())


# -- the world: a keyspace on which every valid call writes --------------------


@pytest.fixture(scope="module")
def client(redis_server_proc: ServerProcess) -> Iterator[SyncRedis]:
    if not redis_server_proc.running:
        redis_server_proc.start()
    connection = SyncRedis(port=redis_server_proc.port)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def shas(client: SyncRedis) -> dict[str, str]:
    return {name: client.script_load(source(name)) for name in NAMES}


def call(client: SyncRedis, sha: str, keys: list[str], args: list[str]) -> Any:
    return client.evalsha(sha, len(keys), *keys, *args)


def seed(client: SyncRedis, shas: dict[str, str]) -> None:
    """A pending order, a paid one, one past its deadline (and due in the
    index), a lease held by OWNER and part OTHER paused: each valid call
    above has work to do."""
    client.flushdb()
    create_keys = [LAYOUT.deadlines(P), LAYOUT.outbox_created(P)]
    create_args = [LAYOUT.wake_channel, str(P)]
    for oid in (PENDING, PAID, DUE):
        create_keys += [LAYOUT.order(oid), LAYOUT.timer(oid)]
        create_args += [oid, "60000"]
    assert call(client, shas["create"], create_keys, create_args)[::2] == [1, 1, 1]
    assert call(client, shas["pay"], transition_keys(PAID), [PAID, RETENTION])[0] == b"done"
    # DUE's deadline passed: `d` in its own hash wins over the bucket value (keys.py)
    client.hset(LAYOUT.order(DUE), "d", 1)
    client.zadd(LAYOUT.deadlines(P), {DUE: 1})
    client.set(LAYOUT.lease(P), OWNER, px=60_000)
    assert call(client, shas["pause"], [LAYOUT.pause(OTHER)], ["seeded", "test"])[0] == 1


def snapshot(client: SyncRedis) -> list[tuple[Any, ...]]:
    """Every key with its type, its DUMP and its absolute expiry time (ms)."""
    keys = sorted(client.scan_iter(count=1000))
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
            pipe.dump(key)
            pipe.pexpiretime(key)
        replies = pipe.execute()
    return [(key, *replies[3 * i : 3 * i + 3]) for i, key in enumerate(keys)]


@contextlib.contextmanager
def published(client: SyncRedis) -> Iterator[list[Any]]:
    """The messages published on any channel while the block runs."""
    pubsub = client.pubsub()  # type: ignore[no-untyped-call]  # unannotated in redis-py's sync client
    pubsub.psubscribe("*")
    pubsub.get_message(timeout=5)  # the subscription's confirmation
    seen: list[Any] = []
    try:
        yield seen
        # A marker published after the block arrives after anything the block published.
        marker = f"marker-{time.monotonic_ns()}"
        client.publish(marker, "x")
        give_up = time.monotonic() + 5
        while time.monotonic() < give_up:
            message = pubsub.get_message(timeout=1)
            if message is None or message["type"] != "pmessage":
                continue
            if message["channel"] == marker.encode():
                return
            seen.append(message)
        pytest.fail("the marker message never arrived")
    finally:
        pubsub.close()


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_malformed_call_is_refused_and_changes_nothing(
    client: SyncRedis, shas: dict[str, str], case: Case
) -> None:
    seed(client, shas)
    before = snapshot(client)
    with published(client) as messages, pytest.raises(ResponseError) as refused:
        call(client, shas[case.script], case.keys, case.args)
    message = str(refused.value)
    assert message.startswith(f"{case.script}: ") and message.endswith("; nothing changed"), message
    for part in case.says:
        assert part in message, (part, message)
    assert "\n" not in message and len(message) < 700, message
    assert snapshot(client) == before
    assert messages == []

    # the valid call still works, and writes: the keyspace above was one it changes
    keys, args = VALID[case.script]
    reply = call(client, shas[case.script], keys, args)
    assert snapshot(client) != before
    if case.script == "create":
        assert reply[::2] == [1, 1]
    elif case.script in TRANSITIONS:
        assert reply[0] == b"done"
    elif case.script == "sweep":
        assert reply[2][::2] == [DUE.encode()] and reply[4] == []
    elif case.script in ("pause", "resume"):
        assert reply[0] == 1
    else:
        assert reply == 1


def test_an_error_shows_a_long_or_unprintable_value_short(client: SyncRedis, shas: dict[str, str]) -> None:
    seed(client, shas)
    for bad, shown in (
        ("x" * 5000, "'" + "x" * 40 + "...(5000 bytes)'"),
        ("ünï", "'\\xc3\\xbcn\\xc3\\xaf'"),
        ("a\r\nb", "'a\\x0d\\x0ab'"),
    ):
        with pytest.raises(ResponseError) as refused:
            call(client, shas["pay"], transition_keys(bad), [bad, RETENTION])
        assert str(refused.value) == (
            f"pay: ARGV[1] (order id) is {shown}: must be 1 to 128 characters of letters, digits, "
            "'-', '_', '.', ':'; nothing changed"
        )


def test_a_malformed_stored_record_is_refused_and_left_alone(client: SyncRedis, shas: dict[str, str]) -> None:
    seed(client, shas)
    client.hset(LAYOUT.bucket(PENDING), PENDING, "garbage")
    before = snapshot(client)
    with pytest.raises(ResponseError, match=r"pay: the stored record of '.*' is malformed \(created"):
        call(client, shas["pay"], *VALID["pay"])
    assert snapshot(client) == before


# -- the sweep and records it cannot cancel ----------------------------------

GOOD_DUE = ids_in_part(P, 7, "due")
NO_RECORD, GARBAGE, BAD_VERSION, BAD_CREATED, NOT_PENDING, VALID_DUE = GOOD_DUE[1:]
UNUSABLE: dict[str | bytes, str] = {
    "bad+id": "order id must be",
    "x" * 5000: "order id must be",
    "ünï": "order id must be",
    b"\xff\xfe": "order id must be",
    NO_RECORD: "no order record",
    GARBAGE: "created entry id missing",
    BAD_VERSION: "version 'x'",
    BAD_CREATED: "created entry id 'yesterday'",
    NOT_PENDING: "the order is 'paid', not pending",
}


def plant_unusable(client: SyncRedis) -> None:
    """Due index members of part P that no sweep can cancel, written with raw
    commands as an older or broken producer would."""
    index = LAYOUT.deadlines(P)
    for member in UNUSABLE:
        # redis-py's zadd takes members of one type (a constrained TypeVar): str or bytes, not either
        client.zadd(index, {member: 1})  # type: ignore[type-var]
    client.hset(LAYOUT.bucket("bad+id"), "bad+id", "1-0|1")
    client.hset(LAYOUT.bucket(GARBAGE), GARBAGE, "garbage")
    client.hset(
        LAYOUT.order(BAD_VERSION), mapping={"s": "created", "v": "x", "r": "created", "c": "1-0", "d": 1}
    )
    client.hset(LAYOUT.order(BAD_CREATED), mapping={"c": "yesterday", "d": 1})
    client.hset(
        LAYOUT.order(NOT_PENDING), mapping={"s": "paid", "v": 2, "r": "paid", "c": "1-0", "u": 1, "d": 1}
    )


def planted(client: SyncRedis) -> list[Any]:
    """The records plant_unusable wrote, as they are now."""
    return [
        client.hmget(LAYOUT.bucket("bad+id"), ["bad+id"]),
        client.hmget(LAYOUT.bucket(GARBAGE), [GARBAGE]),
        *(client.hgetall(LAYOUT.order(oid)) for oid in (BAD_VERSION, BAD_CREATED, NOT_PENDING)),
    ]


async def test_the_sweep_reports_unusable_records_once_and_leaves_them(
    client: SyncRedis, settings: Settings, redis: AsyncRedis
) -> None:
    plant_unusable(client)
    records = planted(client)
    store = Store.from_settings(settings)
    try:
        async with OrderClient(settings) as orders:
            await orders.create(VALID_DUE, timeout=0.1)
        deadline = await store.now_ms() + 100

        async def past() -> bool:
            return await store.now_ms() > deadline

        await wait_until(past, 5, "the valid order's deadline to pass")
        (result,) = await store.sweep([P], 1000)
        assert [oid for oid, _ in result.cancelled] == [VALID_DUE]
        reported = dict(result.dropped)
        shown = {m.decode(errors="backslashreplace") if isinstance(m, bytes) else m for m in UNUSABLE}
        assert set(reported) == shown
        for member, problem in UNUSABLE.items():
            text = member.decode(errors="backslashreplace") if isinstance(member, bytes) else member
            assert problem in reported[text], (member, reported[text])
        # out of the index, records untouched, reported once
        assert client.zcard(LAYOUT.deadlines(P)) == 0
        assert planted(client) == records
        (again,) = await store.sweep([P], 1000)
        assert again.dropped == [] and again.cancelled == []
    finally:
        await store.close()


async def test_the_daemon_logs_and_counts_unusable_records_and_goes_on(
    client: SyncRedis,
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    plant_unusable(client)
    stream = io.StringIO()
    logs.configure("info", LogFormat.JSON, stream=stream)
    try:
        daemon = await start_daemon()
        async with OrderClient(settings) as orders:
            await orders.create_many([(VALID_DUE, 0.2), ("other-part-order", 0.2)])
        await wait_until(
            lambda: subscriber.cancelled_ids() == {VALID_DUE, "other-part-order"}, 10, "both cancellations"
        )

        def counted() -> float:
            return daemon.metrics.registry.get_sample_value("order_listener_malformed_records_total") or 0.0

        await wait_until(lambda: counted() == len(UNUSABLE), 10, lambda: f"the metric at {counted()}")
        lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
        errors = [line for line in lines if line["event"].startswith("order not cancelled: its record")]
        assert len(errors) == len(UNUSABLE), errors
        for line in errors:
            assert line["level"] == "error" and line["order_id"] and line["part"] == P and line["problem"]
        assert "x" * 200 + "..." in {line["order_id"] for line in errors}
        assert daemon.scheduler.dropped == len(UNUSABLE)
        assert len(subscriber.with_status("cancelled")) == 2  # announced once each
    finally:
        logs.configure("warning", stream=sys.stderr)


def test_the_keyspace_path_leaves_a_timer_of_a_refused_id_to_the_sweep() -> None:
    """The expire script refuses such an id: its timer's expiry is not this
    product's to act on, the sweep reports the order instead."""
    for bad in ("bad+id", "a b", "x" * 129):
        assert LAYOUT.parse_timer(LAYOUT.timer(bad)) is None
    assert LAYOUT.parse_timer(LAYOUT.timer("A-1:x_y.z")) == "A-1:x_y.z"


# -- `order-listener scripts NAME` --------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_scripts_prints_exactly_what_the_daemon_loads(client: SyncRedis, name: str) -> None:
    printed = subprocess.run([CLI, "scripts", name], capture_output=True, check=True, timeout=30).stdout
    daemon_sha = getattr(Scripts.register(AsyncRedis()), name).sha  # the SHA the daemon calls
    assert hashlib.sha1(printed).hexdigest() == daemon_sha
    assert client.script_load(printed) == daemon_sha


def test_the_installed_command_prints_the_same_bytes() -> None:
    printed = subprocess.run([CLI, "scripts", "create"], capture_output=True, check=True, timeout=30).stdout
    assert printed == source("create").encode()


def test_scripts_help_lists_every_script() -> None:
    shown = subprocess.run([CLI, "scripts", "--help"], capture_output=True, text=True, timeout=30)
    listed = " ".join(shown.stdout.split())
    assert shown.returncode == 0 and all(name in listed for name in NAMES), listed
    refused = subprocess.run([CLI, "scripts", "nope"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and ", ".join(NAMES) in refused.stderr


async def test_the_python_sides_calls_pass_every_check(settings: Settings, redis: AsyncRedis) -> None:
    """The store's own calls pass the checks: create over all parts, each
    transition, and the sweep with the largest batch the settings allow."""
    store = Store.from_settings(settings)
    try:
        ids = [f"ok-{i}" for i in range(64)]
        assert all(result.created for result in await store.create_many([(oid, 60_000) for oid in ids]))
        assert {part_of(oid) for oid in ids} == set(range(PARTS))
        for operation, oid in ((Operation.PAY, ids[0]), (Operation.CANCEL, ids[1]), (Operation.PAY, ids[2])):
            assert (await store.apply(operation, oid)).outcome == "done"
        assert (await store.apply(Operation.EXPIRE, ids[3])).outcome == "notdue"
        assert (await store.apply(Operation.DELIVER, ids[0])).outcome == "done"
        assert (await store.apply(Operation.LOGISTICS_RETURNED, ids[0])).outcome == "done"
        assert (await store.apply(Operation.REFUND, ids[2])).outcome == "done"
        results = await store.sweep(range(PARTS), 5000)
        assert all(result.dropped == [] and result.cancelled == [] for result in results)
    finally:
        await store.close()
