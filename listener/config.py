"""Settings: read once from the environment (and flags) into one frozen object.

Nothing deeper than the command line reads ``os.environ``. Every setting is
``ORDER_LISTENER_<NAME>`` so a systemd ``EnvironmentFile=`` works as is.

A plain dataclass checked by hand, not a settings library: every command
reads the settings, and loading such a library would cost a command line that
answers at once more than the rest of its work. A bad value is refused with
the variable's name, the value (passwords hidden) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from listener.errors import ConfigError
from listener.orders import MAX_TIMEOUT_MS, MIN_TIMEOUT_MS
from listener.urls import mqtt_target, parse_addr, redact, redis_target

ENV_PREFIX = "ORDER_LISTENER_"
_TOPIC_LEVEL = re.compile(r"[^#+\x00]+(/[^#+\x00]+)*")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
LOG_LEVELS = ("debug", "info", "warning", "error")
MQTT_PROTOCOLS = ("5", "3.1.1")


class FastPathSetting(StrEnum):
    AUTO = "auto"  # each fast path runs where its versions and checks allow (listener/fastpath/)
    OFF = "off"  # every fast path takes the libraries' public way


class LogFormat(StrEnum):
    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


@dataclass(frozen=True)
class Settings:
    """Everything the daemon and the commands can be told. Defaults run on one laptop.

    Built by `load_settings` (environment plus flags); constructing it, or
    `dataclasses.replace` on it, checks every value the same way (text from
    the environment is converted) and raises ConfigError naming each bad one.
    """

    redis_url: str = "redis://127.0.0.1:6379/0"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_protocol: str = "5"
    mqtt_client_id: str = ""
    topic_prefix: str = "orders"
    logistics_topic: str = "logistics/+/status"
    default_timeout: float = 1800.0
    key_prefix: str = "order"
    retention: float = 7 * 24 * 3600.0
    event_log_retention: float = 24 * 3600.0  # published events kept for `replay`; 0: no event log
    log_level: str = "info"
    log_format: LogFormat = LogFormat.AUTO
    sweep_batch: int = 1000
    publish_batch: int = 500
    mqtt_connections: int | None = None  # the outbox lanes are spread over them; None: auto
    created_rate: float | None = None  # `created` events a second from a backlog; None: auto, 0: unpaced
    shutdown_timeout: float = 10.0
    resync_interval: float = 5.0
    metrics_addr: str = ""  # host:port for /metrics and /healthz; empty: off
    # TLS (rediss://, mqtts://): CA bundle to trust (default: the system's),
    # and a client certificate + key where the server asks for one.
    redis_tls_ca: str = ""
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    mqtt_tls_ca: str = ""
    mqtt_tls_cert: str = ""
    mqtt_tls_key: str = ""
    fast_paths: FastPathSetting = FastPathSetting.AUTO

    def __post_init__(self) -> None:
        problems = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            try:
                object.__setattr__(self, field.name, _CHECKS[field.name](value))
            except ValueError as exc:
                problems.append(f"{ENV_PREFIX}{field.name.upper()}: {exc}")
        if problems:
            raise ConfigError("bad configuration:\n  " + "\n  ".join(problems))

    def __repr__(self) -> str:
        shown = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        shown |= {"redis_url": redact(self.redis_url), "mqtt_url": redact(self.mqtt_url)}
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def default_timeout_ms(self) -> int:
        return round(self.default_timeout * 1000)

    @property
    def retention_ms(self) -> int:
        return round(self.retention * 1000)

    @property
    def event_log_retention_ms(self) -> int:
        return round(self.event_log_retention * 1000)


def load_settings(**overrides: Any) -> Settings:
    """Environment plus flags (`overrides`, None means not given), or ConfigError."""
    names = {field.name for field in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    # Names match whatever their case, as systemd and shells may write them.
    env = {key.upper(): value for key, value in os.environ.items() if key.upper().startswith(ENV_PREFIX)}
    given: dict[str, Any] = {
        name: env[f"{ENV_PREFIX}{name.upper()}"] for name in names if f"{ENV_PREFIX}{name.upper()}" in env
    }
    given |= {name: value for name, value in overrides.items() if value is not None}
    return Settings(**given)


# -- the checks: each takes the value (text from the environment, or a Python
# value), returns it converted, or raises ValueError saying what is allowed ----


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be text (got {value!r})")
    return value


def _number(kind: type[int] | type[float], low: float, high: float, allowed: str) -> Callable[[Any], Any]:
    """A number from `low` (excluded for floats at 0) to `high`."""

    def check(value: Any) -> int | float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = kind(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {allowed} (got {value!r})") from None
        above_low = number > low if kind is float and low == 0 else number >= low
        if not (math.isfinite(number) and above_low and number <= high):
            raise ValueError(f"must be {allowed} (got {value!r})")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"must be {allowed} (got {value!r})")
        return number

    return check


def _one_of(allowed: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)} (got {value!r})")
        return text

    return check


def _log_format(value: Any) -> LogFormat:
    text = _one_of(tuple(LogFormat))(value)
    return LogFormat(text)


def _readable_file(value: Any) -> str:
    path = _text(value)
    if path and not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path!r}: give the path of a PEM file this user can read")
    return path


def _metrics_addr(value: Any) -> str:
    text = _text(value)
    if text:
        parse_addr(text)
    return text


def _redis_url(value: Any) -> str:
    redis_target(_text(value))
    return str(value)


def _mqtt_url(value: Any) -> str:
    mqtt_target(_text(value))
    return str(value)


def _timeout(value: Any) -> float:
    seconds = float(_number(float, 0, math.inf, "0.1 to 2592000 seconds (30 days)")(value))
    if not MIN_TIMEOUT_MS <= round(seconds * 1000) <= MAX_TIMEOUT_MS:
        raise ValueError(f"must be 0.1 to 2592000 seconds (30 days) (got {value!r})")
    return seconds


def _topic_prefix(value: Any) -> str:
    text = _text(value)
    if not _TOPIC_LEVEL.fullmatch(text):
        raise ValueError(
            f"must be a topic without wildcards (+, #), e.g. 'orders' or 'shop/orders' (got {text!r})"
        )
    return text


def _logistics_topic(value: Any) -> str:
    text = _text(value)
    levels = text.split("/")
    if levels.count("+") != 1 or "#" in text or any(("+" in lv and lv != "+") for lv in levels):
        raise ValueError(
            "must have exactly one '+' level, where the order id is, "
            f"e.g. 'logistics/+/status' (got {text!r})"
        )
    return text


def _key_prefix(value: Any) -> str:
    text = _text(value)
    if not _KEY_PREFIX.fullmatch(text):
        raise ValueError(f"must be 1-64 letters, digits, '-', '_', '.' (got {text!r})")
    return text


def _event_log_retention(value: Any) -> float:
    allowed = "0 (no event log) or 0.001 to 3153600000 seconds (100 years)"
    seconds = float(_number(float, -1.0, 100 * 365 * 24 * 3600.0, allowed)(value))
    if seconds != 0 and not seconds >= 0.001:
        raise ValueError(f"must be {allowed} (got {value!r})")
    return seconds


_SECONDS = _number(float, 0, math.inf, "a number of seconds above 0")
_CONNECTIONS = _number(int, 1, 16, "auto or a whole number from 1 to 16")


def _connections(value: Any) -> int | None:
    """MQTT connections to publish over; None (`auto`) for the broker to decide."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    return int(_CONNECTIONS(value))


_RATE_RULE = "auto, 0 (unpaced) or a number of events a second up to 1000000"


def parse_rate(value: Any) -> float | None:
    """Events a second, 0 for no pace, None (`auto`) for the broker to decide
    (the setting `created_rate` and `replay --rate`). ValueError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        return float(_number(float, 0, 1e6, _RATE_RULE)(value))
    except ValueError:
        if not isinstance(value, bool) and str(value).strip() in {"0", "0.0", "0.00"}:
            return 0.0
        raise


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "redis_url": _redis_url,
    "mqtt_url": _mqtt_url,
    "mqtt_protocol": _one_of(MQTT_PROTOCOLS),
    "mqtt_client_id": _text,
    "topic_prefix": _topic_prefix,
    "logistics_topic": _logistics_topic,
    "default_timeout": _timeout,
    "key_prefix": _key_prefix,
    # whole ms from 1 ms to 100 years: what the scripts take (lib.lua, MAX_RETENTION_MS)
    "retention": _number(float, 0.001, 100 * 365 * 24 * 3600.0, "0.001 to 3153600000 seconds (100 years)"),
    # 0 turns the event log off; else whole ms up to 100 years, like `retention`
    "event_log_retention": _event_log_retention,
    "log_level": _one_of(LOG_LEVELS),
    "log_format": _log_format,
    "sweep_batch": _number(int, 1, 5000, "a whole number from 1 to 5000"),
    "publish_batch": _number(int, 1, 10000, "a whole number from 1 to 10000"),
    "mqtt_connections": _connections,
    "created_rate": parse_rate,
    "shutdown_timeout": _SECONDS,
    "resync_interval": _SECONDS,
    "metrics_addr": _metrics_addr,
    "redis_tls_ca": _readable_file,
    "redis_tls_cert": _readable_file,
    "redis_tls_key": _readable_file,
    "mqtt_tls_ca": _readable_file,
    "mqtt_tls_cert": _readable_file,
    "mqtt_tls_key": _readable_file,
    "fast_paths": lambda value: FastPathSetting(_one_of(tuple(FastPathSetting))(value)),
}
