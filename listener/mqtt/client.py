"""One MQTT connection: aiomqtt's client, made and checked the way the daemon needs.

`CheckedClient` hands the PUBACKs of our own publishes to the publisher
(`acker`) with their reason code: aiomqtt treats any PUBACK as success, but
an MQTT 5 PUBACK may say "not authorized" or "quota exceeded", and then the
event was not taken. It reads the broker's Receive Maximum from CONNACK, and
turns Nagle's algorithm off on our side. It overrides three of aiomqtt's
paho callbacks (`_on_socket_open`, `_on_connect`, `_on_publish`), which
aiomqtt has no public hook for; the fast path's start-up check
(listener.fastpath.paho_io) covers them.
"""

from __future__ import annotations

import os
import socket
import ssl
import uuid
from collections.abc import Callable
from typing import Any

import aiomqtt
from paho.mqtt import client as mqtt_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from listener.config import Settings
from listener.fastpath import FastPaths, paho_io
from listener.fastpath.paho_io import FastPaho
from listener.urls import mqtt_target

Acker = Callable[[int, int], None]  # (message id, PUBACK reason code)


def protocol_of(settings: Settings) -> aiomqtt.ProtocolVersion:
    return aiomqtt.ProtocolVersion.V5 if settings.mqtt_protocol == "5" else aiomqtt.ProtocolVersion.V311


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a publish with a failure reason code."""


def _no_acker(mid: int, reason: int) -> None:
    """Until a publisher takes the connection, there is nothing of ours to acknowledge."""


class CheckedClient(aiomqtt.Client):
    """aiomqtt's client for the connection; our publishes go to paho directly."""

    def __init__(
        self,
        *args: Any,
        fast_io: bool = True,
        on_fast_failure: Callable[[BaseException], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[int, Any] = {}  # message id -> what the publisher keeps for it
        self.acker: Acker = _no_acker
        self.receive_maximum = 65535  # the broker's (MQTT 5 CONNACK), if it gives one
        self.fast: FastPaho | None = None
        self._on_fast_failure = on_fast_failure
        if fast_io:
            self.fast = FastPaho.adopt(self._client, self.pending, self._route_ack, self._fast_failed)

    def _fast_failed(self, exc: BaseException) -> None:
        """The fast path failed at run time: this connection goes on paho's public way."""
        fast, self.fast = self.fast, None
        if fast is not None and isinstance(fast, FastPaho):
            fast.release()
        if self._on_fast_failure is not None:
            self._on_fast_failure(exc)

    def drop_fast(self, exc: BaseException) -> None:
        self._fast_failed(exc)

    @property
    def paho(self) -> mqtt_client.Client:
        return self._client

    def _route_ack(self, mid: int, reason: int) -> None:
        self.acker(mid, reason)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle's algorithm on: a small batch could wait for the
        # TCP acknowledgement of the one before it
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._on_socket_open(client, userdata, sock)

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None
    ) -> None:
        maximum = getattr(properties, "ReceiveMaximum", None)
        if isinstance(maximum, int) and maximum > 0:
            self.receive_maximum = maximum
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if mid not in self.pending:  # a publish of aiomqtt's own `publish()`
            super()._on_publish(client, userdata, mid, reason_code, properties)
        elif getattr(reason_code, "is_failure", False):
            self.acker(mid, int(reason_code.value))
        else:
            self.acker(mid, 0)


# How long aiomqtt waits for the broker's answer to CONNECT, SUBSCRIBE and
# the like before it gives the session up.
CLIENT_TIMEOUT_S = 10.0


def make_client(
    settings: Settings,
    *,
    identifier: str | None = None,
    persistent: bool = False,
    timeout: float | None = None,
    fast_io: bool = False,
    on_fast_failure: Callable[[BaseException], None] | None = None,
) -> CheckedClient:
    """An aiomqtt client for the configured URL (not yet connected); `fast_io`
    puts our publish path (listener.fastpath.paho_io) on its paho client."""
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
        timeout=CLIENT_TIMEOUT_S if timeout is None else timeout,
        keepalive=15,
        max_inflight_messages=1000,
        fast_io=fast_io,
        on_fast_failure=on_fast_failure,
    )
    client.pending_calls_threshold = 1_000_000  # our publishes are bounded by the window
    return client


def make_publishing_client(
    settings: Settings, fast_paths: FastPaths, *, identifier: str, persistent: bool = False
) -> CheckedClient:
    """A client whose QoS 1 publishes go through a `Publisher` window (the
    daemon's connections, `replay`): on our fast publish path unless
    `fast_paths` decides against it (decided once per registry; a failure at
    run time turns it off for good), and with paho's own in-flight queue off,
    since our window bounds what is in flight and paho's would scan all its
    messages on every PUBACK (only the fallback path uses paho's queue)."""

    def fast_failed(exc: BaseException) -> None:
        fast_paths.fall_back(paho_io.SPEC.name, f"{type(exc).__name__}: {exc}")

    client = make_client(
        settings,
        identifier=identifier,
        persistent=persistent,
        fast_io=fast_paths.decide(paho_io.SPEC).fast,
        on_fast_failure=fast_failed,
    )
    client.paho.max_inflight_messages_set(0)
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


def is_failure(code: object) -> bool:
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
