"""The demo's view (listener/demo/view.py), rendered here without servers:
on a terminal of 80 columns nothing wraps or is cut off, and the live view
fits the terminal's height; off a terminal each line stays whole."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from listener.demo.record import Run, Seen
from listener.demo.verdict import Verdict
from listener.demo.view import LATEST, Display, show_verdict

LONGEST_REDIS = "valkey-server (embedded) started on 127.0.0.1:65535"
LONGEST_MQTT = "amqtt (embedded, MQTT 3.1.1) on 127.0.0.1:65535"


def terminal(width: int, height: int = 24) -> Console:
    return Console(
        file=io.StringIO(), width=width, height=height, force_terminal=True, color_system=None, record=True
    )


NOW = float(round(time.time() * 1000))


def busy_run(overdue: bool) -> Run:
    """The widest content the view can get: 1,000 orders (4-digit numbers),
    100 s into the run, the last 40 cancelled 12 s after their deadline; the
    others wait for a deadline ahead or, with `overdue`, past (the longest
    "next" line)."""
    now = NOW
    run = Run(run_id="5a7c73", ids=[f"demo-5a7c73-{n:03d}" for n in range(1, 1001)], timeout=90.0)
    run.started_ms = now - 100_000
    run.to_pay = set(run.ids[:250])
    waiting, cancelled = run.ids[:-40], run.ids[-40:]
    for oid in waiting:
        run.deadline_of[oid] = round(now - 12_000 if overdue else now + 5_000)
    for n, oid in enumerate(run.ids):
        run.record(Seen(f"c{n}", oid, "created", None, "created", 1, None, now - 99_000))
    for n, oid in enumerate(cancelled):
        run.deadline_of[oid] = round(now - 12_000)
        run.record(Seen(f"x{n}", oid, "cancelled", "created", "timeout", 2, None, now))
    return run


def text_of(console: Console, render: object) -> list[str]:
    console.print(render)
    return console.export_text().splitlines()


@pytest.mark.parametrize("overdue", [False, True], ids=["deadlines-ahead", "deadlines-past"])
def test_the_live_view_fits_80_columns_without_wrapping(overdue: bool) -> None:
    run = busy_run(overdue)
    narrow, wide = terminal(80), terminal(300)
    shown = text_of(narrow, Display(narrow, run, redis=LONGEST_REDIS, mqtt=LONGEST_MQTT).render(NOW))
    unbounded = text_of(wide, Display(wide, run, redis=LONGEST_REDIS, mqtt=LONGEST_MQTT).render(NOW))
    assert max(len(line) for line in shown) <= 80, "\n".join(shown)
    # the same lines as with all the room in the world: nothing wrapped, nothing cut
    assert [line.rstrip() for line in shown] == [line.rstrip() for line in unbounded], "\n".join(shown)
    assert not any("…" in line for line in shown)
    assert "demo-5a7c73-1000  created -> cancelled  timeout  2" in "\n".join(shown)
    assert ("past their deadline" in "\n".join(shown)) == overdue


@pytest.mark.parametrize(("height", "rows"), [(24, 11), (50, LATEST), (10, 1)])
def test_the_live_view_fits_the_terminal_height(height: int, rows: int) -> None:
    run = busy_run(overdue=False)
    console = terminal(80, height)
    shown = text_of(console, Display(console, run, redis=LONGEST_REDIS, mqtt=LONGEST_MQTT).render(NOW))
    assert sum(1 for line in shown if "created -> cancelled" in line) == rows
    if height >= 24:
        assert len(shown) < height, "\n".join(shown)


def test_off_a_terminal_every_event_is_one_whole_line() -> None:
    run = busy_run(overdue=False)
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=False, color_system=None)
    display = Display(console, run, redis=LONGEST_REDIS, mqtt=LONGEST_MQTT)
    with display:
        display.update()
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        "order-listener demo, run 5a7c73",
        f"Redis: {LONGEST_REDIS}",
        f"MQTT:  {LONGEST_MQTT}",
        "creating 1000 orders with a 90 s payment window; 250 of them get paid",
    ]
    assert len(lines) == 4 + len(run.events)
    assert lines[-1] == (
        "+100.000s  demo-5a7c73-1000  created -> cancelled  (timeout, v2)  +12000 ms after its deadline"
    )


VERDICT = Verdict(
    [
        "created   12",
        "cancelled on time: lag after the deadline p50 16 ms, p99 19 ms, max 19 ms; none before its deadline",
        "  of which: cancelled in Redis p50 3 ms after the deadline, then published and received "
        "p50 13 ms later",
    ],
    [f"demo-5a7c73-{n:03d} (unpaid): status in Redis is 'created', not cancelled" for n in range(25)],
)


def test_the_summary_folds_to_80_columns_on_a_terminal() -> None:
    console = terminal(80)
    show_verdict(console, VERDICT)
    shown = console.export_text().splitlines()
    assert max(len(line) for line in shown) <= 80
    assert shown[3:5] == [
        "  cancelled on time: lag after the deadline p50 16 ms, p99 19 ms, max 19 ms;",
        "    none before its deadline",
    ]
    assert shown[-2:] == ["  ... and 5 more", "result: FAILED"]
    assert " ".join(line.strip() for line in shown[3:5]) == VERDICT.lines[1]


def test_off_a_terminal_each_summary_item_is_one_line() -> None:
    out = io.StringIO()
    show_verdict(Console(file=out, width=80, force_terminal=False), VERDICT)
    lines = out.getvalue().splitlines()
    assert lines[:5] == ["", "summary", *(f"  {line}" for line in VERDICT.lines)]
    assert lines[5:25] == [f"  problem: {problem}" for problem in VERDICT.problems[:20]]
    assert lines[25:] == ["  ... and 5 more", "result: FAILED"]
    out = io.StringIO()
    show_verdict(Console(file=out, width=80, force_terminal=False), Verdict(["created   1"], []))
    assert out.getvalue().splitlines()[-1] == "result: OK, every expectation held"
