"""paho-mqtt's private parts, used for our QoS 1 publishes: the only module that touches them.

paho reads every packet with three ``recv`` calls (type, length, rest),
sends every packet with its own ``send``, and per publish builds a message
object with a lock and a condition, per PUBACK a ReasonCode and a Properties
object. `FastPaho` is put on the paho client that aiomqtt created (`adopt`:
same object and state, other methods), so aiomqtt keeps managing the
connection, and:

* reads go through a 64 KiB buffer: one ``recv`` serves many packets, and
  the PUBACKs of our publishes at its head go straight to `on_ack(mid, reason)`;
* `queue_publishes` writes one buffer with a whole batch of PUBLISH packets;
* after each read the socket is told to acknowledge at once (``TCP_QUICKACK``,
  Linux): a broker with Nagle's algorithm on (mosquitto's default) holds its
  next PUBACK back until our TCP acknowledgement of the one before arrives,
  which delayed acknowledgement would put off by up to 40 ms.

Everything else (CONNECT, keepalive, SUBSCRIBE, incoming messages, TLS,
disconnects) stays paho's. `PAHO_NAMES` lists every private name used here;
`missing_names()` checks them at start, and without them the link publishes
through paho's public `publish` (slower, same guarantees).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any, Literal, cast

from paho.mqtt import client as mqtt_client
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from listener.mqtt.packets import PUBACK, PUBLISH_QOS1

# Every private name of paho's Client this module reads, calls or overrides.
PAHO_NAMES = (
    "_sock",
    "_out_packet",
    "_registered_write",
    "_mid_generate",
    "_sock_recv",
    "_packet_read",
    "_loop_rc_handle",
    "_in_packet",
    "_handle_pubackcomp",
    "_sock_close",
    "_last_bytes_received",
)
# paho 2.x keeps these per instance (set in __init__): checked on an instance
_INSTANCE_NAMES = frozenset(
    {"_sock", "_out_packet", "_registered_write", "_in_packet", "_last_bytes_received"}
)
TESTED = {"paho-mqtt": "2.2"}  # the minor versions this module was tested with

READ_SIZE = 65536
QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def missing_names() -> list[str]:
    """The private names this module needs that this paho lacks (empty: all there)."""
    probe = mqtt_client.Client(CallbackAPIVersion.VERSION2)
    missing = [
        name
        for name in PAHO_NAMES
        if not hasattr(probe if name in _INSTANCE_NAMES else mqtt_client.Client, name)
    ]
    if not hasattr(mqtt_client, "time_func"):
        missing.append("paho.mqtt.client.time_func")
    return missing


def quickack(sock: object) -> None:
    """Ask the kernel to acknowledge received data now (it falls back to
    delayed acknowledgement by itself after a while: set again after each read)."""
    if QUICKACK is not None and isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):  # a socket that went away meanwhile
            sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


class FastPaho(mqtt_client.Client):
    """paho's client with a cheaper path for our QoS 1 publishes (see the module)."""

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
                quickack(self._sock)
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


_usable: bool | None = None


def usable() -> bool:
    """Whether this paho has every private name the fast path needs (checked once, logged once)."""
    global _usable
    if _usable is None:
        from listener import logs

        missing = missing_names()
        _usable = not missing
        log = logs.get("listener.fastpath")
        if missing:
            log.warning("fast path: paho-publish fallback", missing=missing)
        else:
            log.info("fast path: paho-publish fast")
    return _usable
