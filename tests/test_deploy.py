"""deploy/: the systemd unit, its environment file, the Redis and mosquitto ACLs, checked for real.

- the unit passes `systemd-analyze verify` without a single message, and its
  `systemd-analyze security` exposure stays at or below EXPOSURE_THRESHOLD;
- the environment file lists every setting with its real default;
- `order-listener run` works as the unit runs it: environment from the file,
  sd_notify READY/WATCHDOG/STOPPING, SIGTERM stops it within TimeoutStopSec,
  no writable+executable memory (prctl PR_SET_MDWE, the kernel's form of
  MemoryDenyWriteExecute=, when the kernel has it), and only the grants of
  deploy/redis-users.acl and deploy/mosquitto-acl.example: a producer's order
  is cancelled at its deadline, a carrier's report delivers an order, a shop
  subscriber sees both, and Redis' ACL LOG records no refusal at all;
- `order-listener check` passes as the daemon's user on both servers;
- the grants are tight: the daemon's user is refused outside its keys and
  cannot create orders, the producer's cannot listen to expired events, and
  on the broker each user's forbidden publishes and subscriptions deliver nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import redis.exceptions
from redis.asyncio import Redis

from listener import OrderClient, Unavailable, load_settings
from listener.config import Settings
from listener.keys import KeyLayout
from listener.servers import ServerProcess, mosquitto, mosquitto_binary, redis_binary, redis_server

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "order-listener.service"
ENV_EXAMPLE = DEPLOY / "order-listener.env.example"
REDIS_ACL = DEPLOY / "redis-users.acl"
MOSQUITTO_ACL = DEPLOY / "mosquitto-acl.example"
CLI = str(Path(sys.executable).parent / "order-listener")
# Redis 7.0-7.2 word an ACL refusal inside a script like this; later ones say NOPERM.
DENIED_IN_SCRIPT = r"NOPERM|can't run this command"

# `systemd-analyze security` exposure, 0.0 (locked down) to 10.0 (unprotected);
# up to 4.0 is rated "OK". Measured: 1.1 with systemd 252 (Debian 12). What is
# left is inherent to a network client: it needs the host's network (0.5 of
# it), Internet and unix sockets, and runs in the host's root directory.
EXPOSURE_THRESHOLD = 2.0

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian/Ubuntu: apt-get install systemd)",
)

PASSWORDS = {"order-listener": "listener-pw", "order-producer": "producer-pw", "admin": "admin-pw"}
MQTT_PASSWORDS = {"order-listener": "l-pw", "shop-subscriber": "s-pw", "carrier": "c-pw"}

# Runs its arguments with PR_SET_MDWE (Linux 6.3+): from then on, like under
# MemoryDenyWriteExecute=yes, no mapping may be writable and executable.
MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) == 0:
    print("test_deploy: running with PR_SET_MDWE", file=sys.stderr, flush=True)
else:
    reason = os.strerror(ctypes.get_errno())
    print("test_deploy: PR_SET_MDWE unavailable:", reason, file=sys.stderr, flush=True)
os.execv(sys.argv[1], sys.argv[1:])
"""


# -- the unit file -----------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """Every `Name=value` of the unit (a name may repeat)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        name, _, value = line.partition("=")
        found.setdefault(name, []).append(value)
    return found


def unit_to_check(folder: Path) -> Path:
    """A copy of the unit whose ExecStart is this venv's order-listener (verify
    checks that the binary exists); everything else as shipped."""
    text, count = re.subn(
        r"^ExecStart=\S+/order-listener run$", f"ExecStart={CLI} run", UNIT.read_text(), flags=re.M
    )
    assert count == 1, "the unit must have one ExecStart=<venv>/bin/order-listener run"
    path = folder / UNIT.name
    path.write_text(text)
    return path


def systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env.update(SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


@needs_systemd_analyze
def test_unit_verifies_without_a_message(tmp_path: Path) -> None:
    # verify exits 0 even for unknown or malformed settings: every message counts.
    unit = unit_to_check(tmp_path)
    result = systemd_analyze("verify", f"./{unit.name}", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


@needs_systemd_analyze
def test_unit_exposure_is_low(tmp_path: Path) -> None:
    unit = unit_to_check(tmp_path)
    result = systemd_analyze("security", "--offline=yes", "--no-pager", f"./{unit.name}", cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    assert float(match.group(1)) <= EXPOSURE_THRESHOLD, result.stdout


def test_unit_matches_the_daemon() -> None:
    """The numbers in the unit that must agree with the daemon's own."""
    unit = unit_settings()
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == ["/opt/order-listener/venv/bin/order-listener run"]
    assert unit["EnvironmentFile"] == ["/etc/order-listener/order-listener.env"]
    # The daemon pings at half of WATCHDOG_USEC, and stops gracefully within
    # ORDER_LISTENER_SHUTDOWN_TIMEOUT: SIGKILL must come a little after that.
    assert unit["WatchdogSec"] == ["30"]
    shutdown = Settings().shutdown_timeout
    assert shutdown < float(unit["TimeoutStopSec"][0]) <= shutdown + 10
    # A bad configuration exits 2 (ConfigError): restarting cannot fix it.
    assert unit["RestartPreventExitStatus"] == ["2"]


# -- the environment file ----------------------------------------------------------


def env_file_values(text: str, *, commented: bool) -> dict[str, str]:
    """NAME=value lines as systemd's EnvironmentFile= reads them; with
    `commented`, also the `#ORDER_LISTENER_NAME=default` lines."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if commented and line.startswith("#ORDER_LISTENER_"):
            line = line[1:]
        if not line or line[0] in "#;" or "=" not in line:
            continue
        name, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = ENV_EXAMPLE.read_text()
    shown = env_file_values(text, commented=True)
    fields = {field.name: field for field in dataclasses.fields(Settings)}
    assert set(shown) == {f"ORDER_LISTENER_{name.upper()}" for name in fields}
    config = load_settings(**{name.removeprefix("ORDER_LISTENER_").lower(): v for name, v in shown.items()})
    active = env_file_values(text, commented=False)
    for name, field in fields.items():
        variable = f"ORDER_LISTENER_{name.upper()}"
        if variable in active:  # set for a typical install; the default is in its comment
            assert f"# Default: {field.default}\n{variable}=" in text
        else:
            assert getattr(config, name) == field.default, variable


# -- the ACLs, for real --------------------------------------------------------------


@dataclass
class Servers:
    redis: ServerProcess
    mqtt: ServerProcess
    folder: Path

    def redis_url(self, user: str) -> str:
        return f"redis://{user}:{PASSWORDS[user]}@127.0.0.1:{self.redis.port}/0"

    def mqtt_url(self, user: str) -> str:
        return f"mqtt://{user}:{MQTT_PASSWORDS[user]}@127.0.0.1:{self.mqtt.port}"

    def admin(self) -> Redis:
        return Redis(port=self.redis.port, username="admin", password=PASSWORDS["admin"])


def redis_version() -> tuple[int, int]:
    out = subprocess.run([redis_binary()[0], "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v=(\d+)\.(\d+)", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


def acl_with_passwords(text: str, version: tuple[int, int]) -> str:
    """The shipped ACL file as an operator completes it (deploy/README.md):
    a password for each user, CLIENT SETINFO on Redis 7.2+; plus an admin
    for the test to read the ACL LOG."""
    for user in ("order-listener", "order-producer"):
        text, count = re.subn(
            rf"^(user {user} .*)#0{{64}}(.*)$", rf"\1>{PASSWORDS[user]}\2", text, flags=re.M
        )
        assert count == 1, f"{user}: one placeholder password hash expected"
        if version >= (7, 2):
            text = re.sub(rf"^(user {user} .*)$", r"\1 +client|setinfo", text, flags=re.M)
    return text + f"user admin on >{PASSWORDS['admin']} ~* &* +@all\n"


def mosquitto_passwd_file(path: Path) -> None:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.path.exists(tool):
        pytest.skip("mosquitto_passwd not found (it comes with the mosquitto package)")
    path.touch()
    for user, password in MQTT_PASSWORDS.items():
        subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    if mosquitto_binary() is None:
        pytest.skip("no mosquitto (apt-get install mosquitto)")
    folder = Path(tempfile.mkdtemp(prefix="deploy-"))
    folder.chmod(0o755)  # mosquitto may drop to its own user before reading its files
    acl = folder / "users.acl"
    acl.write_text(acl_with_passwords(REDIS_ACL.read_text(), redis_version()))
    passwd = folder / "mosquitto.passwd"
    mosquitto_passwd_file(passwd)
    for path in (acl, passwd):
        path.chmod(0o644)
    shutil.copy(MOSQUITTO_ACL, folder / "mosquitto.acl")
    (folder / "mosquitto.acl").chmod(0o644)
    redis = redis_server(folder / "redis", extra=["--aclfile", str(acl)])
    mqtt = mosquitto(
        folder / "mqtt",
        extra_conf=(f"allow_anonymous false\npassword_file {passwd}\nacl_file {folder / 'mosquitto.acl'}\n"),
    )
    try:
        redis.start()
        mqtt.start()
        yield Servers(redis, mqtt, folder)
    finally:
        redis.stop()
        mqtt.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float, what: str | Callable[[], str]
) -> None:
    """Wait for `check`; fail after `timeout` s saying `what` (a callable: evaluated then)."""
    give_up = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > give_up:
            pytest.fail(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def notify_socket() -> AsyncIterator[tuple[str, list[str]]]:
    """A NOTIFY_SOCKET like systemd's; yields its path and the messages received."""
    folder = Path(tempfile.mkdtemp(prefix="notify-"))
    path = folder / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    received: list[str] = []

    async def receive() -> None:
        loop = asyncio.get_running_loop()
        while True:
            received.extend((await loop.sock_recv(sock, 4096)).decode().splitlines())

    task = asyncio.create_task(receive())
    try:
        yield str(path), received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def shop_subscriber(servers: Servers) -> AsyncIterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    async with aiomqtt.Client(
        "127.0.0.1", servers.mqtt.port, username="shop-subscriber", password=MQTT_PASSWORDS["shop-subscriber"]
    ) as client:
        await client.subscribe("orders/#", qos=1)

        async def collect() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                events.append(json.loads(message.payload))

        task = asyncio.create_task(collect())
        try:
            yield events
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_daemon_runs_as_the_unit_runs_it_with_least_privilege(servers: Servers) -> None:
    admin = servers.admin()
    await admin.acl_log_reset()
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    env.update(env_file_values(ENV_EXAMPLE.read_text(), commented=False))  # EnvironmentFile=
    env.update(
        ORDER_LISTENER_REDIS_URL=servers.redis_url("order-listener"),
        ORDER_LISTENER_MQTT_URL=servers.mqtt_url("order-listener"),
        ORDER_LISTENER_LOG_LEVEL="info",
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        WATCHDOG_USEC="1000000",  # pings every 0.5 s
    )
    stop_within = float(unit_settings()["TimeoutStopSec"][0])
    log = servers.folder / "daemon.log"
    producer = OrderClient(load_settings(redis_url=servers.redis_url("order-producer")))
    async with notify_socket() as (notify_path, notices), shop_subscriber(servers) as events:
        with log.open("wb") as log_file:
            daemon = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                MDWE_EXEC,
                CLI,
                "run",
                env={**env, "NOTIFY_SOCKET": notify_path},
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )

        def said() -> str:
            return f"daemon log:\n{log.read_text(errors='replace')[-4000:]}\nnotices: {notices}"

        try:
            await eventually(lambda: "READY=1" in notices, 20, lambda: f"READY=1; {said()}")
            await producer.create("deploy-late", timeout=1)
            await producer.create("deploy-paid", timeout=60)
            await producer.pay("deploy-paid")
            async with aiomqtt.Client(
                "127.0.0.1", servers.mqtt.port, username="carrier", password=MQTT_PASSWORDS["carrier"]
            ) as carrier:
                await carrier.publish("logistics/deploy-paid/status", b'{"status": "delivered"}', qos=1)

            async def settled() -> bool:
                late, paid = await producer.get("deploy-late"), await producer.get("deploy-paid")
                return late.status == "cancelled" and paid.status == "delivered"

            await eventually(settled, 10, lambda: f"the cancellation and the delivery; {said()}")
            assert (await producer.get("deploy-late")).reason == "timeout"
            assert (await producer.get("deploy-paid")).reason == "logistics"
            # the operators' controls as the producer user; the daemon reads the switch meanwhile
            await producer.create("deploy-extended", timeout=60)
            assert (await producer.extend("deploy-extended", 30)).version == 2
            assert (await producer.pause("deploy drill", by="test")).changed
            assert (await producer.pause_state()).paused
            assert (await producer.resume(grace=1)).changed

            def seen() -> set[tuple[str, str, str]]:
                return {(e["order_id"], e["status"], e["reason"]) for e in events}

            expected = {("deploy-late", "cancelled", "timeout"), ("deploy-paid", "delivered", "logistics")}
            await eventually(
                lambda: expected <= seen(), 10, lambda: f"both events at the shop (seen {seen()}); {said()}"
            )
            assert "WATCHDOG=1" in notices, said()

            started = time.monotonic()
            daemon.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(daemon.wait(), stop_within)
            assert code == 0, said()
            assert time.monotonic() - started < stop_within
            assert "STOPPING=1" in notices, said()
        finally:
            if daemon.returncode is None:
                daemon.kill()
                await daemon.wait()
            await producer.close()
    try:
        # Neither the daemon nor the producer was refused anything along the way.
        assert await admin.acl_log() == [], said()
    finally:
        await admin.aclose()


async def test_check_passes_as_the_daemon_user(servers: Servers) -> None:
    """deploy/README.md tells operators to run `order-listener check` with the
    daemon's settings: the ACLs must let every check through, unrefused."""
    admin = servers.admin()
    await admin.acl_log_reset()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "ORDER_LISTENER_REDIS_URL": servers.redis_url("order-listener"),
        "ORDER_LISTENER_MQTT_URL": servers.mqtt_url("order-listener"),
    }
    try:
        check = await asyncio.create_subprocess_exec(
            CLI, "check", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, _ = await asyncio.wait_for(check.communicate(), 30)
        assert check.returncode == 0, out.decode()
        assert "FAIL" not in out.decode()
        # the broker ACL lets the daemon's user read the broker's count of dropped messages
        assert "the broker has dropped no messages since it started" in out.decode(), out.decode()
        assert await admin.acl_log() == []
    finally:
        await admin.aclose()


async def subscribe_error(client: Redis, channel: str) -> redis.exceptions.RedisError | None:
    """What SUBSCRIBE `channel` answers: None when allowed, else the error."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        await pubsub.get_message(timeout=2)  # the confirmation, or the refusal
    except redis.exceptions.RedisError as exc:
        return exc
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    return None


async def test_acl_refuses_what_each_user_does_not_need(servers: Servers) -> None:
    daemon_user = Redis.from_url(servers.redis_url("order-listener"))
    producer_user = Redis.from_url(servers.redis_url("order-producer"))
    as_daemon = OrderClient(load_settings(redis_url=servers.redis_url("order-listener")))
    admin = servers.admin()
    await admin.acl_log_reset()
    try:
        # The daemon's user: its keys and channels only.
        with pytest.raises(redis.exceptions.NoPermissionError):
            await daemon_user.get("other:key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            await daemon_user.zadd("order:{0}:deadlines", {"x": 1})
        assert await subscribe_error(daemon_user, "__keyevent@0__:expired") is None
        assert isinstance(
            await subscribe_error(daemon_user, "other:channel"), redis.exceptions.NoPermissionError
        )
        # Creating orders is the producer's: the create script stops at the first
        # command the daemon's user lacks (HGET), before it writes anything.
        with pytest.raises((Unavailable, redis.exceptions.ResponseError), match=DENIED_IN_SCRIPT):
            await as_daemon.create("deploy-not-by-the-daemon")
        assert await admin.exists(KeyLayout().order("deploy-not-by-the-daemon")) == 0
        # The producer's user: the scripts and reads, no listening, no outbox, no CONFIG.
        assert isinstance(
            await subscribe_error(producer_user, "__keyevent@0__:expired"), redis.exceptions.NoPermissionError
        )
        with pytest.raises(redis.exceptions.NoPermissionError):
            await producer_user.xread({"order:{0}:outbox": "0-0"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            await producer_user.config_get("notify-keyspace-events")
        refusals = {
            (_text(entry["username"]), _text(entry["reason"]), _text(entry["object"]))
            for entry in await admin.acl_log()
        }
        assert {
            ("order-listener", "key", "other:key"),
            ("order-listener", "channel", "other:channel"),
            ("order-listener", "command", "hget"),  # inside the create script
            ("order-producer", "command", "subscribe"),
            ("order-producer", "command", "xread"),
            ("order-producer", "command", "config|get"),
        } <= refusals, refusals
    finally:
        await as_daemon.close()
        for client in (daemon_user, producer_user, admin):
            await client.aclose()


@contextlib.asynccontextmanager
async def mqtt_as(servers: Servers, user: str, *subscriptions: str) -> AsyncIterator[MqttUser]:
    """A connected client of `user`, recording the topics it receives."""
    async with aiomqtt.Client(
        "127.0.0.1",
        servers.mqtt.port,
        username=user,
        password=MQTT_PASSWORDS[user],
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        received: list[str] = []
        for topic_filter in subscriptions:
            await client.subscribe(topic_filter, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                received.append(str(message.topic))

        task = asyncio.create_task(collect())
        try:
            yield MqttUser(client, received)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class MqttUser:
    client: aiomqtt.Client
    received: list[str]


async def publish_refused(servers: Servers, user: str, topic: str) -> None:
    """Publish as `user` where the ACL forbids it: mosquitto drops the message
    and closes the connection (so a fresh one is used and its end ignored)."""
    with contextlib.suppress(aiomqtt.MqttError):
        async with mqtt_as(servers, user) as client:
            await client.client.publish(topic, b"{}", qos=0)
            await asyncio.sleep(0.1)


async def test_mosquitto_acl_refuses_what_each_user_does_not_need(servers: Servers) -> None:
    # mosquitto 2 grants a refused SUBSCRIBE and then just delivers nothing, so
    # each refusal shows as a message that does not arrive while an allowed
    # one, sent after it, does.
    async with (
        mqtt_as(servers, "shop-subscriber", "orders/#", "logistics/#") as shop,
        mqtt_as(servers, "carrier", "orders/#", "logistics/#") as carrier,
        mqtt_as(servers, "order-listener", "logistics/+/status", "orders/#") as daemon,
    ):
        await publish_refused(servers, "shop-subscriber", "orders/fake-by-shop/status")
        await publish_refused(servers, "carrier", "orders/fake-by-carrier/status")
        await publish_refused(servers, "order-listener", "logistics/fake-by-daemon/status")
        await daemon.client.publish("orders/real/status", b"{}", qos=1)
        await carrier.client.publish("logistics/real/status", b"{}", qos=1)
        await eventually(lambda: "orders/real/status" in shop.received, 5, "the order event at the shop")
        await eventually(lambda: "logistics/real/status" in daemon.received, 5, "the report at the daemon")
        await asyncio.sleep(0.2)
        assert shop.received == ["orders/real/status"]  # no fakes, no parcel reports
        assert carrier.received == []  # reads nothing, not even its own reports
        assert daemon.received == ["logistics/real/status"]  # not its own events


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
