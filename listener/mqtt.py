"""The MQTT side: one connection kept up with reconnects, publishing in order.

aiomqtt's reconnect pattern is a loop around ``async with Client(...)``; the
link runs that loop, subscribes, hands incoming messages to a handler and
lets publishers wait for the current connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiomqtt
from paho.mqtt import client as mqtt_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from listener import logs
from listener.config import Settings, mqtt_target
from listener.events import StatusEvent
from listener.supervise import Service, supervise

log = logs.get("listener.mqtt")

Handler = Callable[[aiomqtt.Message], Awaitable[None]]


def protocol_of(settings: Settings) -> aiomqtt.ProtocolVersion:
    return aiomqtt.ProtocolVersion.V5 if settings.mqtt_protocol == "5" else aiomqtt.ProtocolVersion.V311


class CheckedClient(aiomqtt.Client):
    """aiomqtt's client, keeping the broker's refusals: aiomqtt treats any
    PUBACK as success, but an MQTT 5 PUBACK may say "not authorized" or
    "quota exceeded", and then the event was not taken."""

    refused: list[str]

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            self.refused.append(str(reason_code))
        super()._on_publish(client, userdata, mid, reason_code, properties)


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a publish with a failure reason code."""


def make_client(
    settings: Settings, *, identifier: str | None = None, persistent: bool = False, timeout: float = 10.0
) -> CheckedClient:
    """An aiomqtt client for the configured URL (not yet connected)."""
    target = mqtt_target(settings.mqtt_url)
    v5 = settings.mqtt_protocol == "5"
    client = CheckedClient(
        target.host,
        target.port,
        username=target.username,
        password=target.password,
        identifier=identifier,
        protocol=protocol_of(settings),
        clean_session=None if v5 else not persistent,
        clean_start=_clean_start(v5, persistent),
        properties=_session_expiry() if (v5 and persistent) else None,
        tls_context=tls_context(settings) if target.tls else None,
        timeout=timeout,
        keepalive=15,
        max_inflight_messages=1000,
    )
    client.pending_calls_threshold = 1_000_000  # our batches are bounded; no warning per call
    client.refused = []
    return client


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Verify the broker against the configured CA (or the system's); present a
    client certificate when one is configured."""
    context = ssl.create_default_context(cafile=settings.mqtt_tls_ca or None)
    if settings.mqtt_tls_cert:
        context.load_cert_chain(settings.mqtt_tls_cert, settings.mqtt_tls_key or None)
    return context


def _clean_start(v5: bool, persistent: bool) -> mqtt_client.CleanStartOption:
    if not v5:
        return mqtt_client.MQTT_CLEAN_START_FIRST_ONLY  # the only value paho accepts for 3.1.1
    return False if persistent else True  # noqa: SIM211


def _is_failure(code: object) -> bool:
    """A SUBACK entry: a ReasonCode (MQTT 5) or the granted QoS, 128 = failure (3.1.1)."""
    if isinstance(code, int):
        return code >= 128
    return bool(getattr(code, "is_failure", False))


def _session_expiry() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 7 * 24 * 3600
    return props


def default_client_id(role: str) -> str:
    """Unique per connection: two clients with one id make the broker drop the older."""
    return f"order-listener-{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class PackedProperties(Properties):
    """PUBLISH properties encoded once by us. paho's own Properties validates
    every attribute on each message and cost more than the rest of a publish;
    paho only ever calls `pack()` on what we hand it."""

    def __init__(self, packed: bytes) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", packed)

    def pack(self) -> bytes:
        packed: bytes = self.__dict__["_packed"]
        return packed

    def __str__(self) -> str:
        return f"PackedProperties({self.__dict__['_packed']!r})"


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_CONTENT_TYPE = b"\x03" + _utf8("application/json")


def publish_properties(event: StatusEvent, v5: bool) -> Properties | None:
    """MQTT v5: content type and event id / status as user properties, so a
    broker's rule engine can route without parsing the payload."""
    if not v5:
        return None
    body = (
        _CONTENT_TYPE
        + b"\x26"
        + _utf8("event_id")
        + _utf8(event.event_id)
        + b"\x26"
        + _utf8("status")
        + _utf8(event.status)
    )
    return PackedProperties(_varint(len(body)) + body)


@dataclass
class Connection:
    client: CheckedClient
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class MqttLink:
    """Keeps one connection to the broker; publishers borrow the current one."""

    def __init__(
        self,
        settings: Settings,
        service: Service,
        *,
        subscriptions: Sequence[str] = (),
        handler: Handler | None = None,
    ) -> None:
        self.settings = settings
        self.service = service
        self.subscriptions = list(subscriptions)
        self.handler = handler
        self.v5 = settings.mqtt_protocol == "5"
        persistent = bool(settings.mqtt_client_id)
        self._identifier = settings.mqtt_client_id or default_client_id("daemon")
        self._persistent = persistent
        self._current: Connection | None = None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        await supervise("mqtt", self.service, self._session)

    async def _session(self) -> None:
        client = make_client(self.settings, identifier=self._identifier, persistent=self._persistent)
        if self.handler is not None:
            # PUBACK a message only once the handler has applied it to Redis,
            # so the broker redelivers what a crash or an outage interrupted.
            client._client.manual_ack_set(True)
        try:
            async with client:
                for topic in self.subscriptions:
                    granted = await client.subscribe(topic, qos=1)
                    if any(_is_failure(code) for code in granted):
                        log.error(
                            "the broker refused the subscription; logistics messages will not arrive",
                            topic=topic,
                            reason=[str(code) for code in granted],
                            fix="allow this user to subscribe to the topic (broker ACL)",
                        )
                connection = Connection(client)
                self._current = connection
                self.connected.set()
                self.subscribed.set()
                self.service.ok()
                log.info(
                    "mqtt connected",
                    broker=mqtt_target(self.settings.mqtt_url).shown,
                    subscriptions=self.subscriptions,
                )
                try:
                    async for message in client.messages:
                        if self.handler is not None:
                            await self.handler(message)
                            client._client.ack(message.mid, message.qos)
                finally:
                    connection.lost.set()
                    self.connected.clear()
                    self._current = None
        finally:
            self.connected.clear()

    async def connection(self) -> Connection:
        while True:
            await self.connected.wait()
            if self._current is not None:
                return self._current

    async def publish(self, events: Sequence[StatusEvent], timeout: float = 10.0) -> None:
        """Publish with QoS 1, in this order, and return once the broker
        acknowledged all of them. Raises MqttError if the connection is lost."""
        if not events:
            return
        connection = await self.connection()
        client = connection.client
        refused_before = len(client.refused)
        prefix = self.settings.topic_prefix
        sends = [
            client.publish(
                event.topic(prefix),
                event.payload(),
                qos=1,
                properties=publish_properties(event, self.v5),
                timeout=timeout,
            )
            for event in events
        ]
        together: asyncio.Future[list[None]] = asyncio.gather(*sends)
        lost: asyncio.Future[bool] = asyncio.ensure_future(connection.lost.wait())
        try:
            done, _ = await asyncio.wait(
                [cast("asyncio.Future[object]", together), cast("asyncio.Future[object]", lost)],
                return_when=asyncio.FIRST_COMPLETED,
            )
            if together not in done:
                together.cancel()
                await asyncio.gather(together, return_exceptions=True)
                raise aiomqtt.MqttError("connection to the broker lost while publishing")
            together.result()
            if len(client.refused) > refused_before:
                reasons = sorted(set(client.refused[refused_before:]))
                raise PublishRefused(
                    f"the broker refused {len(client.refused) - refused_before} publish(es): "
                    f"{', '.join(reasons)}"
                )
        finally:
            lost.cancel()
            if not together.done():
                together.cancel()
                await asyncio.gather(together, return_exceptions=True)
