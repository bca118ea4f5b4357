"""Cancellation lag: from an order's deadline to a subscriber holding its `cancelled` event.

    .venv/bin/python bench/lag.py [--pending N ...] [--rate R ...] [--duration S]

For each number of pending orders N and each rate R (orders falling due per
second) the script:

1. flushes Redis and starts the daemon (`order-listener run`, a separate
   process) and a fresh MQTT subscriber (QoS 1 on `orders/+/status`:
   mosquitto_sub, the C client, by default; `--subscriber process` takes an
   aiomqtt client in a process of its own, whose Python cost adds to the lag);
2. waits until the daemon cancelled and published a probe order (so it is
   up end to end);
3. loads N pending orders with a deadline one hour away (bulk, pipelined, in
   chunks) and waits until their `created` events are published and received,
   so that backlog does not skew the measurement;
4. for `--duration` seconds creates R orders a second at an even pace (a
   create call every `--tick-ms` ms, 2 by default: 4 orders a call at 2,000/s)
   with a timeout of `--timeout` seconds (2 by default) and records each one's
   deadline (Unix ms from the Redis clock: Redis runs on this machine, so its
   clock is `time.time()`'s);
5. waits for their `cancelled` events (reason `timeout`); the lag of an order
   is the subscriber's `time.time()` on receipt minus its deadline. An order
   whose event has not arrived `--grace` seconds after the last deadline
   counts as missing.

It prints the setup, a block per scenario as it ends, then a table (p50, p99
and max lag in ms, how many were measured, how many are missing) and the same
table in Markdown. It prints figures only; nothing is asserted.

Each block also splits the lag at the event's `at` (the Redis clock when the
daemon cancelled the order): deadline -> cancelled in Redis (the scheduler)
and cancelled -> received (outbox, broker, subscriber); it shows the largest
outbox backlog seen, the CPU each process used while measuring (and how much
other work on the machine took), the Redis commands run, and what the daemon
logged. Run it on an otherwise idle machine: the setup says how busy it was.

redis-server (with the project's redis.conf) and mosquitto are started on free
loopback ports in a temporary folder and stopped at the end. Any
ORDER_LISTENER_* variables in the environment are ignored; to run the daemon
with a setting of your own, name it BENCH_ORDER_LISTENER_* (for example
BENCH_ORDER_LISTENER_SWEEP_BATCH=250): every bench script that starts a
daemon passes those on without the BENCH_ and prints them in its setup.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol

import aiomqtt
from brokers import add_broker_arg, bench_broker, broker_line
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import load_settings
from listener.keys import PARTS, KeyLayout
from listener.servers import ServerProcess, mosquitto_binary, redis_binary, redis_server

TOPIC = "orders/+/status"
MEASURED_PREFIX = "lag-"
PENDING_PREFIX = "pend-"
PROBE_ID = "probe-ready"
PENDING_TIMEOUT_MS = 3600 * 1000  # the pending orders must not fall due during a run
LOAD_CHUNK = 50_000  # pending orders per create_prepared call (bounded memory)
TICK_MS = 2.0  # the producer's default pacing interval (--tick-ms)
POLL = 0.1
STALLED_S = 5.0  # nothing more received this long after the outbox emptied: the rest was dropped
SCRIPT = Path(__file__).resolve()


# -- the subscriber ------------------------------------------------------------


def unix_ms(iso: str) -> int:
    """An event's time (``2026-11-24T15:00:00.123Z``) as Unix ms."""
    return round(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


class Receiver:
    """Subscribes to every status event and timestamps each `cancelled` (timeout) one."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.created = 0  # `created` events received (only counted)
        # order id -> (time.time() of the first receipt, the event's `at` as Unix ms)
        self.cancelled: dict[str, tuple[float, int]] = {}
        self.measured = 0  # cancelled events of measured orders (first receipts)
        self.other = 0  # any other event (should stay 0)
        self.ready = asyncio.Event()

    async def run(self) -> None:
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"lag-bench-subscriber-{os.getpid()}",
            protocol=aiomqtt.ProtocolVersion.V311,  # v5 properties cost ~15% CPU per message
            keepalive=30,
        )
        async with client:
            await client.subscribe(TOPIC, qos=1)
            self.ready.set()
            async for message in client.messages:
                received = time.time()
                payload = message.payload
                if not isinstance(payload, bytes | bytearray):
                    self.other += 1
                    continue
                if b'"status":"created"' in payload:
                    self.created += 1
                    continue
                event = json.loads(payload)
                if event.get("status") == "cancelled" and event.get("reason") == "timeout":
                    order_id = str(event["order_id"])
                    if order_id not in self.cancelled:
                        self.cancelled[order_id] = (received, unix_ms(str(event["at"])))
                        if order_id.startswith(MEASURED_PREFIX):
                            self.measured += 1
                else:
                    self.other += 1

    def counts(self) -> Counts:
        return Counts(self.created, self.measured, len(self.cancelled), self.other)


@dataclass(frozen=True)
class Counts:
    created: int
    measured: int  # cancelled (timeout) events of measured orders
    cancelled: int  # cancelled (timeout) events of any order
    other: int


class Subscriber(Protocol):
    async def start(self) -> None: ...
    async def counts(self) -> Counts: ...
    async def received(self, order_id: str) -> bool: ...
    def pid(self) -> int: ...
    async def results(self) -> dict[str, tuple[float, int]]: ...
    async def stop(self) -> None: ...


class InlineSubscriber:
    """The receiver as a task of the bench's own event loop (shares its CPU)."""

    def __init__(self, host: str, port: int) -> None:
        self.receiver = Receiver(host, port)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.receiver.run())
        ready = asyncio.create_task(self.receiver.ready.wait())
        await asyncio.wait({self.task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if not self.receiver.ready.is_set():
            ready.cancel()
            if self.task.done():
                self.task.result()
            raise RuntimeError("the subscriber did not connect in 10 s")

    async def counts(self) -> Counts:
        return self.receiver.counts()

    async def received(self, order_id: str) -> bool:
        return order_id in self.receiver.cancelled

    def pid(self) -> int:
        return os.getpid()

    async def results(self) -> dict[str, tuple[float, int]]:
        return dict(self.receiver.cancelled)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self.task


class ProcessSubscriber:
    """The receiver in a child process (this script with --subscriber-child),
    driven over its stdin/stdout one line per command."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--subscriber-child",
            self.host,
            str(self.port),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 28,
        )
        line = await asyncio.wait_for(self._line(), timeout=15)
        if line != "ready":
            raise RuntimeError(f"the subscriber process did not start: {line!r}")

    async def _line(self) -> str:
        assert self.proc is not None
        assert self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            raise RuntimeError(f"the subscriber process ended ({await self.proc.wait()})")
        return raw.decode().strip()

    async def _ask(self, command: str) -> str:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._line()

    async def counts(self) -> Counts:
        return Counts(**json.loads(await self._ask("counts")))

    async def received(self, order_id: str) -> bool:
        return await self._ask(f"has {order_id}") == "1"

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def results(self) -> dict[str, tuple[float, int]]:
        data: dict[str, list[float]] = json.loads(await self._ask("dump"))
        return {order_id: (pair[0], int(pair[1])) for order_id, pair in data.items()}

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._ask("quit"), timeout=5)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class MosquittoSubSubscriber:
    """mosquitto_sub (C, from the mosquitto clients) writing `<unix time ns> <payload>`
    lines to a file that this process reads as it grows: the default subscriber,
    which adds the least of its own to the lag."""

    PROBE_TOPIC = "orders/bench-probe/status"

    def __init__(self, host: str, port: int, workdir: Path, *, nodelay: bool = False) -> None:
        self.host = host
        self.port = port
        # --nodelay: its PUBACKs leave at once instead of waiting (Nagle's algorithm)
        # for the TCP acknowledgement of the one before
        self.nodelay = nodelay
        self.path = workdir / f"mosquitto_sub-{time.monotonic_ns()}.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0
        self.rest = b""
        self.created = 0
        self.measured = 0
        self.other = 0
        self.probes = 0
        # order id -> (received stamp, payload) of its first `cancelled` (timeout):
        # its `at` is parsed when the results are asked for, not while this
        # process shares the machine with what it measures
        self.cancelled_raw: dict[str, tuple[bytes, bytes]] = {}

    def _spawn(self) -> None:
        binary = shutil.which("mosquitto_sub")
        if binary is None:
            raise RuntimeError("no mosquitto_sub on PATH (apt-get install mosquitto-clients)")
        with self.path.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-t",
                    TOPIC,
                    "-q",
                    "1",
                    "-V",
                    "mqttv5",
                    "-F",
                    "%U %p",
                    *(["--nodelay"] if self.nodelay else []),
                ],
                stdout=out,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )

    def _read(self) -> None:
        with self.path.open("rb") as out:
            out.seek(self.offset)
            chunk = out.read()
        self.offset += len(chunk)
        lines = (self.rest + chunk).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            stamp, _, payload = line.partition(b" ")
            if b'"status":"created"' in payload:
                self.created += 1
                continue
            # the daemon's payloads (events.StatusEvent.payload): compact JSON,
            # order_id first; found by bytes, parsed in results()
            if b'"status":"cancelled"' in payload and b'"reason":"timeout"' in payload:
                start = payload.find(b'"order_id":"') + len(b'"order_id":"')
                order_id = payload[start : payload.index(b'"', start)].decode()
                if order_id not in self.cancelled_raw:
                    self.cancelled_raw[order_id] = (stamp, payload)
                    if order_id.startswith(MEASURED_PREFIX):
                        self.measured += 1
                continue
            event = json.loads(payload)
            if event.get("status") == "probe":
                self.probes += 1
            else:
                self.other += 1

    async def start(self) -> None:
        self._spawn()
        async with aiomqtt.Client(self.host, self.port) as client:
            give_up = time.monotonic() + 15
            while True:  # it says nothing when subscribed: publish until it hears us
                await client.publish(self.PROBE_TOPIC, b'{"status":"probe"}', qos=1)
                await asyncio.sleep(0.05)
                self._read()
                if self.probes:
                    return
                if time.monotonic() > give_up:
                    raise RuntimeError("mosquitto_sub did not receive anything in 15 s")

    async def counts(self) -> Counts:
        self._read()
        return Counts(self.created, self.measured, len(self.cancelled_raw), self.other)

    async def received(self, order_id: str) -> bool:
        self._read()
        return order_id in self.cancelled_raw

    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def results(self) -> dict[str, tuple[float, int]]:
        self._read()
        return {
            order_id: (float(stamp), unix_ms(str(json.loads(payload)["at"])))
            for order_id, (stamp, payload) in self.cancelled_raw.items()
        }

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


async def subscriber_child(host: str, port: int) -> None:
    """The child side of ProcessSubscriber: answers `counts`, `has ID`, `dump`, `quit`."""
    receiver = Receiver(host, port)
    task = asyncio.create_task(receiver.run())
    ready = asyncio.create_task(receiver.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not receiver.ready.is_set():
        print(f"error {task.exception()!r}", flush=True)
        return
    print("ready", flush=True)
    while True:
        line = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if task.done():  # the connection failed: say so on every question
            print(f"error {task.exception()!r}", flush=True)
            return
        if not line or line == "quit":
            print("bye", flush=True)
            break
        command, _, argument = line.partition(" ")
        if command == "counts":
            c = receiver.counts()
            reply = json.dumps(
                {"created": c.created, "measured": c.measured, "cancelled": c.cancelled, "other": c.other}
            )
        elif command == "has":
            reply = "1" if argument in receiver.cancelled else "0"
        elif command == "dump":
            reply = json.dumps(receiver.cancelled)
        else:
            reply = f"error unknown command {command!r}"
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
        await task


# -- the daemon ------------------------------------------------------------------


def clear_listener_env() -> None:
    """Ignore ORDER_LISTENER_* of the environment: every bench sets its own."""
    for name in [k for k in os.environ if k.startswith("ORDER_LISTENER_")]:
        del os.environ[name]


def start_servers(
    workdir: Path, started: list[ServerProcess], broker_profile: str = "stock"
) -> tuple[ServerProcess, ServerProcess]:
    """redis-server (the project's redis.conf) and mosquitto (`broker_profile`)
    on free ports in `workdir`; each is added to `started` once running (for
    the caller to stop)."""
    redis_proc = redis_server(workdir / "redis")
    broker = bench_broker(workdir / "mosquitto", broker_profile)
    for server in (redis_proc, broker):
        started.append(server)
        server.start()
    return redis_proc, broker


def daemon_command() -> list[str]:
    beside = Path(sys.executable).parent / "order-listener"
    if beside.exists():
        return [str(beside), "run"]
    found = shutil.which("order-listener")
    if found is None:
        raise SystemExit("order-listener not found: pip install -e . in this venv")
    return [found, "run"]


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}):\n{self.log_tail()}")


def daemon_settings() -> dict[str, str]:
    """The daemon's own settings for a bench run: BENCH_ORDER_LISTENER_X=v -> ORDER_LISTENER_X=v."""
    prefix = "BENCH_ORDER_LISTENER_"
    return {k.removeprefix("BENCH_"): v for k, v in os.environ.items() if k.startswith(prefix)}


def spawn_daemon(
    redis_url: str, mqtt_url: str, log_path: Path, log_level: str, **extra_env: str
) -> DaemonProcess:
    """`order-listener run` in its own session; `extra_env`: more ORDER_LISTENER_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_LISTENER_")}
    env.update(daemon_settings())
    env.update(
        ORDER_LISTENER_REDIS_URL=redis_url,
        ORDER_LISTENER_MQTT_URL=mqtt_url,
        ORDER_LISTENER_LOG_LEVEL=log_level,
        ORDER_LISTENER_LOG_FORMAT="json",
        **extra_env,
    )
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            daemon_command(),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of the bench reaches it as our SIGTERM only
        )
    return DaemonProcess(proc, log_path)


async def stop_daemon(daemon: DaemonProcess, wait_s: float = 30.0) -> int | None:
    """SIGTERM and wait; the exit status (None: killed after `wait_s`)."""
    proc = daemon.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            return None
    return proc.returncode


# -- CPU accounting ------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_seconds() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return 0.0, 0.0
    ticks = [int(value) for value in first[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK"), idle / os.sysconf("SC_CLK_TCK")


def machine_busy(seconds: float = 1.0) -> float:
    """How busy the machine is now, in % of one core, measured over `seconds`."""
    busy, _ = machine_seconds()
    time.sleep(seconds)
    return 100 * (machine_seconds()[0] - busy) / seconds


def python_speed() -> float:
    """Milliseconds this host takes for a million additions in a Python loop,
    the best of three: a gauge of the host, printed beside every figure,
    since machines of one kind differ between hosts by more than most
    changes of the code."""
    best = math.inf
    for _ in range(3):
        began = time.perf_counter()
        total = 0
        for i in range(1_000_000):
            total += i
        best = min(best, time.perf_counter() - began)
    return 1000 * best


def speed_line() -> str:
    return f"speed:      a million additions in a Python loop take {python_speed():.0f} ms here (best of 3)"


class CpuMeter:
    """CPU used by named processes between start() and stop(), in % of one core,
    and by everything else on the machine (`others`: CPU this run does not control)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before: dict[str, float] = {}
        self.machine_before = 0.0
        self.began = 0.0
        self.usage: dict[str, float] = {}

    def start(self) -> None:
        self.began = time.monotonic()
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.machine_before = machine_seconds()[0]

    def stop(self) -> None:
        elapsed = time.monotonic() - self.began
        if elapsed <= 0:
            return
        self.usage = {
            name: 100 * (cpu_seconds(pid) - self.before[name]) / elapsed for name, pid in self.pids.items()
        }
        machine = 100 * (machine_seconds()[0] - self.machine_before) / elapsed
        self.usage["others"] = max(0.0, machine - sum(self.usage.values()))
        self.usage["idle"] = max(0.0, 100 * (os.cpu_count() or 1) - machine)


# -- one scenario ---------------------------------------------------------------------


@dataclass
class Row:
    pending: int
    rate: float
    created: int = 0  # measured orders created
    measured: int = 0
    missing: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    min_ms: float = math.nan
    load_s: float = 0.0  # creating the pending orders
    drain_s: float = 0.0  # until their `created` events were published (outbox empty)
    received_s: float = 0.0  # until the subscriber had them all
    created_dropped: int = 0  # never reached the subscriber: dropped by the broker
    achieved_rate: float = 0.0  # creates per second the producer really reached
    slowest_create_ms: float = 0.0  # slowest create_prepared call of the paced loop
    # the lag split at the event's `at` (the Redis clock when the daemon cancelled)
    cancel_p50: float = math.nan  # deadline -> cancelled in Redis
    cancel_p99: float = math.nan
    cancel_max: float = math.nan
    deliver_p50: float = math.nan  # cancelled in Redis -> received
    deliver_p99: float = math.nan
    deliver_max: float = math.nan
    # most unpublished entries seen while measuring, in the outbox streams
    # (cancellations) and in the outbox:created streams
    max_backlog: int = 0
    max_backlog_created: int = 0
    unexpected: int = 0  # cancellations of pending orders, other events
    daemon_exit: int | None = 0
    log_lines: int = 0  # lines the daemon logged
    log_top: str = ""  # its most frequent line (numbers blanked) and how often
    cpu: dict[str, float] = field(default_factory=dict)  # % of a core while measuring
    commands: dict[str, int] = field(default_factory=dict)  # Redis calls while measuring
    note: str = ""


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def watch_backlog(redis: Redis, row: Row) -> None:
    """Sample the outbox backlog every 100 ms (until cancelled); keep the largest."""
    layout = KeyLayout()
    while True:
        async with redis.pipeline(transaction=False) as pipe:
            for part in range(PARTS):
                pipe.xlen(layout.outbox(part))
            for part in range(PARTS):
                pipe.xlen(layout.outbox_created(part))
            lengths = [int(n) for n in await pipe.execute()]
        row.max_backlog = max(row.max_backlog, sum(lengths[:PARTS]))
        row.max_backlog_created = max(row.max_backlog_created, sum(lengths[PARTS:]))
        await asyncio.sleep(POLL)


async def command_usage(redis: Redis) -> dict[str, tuple[int, int]]:
    """Calls and microseconds of each Redis command so far (INFO commandstats)."""
    stats = await redis.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(value["calls"]), int(value["usec"]))
        for name, value in stats.items()
        if isinstance(value, dict)
    }


async def command_calls(redis: Redis) -> dict[str, int]:
    """Calls of each Redis command so far."""
    return {name: calls for name, (calls, _) in (await command_usage(redis)).items()}


def summary(sorted_values: Sequence[float]) -> tuple[float, float, float]:
    """p50, p99 and max of an ascending list."""
    return percentile(sorted_values, 50), percentile(sorted_values, 99), sorted_values[-1]


async def backlog(redis: Redis, layout: KeyLayout) -> int:
    """Entries in all outbox streams: events not yet published."""
    async with redis.pipeline(transaction=False) as pipe:
        for part in range(PARTS):
            pipe.xlen(layout.outbox(part))
            pipe.xlen(layout.outbox_created(part))
        lengths = await pipe.execute()
    return sum(int(n) for n in lengths)


@dataclass(frozen=True)
class Bench:
    redis_url: str
    mqtt_host: str
    mqtt_port: int
    workdir: Path
    duration: float
    timeout_s: float
    grace: float
    subscriber: str
    daemon_log_level: str
    server_pids: dict[str, int]
    tick_s: float = TICK_MS / 1000

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{self.mqtt_host}:{self.mqtt_port}"

    def new_subscriber(self) -> Subscriber:
        if self.subscriber == "inline":
            return InlineSubscriber(self.mqtt_host, self.mqtt_port)
        if self.subscriber == "mosquitto_sub":
            return MosquittoSubSubscriber(self.mqtt_host, self.mqtt_port, self.workdir)
        return ProcessSubscriber(self.mqtt_host, self.mqtt_port)


async def wait_ready(daemon: DaemonProcess, orders: OrderClient, sub: Subscriber) -> None:
    """The daemon is up end to end once a probe order's cancellation reached us."""
    await orders.create_prepared([(PROBE_ID, 100)])
    give_up = time.monotonic() + 60
    while not await sub.received(PROBE_ID):
        daemon.check_alive()
        if time.monotonic() > give_up:
            raise RuntimeError(f"the daemon did not cancel the probe in 60 s:\n{daemon.log_tail()}")
        await asyncio.sleep(0.05)


async def load_pending(orders: OrderClient, count: int) -> None:
    for start in range(0, count, LOAD_CHUNK):
        chunk = [
            (f"{PENDING_PREFIX}{i}", PENDING_TIMEOUT_MS) for i in range(start, min(count, start + LOAD_CHUNK))
        ]
        result = await orders.create_prepared(chunk)
        if result.existing:
            raise RuntimeError(f"{len(result.existing)} pending orders existed already")


async def wait_drained(
    bench: Bench, redis: Redis, sub: Subscriber, daemon: DaemonProcess, created: int, row: Row
) -> None:
    """Until the outbox is empty and the subscriber has `created` created events,
    or has received nothing more for STALLED_S after the outbox emptied: the
    broker dropped the rest (a stock mosquitto keeps at most 1,000 messages a
    subscriber has not taken yet), counted in `row.created_dropped`."""
    layout = KeyLayout()
    start = time.monotonic()
    give_up = start + 120 + created / 1000
    published = False
    last_count, last_change = -1, start
    while True:
        if not published and await backlog(redis, layout) == 0:
            published = True
            row.drain_s = time.monotonic() - start
        count = (await sub.counts()).created
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        if published and count >= created:
            row.received_s = time.monotonic() - start
            return
        if published and time.monotonic() - last_change > STALLED_S:
            row.received_s = last_change - start
            row.created_dropped = created - count
            return
        daemon.check_alive()
        if time.monotonic() > give_up:
            raise RuntimeError(
                f"backlog not drained after {time.monotonic() - start:.0f} s "
                f"(outbox {await backlog(redis, layout)}, received {(await sub.counts()).created}"
                f" of {created} created events)"
            )
        await asyncio.sleep(POLL)


async def paced_creates(bench: Bench, orders: OrderClient, rate: float, row: Row) -> dict[str, int]:
    """R orders a second for the duration, a batch per tick (`bench.tick_s`); their
    deadlines (Unix ms). The orders due by a tick are created in one call, so they
    fall due together: a long tick makes clumps (20 orders in the same millisecond
    at 2,000/s and 10 ms), which the median of a steady load would not have."""
    total = round(rate * bench.duration)
    timeout_ms = round(bench.timeout_s * 1000)
    deadlines: dict[str, int] = {}
    done = 0
    slowest = 0.0
    start = time.monotonic()
    tick = 0
    while done < total:
        want = min(total, math.floor(rate * (time.monotonic() - start)) + 1)
        if want > done:
            batch = [(f"{MEASURED_PREFIX}{i}", timeout_ms) for i in range(done, want)]
            began = time.monotonic()
            result = await orders.create_prepared(batch)
            slowest = max(slowest, time.monotonic() - began)
            for created in result.created:
                assert created.deadline_ms is not None
                deadlines[created.order_id] = created.deadline_ms
            done = want
        tick += 1
        pause = start + tick * bench.tick_s - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        else:  # behind: do not try to catch up ticks, only orders
            tick = math.ceil((time.monotonic() - start) / bench.tick_s)
    elapsed = time.monotonic() - start
    row.achieved_rate = total / elapsed if elapsed > 0 else math.nan
    row.slowest_create_ms = slowest * 1000
    return deadlines


async def wait_cancelled(bench: Bench, sub: Subscriber, deadlines: dict[str, int]) -> None:
    """Until every measured order's cancellation arrived, or `grace` s after the last deadline."""
    if not deadlines:
        return
    last = max(deadlines.values()) / 1000
    while (await sub.counts()).measured < len(deadlines):
        if time.time() > last + bench.grace:
            return
        await asyncio.sleep(POLL)


def log_summary(log_path: Path) -> tuple[int, str]:
    """Lines in the daemon's log and its most frequent line, numbers blanked."""
    counts: dict[str, int] = {}
    total = 0
    with log_path.open("rb") as log:
        for raw in log:
            total += 1
            text = raw.decode(errors="replace").strip()
            if text.startswith("{"):
                with contextlib.suppress(ValueError):
                    text = str(json.loads(text).get("event", text))
            shape = re.sub(r"\d+", "N", text)[:100]
            counts[shape] = counts.get(shape, 0) + 1
    if not counts:
        return 0, ""
    shape, times = max(counts.items(), key=lambda item: item[1])
    return total, f"{shape!r} x {times}"


class MeasureHooks(Protocol):
    """Called by scenario() around the measured part (bench/alternatives.py uses it)."""

    async def before(self, redis: Redis, daemon_pid: int) -> None:
        """After the pending orders are loaded and published, before the paced creates."""

    async def after(self, redis: Redis) -> None:
        """Once the last measured event arrived (or the grace time ended)."""


async def scenario(
    bench: Bench, redis: Redis, pending: int, rate: float, index: int, hooks: MeasureHooks | None = None
) -> Row:
    row = Row(pending, rate)
    await redis.flushall()
    sub = bench.new_subscriber()
    await sub.start()
    log_path = bench.workdir / f"daemon-{index}.log"
    daemon = spawn_daemon(bench.redis_url, bench.mqtt_url, log_path, bench.daemon_log_level)
    settings = load_settings(redis_url=bench.redis_url, mqtt_url=bench.mqtt_url)
    orders = OrderClient(settings)
    try:
        await wait_ready(daemon, orders, sub)
        began = time.monotonic()
        await load_pending(orders, pending)
        row.load_s = time.monotonic() - began
        await wait_drained(bench, redis, sub, daemon, pending + 1, row)  # + the probe
        if hooks is not None:
            await hooks.before(redis, daemon.proc.pid)

        pids = {"daemon": daemon.proc.pid, "subscriber": sub.pid(), "bench": os.getpid()}
        if pids["subscriber"] == pids["bench"]:
            del pids["subscriber"]
        meter = CpuMeter(pids | bench.server_pids)
        meter.start()
        calls_before = await command_calls(redis)
        watcher = asyncio.create_task(watch_backlog(redis, row))
        try:
            deadlines = await paced_creates(bench, orders, rate, row)
            await wait_cancelled(bench, sub, deadlines)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if hooks is not None:
            await hooks.after(redis)
        meter.stop()
        row.cpu = meter.usage
        calls_after = await command_calls(redis)
        row.commands = {
            name: calls - calls_before.get(name, 0)
            for name, calls in calls_after.items()
            if calls > calls_before.get(name, 0)
        }
        received = await sub.results()
        counts = await sub.counts()

        lags: list[float] = []
        cancel: list[float] = []
        deliver: list[float] = []
        for order_id, deadline in deadlines.items():
            if order_id in received:
                at_time, at_ms = received[order_id]
                lags.append(at_time * 1000 - deadline)
                cancel.append(at_ms - deadline)
                deliver.append(at_time * 1000 - at_ms)
        lags.sort()
        cancel.sort()
        deliver.sort()
        row.created = len(deadlines)
        row.measured = len(lags)
        row.missing = row.created - row.measured
        if lags:
            row.p50_ms, row.p99_ms, row.max_ms = summary(lags)
            row.min_ms = lags[0]
            row.cancel_p50, row.cancel_p99, row.cancel_max = summary(cancel)
            row.deliver_p50, row.deliver_p99, row.deliver_max = summary(deliver)
        early = sum(1 for order_id in received if order_id.startswith(PENDING_PREFIX))
        row.unexpected = early + counts.other
    finally:
        await orders.close()
        row.daemon_exit = await stop_daemon(daemon)
        await sub.stop()
    row.log_lines, row.log_top = log_summary(log_path)
    if row.daemon_exit != 0:
        row.note = f"daemon exit status {row.daemon_exit}"
        print(f"\nWARNING: the daemon exited with {row.daemon_exit}:\n{daemon.log_tail()}\n")
    return row


def describe(row: Row) -> str:
    """The scenario's details, a few indented lines."""
    lines = [
        f"pending {row.pending:,}, {row.rate:g} orders due per second:",
        f"  pending orders loaded in {row.load_s:.1f} s; their created events published in "
        f"{row.drain_s:.1f} s, "
        + (
            f"all received in {row.received_s:.1f} s"
            if not row.created_dropped
            else f"the last received after {row.received_s:.1f} s; {row.created_dropped:,} never "
            "arrived (dropped by the broker: its queue for a subscriber is full)"
        ),
        f"  producer reached {row.achieved_rate:.0f}/s (slowest create call "
        f"{row.slowest_create_ms:.1f} ms); {row.created} orders, {row.measured} measured, "
        f"{row.missing} missing",
        f"  lag ms: min {fmt(row.min_ms)}, p50 {fmt(row.p50_ms)}, p99 {fmt(row.p99_ms)}, "
        f"max {fmt(row.max_ms)}",
        f"    deadline -> cancelled in Redis (the event's `at`): p50 {fmt(row.cancel_p50)}, "
        f"p99 {fmt(row.cancel_p99)}, max {fmt(row.cancel_max)}",
        f"    cancelled in Redis -> received: p50 {fmt(row.deliver_p50)}, "
        f"p99 {fmt(row.deliver_p99)}, max {fmt(row.deliver_max)}; "
        f"unpublished up to {row.max_backlog} cancellations and "
        f"{row.max_backlog_created} created events",
    ]
    if row.cpu:
        lines.append(
            "  CPU while measuring (% of one core): "
            + ", ".join(f"{name} {share:.0f}" for name, share in row.cpu.items())
        )
    if row.commands:
        busiest = sorted(row.commands.items(), key=lambda item: -item[1])[:20]
        lines.append(
            "  Redis calls while measuring: " + ", ".join(f"{name} {calls}" for name, calls in busiest)
        )
    if row.log_lines:
        lines.append(f"  daemon log: {row.log_lines} lines, most often {row.log_top}")
    if row.unexpected:
        lines.append(f"  UNEXPECTED events (pending orders cancelled, other statuses): {row.unexpected}")
    if row.note:
        lines.append(f"  {row.note}")
    return "\n".join(lines)


async def run_all(bench: Bench, pendings: Sequence[int], rates: Sequence[float], rows: list[Row]) -> None:
    """Every scenario in turn; each finished row is appended to `rows` at once."""
    redis = Redis.from_url(bench.redis_url)
    try:
        index = 0
        for pending in pendings:
            for rate in rates:
                index += 1
                row = await scenario(bench, redis, pending, rate, index)
                print(describe(row), flush=True)
                rows.append(row)
    finally:
        await redis.aclose()


# -- setup and report --------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def print_setup(args: argparse.Namespace) -> None:
    redis_path, redis_kind = redis_binary()
    mosquitto_path = mosquitto_binary() or "mosquitto"
    print("Setup")
    print(f"  CPUs:       {os.cpu_count()} x {cpu_model()}")
    print(f"  OS:         {platform.system()} {platform.release()}")
    print(f"  Python:     {platform.python_version()} ({sys.executable})")
    print(f"  Redis:      {command_output([redis_path, '--version'])} [{redis_kind}]")
    print(f"  mosquitto:  {command_output([mosquitto_path, '-h'])}")
    print(f"  broker:     {broker_line(args.broker)[1]}")
    print(
        f"  scenarios:  pending {args.pending} x rate {args.rate}/s, {args.duration:g} s each; "
        f"order timeout {args.timeout:g} s; pending orders due in 1 h; "
        f"a create call every {args.tick_ms:g} ms"
    )
    busy = machine_busy()
    print(
        f"  load:       {busy:.0f}% of one core busy before the start (load average "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])})"
        + ("  <- other work on this machine skews the figures" if busy > 20 else "")
    )
    print(f"  {speed_line()}")
    print(
        f"  subscriber: {args.subscriber} (QoS 1, {TOPIC}); daemon log level "
        f"{args.daemon_log_level}; redis.conf of the project, all on loopback"
    )
    print(flush=True)


def fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


HEADERS = ["pending", "rate/s", "measured", "missing", "p50 ms", "p99 ms", "max ms", "load s", "drain s"]


def cells(row: Row) -> list[str]:
    return [
        f"{row.pending:,}",
        f"{row.rate:g}",
        f"{row.measured:,}",
        f"{row.missing:,}",
        fmt(row.p50_ms),
        fmt(row.p99_ms),
        fmt(row.max_ms),
        f"{row.load_s:.1f}",
        f"{row.received_s:.1f}",
    ]


def print_tables(rows: Sequence[Row]) -> None:
    table = [HEADERS] + [cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS))]
    print()
    print("Lag from deadline to the subscriber's receipt of the `cancelled` event")
    for n, line in enumerate(table):
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
        if n == 0:
            print("  " + "  ".join("-" * width for width in widths))
    print(
        "  (load s: creating the pending orders; drain s: until their `created` events "
        "were published and received)"
    )
    print()
    print("Markdown:")
    print()
    print("| " + " | ".join(HEADERS) + " |")
    print("|" + "|".join("---:" for _ in HEADERS) + "|")
    for row in rows:
        print("| " + " | ".join(cells(row)) + " |")
    print(flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Lag from each order's deadline to the receipt of its `cancelled` event."
    )
    add_broker_arg(parser)
    parser.add_argument(
        "--pending",
        type=int,
        nargs="+",
        default=[0, 100_000],
        metavar="N",
        help="pending orders (due in 1 h) loaded first (default: 0 100000)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        nargs="+",
        default=[100, 2000],
        metavar="R",
        help="orders falling due per second (default: 100 2000)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds of paced creates per scenario (default: 10)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="S",
        help="timeout of the measured orders in seconds (default: 2)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=15.0,
        metavar="S",
        help="wait this long after the last deadline for late events (default: 15)",
    )
    parser.add_argument(
        "--subscriber",
        choices=["mosquitto_sub", "process", "inline"],
        default="mosquitto_sub",
        help="mosquitto_sub, the C client (default), or an aiomqtt subscriber in its own process "
        "or in the bench's event loop (these add their own Python cost to the lag)",
    )
    parser.add_argument(
        "--tick-ms",
        type=float,
        default=TICK_MS,
        metavar="MS",
        help=f"the producer's pacing: one create call every MS ms (default: {TICK_MS:g}; "
        "10 makes clumps of 20 orders due in the same ms at 2,000/s)",
    )
    parser.add_argument(
        "--daemon-log-level",
        choices=["warning", "info"],
        default="warning",
        help="the daemon's log level (info logs every cancellation: shows what that costs)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (server and daemon logs)"
    )
    parser.add_argument("--subscriber-child", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.subscriber_child is None:
        if any(n < 0 for n in args.pending) or any(r <= 0 for r in args.rate):
            parser.error("--pending must be >= 0 and --rate > 0")
        if args.duration <= 0 or not 0.1 <= args.timeout <= 3600:
            parser.error("--duration must be > 0 and --timeout 0.1 .. 3600")
        if not 1 <= args.tick_ms <= 1000:
            parser.error("--tick-ms must be 1 .. 1000")
    return args


def _pid(server: ServerProcess) -> int:
    assert server.proc is not None
    return server.proc.pid


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.subscriber_child is not None:
        host, port = args.subscriber_child
        asyncio.run(subscriber_child(host, int(port)))
        return 0
    clear_listener_env()
    print_setup(args)
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-lag-"))
    servers: list[ServerProcess] = []
    rows: list[Row] = []
    try:
        redis_proc, broker = start_servers(workdir, servers, args.broker)
        bench = Bench(
            redis_url=f"redis://127.0.0.1:{redis_proc.port}/0",
            mqtt_host="127.0.0.1",
            mqtt_port=broker.port,
            workdir=workdir,
            duration=args.duration,
            timeout_s=args.timeout,
            grace=args.grace,
            subscriber=args.subscriber,
            daemon_log_level=args.daemon_log_level,
            tick_s=args.tick_ms / 1000,
            server_pids={"redis": _pid(redis_proc), "mosquitto": _pid(broker)},
        )
        print(
            f"servers: redis-server on port {redis_proc.port}, mosquitto on port "
            f"{broker.port}, files in {workdir}",
            flush=True,
        )
        asyncio.run(run_all(bench, args.pending, args.rate, rows))
    finally:
        for server in reversed(servers):
            server.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if rows:
            print_tables(rows)
            mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(f"peak RSS: bench {mine:.0f} MB, largest child process {children:.0f} MB")
    return 0 if all(row.daemon_exit == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
