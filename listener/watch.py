"""`order-listener watch`: prints status events as they are published."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import aiomqtt

from listener.config import Settings
from listener.errors import Unavailable
from listener.mqtt import default_client_id, make_client
from listener.urls import mqtt_target


def _line(event: dict[str, object]) -> str:
    previous = event.get("previous") or "-"
    return (
        f"{event.get('at')}  {event.get('order_id')}  {previous} -> {event.get('status')}"
        f"  ({event.get('reason')}, v{event.get('version')})"
    )


async def watch_events(settings: Settings, *, count: int = 0, seconds: float = 0, raw: bool = False) -> int:
    """Print events until `count` were seen or `seconds` passed (0: no limit)."""
    topic = f"{settings.topic_prefix}/+/status"
    seen = 0
    try:
        async with make_client(settings, identifier=default_client_id("watch")) as client:
            await client.subscribe(topic, qos=1)
            print(f"watching {topic} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds or None):
                    async for message in client.messages:
                        payload = message.payload
                        text = payload.decode() if isinstance(payload, bytes) else str(payload)
                        if raw:
                            print(text, flush=True)
                        else:
                            try:
                                print(_line(json.loads(text)), flush=True)
                            except (ValueError, AttributeError):
                                print(f"(not JSON) {message.topic}: {text[:200]}", flush=True)
                        seen += 1
                        if count and seen >= count:
                            break
    except aiomqtt.MqttError as exc:
        raise Unavailable(
            f"cannot reach the MQTT broker at {mqtt_target(settings.mqtt_url).shown}: {exc}; start the "
            "broker there, or point ORDER_LISTENER_MQTT_URL (--mqtt-url) at it "
            "(older brokers: ORDER_LISTENER_MQTT_PROTOCOL=3.1.1)"
        ) from None
    return seen
