"""The MQTT side: connections kept up with reconnects, publishing in order.

aiomqtt's reconnect pattern is a loop around ``async with Client(...)``; the
link runs that loop, subscribes, hands incoming messages to a handler and
lets publishers wait for the current connection.

Publishing does not go through aiomqtt's `publish` (a coroutine, an Event and
a scan of every pending call per message) nor paho's (a message object with
a lock per publish, a ReasonCode and a Properties object per PUBACK, three
``recv`` per packet, one ``send`` per packet): a batch of events is encoded
here into one buffer of PUBLISH packets handed to paho's socket, and its
PUBACKs resolve one future. aiomqtt and paho still do everything else
(CONNECT, TLS, keepalive, subscriptions, incoming messages, disconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import aiomqtt
from paho.mqtt import client as mqtt_client
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from listener import logs
from listener.config import Settings, mqtt_target
from listener.events import StatusEvent
from listener.orders import Status
from listener.supervise import Service, supervise

log = logs.get("listener.mqtt")

# QoS 1 publishes awaiting PUBACK per connection (fewer if the broker's MQTT 5
# Receive Maximum says so): enough to keep a loopback or LAN link busy.
WINDOW = 1000


Handler = Callable[[aiomqtt.Message], Awaitable[None]]


def protocol_of(settings: Settings) -> aiomqtt.ProtocolVersion:
    return aiomqtt.ProtocolVersion.V5 if settings.mqtt_protocol == "5" else aiomqtt.ProtocolVersion.V311


# paho internals FastPaho relies on (paho-mqtt 2.x); without them the link
# publishes through paho's public `publish` instead (slower, same guarantees).
_PAHO_INTERNALS = ("_sock_recv", "_packet_read", "_packet_queue", "_handle_pubackcomp", "_mid_generate")
FAST_IO_AVAILABLE = all(hasattr(mqtt_client.Client, name) for name in _PAHO_INTERNALS)

READ_SIZE = 65536
PUBLISH_QOS1 = 0x32  # PUBLISH, QoS 1, not retained, not a duplicate
PUBACK = 0x40


class FastPaho(mqtt_client.Client):
    """paho's client with a cheaper path for our QoS 1 publishes.

    paho reads every packet with three ``recv`` calls (type, length, rest),
    sends every packet with its own ``send``, and per publish builds a
    message object with a lock and a condition, and per PUBACK a ReasonCode
    and a Properties object. Here:

    * reads go through a 64 KiB buffer: one ``recv`` serves many packets;
    * `queue_publishes` hands paho one buffer with a whole batch of PUBLISH
      packets (encoded by `encode_publish`): one ``send`` for the batch;
    * the PUBACK of such a publish goes straight to `on_ack(mid, reason)`.

    Everything else (CONNECT, keepalive, SUBSCRIBE, incoming messages, TLS,
    disconnects) stays paho's. The class is put on the paho client aiomqtt
    created (`adopt`), so aiomqtt keeps managing the connection."""

    _rbuf: bytes
    _rpos: int
    _ours: dict[int, Any]
    _on_ack: Callable[[int, int], None]

    @classmethod
    def adopt(
        cls, paho: mqtt_client.Client, ours: dict[int, Any], on_ack: Callable[[int, int], None]
    ) -> FastPaho:
        paho.__class__ = cls  # the same object and state; only the methods below differ
        fast = cast(FastPaho, paho)
        fast._rbuf, fast._rpos = b"", 0
        fast._ours, fast._on_ack = ours, on_ack
        return fast

    def queue_publishes(self, packets: bytes) -> MQTTErrorCode:
        """Send encoded PUBLISH packets now, as far as the socket takes them;
        the rest goes out when it is writable (paho's writer callback). paho's
        own queueing would always wait for that callback: a wake-up of the
        event loop through its self-pipe and two epoll changes per batch."""
        if self._sock is None:
            return mqtt_client.MQTT_ERR_NO_CONN
        self._out_packet.append(
            {
                "command": PUBLISH_QOS1,
                "mid": 0,
                "qos": 1,
                "pos": 0,
                "to_process": len(packets),
                "packet": packets,
                "info": None,
            }
        )
        if self._registered_write:  # earlier packets wait for the socket: these go after them
            return mqtt_client.MQTT_ERR_SUCCESS
        return self.loop_write()

    def next_mid(self) -> int:
        return self._mid_generate()

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """Read what the socket has, in 64 KiB chunks, and handle every packet in it."""
        while self._sock is not None:
            if self._rpos >= len(self._rbuf):
                try:
                    data = super()._sock_recv(READ_SIZE)
                except BlockingIOError:
                    return mqtt_client.MQTT_ERR_SUCCESS
                except OSError:  # reset, TLS error: paho's reader would say the same
                    return self._loop_rc_handle(mqtt_client.MQTT_ERR_CONN_LOST)
                if not data:  # the broker closed the connection
                    return self._loop_rc_handle(mqtt_client.MQTT_ERR_CONN_LOST)
                self._rbuf, self._rpos = data, 0
            if self._in_packet["command"] == 0:
                self._take_acks()
            if self._rpos < len(self._rbuf):
                rc = self._packet_read()  # one packet (or its start) from the buffer
                if rc > 0:
                    return self._loop_rc_handle(rc)
        return mqtt_client.MQTT_ERR_NO_CONN

    def _take_acks(self) -> None:
        """Handle the PUBACKs of our publishes at the head of the buffer (the common case)."""
        buf, pos, end = self._rbuf, self._rpos, len(self._rbuf)
        ours, on_ack = self._ours, self._on_ack
        start = pos
        while pos + 4 <= end and buf[pos] == PUBACK:
            length = buf[pos + 1]
            if length < 2 or length > 127 or pos + 2 + length > end:
                break  # a long or incomplete packet: paho's reader takes it
            mid = (buf[pos + 2] << 8) | buf[pos + 3]
            if mid not in ours:
                break
            pos += 2 + length
            on_ack(mid, buf[pos - length + 2] if length > 2 else 0)
        if pos != start:
            self._rpos = pos
            self._last_bytes_received = mqtt_client.time_func()

    def _sock_recv(self, bufsize: int) -> bytes:
        """paho's reads come from the buffer; loop_read refills it."""
        pos = self._rpos
        if pos >= len(self._rbuf):
            raise BlockingIOError
        self._rpos = pos + bufsize
        return self._rbuf[pos : pos + bufsize]

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd == "PUBACK" and len(packet) >= 2:
            mid = (packet[0] << 8) | packet[1]
            if mid in self._ours:
                self._on_ack(mid, packet[2] if len(packet) > 2 else 0)
                return mqtt_client.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()


def encode_publish(topic: bytes, mid: int, properties: bytes | None, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH packet; `properties` (MQTT 5) already length-prefixed, None for 3.1.1."""
    props = properties if properties is not None else b""
    remaining = 4 + len(topic) + len(props) + len(payload)
    head = (_PUBLISH_BYTE, _length(remaining), len(topic).to_bytes(2, "big"), topic, mid.to_bytes(2, "big"))
    return b"".join((*head, props, payload))


class _Batch:
    """One `publish` call's messages on one connection: done at the last PUBACK."""

    __slots__ = ("future", "refused", "remaining")

    def __init__(self, future: asyncio.Future[None], remaining: int) -> None:
        self.future = future
        self.remaining = remaining
        self.refused: list[str] = []


class CheckedClient(aiomqtt.Client):
    """aiomqtt's client for the connection; our publishes go to paho directly.

    aiomqtt's `publish` costs a coroutine, an Event, a `wait_for` and a scan of
    all pending calls per message. `Publisher` hands a whole batch to paho and
    waits on one future, resolved by the PUBACKs of its message ids. It also
    keeps the broker's refusals: aiomqtt treats any PUBACK as success, but an
    MQTT 5 PUBACK may say "not authorized" or "quota exceeded", and then the
    event was not taken."""

    def __init__(self, *args: Any, fast_io: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: dict[int, _Batch] = {}  # message id -> the batch awaiting its PUBACK
        self.receive_maximum = 65535  # the broker's (MQTT 5 CONNACK), if it gives one
        self.fast: FastPaho | None = None
        if fast_io and FAST_IO_AVAILABLE:
            self.fast = FastPaho.adopt(self._client, self.batches, self._ack)

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        # paho leaves Nagle's algorithm on: a small batch could wait for the
        # TCP acknowledgement of the one before it (on loopback the measured
        # effect was within the noise; on a network it is the usual setting)
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
        if mid not in self.batches:  # a publish of aiomqtt's own `publish()`
            super()._on_publish(client, userdata, mid, reason_code, properties)
        elif getattr(reason_code, "is_failure", False):
            self._ack(mid, int(reason_code.value))
        else:
            self._ack(mid, 0)

    def _ack(self, mid: int, reason: int) -> None:
        batch = self.batches.pop(mid)
        if reason >= 0x80:
            batch.refused.append(str(ReasonCode(PacketTypes.PUBACK, identifier=reason)))
        batch.remaining -= 1
        if batch.remaining == 0 and not batch.future.done():
            batch.future.set_result(None)


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


def _length(value: int) -> bytes:
    """An MQTT variable byte integer (a packet's remaining length, a property length)."""
    if value < 128:
        return bytes((value,))
    if value < 16384:
        return bytes((value & 0x7F | 0x80, value >> 7))
    return _varint(value)


_PUBLISH_BYTE = bytes((PUBLISH_QOS1,))
_CONTENT_TYPE = b"\x03" + _utf8("application/json")
_FIXED_PROPS = _CONTENT_TYPE + b"\x26" + _utf8("event_id")
_STATUS_KEY = b"\x26" + _utf8("status")
_STATUS = {str(status): _utf8(status) for status in Status}


def property_bytes(event: StatusEvent) -> bytes:
    """MQTT v5 PUBLISH properties, length-prefixed: content type and event id /
    status as user properties, so a broker's rule engine can route without
    parsing the payload."""
    event_id = event.event_id.encode()
    status = _STATUS.get(event.status) or _utf8(event.status)
    body = b"".join((_FIXED_PROPS, len(event_id).to_bytes(2, "big"), event_id, _STATUS_KEY, status))
    return _length(len(body)) + body


def publish_properties(event: StatusEvent, v5: bool) -> Properties | None:
    """The same for paho's `publish`."""
    return PackedProperties(property_bytes(event)) if v5 else None


class Publisher:
    """Publishing on one connection, at most `window` messages awaiting PUBACK."""

    def __init__(self, client: CheckedClient, v5: bool, prefix: str, window: int) -> None:
        self.client = client
        self.v5 = v5
        self.prefix = prefix
        self.window = max(1, min(window, client.receive_maximum)) if v5 else max(1, window)
        self.inflight = 0
        self._pending: set[asyncio.Future[None]] = set()
        self._room = asyncio.Event()
        self._lost = ""  # why the connection is gone; empty while it is up

    def fail(self, reason: str) -> None:
        """The connection is gone: every waiting publish raises MqttError."""
        self._lost = reason
        for future in self._pending:
            if not future.done():
                future.set_exception(aiomqtt.MqttError(reason))
        self._room.set()

    async def publish(self, events: Sequence[StatusEvent], timeout: float) -> None:
        refused: list[str] = []
        async with asyncio.timeout(timeout):
            for start in range(0, len(events), self.window):
                chunk = events[start : start + self.window]
                while self.inflight and self.inflight + len(chunk) > self.window:
                    self._room.clear()
                    await self._room.wait()
                    if self._lost:
                        raise aiomqtt.MqttError(self._lost)
                refused += await self._send(chunk)
                if refused:  # no later event may overtake a refused one (the batch is sent again)
                    break
        if refused:
            reasons = sorted(set(refused))
            raise PublishRefused(f"the broker refused {len(refused)} publish(es): {', '.join(reasons)}")

    async def _send(self, events: Sequence[StatusEvent]) -> list[str]:
        if self._lost:
            raise aiomqtt.MqttError(self._lost)
        client = self.client
        batches = client.batches
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = _Batch(future, len(events))
        mids: list[int] = []
        self._pending.add(future)
        self.inflight += len(events)
        try:
            if client.fast is not None:
                self._queue_fast(client.fast, events, batch, mids)
            else:
                self._queue_paho(events, batch, mids)
            await future
            return batch.refused
        finally:
            self._pending.discard(future)
            self.inflight -= len(events)
            if self.inflight <= self.window // 2:
                self._room.set()
            if not future.done():  # lost, timed out or cancelled: forget our message ids
                future.cancel()
                for mid in mids:
                    if batches.get(mid) is batch:
                        del batches[mid]

    def _queue_fast(
        self, fast: FastPaho, events: Sequence[StatusEvent], batch: _Batch, mids: list[int]
    ) -> None:
        prefix, v5, batches = self.prefix, self.v5, self.client.batches
        packets: list[bytes] = []
        for event in events:
            order_id = event.order_id
            if "+" in order_id or "#" in order_id:
                raise ValueError(f"order id {order_id!r} cannot be a topic level")
            mid = fast.next_mid()
            topic = f"{prefix}/{order_id}/status".encode()
            packets.append(encode_publish(topic, mid, property_bytes(event) if v5 else None, event.payload()))
            mids.append(mid)
            batches[mid] = batch
        rc = fast.queue_publishes(b"".join(packets))
        if rc != mqtt_client.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(rc, "Could not publish message")

    def _queue_paho(self, events: Sequence[StatusEvent], batch: _Batch, mids: list[int]) -> None:
        paho, prefix, v5, batches = self.client._client, self.prefix, self.v5, self.client.batches
        for event in events:
            topic = f"{prefix}/{event.order_id}/status"
            info = paho.publish(topic, event.payload(), 1, False, publish_properties(event, v5))
            if info.rc != mqtt_client.MQTT_ERR_SUCCESS:
                raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
            batches[info.mid] = batch
            mids.append(info.mid)


@dataclass
class Connection:
    """The connections of one session, all up together."""

    publishers: list[Publisher]


class MqttLink:
    """Keeps the connections to the broker; publishers borrow the current ones.

    Connection 0 subscribes and receives; with `mqtt_connections` > 1 more
    publish-only connections share the publishing, each taking whole outbox
    lanes (`part`), so an order's events stay on one connection, in order."""

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
        self.count = settings.mqtt_connections
        persistent = bool(settings.mqtt_client_id)
        self._identifier = settings.mqtt_client_id or default_client_id("daemon")
        self._persistent = persistent
        self._current: Connection | None = None
        self.connected = asyncio.Event()
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        await supervise("mqtt", self.service, self._session)

    def _make(self, index: int) -> CheckedClient:
        if index == 0:
            client = make_client(self.settings, identifier=self._identifier, persistent=self._persistent)
        else:  # publish only: no session state worth keeping
            client = make_client(self.settings, identifier=f"{self._identifier}-p{index}")
        # our window bounds what is in flight; paho's own would scan all its
        # messages on every PUBACK (only the fallback path uses paho's queue)
        client._client.max_inflight_messages_set(0)
        return client

    async def _session(self) -> None:
        clients = [self._make(index) for index in range(self.count)]
        main = clients[0]
        if self.handler is not None:
            # PUBACK a message only once the handler has applied it to Redis,
            # so the broker redelivers what a crash or an outage interrupted.
            main._client.manual_ack_set(True)
        async with contextlib.AsyncExitStack() as stack:
            for client in clients:
                await stack.enter_async_context(client)
            for topic in self.subscriptions:
                granted = await main.subscribe(topic, qos=1)
                if any(_is_failure(code) for code in granted):
                    log.error(
                        "the broker refused the subscription; logistics messages will not arrive",
                        topic=topic,
                        reason=[str(code) for code in granted],
                        fix="allow this user to subscribe to the topic (broker ACL)",
                    )
            prefix = self.settings.topic_prefix
            connection = Connection([Publisher(c, self.v5, prefix, WINDOW) for c in clients])
            self._current = connection
            self.connected.set()
            self.subscribed.set()
            self.service.ok()
            log.info(
                "mqtt connected",
                broker=mqtt_target(self.settings.mqtt_url).shown,
                subscriptions=self.subscriptions,
                connections=self.count,
            )
            reason = "connection closed"
            try:
                await self._receive_until_lost(clients)
            except BaseException as exc:  # also a stop (cancelled) or a failing handler
                reason = str(exc) or type(exc).__name__
                raise
            finally:
                for publisher in connection.publishers:
                    publisher.fail(f"connection to the broker lost while publishing ({reason})")
                self.connected.clear()
                self._current = None

    async def _receive_until_lost(self, clients: list[CheckedClient]) -> None:
        """Hand incoming messages to the handler until a connection is lost
        (each client's message iterator raises MqttError then)."""
        tasks = [
            asyncio.ensure_future(self._receive(client, index == 0)) for index, client in enumerate(clients)
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            raise aiomqtt.MqttError("connection to the broker closed")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _receive(self, client: CheckedClient, main: bool) -> None:
        async for message in client.messages:
            if main and self.handler is not None:
                await self.handler(message)
                client._client.ack(message.mid, message.qos)

    async def connection(self) -> Connection:
        while True:
            await self.connected.wait()
            if self._current is not None:
                return self._current

    async def publish(self, events: Sequence[StatusEvent], timeout: float = 10.0, *, part: int = 0) -> None:
        """Publish with QoS 1, in this order, and return once the broker
        acknowledged all of them. `part` (an outbox lane) picks the connection.
        Raises MqttError if the connection is lost or the broker is silent for
        `timeout` seconds, PublishRefused if it refused any."""
        await self.publish_lanes({part: events}, timeout)

    async def publish_lanes(self, lanes: Mapping[int, Sequence[StatusEvent]], timeout: float = 10.0) -> None:
        """`publish` for several outbox lanes at once: the lanes of one
        connection go out as one batch (each lane's events in their order)."""
        if not any(lanes.values()):
            return
        connection = await self.connection()
        publishers = connection.publishers
        batches: dict[int, list[StatusEvent]] = {}
        for part, events in lanes.items():
            if events:
                batches.setdefault(part % len(publishers), []).extend(events)
        try:
            outcomes = await asyncio.gather(
                *(publishers[index].publish(events, timeout) for index, events in batches.items()),
                return_exceptions=True,
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except TimeoutError:
            raise aiomqtt.MqttError("publish timed out: no PUBACK from the broker") from None
