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
disconnects) stays paho's. `SPEC` declares the path to the registry
(`listener.fastpath`): the versions tested and a check of every private name
used here (`PAHO_NAMES`, and the aiomqtt callbacks `CheckedClient`
overrides). Without them, or after a failure at run time (`on_failure`: the
connection is dropped once and the next one publishes the public way), the
link publishes through paho's public `publish`: slower, same guarantees.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any, Literal, cast

from paho.mqtt import client as mqtt_client
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from listener.fastpath import Spec, Unfit, require
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
_INSTANCE_NAMES = ("_sock", "_out_packet", "_registered_write", "_in_packet", "_last_bytes_received")
# aiomqtt's paho callbacks that listener.mqtt.client.CheckedClient overrides
# (aiomqtt has no public hook for them)
AIOMQTT_NAMES = ("_on_socket_open", "_on_connect", "_on_publish")

READ_SIZE = 65536
QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


def _check() -> None:
    import aiomqtt

    class_names = [name for name in PAHO_NAMES if name not in _INSTANCE_NAMES]
    require(mqtt_client.Client, class_names, "paho.mqtt.client.Client")
    require(mqtt_client.Client(CallbackAPIVersion.VERSION2), _INSTANCE_NAMES, "a paho.mqtt.client.Client")
    require(mqtt_client, ("time_func",), "paho.mqtt.client")
    require(aiomqtt.Client, AIOMQTT_NAMES, "aiomqtt.Client")
    # the paho client aiomqtt makes in __init__ (an instance would need an event loop)
    if "_client" not in aiomqtt.Client.__init__.__code__.co_names:
        raise Unfit("aiomqtt.Client no longer keeps its paho client as _client")


SPEC = Spec("paho-publish", {"paho-mqtt": "2.2", "aiomqtt": "2.5"}, _check)


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
    _on_failure: Callable[[BaseException], None]

    @classmethod
    def adopt(
        cls,
        paho: mqtt_client.Client,
        ours: dict[int, Any],
        on_ack: Callable[[int, int], None],
        on_failure: Callable[[BaseException], None],
    ) -> FastPaho:
        paho.__class__ = cls  # the same object and state; only the methods below differ
        fast = cast(FastPaho, paho)
        fast._rbuf, fast._rpos = b"", 0
        fast._ours, fast._on_ack, fast._on_failure = ours, on_ack, on_failure
        return fast

    def release(self) -> mqtt_client.Client:
        """Back to paho's own class (after a failure): the same object, paho's methods."""
        self.__class__ = mqtt_client.Client  # type: ignore[assignment]
        return self

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
        """Read what the socket has, in 64 KiB chunks, and handle every packet in it.
        A failure of ours (a paho that changed under the same names) must not
        reach aiomqtt, which would drop the connection on every read: the path
        is given up for good and this connection ends once."""
        try:
            return self._read_all()
        except Exception as exc:
            on_failure = self._on_failure
            paho = self.release()
            on_failure(exc)
            return paho._loop_rc_handle(mqtt_client.MQTT_ERR_CONN_LOST)

    def _read_all(self) -> MQTTErrorCode:
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
