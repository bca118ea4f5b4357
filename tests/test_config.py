"""Settings: read from ORDER_LISTENER_* and flags, converted, checked, and
refused with the variable's name, the value given (passwords hidden) and what
is allowed."""

from __future__ import annotations

import dataclasses

import pytest

from listener.config import LogFormat, Settings, load_settings
from listener.errors import ConfigError


def test_the_environment_is_read_and_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDER_LISTENER_SWEEP_BATCH", " 250 ")
    monkeypatch.setenv("ORDER_LISTENER_DEFAULT_TIMEOUT", "2.5")
    monkeypatch.setenv("ORDER_LISTENER_LOG_FORMAT", "JSON")
    monkeypatch.setenv("order_listener_key_prefix", "shop")  # the name's case does not matter
    monkeypatch.setenv("ORDER_LISTENER_NOT_A_SETTING", "ignored")
    config = load_settings(log_level="DEBUG", topic_prefix=None)  # None: not given
    assert (config.sweep_batch, config.default_timeout_ms, config.log_format) == (250, 2500, LogFormat.JSON)
    assert (config.key_prefix, config.log_level, config.topic_prefix) == ("shop", "debug", "orders")
    flagged = load_settings(key_prefix="flag")  # a flag wins over the environment
    assert flagged.key_prefix == "flag"


def test_every_bad_value_is_named_with_what_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDER_LISTENER_RETENTION", "0")
    with pytest.raises(ConfigError) as raised:
        load_settings(
            publish_batch="10001",
            mqtt_connections=2.5,
            mqtt_protocol="4",
            resync_interval="inf",
            redis_url="redis://u:hunter2@127.0.0.1:port/0",
            metrics_addr="nowhere",
        )
    lines = str(raised.value).splitlines()
    assert lines == [
        "bad configuration:",
        "  ORDER_LISTENER_REDIS_URL: 'redis://u:***@127.0.0.1/0' has a port that is not a number 1-65535",
        "  ORDER_LISTENER_MQTT_PROTOCOL: must be one of 5, 3.1.1 (got '4')",
        "  ORDER_LISTENER_RETENTION: must be 0.001 to 3153600000 seconds (100 years) (got '0')",
        "  ORDER_LISTENER_PUBLISH_BATCH: must be a whole number from 1 to 10000 (got '10001')",
        "  ORDER_LISTENER_MQTT_CONNECTIONS: must be auto or a whole number from 1 to 16 (got 2.5)",
        "  ORDER_LISTENER_RESYNC_INTERVAL: must be a number of seconds above 0 (got 'inf')",
        "  ORDER_LISTENER_METRICS_ADDR: 'nowhere' is not host:port (e.g. 127.0.0.1:9464)",
    ]
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) redis_ulr; known: "):
        load_settings(redis_ulr="redis://127.0.0.1:6379/0")


def test_a_copy_is_checked_too_and_the_password_never_shown() -> None:
    config = Settings(redis_url="redis://u:hunter2@127.0.0.1:6380/0", mqtt_url="mqtt://a:b-pw@broker:1883")
    assert "hunter2" not in repr(config) and "b-pw" not in repr(config)
    assert "redis://u:***@127.0.0.1:6380/0" in repr(config)
    assert dataclasses.replace(config, sweep_batch=10).sweep_batch == 10
    with pytest.raises(ConfigError, match="ORDER_LISTENER_SWEEP_BATCH"):
        dataclasses.replace(config, sweep_batch=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.key_prefix = "other"  # type: ignore[misc]
