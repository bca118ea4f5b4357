"""Bulk input read from stdin with ``-``. Pure parsing.

`create -`: one order a line, ``ORDER_ID [TIMEOUT]``; `pay -`, `cancel -`,
`deliver -`, `refund -`: one ``ORDER_ID`` a line. Blank lines and lines
starting with ``#`` are skipped. A malformed line (bad id, bad timeout, extra
fields) is reported with its line number and nothing at all is written, so a
fixed file can simply be loaded again. For `create`, an id that appears twice
is refused on its second line, like an id that exists in Redis; a transition
of an id seen before is applied again, and reported as the repeat it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


@dataclass(frozen=True)
class IdLine:
    number: int
    order_id: str


@dataclass
class ParsedIds:
    lines: list[IdLine] = field(default_factory=list)
    bad: list[Problem] = field(default_factory=list)  # malformed: nothing is written


def _records(text_lines: Iterable[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each line that is not blank or a comment."""
    for number, raw in enumerate(text_lines, start=1):
        text = raw.strip()
        if text and not text.startswith("#"):
            yield number, text.split()


def parse_ids(text_lines: Iterable[str]) -> ParsedIds:
    parsed = ParsedIds()
    for number, fields in _records(text_lines):
        if len(fields) > 1:
            parsed.bad.append(Problem(number, fields[0], f"expected one ORDER_ID, got {len(fields)} fields"))
            continue
        try:
            parsed.lines.append(IdLine(number, validate_order_id(fields[0])))
        except BadInput as exc:
            parsed.bad.append(Problem(number, fields[0], str(exc)))
    return parsed


def parse_lines(text_lines: Iterable[str], default_timeout_ms: int) -> Parsed:
    parsed = Parsed()
    first_seen: dict[str, int] = {}
    for number, fields in _records(text_lines):
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
