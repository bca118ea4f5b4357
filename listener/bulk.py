"""Bulk input (`create -`): one order a line, ``ORDER_ID [TIMEOUT]``. Pure parsing.

Blank lines and lines starting with ``#`` are skipped. A malformed line (bad
id, bad timeout, extra fields) is reported with its line number and nothing
at all is written, so a fixed file can simply be loaded again. An id that
appears twice is refused on its second line, like an id that exists in Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from listener.errors import BadInput
from listener.orders import parse_timeout, validate_order_id


@dataclass(frozen=True)
class Line:
    number: int
    order_id: str
    timeout_ms: int


@dataclass(frozen=True)
class Problem:
    number: int
    order_id: str | None
    message: str

    def __str__(self) -> str:
        return f"line {self.number}: {self.message}"


@dataclass
class Parsed:
    lines: list[Line] = field(default_factory=list)
    bad: list[Problem] = field(default_factory=list)  # malformed: nothing is written
    repeated: list[Problem] = field(default_factory=list)  # an id seen on an earlier line


def parse_lines(text_lines: Iterable[str], default_timeout_ms: int) -> Parsed:
    parsed = Parsed()
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text_lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) > 2:
            parsed.bad.append(
                Problem(number, fields[0], f"expected 'ORDER_ID [TIMEOUT]', got {len(fields)} fields")
            )
            continue
        try:
            order_id = validate_order_id(fields[0])
            timeout_ms = parse_timeout(fields[1]) if len(fields) == 2 else default_timeout_ms
        except BadInput as exc:
            parsed.bad.append(Problem(number, fields[0], str(exc)))
            continue
        if order_id in first_seen:
            parsed.repeated.append(
                Problem(
                    number,
                    order_id,
                    f"order {order_id!r} appears again (first on line {first_seen[order_id]})",
                )
            )
            continue
        first_seen[order_id] = number
        parsed.lines.append(Line(number, order_id, timeout_ms))
    return parsed
