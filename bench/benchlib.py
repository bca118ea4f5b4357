"""Helpers shared by the benchmark scripts in bench/ (not a benchmark itself).

The order daemon, the MQTT subscribers, CPU accounting and the setup lines
come from bench/lag.py; this module adds what the other scripts have in
common: Redis INFO readings, process memory, a consumer child process that
reports what it handled as JSON lines, BullMQ (node) detection and install,
and tables printed as text and as Markdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from lag import DaemonProcess, command_output, cpu_model, machine_busy, percentile, speed_line
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.servers import mosquitto_binary, redis_binary

BENCH = Path(__file__).resolve().parent
NODE_DIR = BENCH / ".node"  # gitignored: npm installs bullmq and ioredis here at run time
BULLMQ_SCRIPT = BENCH / "bullmq_bench.mjs"


# -- the machine and the servers --------------------------------------------------------


def setup_lines(extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Machine, CPU, OS, Python, Redis and mosquitto binaries, how busy the machine is."""
    redis_path, redis_kind = redis_binary()
    busy = machine_busy()
    lines = [
        f"machine:    {platform.node()}, {os.cpu_count()} x {cpu_model()}, "
        f"{Path('/proc/meminfo').read_text().split()[1] if Path('/proc/meminfo').exists() else '?'} kB RAM",
        f"OS:         {platform.system()} {platform.release()}",
        f"Python:     {platform.python_version()} ({sys.executable})",
        f"Redis:      {command_output([redis_path, '--version'])} [{redis_kind}]",
        f"mosquitto:  {command_output([mosquitto_binary() or 'mosquitto', '-h'])}",
        f"load:       {busy:.0f}% of one core busy before the start (load average "
        f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])})"
        + ("  <- other work on this machine skews the figures" if busy > 20 else ""),
        speed_line(),
    ]
    own = sorted(f"{k[6:]}={v}" for k, v in os.environ.items() if k.startswith("BENCH_ORDER_LISTENER_"))
    lines.append(f"daemon:     {' '.join(own) if own else 'default settings'}")
    lines += [f"{name + ':':<11} {value}" for name, value in extra]
    return lines


def print_setup(title: str, extra: Sequence[tuple[str, str]] = ()) -> None:
    print(title)
    for line in setup_lines(extra):
        print("  " + line)
    print(flush=True)


async def redis_config(redis: Redis) -> str:
    """`7.0.15, hz 50 (dynamic-hz yes), maxmemory-policy noeviction, ...` of a running server."""
    info = await redis.info("server")
    # redis-py types CONFIG GET's reply as decoded (str keys); a client without
    # decode_responses gets bytes, which get() below looks up as well.
    config = cast("dict[bytes | str, bytes | str]", await redis.config_get("*"))

    def get(name: str) -> str:
        value = config.get(name, config.get(name.encode(), "?"))
        return value.decode() if isinstance(value, bytes) else str(value)

    return (
        f"{info.get('redis_version', '?')}, hz {get('hz')} (dynamic-hz {get('dynamic-hz')}), "
        f"notify-keyspace-events {get('notify-keyspace-events')}, appendonly {get('appendonly')} "
        f"(fsync {get('appendfsync')}), maxmemory-policy {get('maxmemory-policy')}"
    )


async def redis_cpu(redis: Redis) -> float:
    """CPU seconds Redis used so far: INFO cpu used_cpu_sys + used_cpu_user."""
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def idle_cost(redis: Redis, pid: int | None, seconds: float) -> tuple[float, float]:
    """(Redis CPU, the process `pid`'s CPU) in % of one core while nothing is due for `seconds`."""
    from lag import cpu_seconds

    redis_before = await redis_cpu(redis)
    proc_before = cpu_seconds(pid) if pid else 0.0
    began = time.monotonic()
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - began
    redis_used = await redis_cpu(redis) - redis_before
    proc_used = (cpu_seconds(pid) - proc_before) if pid else math.nan
    return 100 * redis_used / elapsed, 100 * proc_used / elapsed


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in kB, from /proc/<pid>/status (0, 0 if it is gone)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in values:
                values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return values["VmRSS"], values["VmHWM"]


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs; needs the right to)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- lag figures ----------------------------------------------------------------------


@dataclass
class Lags:
    """Lag of each item from its deadline to its handling, in ms."""

    expected: int = 0
    values: list[float] = field(default_factory=list)

    @property
    def measured(self) -> int:
        return len(self.values)

    @property
    def missing(self) -> int:
        return self.expected - len(self.values)

    def stats(self) -> tuple[float, float, float]:
        """p50, p99, max (nan when nothing was measured)."""
        ordered = sorted(self.values)
        if not ordered:
            return math.nan, math.nan, math.nan
        return percentile(ordered, 50), percentile(ordered, 99), ordered[-1]


def lags_of(deadlines: dict[str, float], handled: dict[str, float]) -> Lags:
    """Deadlines and handling times (both Unix ms) by item id -> lags."""
    result = Lags(expected=len(deadlines))
    for item_id, deadline in deadlines.items():
        at = handled.get(item_id)
        if at is not None:
            result.values.append(at - deadline)
    return result


def fmt(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


# -- consumer processes ---------------------------------------------------------------


class Consumer:
    """A child process that prints `{"ready": true}` once it can take work, then one
    JSON object per handled item with `id` and `t` (Unix ms), and ends when its stdin
    is closed."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.handled: dict[str, float] = {}
        self.reader: asyncio.Task[None] | None = None
        self.stderr_path: Path | None = None

    async def start(self, workdir: Path, wait: float = 30.0) -> None:
        self.stderr_path = workdir / f"{self.name}.stderr"
        with self.stderr_path.open("wb") as errors:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
                env=self.env,
                limit=1 << 26,
            )
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=wait)
        except TimeoutError:
            line = b""
        if b'"ready"' not in line:
            await self.stop()
            raise RuntimeError(f"{self.name} did not start: {line!r}\n{self.stderr_tail()}")
        self.reader = asyncio.create_task(self._read())

    def stderr_tail(self, chars: int = 2000) -> str:
        if self.stderr_path is None or not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(errors="replace")[-chars:]

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            with contextlib.suppress(ValueError, KeyError):
                record = json.loads(raw)
                item_id = str(record["id"])
                if item_id not in self.handled:
                    self.handled[item_id] = float(record["t"])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.reader, timeout=5)


async def child_output_loop(records: list[tuple[str, float]], stop: asyncio.Event) -> None:
    """The child side of Consumer: flush handled records to stdout every 50 ms until stdin closes."""

    def flush() -> None:
        if records:
            sys.stdout.write("".join(json.dumps({"id": i, "t": t}) + "\n" for i, t in records))
            sys.stdout.flush()
            records.clear()

    async def watch_stdin() -> None:
        await asyncio.to_thread(sys.stdin.read)
        stop.set()

    watcher = asyncio.create_task(watch_stdin())
    while not stop.is_set():
        flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.05)
    flush()
    watcher.cancel()


# -- node and BullMQ -------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    ok: bool
    reason: str  # why not, or the versions
    node: str = ""


def bullmq_available(install: bool = True) -> Node:
    """node and npm on PATH, bullmq + ioredis installed in bench/.node (npm install at first use)."""
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        return Node(False, "node and npm are not both on PATH (apt-get install nodejs npm)")
    package = NODE_DIR / "node_modules" / "bullmq" / "package.json"
    if not package.exists() or not (NODE_DIR / "node_modules" / "ioredis").exists():
        if not install:
            return Node(False, "bullmq is not installed in bench/.node (bench/alternatives.py installs it)")
        NODE_DIR.mkdir(exist_ok=True)
        print("installing bullmq and ioredis with npm into bench/.node ...", flush=True)
        done = subprocess.run(
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--silent",
                "--prefix",
                str(NODE_DIR),
                "bullmq",
                "ioredis",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if done.returncode != 0 or not package.exists():
            return Node(False, f"npm install bullmq failed: {(done.stderr or done.stdout).strip()[-300:]}")
    bullmq_version = json.loads(package.read_text()).get("version", "?")
    ioredis = NODE_DIR / "node_modules" / "ioredis" / "package.json"
    ioredis_version = json.loads(ioredis.read_text()).get("version", "?") if ioredis.exists() else "?"
    version = command_output([node, "--version"])
    return Node(True, f"node {version}, bullmq {bullmq_version}, ioredis {ioredis_version}", node)


# -- tables -----------------------------------------------------------------------------


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], notes: str = "") -> None:
    """A right-aligned text table, then the same table in Markdown."""
    table = [list(headers)] + [list(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    print()
    print(title)
    for n, line in enumerate(table):
        print("  " + "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
        if n == 0:
            print("  " + "  ".join("-" * width for width in widths))
    if notes:
        for note in notes.splitlines():
            print("  " + note)
    print()
    print("Markdown:")
    print()
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(flush=True)


async def daemon_cancels_probe(orders: OrderClient, daemon: DaemonProcess, probe: str) -> None:
    """The daemon is up once it cancelled a probe order with a 100 ms timeout."""
    await orders.create(probe, timeout=0.1)
    give_up = time.monotonic() + 60
    while (await orders.get(probe)).status != "cancelled":
        daemon.check_alive()
        if time.monotonic() > give_up:
            raise RuntimeError(f"the daemon did not cancel the probe in 60 s:\n{daemon.log_tail()}")
        await asyncio.sleep(0.05)
