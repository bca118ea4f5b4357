"""Real servers for the tests: redis-server (with the project's redis.conf) and
mosquitto, started once per session on free loopback ports. Each test gets a
clean database; fault tests stop, kill and restart them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from redis.asyncio import Redis

from listener import logs
from listener.api import OrderClient
from listener.config import Settings, load_settings
from listener.daemon import Daemon
from listener.mqtt import make_client
from listener.servers import ServerProcess, mosquitto, redis_server

CLI = str(Path(sys.executable).parent / "order-listener")


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "",
) -> None:
    """Wait for a condition, polling every 20 ms; fail the test after `timeout`."""
    give_up = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > give_up:
            said = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout} s waiting for {said or condition}")
        await asyncio.sleep(0.02)


# The servers' files (Redis' append-only file, mosquitto's autosave every second)
# go to memory where the machine has a tmpfs: the tests prove behaviour, not the
# disk, and a slow moment of a shared disk must not stall the single-threaded
# servers (a suite run once saw the broker answer nothing for 10 s on a busy host).
SHM = Path("/dev/shm")


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    base = SHM if SHM.is_dir() and os.access(SHM, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="order-listener-tests-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server_proc(workdir: Path) -> Iterator[ServerProcess]:
    server = redis_server(workdir / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mqtt_server_proc(workdir: Path) -> Iterator[ServerProcess]:
    server = mosquitto(workdir / "mosquitto")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def small_broker(workdir: Path) -> Iterator[ServerProcess]:
    """A mosquitto of its own that tells MQTT 5 clients Receive Maximum 5."""
    broker = mosquitto(workdir / f"rm-{random.randrange(10**9)}", extra_conf="max_inflight_messages 5\n")
    broker.start()
    yield broker
    broker.stop()


def quiet_logs() -> None:
    """The tests' logging: warnings and errors on stderr (everything with TEST_DEBUG=1)."""
    logs.configure("debug" if os.environ.get("TEST_DEBUG") else "warning", stream=sys.stderr)


@pytest.fixture(scope="session", autouse=True)
def _quiet_logs() -> None:
    quiet_logs()


@pytest.fixture
async def redis(redis_server_proc: ServerProcess, mqtt_server_proc: ServerProcess) -> AsyncIterator[Redis]:
    """A client on a clean database (servers restarted if a test left them down)."""
    for server in (redis_server_proc, mqtt_server_proc):
        if not server.running:
            server.start()
    client = Redis(port=redis_server_proc.port)
    await wait_until(_pings(client), 15, "redis to load")
    await client.flushall()
    await client.config_set("notify-keyspace-events", "Ex")
    yield client
    await client.aclose()


def _pings(client: Redis) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        try:
            return bool(await client.ping())
        except Exception:
            return False

    return check


@pytest.fixture
def settings(redis: Redis, redis_server_proc: ServerProcess, mqtt_server_proc: ServerProcess) -> Settings:
    return load_settings(
        redis_url=f"redis://127.0.0.1:{redis_server_proc.port}/0",
        mqtt_url=f"mqtt://127.0.0.1:{mqtt_server_proc.port}",
        resync_interval=1.0,
        shutdown_timeout=5.0,
    )


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_LISTENER_")}
    env.update(
        ORDER_LISTENER_REDIS_URL=settings.redis_url,
        ORDER_LISTENER_MQTT_URL=settings.mqtt_url,
        ORDER_LISTENER_RESYNC_INTERVAL=str(settings.resync_interval),
        ORDER_LISTENER_SHUTDOWN_TIMEOUT=str(settings.shutdown_timeout),
        # CI's second pass forces the fallbacks: the daemons it spawns too
        ORDER_LISTENER_FAST_PATHS=settings.fast_paths.value,
    )
    env.update(extra)
    return env


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(settings: Settings) -> Callable[..., Awaitable[CliResult]]:
    """Run `order-listener ARGS` as a real process against the test servers."""

    async def run(
        *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 60
    ) -> CliResult:
        proc = await asyncio.create_subprocess_exec(
            CLI,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env if env is not None else env_for(settings),
        )
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout
        )
        assert proc.returncode is not None
        return CliResult(proc.returncode, out.decode(), err.decode())

    return run


@pytest.fixture
async def start_daemon(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """Start in-process daemons (each in its own task); all stopped at teardown."""
    running: list[tuple[Daemon, asyncio.Event, asyncio.Task[None]]] = []

    async def start(config: Settings | None = None, wait_ready: bool = True) -> Daemon:
        daemon = Daemon(config or settings)
        stop = asyncio.Event()
        task = asyncio.create_task(daemon.run(stop))
        running.append((daemon, stop, task))
        if wait_ready:
            await asyncio.wait_for(daemon.ready.wait(), 20)
        return daemon

    yield start
    for _, stop, _task in running:
        stop.set()
    for _, _, task in running:
        try:
            await asyncio.wait_for(task, 15)
        except (asyncio.CancelledError, Exception):
            task.cancel()


@dataclass
class Subscriber:
    """A persistent QoS 1 subscriber that records every status event."""

    events: list[dict[str, Any]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)

    def of(self, order_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["order_id"] == order_id]

    def with_status(self, status: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["status"] == status]

    def cancelled_ids(self) -> set[str]:
        return {e["order_id"] for e in self.with_status("cancelled")}

    def unique(self) -> dict[str, dict[str, Any]]:
        return {e["event_id"]: e for e in self.events}


@pytest.fixture
async def subscriber(settings: Settings, mqtt_server_proc: ServerProcess) -> AsyncIterator[Subscriber]:
    """Subscribes to orders/+/status with a persistent session, reconnecting if
    the broker restarts, so no event is missed by the test itself."""
    sub = Subscriber()
    ready = asyncio.Event()
    identifier = f"test-subscriber-{os.getpid()}-{time.monotonic_ns()}"

    async def loop() -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    mqtt_server_proc.port,
                    identifier=identifier,
                    clean_session=False,
                    keepalive=5,
                ) as client:
                    await client.subscribe(f"{settings.topic_prefix}/+/status", qos=1)
                    ready.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        sub.events.append(json.loads(message.payload))
                        sub.received_at.append(time.time())
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    await asyncio.wait_for(ready.wait(), 10)
    yield sub
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@dataclass
class Received:
    at: float  # time.time() on receipt
    event: dict[str, Any]


@contextlib.asynccontextmanager
async def watch_topic(settings: Settings, topic: str, identifier: str) -> AsyncIterator[list[Received]]:
    """Collect the events on one topic (filter) while the block runs; subscribed
    before the block starts. One order's topic alone shows what the daemon
    publishes without queueing at the broker behind other orders' events."""
    seen: list[Received] = []
    subscribed = asyncio.Event()

    async def collect() -> None:
        async with make_client(settings, identifier=identifier) as client:
            await client.subscribe(topic, qos=1)
            subscribed.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                seen.append(Received(time.time(), json.loads(message.payload)))

    task = asyncio.create_task(collect())
    try:
        done, _ = await asyncio.wait(
            {task, asyncio.ensure_future(subscribed.wait())}, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        if task in done:
            task.result()  # raises what went wrong
        assert subscribed.is_set(), f"could not subscribe to {topic}"
        yield seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@dataclass
class DaemonProcess:
    """`order-listener run` as a real process (for kill -9 and SIGTERM tests)."""

    proc: asyncio.subprocess.Process
    log: Path

    async def wait_ready(self, timeout: float = 20) -> None:
        async def ready() -> bool:
            return '"ready"' in self.log.read_text() or "event='ready'" in self.log.read_text()

        await wait_until(ready, timeout, "the daemon to log ready")

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float = 20) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


@pytest.fixture
async def spawn_daemon(
    settings: Settings, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[DaemonProcess]]]:
    procs: list[DaemonProcess] = []

    async def spawn(**extra_env: str) -> DaemonProcess:
        log = tmp_path / f"daemon-{len(procs)}.log"
        handle = log.open("wb")
        proc = await asyncio.create_subprocess_exec(
            CLI,
            "run",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=handle,
            stderr=handle,
            env=env_for(settings, **{"ORDER_LISTENER_LOG_FORMAT": "json", **extra_env}),
        )
        handle.close()
        daemon = DaemonProcess(proc, log)
        procs.append(daemon)
        return daemon

    yield spawn
    for daemon in procs:
        daemon.kill()
        await daemon.proc.wait()


def compact(event: dict[str, Any]) -> str:
    """An event as the daemon's payload writes it (keys in the received order)."""
    return json.dumps(event, separators=(",", ":"))


async def redis_clock_past(client: OrderClient, ms: int) -> bool:
    """Whether the Redis clock (the one deadlines are kept by) is past `ms`."""
    return await client.store.now_ms() > ms
