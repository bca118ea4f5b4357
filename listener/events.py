"""Status events: how an outbox entry becomes the MQTT payload. Pure functions.

The Lua scripts append raw fields to the outbox streams (``o`` order id,
``s`` status, ``p`` previous, ``r`` reason, ``v`` version, ``t`` at (Unix ms),
``c`` id of the order's `created` entry (``<Unix ms>-<seq>``), ``d`` the
new deadline (Unix ms) on an `extended` event (status `created`, version 2 on),
and in ``outbox:created`` only ``o`` and ``t`` the timeout (ms): the deadline
is the entry id's millisecond plus the timeout). The JSON is
built here at publish time, so it is the same on every redelivery.

The entries are written by scripts that producers in any language call, and
by older versions of them: every field is checked here, and an entry that
does not make a valid event raises ValueError saying which field is wrong
(the outbox moves it to its lane's dead-letter stream).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from json.encoder import encode_basestring_ascii as _json_str  # what json.dumps uses (C)

from listener.orders import MAX_TIMEOUT_MS, MIN_TIMEOUT_MS, ORDER_ID_PATTERN, Reason, Status

# The latest time `iso_ms` can write (9999-12-31T23:59:59.999Z); Unix ms
# fields outside 0 .. MAX_MS are malformed.
MAX_MS = 253402300799999
MAX_VERSION = 2**53 - 1  # JSON numbers stay exact up to here in every language


def iso_ms(unix_ms: int) -> str:
    """Unix milliseconds as ``2026-11-24T15:00:00.123Z``."""
    return _iso_second(unix_ms // 1000) + f"{unix_ms % 1000:03d}Z"


@lru_cache(maxsize=1024)
def _iso_second(unix_s: int) -> str:
    """Events come in bursts within a few seconds: the date part is mostly cached."""
    return datetime.fromtimestamp(unix_s, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.")


@dataclass(slots=True)
class StatusEvent:
    """One status change as it is published. Treated as a value: nothing
    assigns to one once made (`event_id` is computed from the other fields
    then), and none is hashed. Not a frozen dataclass, which would enforce
    both: one is built for every event on the publish path, and a frozen
    one's ``__init__`` (a generic ``object.__setattr__`` per field) costs
    about twice as much as this whole one."""

    order_id: str
    status: str
    previous: str | None
    reason: str
    version: int
    at_ms: int
    created_ms: int
    deadline_ms: int | None = None
    created_entry: bytes = b""  # id of the `created` outbox entry (events after created)

    # `<order_id>/<created ms>/<version>/<status>/<reason>`, computed once in
    # __init__: the payload and the MQTT 5 properties both carry it. Unique per
    # transition, the same on every redelivery. The creation millisecond keeps
    # ids unique even if an order id is reused after its record's retention ran
    # out. Status and reason keep them unique when Redis loses an acknowledged
    # write (a primary that died before it replicated a `pay`) and the order
    # then goes another way with the same version (cancelled at its deadline):
    # that is another transition, and subscribers that deduplicate by event_id
    # must not drop it. Built from the entry's own fields only (not its stream
    # id: after a failover a lagging clock can give a new entry an id an
    # earlier one had). '/' never occurs in an order id, a status or a reason.
    event_id: str = field(init=False, repr=False, compare=False)

    def __init__(  # written out: the generated one with a __post_init__ costs more
        self,
        order_id: str,
        status: str,
        previous: str | None,
        reason: str,
        version: int,
        at_ms: int,
        created_ms: int,
        deadline_ms: int | None = None,
        created_entry: bytes = b"",
    ) -> None:
        self.order_id = order_id
        self.status = status
        self.previous = previous
        self.reason = reason
        self.version = version
        self.at_ms = at_ms
        self.created_ms = created_ms
        self.deadline_ms = deadline_ms
        self.created_entry = created_entry
        self.event_id = f"{order_id}/{created_ms}/{version}/{status}/{reason}"

    def topic(self, prefix: str) -> str:
        return f"{prefix}/{self.order_id}/status"

    def as_dict(self) -> dict[str, object]:
        body: dict[str, object] = {
            "event_id": self.event_id,
            "order_id": self.order_id,
            "status": self.status,
            "previous": self.previous,
            "reason": self.reason,
            "at": iso_ms(self.at_ms),
            "version": self.version,
        }
        if self.deadline_ms is not None:
            body["deadline"] = iso_ms(self.deadline_ms)
        return body

    def payload(self) -> bytes:
        """The JSON of `as_dict()`, byte for byte what ``json.dumps(...,
        separators=(",", ":"))`` gives, built directly (cheaper: it runs for every event)."""
        previous = "null" if self.previous is None else _json_str(self.previous)
        deadline = "" if self.deadline_ms is None else f',"deadline":"{iso_ms(self.deadline_ms)}"'
        return (
            f'{{"event_id":{_json_str(self.event_id)},"order_id":{_json_str(self.order_id)},'
            f'"status":{_json_str(self.status)},"previous":{previous},"reason":{_json_str(self.reason)},'
            f'"at":"{iso_ms(self.at_ms)}","version":{int(self.version)}{deadline}}}'
        ).encode()


_ORDER_ID = re.compile(ORDER_ID_PATTERN.pattern.encode())
# Field values as stored -> the text of the event (interned: no decoding per entry).
_STATUSES = {str(status).encode(): str(status) for status in Status}
_LATER_STATUSES = {raw: text for raw, text in _STATUSES.items() if text != Status.CREATED}
_REASONS = {str(reason).encode(): str(reason) for reason in Reason}
_ENTRY_ID = re.compile(rb"([0-9]{1,16})-([0-9]{1,19})")  # (Redis refuses a sequence past 2**64-1)
_DIGITS = re.compile(rb"[0-9]{1,16}")


def is_entry_id(value: bytes) -> bool:
    """Is `value` a stream entry id (`<ms>-<seq>`) as the outbox keeps in ``c``?"""
    return _ENTRY_ID.fullmatch(value) is not None


def _shown(value: bytes) -> str:
    """A stored value for an error message: decoded as far as it goes, cut short."""
    text = value[:60].decode(errors="replace")
    return repr(text + "..." if len(value) > 60 else text)


def _field(fields: dict[bytes, bytes], name: bytes, what: str) -> bytes:
    value = fields.get(name)
    if value is None:
        raise ValueError(f"field {name.decode()!r} ({what}) is missing")
    return value


def _order_id(fields: dict[bytes, bytes]) -> str:
    value = _field(fields, b"o", "order id")
    if _ORDER_ID.fullmatch(value) is None:
        raise ValueError(
            f"field 'o' (order id) {_shown(value)} is not 1 to 128 letters, digits, '-', '_', '.', ':'"
        )
    return value.decode("ascii")


def _one_of(fields: dict[bytes, bytes], name: bytes, what: str, known: dict[bytes, str]) -> str:
    value = _field(fields, name, what)
    text = known.get(value)
    if text is None:
        raise ValueError(
            f"field {name.decode()!r} ({what}) {_shown(value)} is not one of {sorted(known.values())}"
        )
    return text


def _number(fields: dict[bytes, bytes], name: bytes, what: str, low: int, high: int) -> int:
    """A whole number written in ASCII digits, within low .. high."""
    value = _field(fields, name, what)
    if not (0 < len(value) <= 16 and value.isdigit()):  # bytes.isdigit: ASCII digits only
        raise ValueError(f"field {name.decode()!r} ({what}) {_shown(value)} is not a whole number")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"field {name.decode()!r} ({what}) {number} is out of range {low} .. {high}")
    return number


def _created_ms(entry_id: bytes, what: str) -> int:
    """The millisecond of a stream entry id `<ms>-<seq>`."""
    match = _ENTRY_ID.fullmatch(entry_id)
    if match is None:
        raise ValueError(f"{what} {_shown(entry_id)} is not a stream entry id <ms>-<seq>")
    created_ms = int(match.group(1))
    if created_ms > MAX_MS:
        raise ValueError(f"{what} {_shown(entry_id)} is out of range")
    return created_ms


def from_created_entry(entry_id: bytes, fields: dict[bytes, bytes]) -> StatusEvent:
    """An entry of ``outbox:created``: its id's millisecond is the creation time.
    Raises ValueError if a field is missing or malformed."""
    order_id, timeout = fields.get(b"o"), fields.get(b"t")
    # The usual case in one expression (a call per field would cost as much as
    # building the event); anything else goes to the checks that name the field.
    if (
        order_id is not None
        and timeout is not None
        and _ORDER_ID.fullmatch(order_id)
        and len(timeout) <= 16
        and timeout.isdigit()  # ASCII digits only (as _DIGITS; no regex per field)
        and (entry := _ENTRY_ID.fullmatch(entry_id))
    ):
        created_ms, timeout_ms = int(entry.group(1)), int(timeout)
        if MIN_TIMEOUT_MS <= timeout_ms <= MAX_TIMEOUT_MS and created_ms + timeout_ms <= MAX_MS:
            return StatusEvent(
                order_id=order_id.decode("ascii"),
                status="created",
                previous=None,
                reason="created",
                version=1,
                at_ms=created_ms,
                created_ms=created_ms,
                deadline_ms=created_ms + timeout_ms,
            )
    created_ms = _created_ms(entry_id, "entry id")
    _order_id(fields)
    timeout_ms = _number(fields, b"t", "timeout ms", MIN_TIMEOUT_MS, MAX_TIMEOUT_MS)
    raise ValueError(f"deadline {created_ms} + {timeout_ms} ms is out of range")


def from_outbox_entry(fields: dict[bytes, bytes]) -> StatusEvent:
    """An entry of ``outbox`` (every transition after `created`).
    Raises ValueError if a field is missing or malformed."""
    get = fields.get
    order_id, version, at, created = get(b"o"), get(b"v"), get(b"t"), get(b"c")
    status = _LATER_STATUSES.get(get(b"s", b""))
    previous = _STATUSES.get(get(b"p", b""))
    reason = _REASONS.get(get(b"r", b""))
    # The usual case in one expression, as in from_created_entry.
    if (
        order_id is not None
        and version is not None
        and at is not None
        and created is not None
        and status is not None
        and previous is not None
        and reason is not None
        and _ORDER_ID.fullmatch(order_id)
        and len(version) <= 16
        and version.isdigit()  # ASCII digits only (as _DIGITS; no regex per field)
        and len(at) <= 16
        and at.isdigit()
        and (entry := _ENTRY_ID.fullmatch(created))
    ):
        version_n, at_ms, created_ms = int(version), int(at), int(entry.group(1))
        if 2 <= version_n <= MAX_VERSION and at_ms <= MAX_MS and created_ms <= MAX_MS:
            return StatusEvent(
                order_id=order_id.decode("ascii"),
                status=status,
                previous=previous,
                reason=reason,
                version=version_n,
                at_ms=at_ms,
                created_ms=created_ms,
                created_entry=created,
            )
    if get(b"s") == b"created":
        return _extended_entry(fields)
    # Say which field is wrong: the first check that fails raises.
    _order_id(fields)
    _one_of(fields, b"s", "status", _LATER_STATUSES)
    _one_of(fields, b"p", "previous status", _STATUSES)
    _one_of(fields, b"r", "reason", _REASONS)
    _number(fields, b"v", "version", 2, MAX_VERSION)
    _number(fields, b"t", "at ms", 0, MAX_MS)
    _created_ms(_field(fields, b"c", "id of the created entry"), "field 'c' (id of the created entry)")
    raise ValueError("outbox entry refused")  # not reached: one of the checks above raises


def _extended_entry(fields: dict[bytes, bytes]) -> StatusEvent:
    """An ``outbox`` entry that leaves the order `created` (extend): previous
    `created`, reason `extended`, version from 2, and ``d`` the new deadline."""
    order_id = _order_id(fields)
    if fields.get(b"r") != b"extended":
        raise ValueError(
            f"field 's' (status) 'created' after the first event is an extension's only: field 'r' "
            f"(reason) is {_shown(fields.get(b'r', b''))}, not 'extended'"
        )
    previous = _one_of(fields, b"p", "previous status", {b"created": "created"})
    reason = "extended"
    version = _number(fields, b"v", "version", 2, MAX_VERSION)
    at_ms = _number(fields, b"t", "at ms", 0, MAX_MS)
    created = _field(fields, b"c", "id of the created entry")
    created_ms = _created_ms(created, "field 'c' (id of the created entry)")
    deadline_ms = _number(fields, b"d", "deadline ms", 0, MAX_MS)
    return StatusEvent(
        order_id=order_id,
        status="created",
        previous=previous,
        reason=reason,
        version=version,
        at_ms=at_ms,
        created_ms=created_ms,
        deadline_ms=deadline_ms,
        created_entry=created,
    )


def packed(event: StatusEvent) -> bytes:
    """The event in the compact form of an order's history item and of an
    event log entry (without the order id, which the history's key names):
    ``<status>|<previous>|<reason>|<version>|<at ms>|<created ms>|<deadline ms>``,
    previous empty for none, deadline empty on events that carry none."""
    previous = event.previous or ""
    deadline = "" if event.deadline_ms is None else event.deadline_ms
    return (
        f"{event.status}|{previous}|{event.reason}|{event.version}|{event.at_ms}|"
        f"{event.created_ms}|{deadline}"
    ).encode()


# The field of an event log entry that holds its events: `logged` values, one
# per line (neither an order id nor `packed` has a line break). Entries written
# before it held them in fields "0", "1", ... (event_log reads both).
LOG_FIELD = b"e"


def logged(event: StatusEvent) -> bytes:
    """An event's value in the event log: the order id, then `packed(event)`."""
    return event.order_id.encode() + b"|" + packed(event)


_ALL_STATUSES = {str(status): str(status) for status in Status}
_ALL_REASONS = {str(reason): str(reason) for reason in Reason}


def from_packed(order_id: str, item: bytes) -> StatusEvent:
    """The event a history item (`packed`) stands for, the same as was
    published (the same event_id and payload). Raises ValueError, saying
    what is wrong, for an item no script writes."""
    parts = item.split(b"|")
    if len(parts) != 7:
        raise ValueError(f"history item {_shown(item)} has {len(parts)} fields, not 7")
    text = [part.decode("ascii", errors="replace") for part in parts]
    status, previous = _ALL_STATUSES.get(text[0]), _ALL_STATUSES.get(text[1])
    reason = _ALL_REASONS.get(text[2])
    if status is None or reason is None or (previous is None and text[1]):
        raise ValueError(f"history item {_shown(item)} has an unknown status, previous status or reason")
    numbers = [_packed_number(value, item) for value in parts[3:6]]
    deadline = _packed_number(parts[6], item) if parts[6] else None
    version, at_ms, created_ms = numbers
    if not 1 <= version <= MAX_VERSION or (previous is None) != (version == 1):
        raise ValueError(f"history item {_shown(item)} has version {version} with previous {text[1]!r}")
    return StatusEvent(
        order_id=order_id,
        status=status,
        previous=previous,
        reason=reason,
        version=version,
        at_ms=at_ms,
        created_ms=created_ms,
        deadline_ms=deadline,
    )


def from_logged(value: bytes) -> StatusEvent:
    """The event of an event log entry (`logged`). Raises ValueError."""
    order_id, _, rest = value.partition(b"|")
    if _ORDER_ID.fullmatch(order_id) is None:
        raise ValueError(f"event log entry {_shown(value)} does not start with an order id")
    return from_packed(order_id.decode("ascii"), rest)


def _packed_number(value: bytes, item: bytes) -> int:
    if _DIGITS.fullmatch(value) is None or int(value) > MAX_MS:
        raise ValueError(f"history item {_shown(item)} has {_shown(value)} where a whole number belongs")
    return int(value)


def parse_payload(payload: bytes) -> dict[str, object]:
    """Decode an event payload (for `watch`, tests and subscribers)."""
    decoded = json.loads(payload)
    if not isinstance(decoded, dict):
        raise ValueError("event payload is not a JSON object")
    return decoded
