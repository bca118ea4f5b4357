"""Addresses the settings hold: Redis and MQTT URLs taken apart and checked,
passwords hidden for logs and messages, and host:port pairs.

Pure (the standard library's urllib only): config.py checks its URL settings
with these, and each module that connects reads its target from them. A bad
address raises ValueError naming it (password hidden) and the form to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class RedisTarget:
    url: str
    db: int
    tls: bool
    shown: str  # the URL with any password replaced by ***


@dataclass(frozen=True)
class MqttTarget:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None
    shown: str


def redact(url: str) -> str:
    """The URL with its password (if any) replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if _safe_port(url) else ""
    return parts._replace(netloc=f"{user}:***@{host}{port}").geturl()


def _safe_port(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None


def redis_target(url: str) -> RedisTarget:
    shown = redact(url)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"{shown!r} is not a Redis URL: use redis://host:port/db, rediss://... or unix:///path"
        )
    try:
        _ = parts.port
    except ValueError:
        raise ValueError(f"{shown!r} has a port that is not a number 1-65535") from None
    db = 0
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{shown!r} has no socket path: use unix:///run/redis/redis.sock?db=0")
        for pair in parts.query.split("&"):
            if pair.startswith("db="):
                db = _db_number(pair[3:], shown)
    else:
        if not parts.hostname:
            raise ValueError(f"{shown!r} has no host: use redis://127.0.0.1:6379/0")
        path = parts.path.strip("/")
        if path:
            db = _db_number(path, shown)
    return RedisTarget(url=url, db=db, tls=parts.scheme == "rediss", shown=shown)


def parse_addr(text: str) -> tuple[str, int]:
    """host:port (ORDER_LISTENER_METRICS_ADDR); an empty host listens on all addresses."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _db_number(text: str, shown: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{shown!r}: the database {text!r} is not a number (e.g. /0)")
    return int(text)


def mqtt_target(url: str) -> MqttTarget:
    shown = redact(url)
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"{shown!r} is not an MQTT URL: use mqtt://host:1883 or mqtts://host:8883")
    if not parts.hostname:
        raise ValueError(f"{shown!r} has no host: use mqtt://127.0.0.1:1883")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown!r} has a port that is not a number 1-65535") from None
    tls = parts.scheme in ("mqtts", "ssl")
    return MqttTarget(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        shown=shown,
    )
