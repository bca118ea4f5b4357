"""The demo's verdict (listener/demo/verdict.py) over runs made up here: no
servers; each broken expectation is put into a run that otherwise holds."""

from __future__ import annotations

import itertools

import pytest

from listener.demo.record import Run, Seen
from listener.demo.verdict import Verdict, judge, percentile

DEADLINE = 1_000_000  # every order's deadline, Unix ms
_ids = itertools.count(1)


def seen(order_id: str, status: str, *, at: int, received: float | None = None, reason: str = "") -> Seen:
    previous = {"created": None, "paid": "created", "cancelled": "created"}[status]
    version = 1 if status == "created" else 2
    default_reason = {"created": "created", "paid": "paid", "cancelled": "timeout"}[status]
    return Seen(
        event_id=f"e{next(_ids)}",
        order_id=order_id,
        status=status,
        previous=previous,
        reason=reason or default_reason,
        version=version,
        at_ms=at,
        received_ms=at + 5 if received is None else received,
    )


def good_run() -> tuple[Run, dict[str, str]]:
    """Four orders: `a` paid in time, `b`, `c`, `d` cancelled 10, 20 and 30 ms
    after their deadline (received 5 ms later); Redis agrees."""
    run = Run(run_id="abc123", ids=["a", "b", "c", "d"], timeout=1.0)
    run.deadline_of = dict.fromkeys(run.ids, DEADLINE)
    run.to_pay = run.paid_ok = {"a"}
    for oid in run.ids:
        run.record(seen(oid, "created", at=DEADLINE - 1000))
    run.record(seen("a", "paid", at=DEADLINE - 500))
    for lag, oid in ((10, "b"), (20, "c"), (30, "d")):
        run.record(seen(oid, "cancelled", at=DEADLINE + lag))
    return run, {"a": "paid", "b": "cancelled", "c": "cancelled", "d": "cancelled"}


def test_a_run_where_everything_held() -> None:
    run, final = good_run()
    verdict = judge(run, final)
    assert verdict == Verdict(
        [
            "created   4",
            "paid      1",
            "cancelled 3",
            "cancelled on time: lag after the deadline p50 25 ms, p99 35 ms, max 35 ms; "
            "none before its deadline",
            "  of which: cancelled in Redis p50 20 ms after the deadline, then published and "
            "received p50 5 ms later",
            "every unpaid order cancelled exactly once: yes (3/3)",
            "every paid order stayed paid: yes (1/1)",
        ],
        [],
    )
    assert verdict.ok


def test_a_cancellation_before_the_deadline() -> None:
    run, final = good_run()
    run.events[-1] = seen("d", "cancelled", at=DEADLINE - 7)
    verdict = judge(run, final)
    assert verdict.problems == ["d: cancelled 7 ms BEFORE its deadline"]
    assert any(line.endswith("; 1 BEFORE their deadline") for line in verdict.lines)
    assert not verdict.ok


def test_a_second_cancellation_counts_but_a_redelivery_does_not() -> None:
    run, final = good_run()
    run.record(run.events[-1])  # the same event again: the broker redelivered it
    assert judge(run, final).ok
    assert (
        judge(run, final).lines[-1] == "(1 redelivered event(s) ignored by event_id, as subscribers should)"
    )

    run.record(seen("d", "cancelled", at=DEADLINE + 40, reason="customer"))  # a distinct event
    verdict = judge(run, final)
    assert verdict.problems == [
        "d (unpaid): 2 distinct 'cancelled' events (expected 1)",
        "d: cancelled with reason 'customer', not timeout",
    ]
    assert "every unpaid order cancelled exactly once: NO (2/3)" in verdict.lines


def test_a_paid_order_that_was_cancelled() -> None:
    run, _ = good_run()
    run.record(seen("a", "cancelled", at=DEADLINE + 1))
    verdict = judge(run, {"a": "cancelled", "b": "cancelled", "c": "cancelled", "d": "cancelled"})
    assert verdict.problems == [
        "a (paid): announced cancelled",
        "a (paid): status in Redis is 'cancelled', not paid",
    ]
    assert "every paid order stayed paid: NO (0/1)" in verdict.lines
    assert "cancelled 4" in verdict.lines


def test_an_unpaid_order_never_cancelled() -> None:
    run, final = good_run()
    del run.events[-1]
    final["d"] = "created"
    verdict = judge(run, final)
    assert verdict.problems == [
        "d (unpaid): 0 distinct 'cancelled' events (expected 1)",
        "d (unpaid): status in Redis is 'created', not cancelled",
        "not every order reached its expected status within 10 s of the last deadline",
    ]


def test_a_payment_refused_as_too_late_counts_as_unpaid() -> None:
    run, final = good_run()
    run.to_pay = {"a", "b"}
    run.pay_refused = {"b": "order b is cancelled (timeout)"}
    verdict = judge(run, final)
    assert verdict.ok
    assert (
        "1 payment(s) came too late and were refused (the order was cancelled first): counted as unpaid"
        in verdict.lines
    )


def test_problems_of_the_run_itself() -> None:
    run, final = good_run()
    run.to_pay = {"a", "b"}
    run.pay_failed = {"b": "Redis is unreachable"}
    run.receive_error = "Disconnected"
    verdict = judge(run, final, daemon_stopped="RuntimeError('boom')", waited=2.5)
    assert verdict.problems == [
        "the daemon stopped during the demo: RuntimeError('boom')",
        "the event subscription broke: Disconnected",
        "paying b failed: Redis is unreachable",
    ]
    run.events = [event for event in run.events if event.order_id != "c"]  # c never announced
    assert judge(run, final, waited=2.5).problems[-1] == (
        "not every order reached its expected status within 2.5 s of the last deadline"
    )


@pytest.mark.parametrize(
    ("paid", "line"),
    [
        ({"a", "b", "c", "d"}, "cancelled on time: nothing to cancel, every order was paid"),
        ({"a"}, "cancelled on time: no cancellation seen"),
    ],
)
def test_no_cancellation_to_time(paid: set[str], line: str) -> None:
    run = Run(run_id="abc123", ids=["a", "b", "c", "d"], timeout=1.0)
    run.deadline_of = dict.fromkeys(run.ids, DEADLINE)
    run.paid_ok = paid
    verdict = judge(run, {})
    assert line in verdict.lines
    assert not any("of which" in text for text in verdict.lines)


def test_a_cancellation_without_a_redis_time() -> None:
    """An event whose `at` could not be read: its receive lag counts, nothing else."""
    run, final = good_run()
    run.events[-1] = Seen("e-x", "d", "cancelled", "created", "timeout", 2, None, DEADLINE - 3)
    verdict = judge(run, final)
    assert verdict.ok  # no Redis time: no proof of an early cancellation
    assert verdict.lines[3].startswith(
        "cancelled on time: lag after the deadline p50 15 ms, p99 25 ms, max 25"
    )


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0], 0.5) == 5.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.0
    assert percentile([float(n) for n in range(1, 101)], 0.99) == 99.0
    assert percentile([1.0, 2.0], 0.0) == 1.0
    assert percentile([1.0, 2.0], 1.0) == 2.0
