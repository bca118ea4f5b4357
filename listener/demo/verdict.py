"""The demo's verdict: pure functions over what happened.

The expectations: each order announced created once; each unpaid order
cancelled exactly once, for its timeout and never before its deadline, and
cancelled in Redis at the end; each paid order announced paid once, never
cancelled, and paid in Redis at the end. Payments that came too late (the
order was cancelled first) count as unpaid. A redelivered event (the same
event id again) is ignored, as subscribers should.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from listener.demo.record import Run, Seen


@dataclass
class Verdict:
    lines: list[str]  # the summary
    problems: list[str]  # broken expectations: none when the demo succeeded

    @property
    def ok(self) -> bool:
        return not self.problems


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(len(ordered) * share)))
    return ordered[rank - 1]


@dataclass
class OrderEvents:
    """The distinct events of one order, by status."""

    created: list[Seen] = field(default_factory=list)
    paid: list[Seen] = field(default_factory=list)
    cancelled: list[Seen] = field(default_factory=list)

    def add(self, event: Seen) -> None:
        if event.status in ("created", "paid", "cancelled"):
            getattr(self, event.status).append(event)


@dataclass
class Timing:
    """When the unpaid orders' cancellations happened, in ms after their deadline."""

    received: list[float] = field(default_factory=list)  # our receive time
    in_redis: list[float] = field(default_factory=list)  # the event's `at` (Redis time)
    in_flight: list[float] = field(default_factory=list)  # receive time - `at`: outbox, MQTT, broker
    early: int = 0  # cancellations before the deadline

    def add(self, cancel: Seen, deadline: int) -> None:
        self.received.append(cancel.received_ms - deadline)
        if cancel.at_ms is not None:
            self.early += cancel.at_ms < deadline
            self.in_redis.append(cancel.at_ms - deadline)
            self.in_flight.append(cancel.received_ms - cancel.at_ms)


def by_order(run: Run) -> dict[str, OrderEvents]:
    """The distinct events (by event id) of each order of the run."""
    out = {oid: OrderEvents() for oid in run.ids}
    for event in run.unique().values():
        out.setdefault(event.order_id, OrderEvents()).add(event)
    return out


def judge(
    run: Run, final: Mapping[str, str], *, daemon_stopped: str | None = None, waited: float = 10.0
) -> Verdict:
    """The summary lines and the broken expectations. `final`: each order's
    status read back from Redis at the end; `daemon_stopped`: why the daemon
    stopped during the demo, if it did; `waited`: the seconds after the last
    deadline the demo waited for every order to settle."""
    events = by_order(run)
    unpaid = run.expected_unpaid()
    problems: list[str] = []
    timing = Timing()
    for oid in run.ids:
        problems += created_problems(oid, events[oid])
        if oid in unpaid:
            problems += unpaid_problems(oid, events[oid], run.deadline_of[oid], final.get(oid))
            for cancel in events[oid].cancelled:
                timing.add(cancel, run.deadline_of[oid])
        else:
            problems += paid_problems(oid, events[oid], final.get(oid))
    problems += run_problems(run, daemon_stopped, waited)
    return Verdict(summary(run, final, events, timing), problems)


def created_problems(oid: str, events: OrderEvents) -> list[str]:
    if len(events.created) != 1:
        return [f"{oid}: {len(events.created)} 'created' events (expected 1)"]
    return []


def unpaid_problems(oid: str, events: OrderEvents, deadline: int, final: str | None) -> list[str]:
    """An order not paid: cancelled exactly once, for its timeout, not early."""
    problems = []
    if len(events.cancelled) != 1:
        problems.append(f"{oid} (unpaid): {len(events.cancelled)} distinct 'cancelled' events (expected 1)")
    if events.paid:
        problems.append(f"{oid} (unpaid): announced paid")
    for cancel in events.cancelled:
        if cancel.reason != "timeout":
            problems.append(f"{oid}: cancelled with reason {cancel.reason!r}, not timeout")
        if cancel.at_ms is not None and cancel.at_ms < deadline:
            problems.append(f"{oid}: cancelled {deadline - cancel.at_ms} ms BEFORE its deadline")
    if final != "cancelled":
        problems.append(f"{oid} (unpaid): status in Redis is {final!r}, not cancelled")
    return problems


def paid_problems(oid: str, events: OrderEvents, final: str | None) -> list[str]:
    """An order paid in time: paid exactly once and never cancelled."""
    problems = []
    if len(events.paid) != 1:
        problems.append(f"{oid} (paid): {len(events.paid)} distinct 'paid' events (expected 1)")
    if events.cancelled:
        problems.append(f"{oid} (paid): announced cancelled")
    if final != "paid":
        problems.append(f"{oid} (paid): status in Redis is {final!r}, not paid")
    return problems


def run_problems(run: Run, daemon_stopped: str | None, waited: float) -> list[str]:
    """What went wrong with the demo itself rather than with one order."""
    problems = []
    if daemon_stopped is not None:
        problems.append(f"the daemon stopped during the demo: {daemon_stopped}")
    if run.receive_error is not None:
        problems.append(f"the event subscription broke: {run.receive_error}")
    problems += [f"paying {oid} failed: {why}" for oid, why in sorted(run.pay_failed.items())]
    if not run.settled():
        problems.append(
            f"not every order reached its expected status within {waited:g} s of the last deadline"
        )
    return problems


def summary(
    run: Run, final: Mapping[str, str], events: Mapping[str, OrderEvents], timing: Timing
) -> list[str]:
    counts = Counter(final.values())
    lines = [
        f"created   {len(run.ids)}",
        f"paid      {counts['paid']}",
        f"cancelled {counts['cancelled']}",
    ]
    if run.pay_refused:
        lines.append(
            f"{len(run.pay_refused)} payment(s) came too late and were refused "
            "(the order was cancelled first): counted as unpaid"
        )
    unpaid = run.expected_unpaid()
    lines += timing_lines(timing, anything_to_cancel=bool(unpaid))
    once = sum(1 for oid in unpaid if len(events[oid].cancelled) == 1 and final.get(oid) == "cancelled")
    lines.append(
        f"every unpaid order cancelled exactly once: {_yes(once == len(unpaid))} ({once}/{len(unpaid)})"
    )
    stayed = sum(1 for oid in run.ids if oid not in unpaid and final.get(oid) == "paid")
    lines.append(
        f"every paid order stayed paid: {_yes(stayed == len(run.paid_ok))} ({stayed}/{len(run.paid_ok)})"
    )
    redelivered = len(run.events) - len(run.unique())
    if redelivered:
        lines.append(f"({redelivered} redelivered event(s) ignored by event_id, as subscribers should)")
    return lines


def timing_lines(timing: Timing, *, anything_to_cancel: bool) -> list[str]:
    if not timing.received:
        if anything_to_cancel:
            return ["cancelled on time: no cancellation seen"]
        return ["cancelled on time: nothing to cancel, every order was paid"]
    lags = timing.received
    when = f"{timing.early} BEFORE their deadline" if timing.early else "none before its deadline"
    lines = [
        f"cancelled on time: lag after the deadline p50 {percentile(lags, 0.5):.0f} ms, "
        f"p99 {percentile(lags, 0.99):.0f} ms, max {max(lags):.0f} ms; {when}"
    ]
    if timing.in_redis:
        lines.append(
            f"  of which: cancelled in Redis p50 {percentile(timing.in_redis, 0.5):.0f} ms "
            f"after the deadline, then published and received "
            f"p50 {percentile(timing.in_flight, 0.5):.0f} ms later"
        )
    return lines


def _yes(held: bool) -> str:
    return "yes" if held else "NO"
