"""A chaos soak: orders live and die around their deadlines while faults hit
the daemons, Redis and the broker; then the invariants a subscriber relies on.

    .venv/bin/python bench/chaos.py [--minutes 10] [--seed N] [--daemons 2] [--rate 10]

Not part of the test suite: it runs for minutes and its faults are random
(seeded: `--seed` repeats the same choices, though not the same timings).

What runs, on free loopback ports in a temporary folder:

- redis-server with the project's redis.conf (AOF on, fsync every second);
- mosquitto, stock profile, with persistence (`durable`): the subscriber's
  persistent session keeps what it missed while it was cut off, across a
  broker restart, so what the subscriber lacks was never published;
- `--daemons` daemons (`order-listener run`, 2 by default), each a process
  of its own with /healthz on a port of its own;
- a subscriber (aiomqtt, MQTT 3.1.1, clean_session False, QoS 1 on
  `orders/+/status`, reconnecting) that records every payload it receives,
  duplicates included;
- a producer (the Python API, `OrderClient`) that creates `--rate` orders a
  second with timeouts of 0.5 to 3 s and, for each, one plan: let it expire;
  pay it close to its deadline (racing the expiry); pay it early (sometimes
  twice); cancel it (sometimes close to the deadline). Paid orders are then
  delivered, refunded, or both. Every call is recorded with its result; a call
  that failed with Redis unreachable counts as unacknowledged (it may or may
  not have been applied).

Every few seconds (`--fault-gap`) one fault, chosen at random, each logged
with its time:

- daemon-kill: a daemon killed with SIGKILL, restarted after up to 2 s;
- redis-restart: Redis stopped with SIGTERM (it writes its AOF) and started;
- redis-kill: Redis killed with SIGKILL and started (the AOF keeps every
  acknowledged write: a crash of the process alone loses nothing);
- broker-restart: mosquitto stopped (SIGTERM) for up to 3 s and started;
- lost-write: SAVE, the snapshot copied aside; writes go on for a moment;
  Redis killed with SIGKILL, its AOF removed and the old snapshot put back:
  the writes acknowledged since the snapshot are gone, as after a failover to
  a replica that had not replicated them. (Redis 7 starting with the AOF on
  and no AOF would start empty: it is started once with the AOF off, to load
  the snapshot, and the AOF is then turned on again with CONFIG SET.)

After each fault the soak waits until every daemon's /healthz answers 200
and the subscriber has an event of a transition made after the fault: that
is the daemons' recovery, timed and printed.

Then the faults stop (the last one ends with its recovery, while orders
still come), then the producer; the soak waits until every deadline has
passed, the outbox streams are empty, no order is pending and the subscriber
has been quiet for 3 s, reads every order back and checks:

1. every order that exists ends in one state (not `created`, not
   `refunded`) and the last event received for it (highest version, then
   latest receipt) has that status, version and reason;
2. per order, the first receipts of its event_ids never go down in version
   and each follows the one before (its `previous` is that one's status),
   except where a lost write explains it: the order's announced transitions
   at and above some version all happened within a lost write's window, and
   the order then went another way at that version ("rewound by a lost
   write"), or stayed at the lower version for good ("announced, then undone
   by a lost write"), or a daemon published such a transition late ("late
   event of a way a lost write undid");
3. no event_id names two different transitions (order, status, previous,
   reason, version); one transition announced with two different times
   happened twice, which only a lost write explains;
4. nothing lost: every order that exists has, in the events received, an
   unbroken history from `created` (version 1) to its final state, each
   event's `previous` the status of the one before; acknowledged changes are
   in that history, and no later call of the producer finds the order
   unknown or in an earlier state, unless a lost write's window holds the
   change; an order whose acknowledged creation is gone is counted apart
   when a lost write's window holds it, an anomaly otherwise;
5. what a subscriber deduplicating by event_id keeps of an order (all but
   what a lost write undid) is never both paid and cancelled by timeout and
   has at most one cancellation;

and also: no order cancelled by timeout before its deadline, every payload
valid against the shipped JSON schema and on its order's topic, no dead
letters, no daemon exited by itself, every daemon stops with status 0 at the
end, and no producer call failed with anything but the documented errors.
What a lost write explains is counted and shown apart, with examples: it is
what a subscriber sees after such a failover, not a broken promise.

It prints the faults as they happen, then the figures and the anomalies by
kind (up to 10 examples each), and exits 1 if there is any anomaly. The work
folder (server and daemon logs, and run.json: every receipt, call, final
state and fault) is removed unless `--keep` or an anomaly. Every run first
checks its checks on made-up runs (`--self-check` shows them);
`--check-run FOLDER/run.json` checks a saved run again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
from benchlib import print_setup
from lag import clear_listener_env, daemon_command
from redis.asyncio import Redis

from listener.api import Change, OrderClient
from listener.config import load_settings
from listener.errors import OrderExists, Refused, Unavailable, UnknownOrder
from listener.keys import PARTS, KeyLayout
from listener.orders import Order, Reason, Status
from listener.servers import ServerProcess, free_port, mosquitto, redis_server
from listener.store import CreateResult

TOPIC = "orders/+/status"
ORDER_PREFIX = "chaos-"
TIMEOUTS = (0.5, 3.0)  # seconds: each order's payment window
FAULT_KINDS = ("daemon-kill", "redis-restart", "redis-kill", "broker-restart", "lost-write")
RECOVERY_LIMIT = 30.0  # seconds for the daemons to be healthy and publishing after a fault
QUIET = 3.0  # seconds without a receipt before the subscriber counts as drained
SETTLE_LIMIT = 180.0  # seconds for everything to settle after the producer stopped
SLACK_MS = 5  # clock reading vs the Redis clock in a script (same host, ms rounding)
EXAMPLES = 10
SCHEMA = Path(__file__).resolve().parent.parent / "listener" / "schemas" / "status-event.schema.json"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def unix_ms(iso: str) -> int:
    """An event's time (``2026-11-24T15:00:00.123Z``) as Unix ms."""
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


# -- what the soak records ------------------------------------------------------------


@dataclass(frozen=True)
class Receipt:
    """One message as the subscriber got it (redeliveries included)."""

    index: int
    received_ms: int
    topic: str
    payload: bytes
    event: dict[str, Any] | None  # None: not a JSON object


@dataclass(frozen=True)
class Call:
    """One producer call and what came of it."""

    op: str
    order_id: str
    sent_ms: int
    done_ms: int
    outcome: str  # done, already, refused, unknown, exists, unavailable, error
    status: str = ""
    version: int = 0
    detail: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.outcome not in ("unavailable", "error")


@dataclass
class Fault:
    kind: str
    start_ms: int
    at_s: float  # seconds into the soak
    detail: str = ""
    end_ms: int = 0
    recovered_s: float | None = None


@dataclass(frozen=True)
class LostWindow:
    """What a lost-write fault may have undone: anything Redis did after SAVE
    was sent (snapshot_ms) and before it was killed (kill_ms)."""

    snapshot_ms: int
    kill_ms: int

    def holds(self, ms: int) -> bool:
        return self.snapshot_ms - SLACK_MS <= ms <= self.kill_ms + SLACK_MS


@dataclass
class Findings:
    """Anomalies (the product broke a promise) and what lost writes explain,
    each by kind with its examples."""

    anomalies: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    explained: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def anomaly(self, kind: str, example: str) -> None:
        self.anomalies[kind].append(example)

    def explain(self, kind: str, example: str) -> None:
        self.explained[kind].append(example)

    @property
    def total(self) -> int:
        return sum(len(examples) for examples in self.anomalies.values())


# -- the daemons ----------------------------------------------------------------------


@dataclass
class DaemonSlot:
    """One daemon process, restarted in place after a kill; /healthz on its port."""

    index: int
    env: dict[str, str]
    workdir: Path
    metrics_port: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    log: Path | None = None

    def spawn(self) -> None:
        self.starts += 1
        self.log = self.workdir / f"daemon-{self.index}.{self.starts}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                daemon_command(),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def exited(self) -> int | None:
        """The exit status if the process ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, wait: float = 20.0) -> int | None:
        """SIGTERM and wait: the exit status (None: it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        return self.proc.returncode

    def tail(self, lines: int = 8) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def healthy(self) -> bool:
        return await http_status(self.metrics_port, "/healthz") == 200


async def http_status(port: int, path: str) -> int:
    """The HTTP status of GET `path` on 127.0.0.1:`port` (0: no answer)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return 0
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 2.0)
        parts = line.split()
        return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
    except (OSError, TimeoutError):
        return 0
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


# -- the subscriber ---------------------------------------------------------------------


QUIET_LOGGER = logging.getLogger("chaos.subscriber")
QUIET_LOGGER.setLevel(logging.CRITICAL)


class Subscriber:
    """A persistent session (clean_session False), QoS 1, reconnecting: what it
    misses while cut off, the broker keeps for it."""

    def __init__(self, port: int, identifier: str) -> None:
        self.port = port
        self.identifier = identifier
        self.receipts: list[Receipt] = []
        self.latest_at_ms = 0  # the latest `at` of any event received
        self.last_receipt = time.monotonic()
        self.connects = 0
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier=self.identifier,
                    protocol=aiomqtt.ProtocolVersion.V311,
                    clean_session=False,
                    keepalive=5,
                    logger=QUIET_LOGGER,  # "connection reset" at each broker restart is expected
                ) as client:
                    await client.subscribe(TOPIC, qos=1)
                    self.connects += 1
                    self.ready.set()
                    async for message in client.messages:
                        payload = message.payload
                        raw = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
                        self.record(str(message.topic), raw)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)

    def record(self, topic: str, payload: bytes) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            event = None
        self.receipts.append(Receipt(len(self.receipts), now_ms(), topic, payload, event))
        self.last_receipt = time.monotonic()
        if event is not None and isinstance(event.get("at"), str):
            with contextlib.suppress(ValueError):
                self.latest_at_ms = max(self.latest_at_ms, unix_ms(event["at"]))

    @property
    def quiet_for(self) -> float:
        return time.monotonic() - self.last_receipt


# -- the producer -------------------------------------------------------------------------

# (plan, weight): what the producer does with a new order
PLANS = (("expire", 25), ("race-pay", 30), ("pay", 25), ("cancel", 20))


class Producer:
    """Creates orders at a steady rate and plays each one's plan; records every call."""

    def __init__(self, client: OrderClient, rng: random.Random, rate: float, findings: Findings) -> None:
        self.client = client
        self.rng = rng
        self.rate = rate
        self.findings = findings
        self.calls: list[Call] = []
        self.attempted: list[str] = []  # every id a create was sent for
        self.plans: Counter[str] = Counter()
        self.last_create = 0.0  # time.time() of the last create sent
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        tick = 1.0 / self.rate
        next_at = time.monotonic()
        number = 0
        while not stop.is_set():
            number += 1
            order_id = f"{ORDER_PREFIX}{number:06d}"
            task = asyncio.create_task(self.life(order_id, random.Random(self.rng.getrandbits(64))))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            next_at += tick
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        if self.tasks:  # the plans under way end within seconds
            await asyncio.gather(*self.tasks)

    async def life(self, order_id: str, rng: random.Random) -> None:
        timeout = round(rng.uniform(*TIMEOUTS), 3)
        plan = rng.choices([p for p, _ in PLANS], weights=[w for _, w in PLANS])[0]
        self.plans[plan] += 1
        self.attempted.append(order_id)
        self.last_create = time.time()
        created = await self.call("create", order_id, lambda: self.client.create(order_id, timeout))
        if not isinstance(created, CreateResult) or created.deadline_ms is None:
            return
        deadline = created.deadline_ms / 1000
        if plan == "race-pay":
            await sleep_until(deadline + rng.uniform(-0.2, 0.05))
            await self.paid_life(order_id, rng)
        elif plan == "pay":
            await sleep_until(deadline - timeout * rng.uniform(0.4, 0.9))
            await self.paid_life(order_id, rng, repeat=rng.random() < 0.3)
        elif plan == "cancel":
            close = rng.random() < 0.5
            at = deadline + rng.uniform(-0.15, 0.05) if close else deadline - timeout * rng.uniform(0.2, 0.8)
            await sleep_until(at)
            await self.call("cancel", order_id, lambda: self.client.cancel(order_id))

    async def paid_life(self, order_id: str, rng: random.Random, repeat: bool = False) -> None:
        paid = await self.call("pay", order_id, lambda: self.client.pay(order_id))
        if not isinstance(paid, Change):
            return
        if repeat:  # a retried pay: changes nothing
            await self.call("pay", order_id, lambda: self.client.pay(order_id))
        after = rng.random()
        if after < 0.4:
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            delivered = await self.call("deliver", order_id, lambda: self.client.deliver(order_id))
            if isinstance(delivered, Change) and rng.random() < 0.3:
                await asyncio.sleep(rng.uniform(0.1, 1.0))
                await self.call("refund", order_id, lambda: self.client.refund(order_id))
        elif after < 0.65:
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            await self.call("refund", order_id, lambda: self.client.refund(order_id))

    async def call(self, op: str, order_id: str, action: Callable[[], Awaitable[Any]]) -> Any:
        """Run one API call and record it; the result, or None if it raised."""
        sent = now_ms()

        def record(outcome: str, status: str = "", version: int = 0, detail: str = "") -> None:
            self.calls.append(Call(op, order_id, sent, now_ms(), outcome, status, version, detail))

        try:
            result = await action()
        except UnknownOrder:
            record("unknown")
        except Refused as exc:
            record("refused", exc.status, detail=str(exc.reason or ""))
        except OrderExists as exc:
            record("exists", exc.status)
        except Unavailable as exc:  # Redis down: not acknowledged, may have been applied
            record("unavailable", detail=str(exc)[:200])
        except Exception as exc:  # anything else is not what the API documents
            record("error", detail=repr(exc)[:200])
            self.findings.anomaly("producer call failed unexpectedly", f"{op} {order_id}: {exc!r}"[:300])
        else:
            if isinstance(result, Change):
                record("done" if result.changed else "already", result.status, result.version)
            elif isinstance(result, CreateResult):
                record("done", "created", 1)
            return result
        return None


async def sleep_until(unix_s: float) -> None:
    await asyncio.sleep(max(0.0, unix_s - time.time()))


# -- the soak: servers, daemons, faults ---------------------------------------------


@dataclass
class Soak:
    args: argparse.Namespace
    workdir: Path
    redis: ServerProcess
    broker: ServerProcess
    daemons: list[DaemonSlot]
    subscriber: Subscriber
    findings: Findings
    rng: random.Random
    admin: Redis
    faults: list[Fault] = field(default_factory=list)
    lost: list[LostWindow] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    restarting: set[int] = field(default_factory=set)  # daemons we killed and restart

    def stamp(self) -> str:
        return f"+{time.monotonic() - self.started:7.1f} s"

    # -- faults --

    async def faults_loop(self, stop: asyncio.Event, kinds: Sequence[str]) -> None:
        low, high = self.args.fault_gap
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(low, high))
            if stop.is_set():
                return
            fault = Fault(self.rng.choice(kinds), now_ms(), time.monotonic() - self.started)
            self.faults.append(fault)
            try:
                await getattr(self, "fault_" + fault.kind.replace("-", "_"))(fault)
            except Exception as exc:  # the soak's own trouble (a server that did not come back)
                self.findings.anomaly("fault injection failed", f"{fault.kind}: {exc!r}")
                fault.detail += f" FAILED: {exc!r}"
            fault.end_ms = now_ms()
            await self.recovery(fault)
            shown = "no recovery" if fault.recovered_s is None else f"recovered in {fault.recovered_s:.1f} s"
            print(f"  +{fault.at_s:7.1f} s  {fault.kind:<15} {fault.detail}; {shown}", flush=True)

    async def fault_daemon_kill(self, fault: Fault) -> None:
        slot = self.rng.choice(self.daemons)
        down = self.rng.uniform(0.0, 2.0)
        pid = slot.pid
        self.restarting.add(slot.index)
        try:
            slot.kill()
            await asyncio.sleep(down)
            slot.spawn()
        finally:
            self.restarting.discard(slot.index)
        fault.detail = f"daemon {slot.index} (pid {pid}) SIGKILL, down {down:.1f} s, now pid {slot.pid}"

    async def fault_redis_restart(self, fault: Fault) -> None:
        down = self.rng.uniform(0.2, 2.0)
        await asyncio.to_thread(self.redis.stop)
        await asyncio.sleep(down)
        await self.start_redis()
        fault.detail = f"SIGTERM, down {down:.1f} s"

    async def fault_redis_kill(self, fault: Fault) -> None:
        down = self.rng.uniform(0.2, 2.0)
        await asyncio.to_thread(self.redis.kill)
        await asyncio.sleep(down)
        await self.start_redis()
        fault.detail = f"SIGKILL, down {down:.1f} s"

    async def fault_broker_restart(self, fault: Fault) -> None:
        down = self.rng.uniform(0.5, 3.0)
        await asyncio.to_thread(self.broker.stop)
        await asyncio.sleep(down)
        await asyncio.to_thread(self.broker.start)
        fault.detail = f"mosquitto SIGTERM, down {down:.1f} s"

    async def fault_lost_write(self, fault: Fault) -> None:
        dump = self.redis.workdir / "dump.rdb"
        aside = self.redis.workdir / "snapshot-aside.rdb"
        snapshot_ms = now_ms()
        await self.admin.save()
        shutil.copy(dump, aside)
        writes = self.rng.uniform(0.3, 2.0)
        await asyncio.sleep(writes)  # acknowledged writes the snapshot does not have
        kill_ms = now_ms()
        await asyncio.to_thread(self.redis.kill)
        self.lost.append(LostWindow(snapshot_ms, kill_ms))
        shutil.rmtree(self.redis.workdir / "appendonlydir", ignore_errors=True)
        shutil.copy(aside, dump)
        await self.start_redis(from_snapshot=True)
        fault.detail = f"snapshot, {writes:.1f} s of writes, SIGKILL, AOF removed, snapshot restored"

    async def start_redis(self, *, from_snapshot: bool = False) -> None:
        """Start Redis and wait until it answers. From a snapshot: with the AOF
        off (Redis 7 would start empty with it on and no AOF), then on again,
        waiting for the rewrite that makes the AOF hold everything."""
        argv = self.redis.argv
        if from_snapshot:
            self.redis.argv = [*argv, "--appendonly", "no"]
        try:
            await asyncio.to_thread(self.redis.start)
        finally:
            self.redis.argv = argv
        await until(self.redis_answers, 30, "Redis to load")
        if from_snapshot:
            await self.admin.config_set("appendonly", "yes")
            await until(self.aof_rewritten, 30, "the AOF rewrite after the restore")

    async def redis_answers(self) -> bool:
        try:
            return bool(await self.admin.ping())
        except Exception:  # refused, or LOADING
            return False

    async def aof_rewritten(self) -> bool:
        info = await self.admin.info("persistence")
        return (
            info.get("aof_enabled") == 1
            and info.get("aof_rewrite_in_progress") == 0
            and info.get("aof_rewrite_scheduled") == 0
            and (self.redis.workdir / "appendonlydir").exists()
        )

    async def recovery(self, fault: Fault) -> None:
        """Every daemon healthy, and an event of a transition made after the
        fault received: the time from the fault's end."""

        async def recovered() -> bool:
            healthy = [await slot.healthy() for slot in self.daemons]
            return all(healthy) and self.subscriber.latest_at_ms > fault.end_ms

        try:
            await until(recovered, RECOVERY_LIMIT, "recovery")
        except TimeoutError:
            sick = [slot.index for slot in self.daemons if not await slot.healthy()]
            self.findings.anomaly(
                "no recovery after a fault",
                f"{fault.kind} ({fault.detail}) at {fault.start_ms}: after {RECOVERY_LIMIT:.0f} s daemons "
                f"not healthy: {sick}; latest event at {self.subscriber.latest_at_ms}",
            )
            return
        fault.recovered_s = (now_ms() - fault.end_ms) / 1000

    async def watch_daemons(self) -> None:
        """A daemon that exits by itself is an anomaly: noted and restarted."""
        while True:
            for slot in self.daemons:
                code = slot.exited()
                if code is not None and slot.index not in self.restarting:
                    self.findings.anomaly(
                        "daemon exited by itself",
                        f"daemon {slot.index} (pid {slot.pid}) exited {code}: {slot.tail(5)}",
                    )
                    print(
                        f"  {self.stamp()}  daemon {slot.index} exited {code} by itself; restarted",
                        flush=True,
                    )
                    slot.spawn()
            await asyncio.sleep(0.5)

    # -- the end --

    async def settle(self, producer: Producer, layout: KeyLayout) -> None:
        """Until every deadline passed, nothing is pending or unpublished and the
        subscriber has been quiet for QUIET seconds."""
        last_deadline = producer.last_create + TIMEOUTS[1] + 1.0
        state: dict[str, int] = {}

        async def settled() -> bool:
            if time.time() < last_deadline:
                return False
            state["backlog"] = await backlog(self.admin, layout)
            state["pending"] = await pending(self.admin, layout)
            return state["backlog"] == 0 and state["pending"] == 0 and self.subscriber.quiet_for >= QUIET

        try:
            await until(settled, SETTLE_LIMIT, "the end")
        except TimeoutError:
            self.findings.anomaly(
                "did not settle",
                f"after {SETTLE_LIMIT:.0f} s: outbox backlog {state.get('backlog')}, "
                f"pending orders {state.get('pending')}, "
                f"subscriber quiet for {self.subscriber.quiet_for:.1f} s",
            )
        dead = await dead_letters(self.admin, layout)
        if dead:
            self.findings.anomaly("dead letters", f"{dead} entries in the outbox dead-letter streams")


async def until(condition: Callable[[], Awaitable[bool]], limit: float, what: str) -> None:
    """Poll `condition` every 50 ms; TimeoutError naming `what` after `limit` seconds."""
    give_up = time.monotonic() + limit
    while not await condition():
        if time.monotonic() > give_up:
            raise TimeoutError(f"waited {limit} s for {what}")
        await asyncio.sleep(0.05)


async def backlog(redis: Redis, layout: KeyLayout) -> int:
    """Outbox entries not yet published (the daemon deletes what the broker acknowledged)."""
    async with redis.pipeline(transaction=False) as pipe:
        for part in range(PARTS):
            pipe.xlen(layout.outbox(part))
            pipe.xlen(layout.outbox_created(part))
        return sum(int(n) for n in await pipe.execute())


async def pending(redis: Redis, layout: KeyLayout) -> int:
    async with redis.pipeline(transaction=False) as pipe:
        for part in range(PARTS):
            pipe.zcard(layout.deadlines(part))
        return sum(int(n) for n in await pipe.execute())


async def dead_letters(redis: Redis, layout: KeyLayout) -> int:
    async with redis.pipeline(transaction=False) as pipe:
        for part in range(PARTS):
            pipe.xlen(layout.dead_letters(layout.outbox(part)))
            pipe.xlen(layout.dead_letters(layout.outbox_created(part)))
        return sum(int(n) for n in await pipe.execute())


# -- the checks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """The first receipt of one event_id."""

    event_id: str
    order_id: str
    status: str
    previous: str | None
    reason: str
    version: int
    at_ms: int
    receipt: int

    @property
    def transition(self) -> tuple[str, str, str | None, str, int]:
        return (self.order_id, self.status, self.previous, self.reason, self.version)

    def __str__(self) -> str:
        return (
            f"v{self.version} {self.previous}->{self.status} ({self.reason}) {self.event_id} at {self.at_ms}"
        )


@dataclass(frozen=True)
class Run:
    """Everything recorded, for the checks."""

    receipts: list[Receipt]
    calls: list[Call]
    attempted: list[str]
    finals: dict[str, Order | None]
    lost: list[LostWindow]


def check_payloads(run: Run, findings: Findings) -> list[Event]:
    """Each payload valid and on its order's topic; the events, one per event_id
    at its first receipt. Also invariant 3: one event_id, one transition."""
    validate = schema_validator()
    first: dict[str, Event] = {}
    transitions: dict[str, set[tuple[str, str, str | None, str, int]]] = defaultdict(set)
    times: dict[str, set[int]] = defaultdict(set)
    for receipt in run.receipts:
        body = receipt.event
        problem = "not a JSON object" if body is None else validate(body)
        if body is None or problem:
            findings.anomaly("malformed payload", f"{receipt.topic}: {problem}: {receipt.payload[:200]!r}")
            continue
        if receipt.topic != f"orders/{body['order_id']}/status":
            findings.anomaly("event on another order's topic", f"{receipt.topic}: {body['event_id']}")
        event = Event(
            body["event_id"],
            body["order_id"],
            body["status"],
            body["previous"],
            body["reason"],
            body["version"],
            unix_ms(body["at"]),
            receipt.index,
        )
        first.setdefault(event.event_id, event)
        transitions[event.event_id].add(event.transition)
        times[event.event_id].add(event.at_ms)
    for event_id, named in transitions.items():
        if len(named) > 1:
            findings.anomaly("event_id names two transitions", f"{event_id}: {sorted(named, key=str)}")
    for event_id, seen in times.items():
        if len(seen) > 1:
            shown = f"{event_id} at {sorted(seen)}"
            if any(window.holds(min(seen)) for window in run.lost):
                findings.explain("transition redone after a lost write", shown)
            else:
                findings.anomaly("transition done twice", shown)
    return sorted(first.values(), key=lambda e: e.receipt)


def schema_validator() -> Callable[[dict[str, Any]], str]:
    """The shipped JSON schema as a check: '' or what is wrong."""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))

    def check(body: dict[str, Any]) -> str:
        error = jsonschema.exceptions.best_match(validator.iter_errors(body))
        return "" if error is None else error.message

    return check


@dataclass
class OrderStory:
    """One order's events in receipt order, and the branch they leave: per
    version the event the order's latest way went through."""

    order_id: str
    events: list[Event]
    branch: dict[int, Event] = field(default_factory=dict)
    undone: set[str] = field(default_factory=set)  # event_ids a lost write undid

    def walk(self, lost: list[LostWindow], findings: Findings) -> None:
        """Invariant 2: versions never go down, and each event follows the one
        before (its `previous` is that one's status), but where a lost write
        explains it."""
        for event in self.events:
            top = max(self.branch, default=0)
            if event.version > top:
                before = self.branch.get(event.version - 1)
                if before is None or before.status == event.previous:
                    self.branch[event.version] = event  # a gap shows in the history check
                else:
                    self.off_the_branch(event, before, lost, findings)
            elif event.version not in self.branch:
                findings.anomaly(
                    "events out of version order", f"{self.order_id}: {event} after v{top} {self.branch[top]}"
                )
                self.branch[event.version] = event
            else:
                self.rewind(event, lost, findings)

    def off_the_branch(self, event: Event, before: Event, lost: list[LostWindow], findings: Findings) -> None:
        """An event that does not follow the one before: a late event of a way
        that a lost write undid (a daemon that read it before the loss and
        published it after), or an anomaly."""
        shown = f"{self.order_id}: {event} after {before}"
        if any(window.holds(event.at_ms) for window in lost):
            findings.explain("late event of a way a lost write undid", shown)
            self.undone.add(event.event_id)
        else:
            findings.anomaly("event does not follow the one before", shown)
            self.branch[event.version] = event

    def rewind(self, event: Event, lost: list[LostWindow], findings: Findings) -> None:
        """Another transition at a version already announced: the order went
        another way. Only a lost write explains it."""
        superseded = [self.branch[v] for v in sorted(self.branch) if v >= event.version]
        shown = f"{self.order_id}: {' / '.join(map(str, superseded))}  then  {event}"
        if all(undone_by_lost_write(old, event, lost) for old in superseded):
            findings.explain("rewound by a lost write", shown)
            self.undone.update(old.event_id for old in superseded)
        else:
            findings.anomaly("two transitions at one version", shown)
        for version in [v for v in self.branch if v >= event.version]:
            del self.branch[version]
        self.branch[event.version] = event

    def stayed_behind(self, final: Order, lost: list[LostWindow], findings: Findings) -> None:
        """Events above the final version, all done in a lost write's window:
        announced, then lost, and the order never moved again (a delivered
        order whose refund was lost stays delivered). Taken off the branch."""
        above = [self.branch[v] for v in sorted(self.branch) if v > final.version]
        if above and all(any(window.holds(e.at_ms) for window in lost) for e in above):
            shown = (
                f"{self.order_id} is {final.status} v{final.version}; undone: {' / '.join(map(str, above))}"
            )
            findings.explain("announced, then undone by a lost write", shown)
            self.undone.update(e.event_id for e in above)
            for event in above:
                del self.branch[event.version]

    def history(self, final: Order) -> tuple[list[Event], int | None]:
        """The final state's history from the events received, walked back by
        `previous` from the final state: (events from version 1 up, the first
        version found missing or None)."""
        status: str | None = str(final.status)
        reason: str | None = str(final.reason)  # the final event's; before it, any
        found: list[Event] = []
        for version in range(final.version, 0, -1):
            matches = [
                e
                for e in self.events
                if e.version == version and e.status == status and reason in (None, e.reason)
            ]
            if not matches:
                return found[::-1], version
            event = matches[-1]
            found.append(event)
            status, reason = event.previous, None
        return found[::-1], None


def undone_by_lost_write(old: Event, new: Event, lost: list[LostWindow]) -> bool:
    """`old` was done in a lost write's window and `new` after that write was lost."""
    return any(window.holds(old.at_ms) and new.at_ms >= window.kill_ms - SLACK_MS for window in lost)


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)  # final statuses
    timeout_lags_ms: list[int] = field(default_factory=list)  # `at` of a timeout cancellation - deadline
    unacknowledged_kept: int = 0  # orders whose create failed (Redis unreachable) but was applied


def check_orders(run: Run, events: list[Event], findings: Findings) -> Tally:
    """Invariants 1, 2, 4 and 5, order by order; the final statuses."""
    by_order: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_order[event.order_id].append(event)
    calls: dict[str, list[Call]] = defaultdict(list)
    for call in run.calls:
        calls[call.order_id].append(call)
    tally = Tally()
    for order_id in sorted(set(run.attempted) | set(by_order)):
        story = OrderStory(order_id, by_order.get(order_id, []))
        check_calls(order_id, calls[order_id], run.lost, findings)
        story.walk(run.lost, findings)
        final = run.finals.get(order_id)
        if final is not None:
            story.stayed_behind(final, run.lost, findings)
        check_outcomes(story, findings)
        if final is None:
            check_missing(order_id, calls[order_id], story, run, findings)
            continue
        tally.statuses[str(final.status)] += 1
        if not any(c.op == "create" and c.outcome == "done" for c in calls[order_id]):
            tally.unacknowledged_kept += 1
        check_final(story, final, findings)
        history, gap = story.history(final)
        if gap is not None:
            findings.anomaly(
                "event lost",
                f"{order_id} ends {final.status} v{final.version}: no event for v{gap}; "
                f"got {[str(e) for e in story.events]}",
            )
            continue
        check_history(story, history, calls[order_id], run.lost, findings)
        tally.timeout_lags_ms += timeout_lags(order_id, history, final.deadline_ms, findings)
    return tally


def timeout_lags(order_id: str, history: list[Event], deadline_ms: int, findings: Findings) -> list[int]:
    """How late each timeout cancellation came; one before the deadline is an anomaly."""
    lags: list[int] = []
    for event in history:
        if event.reason == "timeout":
            lags.append(event.at_ms - deadline_ms)
            if event.at_ms < deadline_ms:
                findings.anomaly(
                    "cancelled before its deadline", f"{order_id}: deadline {deadline_ms}, {event}"
                )
    return lags


def check_calls(order_id: str, calls: list[Call], lost: list[LostWindow], findings: Findings) -> None:
    """The producer plays one order's calls one after the other: after an
    acknowledged change, a call answered "unknown order" or "refused" means
    the change went back, which only a lost write explains. (A refusal right
    after the creation is a pay or cancel that lost the race with the expiry.)"""
    before: Call | None = None  # the last acknowledged change
    for call in sorted(calls, key=lambda c: c.sent_ms):
        if call.outcome == "done":
            before = call
            continue
        if before is None or call.outcome not in ("unknown", "refused"):
            continue
        if call.outcome == "refused" and before.op == "create":
            continue
        shown = (
            f"{order_id}: {call.op} answered {call.outcome} {call.status} {call.detail} at {call.done_ms}, "
            f"after {before.op} acknowledged as {before.status} v{before.version} at {before.done_ms}"
        )
        if any(window.holds(before.done_ms) for window in lost):
            findings.explain("a change went back with a lost write", shown)
        else:
            findings.anomaly("an acknowledged change went back", shown)


def check_missing(order_id: str, calls: list[Call], story: OrderStory, run: Run, findings: Findings) -> None:
    """An order not in Redis at the end: fine if its creation was never
    acknowledged or a lost write's window holds it."""
    created = [c for c in calls if c.op == "create" and c.outcome == "done"]
    if not created:
        if order_id not in run.attempted:
            findings.anomaly("event of an order never created", f"{order_id}: {story.events[0]}")
        return
    if any(window.holds(created[0].done_ms) for window in run.lost):
        findings.explain("creation undone by a lost write", f"{order_id} created at {created[0].done_ms}")
    else:
        findings.anomaly("acknowledged order missing", f"{order_id} created at {created[0].done_ms}")


def check_outcomes(story: OrderStory, findings: Findings) -> None:
    """Invariant 5: what a subscriber that deduplicates by event_id keeps of an
    order (every event but those a lost write undid) is never both paid and
    cancelled by timeout, and has at most one cancellation."""
    kept = [e for e in story.events if e.event_id not in story.undone]
    steps = {(e.status, e.reason) for e in kept}
    if ("paid", "paid") in steps and ("cancelled", "timeout") in steps:
        findings.anomaly("paid and cancelled by timeout", f"{story.order_id}: {[str(e) for e in kept]}")
    cancellations = [e for e in kept if e.status == "cancelled"]
    if len(cancellations) > 1:
        findings.anomaly("cancelled twice", f"{story.order_id}: {[str(e) for e in cancellations]}")


def check_final(story: OrderStory, final: Order, findings: Findings) -> None:
    """Invariant 1: one final state, and the last event received says it."""
    if final.status in ("created", "refunded"):
        findings.anomaly(
            "order not settled", f"{story.order_id} is {final.status} v{final.version} after its deadline"
        )
    if not story.branch:
        return  # the history check reports the missing events
    last = story.branch[max(story.branch)]
    if (last.status, last.version, last.reason) != (final.status, final.version, final.reason):
        findings.anomaly(
            "last event disagrees with the final state",
            f"{story.order_id} is {final.status} v{final.version} ({final.reason}); last event {last}",
        )


def check_history(
    story: OrderStory, history: list[Event], calls: list[Call], lost: list[LostWindow], findings: Findings
) -> None:
    """Invariant 4 on the history of the final state: acknowledged changes kept."""
    order_id = story.order_id
    at_version = {e.version: e for e in history}
    for call in calls:
        if call.outcome != "done" or call.op == "create":
            continue
        kept = at_version.get(call.version)
        if kept is not None and kept.status == call.status:
            continue
        shown = f"{order_id}: {call.op} acknowledged at {call.done_ms} as {call.status} v{call.version}; " + (
            f"history has {kept}" if kept else "not in the history"
        )
        if any(window.holds(call.done_ms) for window in lost):
            findings.explain("acknowledged change undone by a lost write", shown)
        else:
            findings.anomaly("acknowledged change lost", shown)


# -- the report ---------------------------------------------------------------------------


def print_report(
    args: argparse.Namespace,
    soak: Soak,
    producer: Producer,
    tally: Tally,
    events: list[Event],
    minutes: float,
) -> None:
    findings = soak.findings
    receipts = soak.subscriber.receipts
    created = sum(1 for c in producer.calls if c.op == "create" and c.outcome == "done")
    by_op: dict[str, Counter[str]] = defaultdict(Counter)
    for call in producer.calls:
        by_op[call.op][call.outcome] += 1
    faults = Counter(f.kind for f in soak.faults)
    recovered = [f.recovered_s for f in soak.faults if f.recovered_s is not None]
    print()
    print(f"chaos soak, seed {args.seed}")
    print(
        f"  minutes           {minutes:.1f} (faults and producer), "
        f"{args.daemons} daemons, {args.rate:g} orders/s"
    )
    print(
        f"  orders            {created} created (acknowledged) of {len(producer.attempted)} attempted "
        f"(and {tally.unacknowledged_kept} unacknowledged but stored); plans "
        + ", ".join(f"{plan} {n}" for plan, n in sorted(producer.plans.items()))
    )
    print(f"  operations        {len(producer.calls)}")
    for op in ("create", "pay", "cancel", "deliver", "refund"):
        if op in by_op:
            print(f"    {op:<9} " + ", ".join(f"{k} {n}" for k, n in sorted(by_op[op].items())))
    print(
        f"  faults            {len(soak.faults)}: "
        + ", ".join(f"{k} {faults[k]}" for k in FAULT_KINDS if faults[k])
    )
    if recovered:
        median = sorted(recovered)[len(recovered) // 2]
        print(f"  recovery          median {median:.1f} s, max {max(recovered):.1f} s")
    print(
        f"  events received   {len(receipts)} ({len(events)} distinct event_ids, "
        f"{len(receipts) - len(events)} duplicates); subscriber connected {soak.subscriber.connects} times"
    )
    print("  final states      " + ", ".join(f"{k} {n}" for k, n in sorted(tally.statuses.items())))
    if tally.timeout_lags_ms:
        lags = sorted(tally.timeout_lags_ms)
        print(
            f"  timeout cancels   {len(lags)}, at - deadline: p50 {lags[len(lags) // 2]} ms, "
            f"p99 {lags[len(lags) * 99 // 100]} ms, max {lags[-1]} ms (outages included)"
        )
    print(f"  lost writes       {len(soak.lost)}")
    print_findings(findings)


def print_findings(findings: Findings) -> None:
    for kind, examples in sorted(findings.explained.items()):
        print(f"    {kind}: {len(examples)}")
        for example in examples[:3]:
            print(f"      {example}")
    print(f"  anomalies         {findings.total}")
    for kind, examples in sorted(findings.anomalies.items()):
        print(f"    {kind}: {len(examples)}")
        for example in examples[:EXAMPLES]:
            print(f"      {example}")


# -- the checks checked ---------------------------------------------------------------------

CREATED_MS = 1_800_000_000_000

# An event as (version, previous, status, reason, ms after the creation).
Step = tuple[int, str | None, str, str, int]
CREATED: Step = (1, None, "created", "created", 0)
PAID: Step = (2, "created", "paid", "paid", 2000)
DELIVERED: Step = (3, "paid", "delivered", "delivered", 3000)
CUSTOMER: Step = (2, "created", "cancelled", "customer", 1000)
TIMEOUT: Step = (2, "created", "cancelled", "timeout", 4000)
# a lost write's window that holds PAID and DELIVERED, and ends before TIMEOUT
WINDOW = LostWindow(CREATED_MS + 1500, CREATED_MS + 3500)
LOST_DELIVERY = LostWindow(CREATED_MS + 2500, CREATED_MS + 3500)  # holds DELIVERED only


def fake_receipt(index: int, step: Step, order_id: str = "o") -> Receipt:
    """The payload the daemon would publish for `step`."""
    version, previous, status, reason, after_ms = step
    at = CREATED_MS + after_ms
    body: dict[str, Any] = {
        "event_id": f"{order_id}/{CREATED_MS}/{version}/{status}/{reason}",
        "order_id": order_id,
        "status": status,
        "previous": previous,
        "reason": reason,
        "at": datetime.fromtimestamp(at / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
        "version": version,
    }
    if status == "created":
        body["deadline"] = body["at"]
    return Receipt(index, at, f"orders/{order_id}/status", json.dumps(body).encode(), body)


def fake_call(op: str, done_after_ms: int, status: str, version: int, outcome: str = "done") -> Call:
    done = CREATED_MS + done_after_ms
    return Call(op, "o", done - 10, done, outcome, status, version)


@dataclass(frozen=True)
class Case:
    """A made-up run of one order "o" and the anomalies the checks must find in it."""

    what: str
    steps: list[Step]  # the events received, in this order
    final: tuple[str, int, str] | None  # (status, version, reason) in Redis at the end; None: gone
    expected: set[str]
    calls: list[Call] = field(default_factory=list)
    lost: list[LostWindow] = field(default_factory=list)

    def findings(self) -> Findings:
        receipts = [fake_receipt(i, step) for i, step in enumerate(self.steps)]
        final = None
        if self.final is not None:
            status, version, reason = self.final
            updated = CREATED_MS + 1000 * version
            final = Order("o", Status(status), version, Reason(reason), CREATED_MS, updated, CREATED_MS + 500)
        run = Run(receipts, self.calls, ["o"], {"o": final}, self.lost)
        findings = Findings()
        check_orders(run, check_payloads(run, findings), findings)
        return findings


CASES = [
    Case("a clean life", [CREATED, PAID, DELIVERED], ("delivered", 3, "delivered"), set()),
    Case(
        "cancelled before its deadline",
        [CREATED, (2, "created", "cancelled", "timeout", 300)],
        ("cancelled", 2, "timeout"),
        {"cancelled before its deadline"},
    ),
    Case(
        "a refusal after an acknowledged pay",
        [CREATED, PAID],
        ("paid", 2, "paid"),
        {"an acknowledged change went back"},
        calls=[fake_call("pay", 2000, "paid", 2), fake_call("deliver", 2600, "created", 0, "refused")],
    ),
    Case(
        "the same after a lost write",
        [CREATED, PAID],
        ("paid", 2, "paid"),
        set(),
        calls=[fake_call("pay", 2000, "paid", 2), fake_call("deliver", 3600, "created", 0, "refused")],
        lost=[WINDOW],
    ),
    Case("a redelivery", [CREATED, PAID, PAID], ("paid", 2, "paid"), set()),
    Case(
        "the last event lost",
        [CREATED],
        ("cancelled", 2, "timeout"),
        {"event lost", "last event disagrees with the final state"},
    ),
    Case("the first event lost", [TIMEOUT], ("cancelled", 2, "timeout"), {"event lost"}),
    Case(
        "out of version order",
        [CREATED, DELIVERED, PAID],
        ("delivered", 3, "delivered"),
        {"events out of version order"},
    ),
    Case(
        "paid, then cancelled by timeout",
        [CREATED, PAID, TIMEOUT],
        ("cancelled", 2, "timeout"),
        {"two transitions at one version", "paid and cancelled by timeout"},
    ),
    Case(
        "cancelled twice",
        [CREATED, CUSTOMER, TIMEOUT],
        ("cancelled", 2, "timeout"),
        {"two transitions at one version", "cancelled twice"},
    ),
    Case(
        "the same after a lost write",
        [CREATED, PAID, DELIVERED, TIMEOUT],
        ("cancelled", 2, "timeout"),
        set(),
        lost=[WINDOW],
    ),
    Case(
        "a late event of the lost way",
        [CREATED, PAID, TIMEOUT, DELIVERED],
        ("cancelled", 2, "timeout"),
        set(),
        lost=[WINDOW],
    ),
    Case(
        "an event that does not follow",
        [CREATED, TIMEOUT, DELIVERED],
        ("cancelled", 2, "timeout"),
        {"event does not follow the one before", "last event disagrees with the final state"},
    ),
    Case(
        "the last events undone, no other way",
        [CREATED, PAID, DELIVERED],
        ("paid", 2, "paid"),
        set(),
        lost=[LOST_DELIVERY],
    ),
    Case(
        "the same without a lost write",
        [CREATED, PAID, DELIVERED],
        ("paid", 2, "paid"),
        {"last event disagrees with the final state"},
    ),
    Case("not settled", [CREATED], ("created", 1, "created"), {"order not settled"}),
    Case(
        "an acknowledged pay lost",
        [CREATED, TIMEOUT],
        ("cancelled", 2, "timeout"),
        {"acknowledged change lost"},
        calls=[fake_call("pay", 1000, "paid", 2)],
    ),
    Case(
        "the same after a lost write",
        [CREATED, TIMEOUT],
        ("cancelled", 2, "timeout"),
        set(),
        calls=[fake_call("pay", 2000, "paid", 2)],
        lost=[WINDOW],
    ),
    Case(
        "an acknowledged order missing",
        [CREATED],
        None,
        {"acknowledged order missing"},
        calls=[fake_call("create", 0, "created", 1)],
    ),
    Case(
        "the same after a lost write",
        [CREATED],
        None,
        set(),
        calls=[fake_call("create", 2000, "created", 1)],
        lost=[WINDOW],
    ),
]


def payload_findings(lost: list[LostWindow]) -> Findings:
    """Payloads that break the rules: an event_id naming two transitions, one
    transition at two times, a wrong topic, not JSON."""
    paid = fake_receipt(0, PAID)
    assert paid.event is not None
    again = fake_receipt(1, (*PAID[:4], PAID[4] + 3000))
    receipts = [
        paid,
        Receipt(2, 0, paid.topic, b"", {**paid.event, "status": "cancelled", "reason": "timeout"}),
        again,
        Receipt(3, 0, "orders/other/status", again.payload, again.event),
        Receipt(4, 0, paid.topic, b"not json", None),
    ]
    findings = Findings()
    check_payloads(Run(receipts, [], ["o"], {}, lost), findings)
    return findings


def self_check(quiet: bool = False) -> bool:
    """Each check on made-up runs: it finds what it should, and nothing else."""
    failed = 0
    payload_kinds = {
        "event_id names two transitions",
        "transition done twice",
        "event on another order's topic",
        "malformed payload",
    }
    results = [(case.what, set(case.findings().anomalies), case.expected) for case in CASES]
    results.append(("bad payloads", set(payload_findings([]).anomalies), payload_kinds))
    results.append(
        (
            "the same after a lost write",
            set(payload_findings([WINDOW]).anomalies),
            payload_kinds - {"transition done twice"},
        )
    )
    for what, found, expected in results:
        ok = found == expected
        failed += not ok
        if not (quiet and ok):
            shown = "ok" if ok else f"FAILED: found {sorted(found)}, expected {sorted(expected)}"
            print(f"  {what:<40} {shown}")
    return not failed


# -- main ---------------------------------------------------------------------------------


async def read_finals(client: OrderClient, ids: Iterable[str]) -> dict[str, Order | None]:
    """Every order as stored at the end (None: it does not exist)."""
    finals: dict[str, Order | None] = {}
    ids = list(ids)

    async def one(order_id: str) -> None:
        for attempt in range(5):  # pooled connections from before a Redis restart fail once
            try:
                finals[order_id] = await client.get(order_id)
                return
            except UnknownOrder:
                finals[order_id] = None
                return
            except Unavailable:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2)

    for start in range(0, len(ids), 20):  # the client's connection pool is bounded
        await asyncio.gather(*(one(order_id) for order_id in ids[start : start + 20]))
    return finals


def daemon_env(redis_url: str, mqtt_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_LISTENER_")}
    return env | {
        "ORDER_LISTENER_REDIS_URL": redis_url,
        "ORDER_LISTENER_MQTT_URL": mqtt_url,
        "ORDER_LISTENER_LOG_FORMAT": "json",
        "ORDER_LISTENER_RESYNC_INTERVAL": "1",
        "ORDER_LISTENER_SHUTDOWN_TIMEOUT": "5",
    }


def save_run(path: Path, run: Run, faults: list[Fault]) -> None:
    """Everything recorded, as JSON, for a look after the fact."""
    record = {
        "faults": [asdict(fault) for fault in faults],
        "lost_windows": [asdict(window) for window in run.lost],
        "calls": [asdict(call) for call in run.calls],
        "attempted": run.attempted,
        "finals": {
            order_id: None if order is None else asdict(order) for order_id, order in run.finals.items()
        },
        "receipts": [
            {
                "index": r.index,
                "received_ms": r.received_ms,
                "topic": r.topic,
                "payload": r.payload.decode(errors="replace"),
            }
            for r in run.receipts
        ],
    }
    path.write_text(json.dumps(record))


def load_run(path: Path) -> Run:
    """A run saved by save_run, to check again (--check-run)."""
    record = json.loads(path.read_text())
    receipts = []
    for r in record["receipts"]:
        raw = r["payload"].encode()
        receipt = Receipt(r["index"], r["received_ms"], r["topic"], raw, None)
        with contextlib.suppress(ValueError):
            body = json.loads(raw)
            receipt = Receipt(
                r["index"], r["received_ms"], r["topic"], raw, body if isinstance(body, dict) else None
            )
        receipts.append(receipt)
    finals = {
        order_id: None
        if o is None
        else Order(
            o["order_id"],
            Status(o["status"]),
            int(o["version"]),
            Reason(o["reason"]),
            int(o["created_ms"]),
            int(o["updated_ms"]),
            int(o["deadline_ms"]),
        )
        for order_id, o in record["finals"].items()
    }
    return Run(
        receipts,
        [Call(**c) for c in record["calls"]],
        record.get("attempted", list(finals)),
        finals,
        [LostWindow(**w) for w in record["lost_windows"]],
    )


def check_run(path: Path) -> int:
    """Check a saved run again; 1 if any anomaly."""
    run = load_run(path)
    findings = Findings()
    events = check_payloads(run, findings)
    tally = check_orders(run, events, findings)
    print(f"{path}: {len(run.receipts)} receipts, {len(events)} events, final states {dict(tally.statuses)}")
    print_findings(findings)
    return 1 if findings.total else 0


async def soak(args: argparse.Namespace, workdir: Path) -> int:
    redis_proc = redis_server(workdir / "redis")
    broker = mosquitto(workdir / "mosquitto", profile="stock", durable=True)
    started: list[ServerProcess] = []
    daemons: list[DaemonSlot] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        for server in (redis_proc, broker):
            started.append(server)
            await asyncio.to_thread(server.start)
        redis_url, mqtt_url = f"redis://127.0.0.1:{redis_proc.port}/0", f"mqtt://127.0.0.1:{broker.port}"
        env = daemon_env(redis_url, mqtt_url)
        for index in range(args.daemons):
            port = free_port()
            daemons.append(
                DaemonSlot(index, env | {"ORDER_LISTENER_METRICS_ADDR": f"127.0.0.1:{port}"}, workdir, port)
            )
            daemons[-1].spawn()
        subscriber = Subscriber(broker.port, f"chaos-subscriber-{args.seed}")
        tasks.append(asyncio.create_task(subscriber.run()))
        await asyncio.wait_for(subscriber.ready.wait(), 15)
        await until(lambda: all_healthy(daemons), 60, "the daemons to be ready")
        admin = Redis(port=redis_proc.port, socket_timeout=10)
        state = Soak(
            args,
            workdir,
            redis_proc,
            broker,
            daemons,
            subscriber,
            Findings(),
            random.Random(f"faults-{args.seed}"),
            admin,
        )
        tasks.append(asyncio.create_task(state.watch_daemons()))
        settings = load_settings(redis_url=redis_url, mqtt_url=mqtt_url)
        async with OrderClient(settings) as client:
            producer = Producer(client, random.Random(f"orders-{args.seed}"), args.rate, state.findings)
            minutes = await produce_with_faults(state, producer)
            await state.settle(producer, KeyLayout(settings.key_prefix))
            finals = await read_finals(client, producer.attempted)
        for task in tasks:  # the daemon watch ends before the daemons are stopped
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in daemons:
            code = await asyncio.to_thread(slot.stop)
            if code != 0:
                state.findings.anomaly(
                    "daemon did not stop cleanly", f"daemon {slot.index} exit {code}: {slot.tail(5)}"
                )
        await admin.aclose()
        run = Run(
            list(subscriber.receipts), list(producer.calls), list(producer.attempted), finals, state.lost
        )
        save_run(workdir / "run.json", run, state.faults)
        events = check_payloads(run, state.findings)
        tally = check_orders(run, events, state.findings)
        print_report(args, state, producer, tally, events, minutes)
        return 1 if state.findings.total else 0
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in daemons:
            slot.kill()
        for server in started:
            await asyncio.to_thread(server.stop)


async def produce_with_faults(state: Soak, producer: Producer) -> float:
    """The producer and the faults for --minutes; the minutes they ran."""
    stop_faults, stop_orders = asyncio.Event(), asyncio.Event()
    print("faults:", flush=True)
    state.started = time.monotonic()
    producing = asyncio.create_task(producer.run(stop_orders))
    faulting = asyncio.create_task(state.faults_loop(stop_faults, state.args.faults))
    await asyncio.sleep(state.args.minutes * 60)
    stop_faults.set()
    await faulting  # a fault under way ends with its recovery, which needs new orders' events
    stop_orders.set()
    await producing  # the plans under way end
    print(f"  {state.stamp()}  faults and producer stopped; settling", flush=True)
    return (time.monotonic() - state.started) / 60


async def all_healthy(daemons: list[DaemonSlot]) -> bool:
    return all([await slot.healthy() for slot in daemons])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long faults and orders go on (10)")
    parser.add_argument("--seed", type=int, default=None, help="the random choices (default: from the clock)")
    parser.add_argument("--daemons", type=int, default=2, help="daemon processes (2)")
    parser.add_argument("--rate", type=float, default=10.0, help="orders created a second (10)")
    parser.add_argument(
        "--fault-gap",
        type=float,
        nargs=2,
        default=(2.0, 6.0),
        metavar=("MIN", "MAX"),
        help="seconds between one fault's recovery and the next fault (2 6)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_KINDS),
        help=f"the kinds to choose from, comma-separated (all: {','.join(FAULT_KINDS)})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (logs) even without anomalies"
    )
    parser.add_argument(
        "--self-check", action="store_true", help="only run the checks on made-up runs (a few ms)"
    )
    parser.add_argument("--check-run", type=Path, help="only check a run saved before (its run.json) again")
    args = parser.parse_args(argv)
    args.faults = [kind.strip() for kind in args.faults.split(",") if kind.strip()]
    unknown = sorted(set(args.faults) - set(FAULT_KINDS))
    if unknown or not args.faults:
        parser.error(f"--faults: unknown {unknown}; choose from {', '.join(FAULT_KINDS)}")
    if args.seed is None:
        args.seed = int(time.time()) % 100_000
    return args


def main() -> None:
    args = parse_args()
    if args.self_check:
        sys.exit(0 if self_check() else 1)
    if args.check_run:
        sys.exit(check_run(args.check_run))
    if not self_check(quiet=True):
        raise SystemExit("the checks failed on made-up runs: see --self-check")
    clear_listener_env()
    print_setup(
        "chaos soak",
        [
            ("seed", str(args.seed)),
            ("run", f"{args.minutes:g} min, {args.rate:g} orders/s, {args.daemons} daemons"),
            ("faults", ", ".join(args.faults)),
            ("Redis", "the project's redis.conf (AOF on, fsync every second)"),
            (
                "broker",
                "mosquitto, stock profile with persistence (the subscriber's session keeps what it missed)",
            ),
        ],
    )
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-chaos-"))
    print(f"work folder: {workdir}", flush=True)
    code = 2
    try:
        code = asyncio.run(soak(args, workdir))
    finally:
        if code == 0 and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}")
    sys.exit(code)


if __name__ == "__main__":
    main()
