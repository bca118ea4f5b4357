"""What the demo did and saw: its orders, their deadlines, the payments and
every status event received. Filled in while the demo runs; the view shows
it and the verdict judges it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

from listener.events import parse_payload


@dataclass(frozen=True)
class Seen:
    """One status event as received, with our receive time (Unix ms)."""

    event_id: str
    order_id: str
    status: str
    previous: str | None
    reason: str
    version: int
    at_ms: int | None
    received_ms: float


@dataclass
class Run:
    """The orders of this demo and everything we saw happen to them."""

    run_id: str
    ids: list[str]
    timeout: float
    deadline_of: dict[str, int] = field(default_factory=dict)
    to_pay: set[str] = field(default_factory=set)
    paid_ok: set[str] = field(default_factory=set)  # pay succeeded
    pay_refused: dict[str, str] = field(default_factory=dict)  # order -> why (too late)
    pay_failed: dict[str, str] = field(default_factory=dict)  # order -> error
    receive_error: str | None = None  # the subscription broke
    events: list[Seen] = field(default_factory=list)
    started_ms: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set on every change above

    def mine(self, order_id: str) -> bool:
        return order_id.startswith(f"demo-{self.run_id}-")

    def record(self, event: Seen) -> None:
        self.events.append(event)
        self.changed.set()

    def unique(self) -> dict[str, Seen]:
        """Events by event id (the first receipt of each)."""
        out: dict[str, Seen] = {}
        for event in self.events:
            out.setdefault(event.event_id, event)
        return out

    def status_of(self) -> dict[str, str]:
        """Each order's status after its highest version seen ('' if none yet)."""
        best: dict[str, Seen] = {}
        for event in self.unique().values():
            if event.order_id not in best or event.version > best[event.order_id].version:
                best[event.order_id] = event
        return {oid: best[oid].status if oid in best else "" for oid in self.ids}

    def expected_unpaid(self) -> set[str]:
        return set(self.ids) - self.paid_ok

    def settled(self) -> bool:
        """Every paid order announced paid and every other one announced cancelled
        (or a pay is still to come)."""
        if len(self.paid_ok) + len(self.pay_refused) + len(self.pay_failed) < len(self.to_pay):
            return False
        status = self.status_of()
        return all(status[oid] == ("paid" if oid in self.paid_ok else "cancelled") for oid in self.ids)


def _unix_ms(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return round(moment.timestamp() * 1000)


def event_of(payload: bytes, received_ms: float) -> Seen | None:
    """A received status event, or None if the payload is not one."""
    try:
        body = parse_payload(payload)
        version = body.get("version")
        return Seen(
            event_id=str(body["event_id"]),
            order_id=str(body["order_id"]),
            status=str(body["status"]),
            previous=None if body.get("previous") is None else str(body.get("previous")),
            reason=str(body.get("reason")),
            version=version if isinstance(version, int) else 0,
            at_ms=_unix_ms(body.get("at")),
            received_ms=received_ms,
        )
    except (ValueError, KeyError, TypeError):
        return None
