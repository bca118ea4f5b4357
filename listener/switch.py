"""The pause switch as the parts store it, read into one picture. Pure.

Each part has its own switch hash (listener/keys.py, ``<prefix>:{P}:pause``)
so that every script finds it in its own Redis Cluster slot; `pause` and
`resume` write all of them. What an operator wants to know is one answer:
is cancellation for timeout paused, since when, why, by whom; or is a resume
holding the overdue orders for a grace. A switch set in some parts only (a
pause or resume cut short on a cluster) is shown as such, so it can be
repeated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from listener.events import iso_ms


@dataclass(frozen=True)
class PartSwitch:
    """One part's switch. `until_ms` is set once resumed with a grace."""

    since_ms: int
    reason: str
    by: str
    resumed_ms: int | None = None
    until_ms: int | None = None

    @property
    def paused(self) -> bool:
        return self.until_ms is None


def _ms(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and len(value) <= 16 else None


def part_switch(fields: Mapping[str, str]) -> PartSwitch | None:
    """A part's switch from its hash fields (None: the part runs as usual).
    Times that are not whole ms (written by hand) count as paused since an
    unknown time (0), as the scripts count them."""
    if "since" not in fields:
        return None
    resumed, until = _ms(fields.get("resumed")), _ms(fields.get("until"))
    return PartSwitch(
        since_ms=_ms(fields["since"]) or 0,
        reason=fields.get("reason", ""),
        by=fields.get("by", ""),
        resumed_ms=resumed if until is not None else None,
        until_ms=until if resumed is not None else None,
    )


@dataclass(frozen=True)
class PauseState:
    """The switches of all parts (None for a part that runs as usual)."""

    parts: Sequence[PartSwitch | None]

    @property
    def paused_parts(self) -> list[PartSwitch]:
        return [part for part in self.parts if part is not None and part.paused]

    @property
    def held_parts(self) -> list[PartSwitch]:
        """Parts resumed with a grace still running."""
        return [part for part in self.parts if part is not None and not part.paused]

    @property
    def paused(self) -> bool:
        return bool(self.paused_parts)

    @property
    def first(self) -> PartSwitch | None:
        """The earliest pause of the paused parts (its reason and author)."""
        return min(self.paused_parts, key=lambda part: part.since_ms, default=None)

    @property
    def holding_until_ms(self) -> int | None:
        return max((part.until_ms or 0 for part in self.held_parts), default=None)

    def describe(self) -> str:
        """One line for `check`, `show` and the logs."""
        first = self.first
        if first is not None:
            why = f"reason: {first.reason}" if first.reason else "no reason given"
            where = (
                ""
                if len(self.paused_parts) == len(self.parts)
                else (
                    f" in {len(self.paused_parts)} of {len(self.parts)} parts "
                    "(repeat the pause or the resume)"
                )
            )
            return (
                f"cancellation for timeout is PAUSED{where} since {iso_ms(first.since_ms)} "
                f"by {first.by or '?'} ({why}); resume with: order-listener resume"
            )
        until = self.holding_until_ms
        if until is not None:
            return f"cancellation resumed; the orders overdue at the resume are cancelled at {iso_ms(until)}"
        return "cancellation for timeout is running (not paused)"

    def as_dict(self) -> dict[str, object]:
        """For `show --json` and /healthz."""
        first = self.first
        if first is not None:
            return {
                "cancellation": "paused",
                "paused_since": iso_ms(first.since_ms),
                "paused_reason": first.reason,
                "paused_by": first.by,
                "paused_parts": len(self.paused_parts),
            }
        until = self.holding_until_ms
        if until is not None:
            return {"cancellation": "resuming", "overdue_cancelled_at": iso_ms(until)}
        return {"cancellation": "running"}
