"""Order rules as plain data: statuses, reasons, the transition table, validation.

No Redis and no MQTT here. The Lua scripts in `listener/scripts/` enforce the
same table atomically; `tests/test_rules.py` checks the table cell by cell and
`tests/test_property.py` checks the scripts against a model built from it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum

from listener.errors import BadInput

ORDER_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
MIN_TIMEOUT_MS = 100
MAX_TIMEOUT_MS = 30 * 24 * 3600 * 1000


class Status(StrEnum):
    CREATED = "created"
    PAID = "paid"
    DELIVERED = "delivered"
    REFUNDED = "refunded"
    CANCELLED = "cancelled"


class Reason(StrEnum):
    CREATED = "created"
    PAID = "paid"
    TIMEOUT = "timeout"
    CUSTOMER = "customer"
    DELIVERED = "delivered"
    REFUND = "refund"
    LOGISTICS = "logistics"
    RETURNED = "returned"
    EXTENDED = "extended"  # still `created`, with a later deadline


class Operation(StrEnum):
    """What a caller (or the clock, or logistics) asks of an order."""

    PAY = "pay"
    CANCEL = "cancel"
    EXPIRE = "expire"
    DELIVER = "deliver"
    REFUND = "refund"
    LOGISTICS_DELIVERED = "logistics-delivered"
    LOGISTICS_RETURNED = "logistics-returned"


@dataclass(frozen=True)
class Rule:
    """One row of the contract's transition table.

    `steps` are the statuses the order goes through, in order, each with its
    own event; `already` lists (status, reason-or-None) pairs for which the
    operation counts as repeated: it succeeds and changes nothing.
    """

    sources: frozenset[Status]
    steps: tuple[Status, ...]
    reason: Reason
    already: frozenset[tuple[Status, Reason | None]]


_REFUNDED_REASONS = (Reason.REFUND, Reason.RETURNED)

RULES: dict[Operation, Rule] = {
    Operation.PAY: Rule(
        frozenset({Status.CREATED}),
        (Status.PAID,),
        Reason.PAID,
        frozenset({(Status.PAID, None), (Status.DELIVERED, None)}),
    ),
    Operation.CANCEL: Rule(
        frozenset({Status.CREATED}),
        (Status.CANCELLED,),
        Reason.CUSTOMER,
        frozenset({(Status.CANCELLED, None)}),
    ),
    Operation.EXPIRE: Rule(
        frozenset({Status.CREATED}),
        (Status.CANCELLED,),
        Reason.TIMEOUT,
        frozenset({(Status.CANCELLED, None)}),
    ),
    Operation.DELIVER: Rule(
        frozenset({Status.PAID}),
        (Status.DELIVERED,),
        Reason.DELIVERED,
        frozenset({(Status.DELIVERED, None)}),
    ),
    Operation.LOGISTICS_DELIVERED: Rule(
        frozenset({Status.PAID}),
        (Status.DELIVERED,),
        Reason.LOGISTICS,
        frozenset({(Status.DELIVERED, None)}),
    ),
    Operation.REFUND: Rule(
        frozenset({Status.PAID, Status.DELIVERED}),
        (Status.REFUNDED, Status.CANCELLED),
        Reason.REFUND,
        frozenset({(Status.REFUNDED, None)} | {(Status.CANCELLED, r) for r in _REFUNDED_REASONS}),
    ),
    Operation.LOGISTICS_RETURNED: Rule(
        frozenset({Status.DELIVERED}),
        (Status.REFUNDED, Status.CANCELLED),
        Reason.RETURNED,
        frozenset({(Status.REFUNDED, None)} | {(Status.CANCELLED, r) for r in _REFUNDED_REASONS}),
    ),
}


class Outcome(StrEnum):
    DONE = "done"
    ALREADY = "already"
    REFUSED = "refused"


def decide(operation: Operation, status: Status, reason: Reason | None) -> Outcome:
    """What `operation` does to an order in `status` whose last reason is `reason`."""
    rule = RULES[operation]
    if status in rule.sources:
        return Outcome.DONE
    if (status, None) in rule.already or (status, reason) in rule.already:
        return Outcome.ALREADY
    return Outcome.REFUSED


def validate_order_id(order_id: str) -> str:
    """Return the id unchanged, or raise BadInput saying what is wrong with it."""
    if not isinstance(order_id, str) or not order_id:
        raise BadInput("order id is empty; use 1 to 128 letters, digits, '-', '_', '.', ':'")
    if len(order_id) > 128:
        raise BadInput(f"order id {order_id[:40]!r}... is {len(order_id)} characters long; at most 128")
    if not ORDER_ID_PATTERN.fullmatch(order_id):
        bad = sorted({c for c in order_id if not ORDER_ID_PATTERN.fullmatch(c)})
        shown = "".join(bad)
        raise BadInput(
            f"order id {order_id!r} has characters that are not allowed ({shown!r}); "
            "use letters, digits, '-', '_', '.', ':'"
        )
    return order_id


def parse_timeout(value: str | float | int) -> int:
    """Seconds (decimals allowed) to whole milliseconds, within 0.1 s .. 30 days."""
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            raise BadInput(f"timeout {value!r} is not a number of seconds (e.g. 1800 or 2.5)") from None
    elif isinstance(value, bool):
        raise BadInput(f"timeout {value!r} is not a number of seconds")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise BadInput(f"timeout {value!r} is not a finite number of seconds")
    ms = round(seconds * 1000)
    if ms < MIN_TIMEOUT_MS or ms > MAX_TIMEOUT_MS:
        raise BadInput(f"timeout {value!r} is out of range: use 0.1 seconds to 30 days (2592000 seconds)")
    return ms


def _seconds(value: str | float | int, what: str) -> float:
    """A finite number of seconds from text or a number, or BadInput naming `what`."""
    if isinstance(value, bool):
        raise BadInput(f"{what} {value!r} is not a number of seconds")
    if isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            raise BadInput(f"{what} {value!r} is not a number of seconds (e.g. 600 or 2.5)") from None
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise BadInput(f"{what} {value!r} is not a finite number of seconds")
    return seconds


def parse_extension(value: str | float | int) -> int:
    """`extend --by`: seconds (decimals allowed) to whole milliseconds, at
    least 1 ms and at most 30 days (the new window is checked in Redis)."""
    ms = round(_seconds(value, "extension") * 1000)
    if ms < 1 or ms > MAX_TIMEOUT_MS:
        raise BadInput(
            f"extension {value!r} is out of range: use more than 0 seconds, at most 30 days (2592000 seconds)"
        )
    return ms


def parse_grace(value: str | float | int) -> int:
    """`resume --grace`: seconds (decimals allowed) to whole milliseconds, 0 .. 30 days."""
    ms = round(_seconds(value, "grace") * 1000)
    if ms < 0 or ms > MAX_TIMEOUT_MS:
        raise BadInput(f"grace {value!r} is out of range: use 0 to 30 days (2592000 seconds)")
    return ms


MAX_PAUSE_TEXT = 250  # characters of a pause's reason or author (at most 1000 bytes: the scripts take 1024)


def validate_pause_text(text: str, what: str) -> str:
    """A pause's reason or author: at most 250 printable characters."""
    if not isinstance(text, str):
        raise BadInput(f"{what} must be text")
    if len(text) > MAX_PAUSE_TEXT:
        raise BadInput(f"{what} is {len(text)} characters long; at most {MAX_PAUSE_TEXT}")
    if not text.isprintable():
        raise BadInput(f"{what} {text[:40]!r} has control characters (a newline, say); use one line of text")
    return text


@dataclass(frozen=True)
class Order:
    """An order as stored: times are Unix milliseconds from the Redis clock."""

    order_id: str
    status: Status
    version: int
    reason: Reason
    created_ms: int
    updated_ms: int
    deadline_ms: int

    @property
    def pending(self) -> bool:
        return self.status is Status.CREATED
