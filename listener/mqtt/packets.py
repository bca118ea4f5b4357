"""MQTT PUBLISH packets for our status events, encoded by hand. Pure.

A batch of events becomes one buffer of QoS 1 PUBLISH packets written with
one ``send``; paho's own `publish` builds a message object with a lock and a
Properties object that validates every attribute, per message.
"""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from listener.events import StatusEvent
from listener.orders import Status

PUBLISH_QOS1 = 0x32  # PUBLISH, QoS 1, not retained, not a duplicate
PUBACK = 0x40


def encode_publish(topic: bytes, mid: int, properties: bytes | None, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH packet; `properties` (MQTT 5) already length-prefixed, None for 3.1.1."""
    props = properties if properties is not None else b""
    remaining = 4 + len(topic) + len(props) + len(payload)
    head = (_PUBLISH_BYTE, _length(remaining), len(topic).to_bytes(2, "big"), topic, mid.to_bytes(2, "big"))
    return b"".join((*head, props, payload))


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


class PackedProperties(Properties):
    """PUBLISH properties encoded once by us, for paho's `publish` (the
    fallback path): paho only ever calls `pack()` on what we hand it."""

    def __init__(self, packed: bytes) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "_packed", packed)

    def pack(self) -> bytes:
        packed: bytes = self.__dict__["_packed"]
        return packed

    def __str__(self) -> str:
        return f"PackedProperties({self.__dict__['_packed']!r})"


def publish_properties(event: StatusEvent, v5: bool) -> Properties | None:
    """`property_bytes` for paho's `publish`."""
    return PackedProperties(property_bytes(event)) if v5 else None


def topic_level_ok(order_id: str) -> bool:
    """Whether an order id can stand as one topic level (no wildcard, no level separator)."""
    # four `in` tests: a generator over the characters costs several times as much, per event
    return (
        bool(order_id)
        and "/" not in order_id
        and "+" not in order_id
        and "#" not in order_id
        and "\0" not in order_id
    )
