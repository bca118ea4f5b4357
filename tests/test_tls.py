"""rediss:// and mqtts:// with a CA, client certificates and passwords, against a
real redis-server and mosquitto with TLS and certificates made here. Passwords
never reach the logs or `check`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from listener import logs
from listener.api import OrderClient
from listener.config import LogFormat, Settings, load_settings
from listener.daemon import Daemon
from listener.errors import Unavailable
from listener.servers import ServerProcess, free_port, mosquitto, redis_server
from tests.conftest import CliResult, env_for, wait_until, watch_topic

REDIS_PASSWORD = "redis-Secret-4711"
MQTT_PASSWORD = "mqtt-Secret-0815"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
            "-days", "2", "-subj", "/CN=order-listener test CA", cwd=folder)  # fmt: skip
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extfile in (("server", ["-extfile", "san.ext"]), ("client", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", *extfile, cwd=folder)  # fmt: skip
    for key in folder.glob("*.key"):
        key.chmod(0o644)  # mosquitto drops privileges before reading them
    return Certs(
        folder / "ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
    )


@pytest.fixture(scope="module")
def tls_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Certs, ServerProcess, ServerProcess]]:
    base = tmp_path_factory.mktemp("tls")
    certs = make_certs(base / "certs")
    redis_port = free_port()
    redis = redis_server(
        base / "redis",
        redis_port,
        extra=[
            "--port", "0", "--tls-port", str(redis_port),
            "--tls-cert-file", str(certs.server_cert), "--tls-key-file", str(certs.server_key),
            "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "yes",
            "--requirepass", REDIS_PASSWORD,
        ],
    )  # fmt: skip
    passwords = base / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "shop", MQTT_PASSWORD], check=True)
    passwords.chmod(0o644)
    broker = mosquitto(
        base / "mosquitto",
        extra_conf=(
            f"cafile {certs.ca}\ncertfile {certs.server_cert}\nkeyfile {certs.server_key}\n"
            f"require_certificate true\npassword_file {passwords}\nallow_anonymous false\n"
        ),
    )
    redis.start()
    broker.start()
    yield certs, redis, broker
    redis.stop()
    broker.stop()


@pytest.fixture
def tls_settings(tls_servers: tuple[Certs, ServerProcess, ServerProcess], settings: Settings) -> Settings:
    certs, redis, broker = tls_servers
    return load_settings(
        redis_url=f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0",
        mqtt_url=f"mqtts://shop:{MQTT_PASSWORD}@127.0.0.1:{broker.port}",
        redis_tls_ca=str(certs.ca),
        redis_tls_cert=str(certs.client_cert),
        redis_tls_key=str(certs.client_key),
        mqtt_tls_ca=str(certs.ca),
        mqtt_tls_cert=str(certs.client_cert),
        mqtt_tls_key=str(certs.client_key),
        resync_interval=1.0,
    )


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "daemon.log"
    with path.open("w") as stream:
        logs.configure("info", LogFormat.JSON, stream=stream)
        yield path
    logs.configure("warning", stream=sys.stderr)


async def test_whole_loop_over_tls_with_client_certificates(
    tls_settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    log_file: Path,
) -> None:
    try:
        await start_daemon(tls_settings)
    except TimeoutError:
        pytest.fail("daemon not ready over TLS; its log:\n" + log_file.read_text()[-3000:])  # noqa: ASYNC240
    async with (
        watch_topic(tls_settings, f"{tls_settings.topic_prefix}/tls-1/status", "tls-test-tls-1") as seen,
        OrderClient(tls_settings) as client,
    ):
        await client.create("tls-1", timeout=0.3)
        await wait_until(lambda: len(seen) >= 2, 15, "tls-1 created and cancelled")
    events = [r.event for r in seen]
    assert [(e["status"], e["reason"]) for e in events] == [("created", "created"), ("cancelled", "timeout")]
    text = log_file.read_text()  # noqa: ASYNC240 - a small file, once
    assert "rediss://:***@127.0.0.1" in text and "mqtts://shop:***@127.0.0.1" in text
    assert REDIS_PASSWORD not in text and MQTT_PASSWORD not in text


async def test_without_client_certificate_the_servers_refuse(
    tls_settings: Settings, tls_servers: tuple[Certs, ServerProcess, ServerProcess]
) -> None:
    plain = dataclasses.replace(tls_settings, redis_tls_cert="", redis_tls_key="")
    client = OrderClient(plain)
    try:
        with pytest.raises(Unavailable, match="cannot reach Redis"):
            await client.create("no-cert", timeout=10)
        with pytest.raises(Unavailable, match="cannot reach Redis"):  # opening alone (`async with`)
            await client.opened()
    finally:
        await client.close()


async def test_check_over_tls_never_prints_passwords(
    tls_settings: Settings, cli: Callable[..., Awaitable[CliResult]], settings: Settings
) -> None:
    env = env_for(
        tls_settings,
        ORDER_LISTENER_REDIS_TLS_CA=tls_settings.redis_tls_ca,
        ORDER_LISTENER_REDIS_TLS_CERT=tls_settings.redis_tls_cert,
        ORDER_LISTENER_REDIS_TLS_KEY=tls_settings.redis_tls_key,
        ORDER_LISTENER_MQTT_TLS_CA=tls_settings.mqtt_tls_ca,
        ORDER_LISTENER_MQTT_TLS_CERT=tls_settings.mqtt_tls_cert,
        ORDER_LISTENER_MQTT_TLS_KEY=tls_settings.mqtt_tls_key,
    )
    result = await cli("check", env=env)
    assert "ok    redis: reachable at rediss://:***@127.0.0.1" in result.out, result.out + result.err
    assert "ok    mqtt: reachable at mqtts://shop:***@127.0.0.1" in result.out
    assert REDIS_PASSWORD not in result.out + result.err and MQTT_PASSWORD not in result.out + result.err
    wrong = await cli("check", env={**env, "ORDER_LISTENER_MQTT_URL": "mqtts://shop:WrongPass99@127.0.0.1:1"})
    assert wrong.code == 1 and "WrongPass99" not in wrong.out + wrong.err


async def test_unreadable_ca_file_is_a_clear_config_error(
    cli: Callable[..., Awaitable[CliResult]], settings: Settings
) -> None:
    result = await cli("show", "x", env=env_for(settings, ORDER_LISTENER_MQTT_TLS_CA="/nonexistent/ca.pem"))
    assert result.code == 2
    assert "ORDER_LISTENER_MQTT_TLS_CA" in result.err and "/nonexistent/ca.pem" in result.err
