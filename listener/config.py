"""Settings: read once from the environment (and flags) into one frozen object.

Nothing deeper than the command line reads ``os.environ``. Every setting is
``ORDER_LISTENER_<NAME>`` so a systemd ``EnvironmentFile=`` works as is.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from listener.errors import ConfigError
from listener.orders import MAX_TIMEOUT_MS, MIN_TIMEOUT_MS

ENV_PREFIX = "ORDER_LISTENER_"
_TOPIC_LEVEL = re.compile(r"[^#+\x00]+(/[^#+\x00]+)*")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


class FastPathSetting(StrEnum):
    AUTO = "auto"  # each fast path runs where its versions and checks allow (listener/fastpath/)
    OFF = "off"  # every fast path takes the libraries' public way


class Settings(BaseSettings):
    """Everything the daemon and the commands can be told. Defaults run on one laptop."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_protocol: str = Field(default="5", pattern=r"^(5|3\.1\.1)$")
    mqtt_client_id: str = ""
    topic_prefix: str = "orders"
    logistics_topic: str = "logistics/+/status"
    default_timeout: float = 1800.0
    key_prefix: str = "order"
    # whole ms from 1 ms to 100 years: what the scripts take (lib.lua, MAX_RETENTION_MS)
    retention: float = Field(default=7 * 24 * 3600.0, ge=0.001, le=100 * 365 * 24 * 3600.0)
    log_level: str = Field(default="info", pattern=r"^(?i)(debug|info|warning|error)$")
    log_format: LogFormat = LogFormat.AUTO
    sweep_batch: int = Field(default=1000, ge=1, le=5000)
    publish_batch: int = Field(default=500, ge=1, le=10000)
    mqtt_connections: int = Field(default=1, ge=1, le=16)  # the outbox lanes are spread over them
    shutdown_timeout: float = Field(default=10.0, gt=0)
    resync_interval: float = Field(default=5.0, gt=0)
    metrics_addr: str = ""  # host:port for /metrics and /healthz; empty: off
    fast_paths: FastPathSetting = FastPathSetting.AUTO
    # TLS (rediss://, mqtts://): CA bundle to trust (default: the system's),
    # and a client certificate + key where the server asks for one.
    redis_tls_ca: str = ""
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    mqtt_tls_ca: str = ""
    mqtt_tls_cert: str = ""
    mqtt_tls_key: str = ""

    @field_validator(
        "redis_tls_ca", "redis_tls_cert", "redis_tls_key", "mqtt_tls_ca", "mqtt_tls_cert", "mqtt_tls_key"
    )
    @classmethod
    def _readable_file(cls, value: str) -> str:
        if value and not os.access(value, os.R_OK):
            raise ValueError(f"cannot read {value!r}: give the path of a PEM file this user can read")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _metrics_addr(cls, value: str) -> str:
        if value:
            from listener.metrics import parse_addr

            parse_addr(value)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        redis_target(value)
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        mqtt_target(value)
        return value

    @field_validator("default_timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if not MIN_TIMEOUT_MS <= round(value * 1000) <= MAX_TIMEOUT_MS:
            raise ValueError("must be 0.1 to 2592000 seconds (30 days)")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        if not _TOPIC_LEVEL.fullmatch(value):
            raise ValueError("must be a topic without wildcards (+, #), e.g. 'orders' or 'shop/orders'")
        return value

    @field_validator("logistics_topic")
    @classmethod
    def _logistics_topic(cls, value: str) -> str:
        levels = value.split("/")
        if levels.count("+") != 1 or "#" in value or any(("+" in lv and lv != "+") for lv in levels):
            raise ValueError(
                "must have exactly one '+' level, where the order id is, e.g. 'logistics/+/status'"
            )
        return value

    @field_validator("key_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        if not _KEY_PREFIX.fullmatch(value):
            raise ValueError("must be 1-64 letters, digits, '-', '_', '.'")
        return value

    @property
    def default_timeout_ms(self) -> int:
        return round(self.default_timeout * 1000)

    @property
    def retention_ms(self) -> int:
        return round(self.retention * 1000)


def load_settings(**overrides: Any) -> Settings:
    """Environment plus flags (`overrides`, None means not given), or ConfigError."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]) if error["loc"] else "?"
            message = str(error["msg"]).removeprefix("Value error, ")
            lines.append(f"{ENV_PREFIX}{name.upper()}: {message}")
        raise ConfigError("bad configuration:\n  " + "\n  ".join(lines)) from None


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
