"""The Lua scripts against the rules, on the real redis-server: random sequences
of every operation (create, single and batched; pay, cancel, deliver, refund,
logistics delivered/returned; expire and sweep past real deadlines) on a few
orders, checked after each step against a plain Python model built from
`listener.orders.decide` and `RULES`: the script's reply, the stored record,
the deadline index, the timer, the retention TTL, and exactly which outbox
entries were appended. No daemon: the outbox streams are read directly.

The scripts are called the way a producer in another language would: the
documented key layout (`KeyLayout`), KEYS and ARGV, through a plain
synchronous client.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from listener.keys import KeyLayout, part_of
from listener.orders import RULES, Operation, Outcome, Reason, Status, decide
from listener.scripts import source
from listener.servers import ServerProcess

IDS = ("ord-h", "ord-q", "ord-a")  # the first two share part 15; ord-a is in part 11
PARTS_USED = sorted({part_of(oid) for oid in IDS})
SHORT_MS, LONG_MS = 100, 60_000
RETENTION_MS = 3_600_000
LAYOUT = KeyLayout("order")
ACTIONS = ("create", *(str(op) for op in Operation))

SCRIPT_OF: dict[Operation, tuple[str, str | None]] = {
    Operation.PAY: ("pay", None),
    Operation.CANCEL: ("cancel", None),
    Operation.EXPIRE: ("expire", None),
    Operation.DELIVER: ("deliver", "delivered"),
    Operation.LOGISTICS_DELIVERED: ("deliver", "logistics"),
    Operation.REFUND: ("refund", "refund"),
    Operation.LOGISTICS_RETURNED: ("refund", "returned"),
}


@dataclass
class Modelled:
    status: Status
    version: int
    reason: Reason
    deadline: int
    created_entry: str
    updated: int
    short: bool  # its payment window is SHORT_MS: tests wait for it to pass
    # its history's items, h1, h2, ... of its own hash (lib.lua): none until its first change
    history: list[str] = field(default_factory=list)
    # cancelled by the sweep straight from pending: the record stays in its
    # bucket field, "<c>|<d>|<u>", named in the part's retention queue (keys.py)
    in_bucket: bool = False


Entry = tuple[str, dict[str, str]]  # (stream key, fields)


class OrderMachine(RuleBasedStateMachine):
    def __init__(self, client: redis.Redis, scripts: dict[str, Any]) -> None:
        super().__init__()
        self.r = client
        self.scripts = scripts
        self.r.flushdb()
        self.orders: dict[str, Modelled] = {}
        self.last_seen: dict[str, str] = {}  # stream key -> last entry id read
        self.cells: set[tuple[Operation, Status, Reason]] = set()  # (operation, status, reason) met

    # -- plumbing ------------------------------------------------------------

    def now_ms(self) -> int:
        seconds, micros = self.r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def wait_past(self, deadline: int) -> None:
        """Sleep until the Redis clock is past `deadline` (at most SHORT_MS)."""
        while (now := self.now_ms()) <= deadline:
            time.sleep((deadline - now + 1) / 1000)

    def appended(self, *also: str) -> list[Entry]:
        """Outbox entries appended since the last call, stream by stream, in the
        parts of IDS, of the known orders and of the ids `also`."""
        parts = sorted({*PARTS_USED, *(part_of(oid) for oid in (*self.orders, *also))})
        keys = [key for part in parts for key in (LAYOUT.outbox_created(part), LAYOUT.outbox(part))]
        with self.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xrange(key, "(" + self.last_seen[key] if key in self.last_seen else "-", "+")
            replies = pipe.execute()
        out: list[Entry] = []
        for key, entries in zip(keys, replies, strict=True):
            for entry_id, fields in entries:
                out.append((key, fields))
                self.last_seen[key] = entry_id
        return out

    @initialize(picks=st.dictionaries(st.sampled_from(IDS), st.booleans(), min_size=1))
    def start(self, picks: dict[str, bool]) -> None:
        """Most steps should meet an existing order: start with some, those of
        one part created by one script call."""
        for part in PARTS_USED:
            batch = [(oid, short) for oid, short in picks.items() if part_of(oid) == part]
            if batch:
                self.create(batch)

    # -- create --------------------------------------------------------------

    def create(self, batch: list[tuple[str, bool]]) -> None:
        """One create script call for orders of one part (repeats allowed)."""
        part = part_of(batch[0][0])
        keys = [LAYOUT.deadlines(part), LAYOUT.outbox_created(part)]
        args: list[Any] = [LAYOUT.wake_channel, part]
        for oid, short in batch:
            keys += [LAYOUT.order(oid), LAYOUT.timer(oid)]
            args += [oid, SHORT_MS if short else LONG_MS]
        reply = self.scripts["create"](keys=keys, args=args)
        assert len(reply) == 2 * len(batch)
        entries = self.appended(batch[0][0])
        fresh = 0
        for i, (oid, short) in enumerate(batch):
            flag, value = reply[2 * i], reply[2 * i + 1]
            known = self.orders.get(oid)
            if known is not None:
                assert (flag, value) == (0, str(known.status)), (oid, reply)
                continue
            assert flag == 1, (oid, reply)
            key, fields = entries[fresh]
            fresh += 1
            timeout = SHORT_MS if short else LONG_MS
            assert key == LAYOUT.outbox_created(part) and fields == {"o": oid, "t": str(timeout)}
            # a new order is a field of its bucket: "<created entry id>|<deadline ms>"
            bucket_field = self.r.hget(LAYOUT.bucket(oid), oid)
            assert isinstance(bucket_field, str)  # a client with decode_responses
            entry, deadline = bucket_field.split("|")
            created_ms = int(entry.split("-")[0])
            # the deadline is exactly the timeout after the creation (the entry id's ms)
            assert int(value) == int(deadline) == created_ms + timeout, (oid, value, created_ms)
            self.orders[oid] = Modelled(
                Status.CREATED, 1, Reason.CREATED, int(value), entry, created_ms, short
            )
        assert fresh == len(entries), entries

    @rule(
        picks=st.lists(st.tuples(st.sampled_from(IDS[:2]), st.booleans()), min_size=1, max_size=3),
    )
    def create_batch(self, picks: list[tuple[str, bool]]) -> None:
        self.create(picks)

    # -- transitions ---------------------------------------------------------

    def apply(self, operation: Operation, oid: str) -> None:
        name, reason_arg = SCRIPT_OF[operation]
        part = part_of(oid)
        keys = [LAYOUT.order(oid), LAYOUT.timer(oid), LAYOUT.deadlines(part), LAYOUT.outbox(part)]
        args: list[Any] = [oid, RETENTION_MS] + ([reason_arg] if reason_arg else [])
        known = self.orders.get(oid)
        # A short window is made to have passed before any operation on the
        # order (a long one never passes during the test): then the timeout
        # applies first, whatever is asked (lib.lua), and the operation meets
        # a cancelled order.
        due = known is not None and known.status is Status.CREATED and known.short
        if due and known is not None:
            self.wait_past(known.deadline)
        reply = self.scripts[name](keys=keys, args=args)
        entries = self.appended()

        if known is None:
            assert reply == ["unknown", "", 0, ""] and entries == []
            return
        if due:
            self.cells.add((operation, known.status, known.reason))
            self.advance(oid, known, (Status.CANCELLED,), Reason.TIMEOUT, entries)
            late = decide(operation, Status.CANCELLED, Reason.TIMEOUT)
            expected = "done" if operation is Operation.EXPIRE else str(late)
            assert reply == [expected, "cancelled", known.version, "timeout"], (operation, reply)
            return
        outcome = decide(operation, known.status, known.reason)
        self.cells.add((operation, known.status, known.reason))
        if outcome is Outcome.DONE and operation is Operation.EXPIRE and not due:
            assert reply == ["notdue", known.status, known.version, known.reason]
            assert entries == []
            return
        if outcome is not Outcome.DONE:
            assert reply == [str(outcome), known.status, known.version, known.reason], (operation, reply)
            assert entries == [], (operation, entries)
            return
        self.advance(oid, known, RULES[operation].steps, RULES[operation].reason, entries)
        assert reply == ["done", known.status, known.version, known.reason]

    def advance(
        self, oid: str, known: Modelled, steps: tuple[Status, ...], reason: Reason, entries: list[Entry]
    ) -> None:
        """The model's side of lib.lua's advance(), checked against `entries`."""
        assert len(entries) == len(steps), entries
        at = int(entries[0][1]["t"])
        assert at >= known.updated
        created_ms = known.created_entry.split("-")[0]
        if known.version == 1:  # the first change starts the history with the `created` event
            known.history.append(f"created||created|1|{created_ms}|{created_ms}|{known.deadline}")
        for number, step in enumerate(steps):
            previous = known.status if number == 0 else steps[number - 1]
            version = known.version + number + 1
            known.history.append(f"{step}|{previous}|{reason}|{version}|{at}|{created_ms}|")
        for (key, fields), step in zip(entries, steps, strict=True):
            assert key == LAYOUT.outbox(part_of(oid))
            assert fields == {
                "o": oid,
                "s": str(step),
                "p": str(known.status),
                "r": str(reason),
                "v": str(known.version + 1),
                "t": str(at),
                "c": known.created_entry,
            }, fields
            known.status, known.version = step, known.version + 1
        known.reason, known.updated = reason, at

    @rule(action=st.sampled_from(ACTIONS), oid=st.sampled_from(IDS), short=st.booleans())
    def act(self, action: str, oid: str, short: bool) -> None:
        if action == "create":
            self.create([(oid, short)])
        else:
            self.apply(Operation(action), oid)

    @rule(data=st.data(), oid=st.sampled_from(IDS))
    def forward(self, data: st.DataObject, oid: str) -> None:
        """An operation the model says moves the order on, so runs reach every
        status and every reason often; `act` tries everything else."""
        known = self.orders.get(oid)
        if known is None:
            self.create([(oid, data.draw(st.booleans(), label="short"))])
            return
        moving = [op for op in Operation if decide(op, known.status, known.reason) is Outcome.DONE]
        if moving:
            self.apply(data.draw(st.sampled_from(moving), label="operation"), oid)

    @rule(operation=st.sampled_from(Operation))
    def unknown_order(self, operation: Operation) -> None:
        self.apply(operation, "ord-never")

    @rule(part=st.sampled_from(PARTS_USED), wait=st.booleans())
    def sweep(self, part: int, wait: bool) -> None:
        mine = {oid: o for oid, o in self.orders.items() if part_of(oid) == part}
        if wait:
            pending = [o.deadline for o in mine.values() if o.status is Status.CREATED and o.short]
            if pending:
                self.wait_past(max(pending))
        now, nxt, flat, micros, dropped = self.scripts["sweep"](
            keys=[LAYOUT.deadlines(part), LAYOUT.outbox(part)], args=[LAYOUT.base(part), 1000, RETENTION_MS]
        )
        entries = self.appended()
        due = sorted(
            (o.deadline, oid) for oid, o in mine.items() if o.status is Status.CREATED and o.deadline <= now
        )
        assert [(flat[i], int(flat[i + 1])) for i in range(0, len(flat), 2)] == [(i, d) for d, i in due]
        assert len(entries) == len(due), entries
        for position, (_, oid) in enumerate(due):
            first_change = mine[oid].version == 1
            self.advance(oid, mine[oid], (Status.CANCELLED,), Reason.TIMEOUT, [entries[position]])
            if first_change:  # the sweep writes no items for these: the record implies both (lib.lua)
                mine[oid].history = []
                mine[oid].in_bucket = True
            assert int(entries[position][1]["t"]) == now
        left = [o.deadline for o in mine.values() if o.status is Status.CREATED]
        assert nxt == (min(left) if left else -1)
        assert 0 <= micros < 1000  # the clock's microseconds past `now`
        assert dropped == []  # every record the scripts wrote is well-formed

    # -- what changes nothing ------------------------------------------------

    @invariant()
    def refused_and_repeated_change_nothing(self) -> None:
        """After every step, every operation the model says is refused, repeated
        or not yet due is tried on every order: the script must agree and write
        nothing. So each state a run reaches has all its cells checked."""
        for oid, known in list(self.orders.items()):
            if known.status is Status.CREATED and known.short:
                continue  # its window may have closed: any operation would apply the timeout
            for operation in Operation:
                outcome = decide(operation, known.status, known.reason)
                if outcome is not Outcome.DONE or (operation is Operation.EXPIRE and not known.short):
                    self.apply(operation, oid)

    # -- what is stored ------------------------------------------------------

    @invariant()
    def stored_matches_the_model(self) -> None:
        for oid in sorted({*IDS, "ord-never", *self.orders}):
            key = LAYOUT.order(oid)
            record = self.r.hgetall(key)
            packed = self.r.hget(LAYOUT.bucket(oid), oid)
            known = self.orders.get(oid)
            in_index = self.r.zscore(LAYOUT.deadlines(part_of(oid)), oid)
            if known is None:
                assert record == {} and packed is None and in_index is None
                assert not self.r.exists(LAYOUT.timer(oid))
                continue
            # A record never changed since create is only its bucket field
            # (keys.py); the first transition moves it to the order's own hash,
            # all six fields.
            if known.version == 1:
                assert record == {}, (oid, record, known)
                assert packed == f"{known.created_entry}|{known.deadline}", (oid, packed, known)
            elif known.in_bucket:
                assert record == {}, (oid, record, known)
                assert packed == f"{known.created_entry}|{known.deadline}|{known.updated}", (oid, packed)
                # a client with decode_responses: str, where redis-py's type says bytes or str
                queued = cast("list[str]", self.r.lrange(LAYOUT.expiring(part_of(oid)), 0, -1))
                ends = [entry.split("|")[0] for entry in queued if oid in entry.split("|")[2].split(",")]
                assert ends == [str(known.updated + RETENTION_MS)], (oid, queued)
            else:
                assert packed is None, (oid, packed, known)
                # ... and its history, a field h<version> per event (lib.lua, emit)
                assert record == {
                    "s": str(known.status),
                    "v": str(known.version),
                    "r": str(known.reason),
                    "c": known.created_entry,
                    "u": str(known.updated),
                    "d": str(known.deadline),
                    **{f"h{number}": item for number, item in enumerate(known.history, 1)},
                }, (oid, record, known)
            if known.status is Status.CREATED:
                assert in_index == known.deadline
                if not known.short:
                    assert self.r.pttl(LAYOUT.timer(oid)) > 0
            else:
                assert in_index is None
                assert not self.r.exists(LAYOUT.timer(oid))  # a paid order never times out
            ttl = self.r.pttl(key)
            if known.in_bucket:
                assert ttl == -2  # no own hash: the retention queue ends the record
            elif known.status is Status.CANCELLED:
                assert 0 < ttl <= RETENTION_MS
            elif known.version > 1:
                assert ttl == -1


@contextlib.contextmanager
def scripts_on(server: ServerProcess) -> Iterator[tuple[redis.Redis, dict[str, Any]]]:
    """A plain synchronous client on the test redis-server and the scripts registered on it."""
    if not server.running:
        server.start()
    client = redis.Redis(port=server.port, decode_responses=True)
    try:
        client.flushdb()
        names = ("create", "sweep", *(name for name, _ in SCRIPT_OF.values()))
        yield client, {name: client.register_script(source(name)) for name in names}
        client.flushdb()
    finally:
        client.close()


def test_scripts_follow_the_rules(redis_server_proc: ServerProcess) -> None:
    assert [part_of(oid) for oid in IDS] == [15, 15, 11]
    with scripts_on(redis_server_proc) as (client, scripts):
        run_state_machine_as_test(
            # hypothesis takes "anything which returns an instance of RuleBasedStateMachine
            # when called" (its docstring), but its annotation says a class
            lambda: OrderMachine(client, scripts),  # type: ignore[arg-type]
            settings=settings(
                max_examples=40,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


# One order per resting state, driven along the table: with the checks the
# machine runs after each step, every (operation, status, last reason) cell is
# met at least once in every run, whatever the random runs above happened to reach.
STORIES: dict[str, tuple[str, ...]] = {
    "created": (),
    "paid": ("pay",),
    "delivered": ("pay", "deliver"),
    "carrier-delivered": ("pay", "logistics-delivered"),
    "by-customer": ("cancel",),
    "by-expire": ("expire",),
    "by-sweep": ("sweep",),
    "paid-refunded": ("pay", "refund"),
    "delivered-refunded": ("pay", "deliver", "refund"),
    "carrier-refunded": ("pay", "logistics-delivered", "refund"),
    "carrier-returned": ("pay", "logistics-delivered", "logistics-returned"),
    "returned": ("pay", "deliver", "logistics-returned"),
}
RESTING = [
    (Status.CREATED, Reason.CREATED),
    (Status.PAID, Reason.PAID),
    (Status.DELIVERED, Reason.DELIVERED),
    (Status.DELIVERED, Reason.LOGISTICS),
    *(
        (Status.CANCELLED, reason)
        for reason in (Reason.CUSTOMER, Reason.TIMEOUT, Reason.REFUND, Reason.RETURNED)
    ),
]


def test_every_cell_of_the_table_on_the_scripts(redis_server_proc: ServerProcess) -> None:
    with scripts_on(redis_server_proc) as (client, scripts):
        machine = OrderMachine(client, scripts)
        for name, steps in STORIES.items():
            oid = f"story-{name}"
            machine.create([(oid, name.startswith("by-") and name != "by-customer")])
            for step in steps:
                if step == "sweep":
                    machine.sweep(part_of(oid), wait=True)
                else:
                    machine.apply(Operation(step), oid)
                machine.refused_and_repeated_change_nothing()
                machine.stored_matches_the_model()
        final = {oid.removeprefix("story-"): (o.status, o.reason) for oid, o in machine.orders.items()}
        assert final["carrier-returned"] == final["returned"] == (Status.CANCELLED, Reason.RETURNED)
        assert final["by-sweep"] == final["by-expire"] == (Status.CANCELLED, Reason.TIMEOUT)
        assert set(final.values()) == set(RESTING)
        assert machine.cells == {(op, status, reason) for op in Operation for status, reason in RESTING}


def test_deadline_is_creation_time_plus_timeout(redis_server_proc: ServerProcess) -> None:
    """What `show` and the `created` event report: created + timeout == deadline."""
    with scripts_on(redis_server_proc) as (client, scripts):
        part = 3
        ids = [oid for oid in (f"chunk-{n}" for n in range(20_000)) if part_of(oid) == part][:500]
        keys = [LAYOUT.deadlines(part), LAYOUT.outbox_created(part)]
        args: list[Any] = [LAYOUT.wake_channel, part]
        for oid in ids:
            keys += [LAYOUT.order(oid), LAYOUT.timer(oid)]
            args += [oid, LONG_MS]
        scripts["create"](keys=keys, args=args)  # one chunk, as Store sends it
        short = []
        for oid in ids:
            bucket_field = client.hget(LAYOUT.bucket(oid), oid)
            assert isinstance(bucket_field, str)  # a client with decode_responses
            entry, deadline = bucket_field.split("|")
            created_ms = int(entry.split("-")[0])
            if int(deadline) - created_ms != LONG_MS:
                short.append(LONG_MS - (int(deadline) - created_ms))
        assert short == [], f"{len(short)} of {len(ids)} deadlines short by up to {max(short)} ms"
