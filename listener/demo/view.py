"""What the demo shows: a live view on a terminal, one plain line per event
otherwise (CI logs), and the summary at the end.

On a terminal everything fits 80 columns (nothing wraps or is cut off) and
the live view fits the terminal's height: it shows as many of the latest
events as there are rows for. Off a terminal each event and each summary item
is one line, however long, so that logs can be searched line by line.
"""

from __future__ import annotations

import textwrap
import time
from collections import Counter

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from listener.demo.record import Run, Seen
from listener.demo.verdict import Verdict

LATEST = 12  # events shown in the live table, at most
OTHER_ROWS = 13  # the live view's rows besides the events (and one to spare)
SHOWN_PROBLEMS = 20
COLOUR = {"created": "yellow", "paid": "green", "cancelled": "red"}


class Display:
    """Live on a terminal, one plain line per event otherwise."""

    def __init__(self, console: Console, run: Run, *, redis: str, mqtt: str) -> None:
        self.console = console
        self.run = run
        self.redis = redis  # where Redis and MQTT come from, as the view says it
        self.mqtt = mqtt
        self.live_mode = console.is_terminal
        self._live: Live | None = None
        self._printed = 0

    def _line(self, text: str) -> None:
        self.console.print(Text(text), soft_wrap=True)

    def __enter__(self) -> Display:
        if self.live_mode:
            self._live = Live(
                get_renderable=self.render,
                console=self.console,
                refresh_per_second=12,
                transient=False,
            )
            self._live.__enter__()
            return self
        run = self.run
        self._line(f"order-listener demo, run {run.run_id}")
        self._line(f"Redis: {self.redis}")
        self._line(f"MQTT:  {self.mqtt}")
        self._line(
            f"creating {len(run.ids)} orders with a {run.timeout:g} s payment window; "
            f"{len(run.to_pay)} of them get paid"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.refresh()
            live.__exit__(None, None, None)

    def update(self) -> None:
        """Off a terminal: print the events received since the last call."""
        if self.live_mode:
            return
        for event in self.run.events[self._printed :]:
            self._line(self.event_line(event))
        self._printed = len(self.run.events)

    def event_line(self, event: Seen) -> str:
        since = (event.received_ms - self.run.started_ms) / 1000
        previous = event.previous or "-"
        text = (
            f"+{since:7.3f}s  {event.order_id}  {previous} -> {event.status}"
            f"  ({event.reason}, v{event.version})"
        )
        late = self._after_deadline(event)
        if late:
            text += f"  {late} after its deadline"
        return text

    def _after_deadline(self, event: Seen) -> str:
        deadline = self.run.deadline_of.get(event.order_id)
        if event.status != "cancelled" or deadline is None:
            return ""
        return f"{event.received_ms - deadline:+.0f} ms"

    # -- the live view -------------------------------------------------------

    def render(self, now_ms: float | None = None) -> RenderableType:
        """The live view as of `now_ms` (Unix ms; default: now)."""
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        status = self.run.status_of()
        rows = max(1, min(LATEST, self.console.size.height - OTHER_ROWS))
        return Group(
            self._head(),
            Text(""),
            self._tally(status, now_ms),
            self._progress(status),
            Text(self._next_deadline(status, now_ms)),
            Text(""),
            self._latest(rows),
        )

    def _head(self) -> Table:
        head = Table.grid(padding=(0, 2))
        head.add_row(Text("order-listener demo", style="bold"), Text(f"run {self.run.run_id}", style="dim"))
        head.add_row("Redis", self.redis)
        head.add_row("MQTT", self.mqtt)
        return head

    def _tally(self, status: dict[str, str], now_ms: float) -> Table:
        run = self.run
        counts = Counter(status.values())
        elapsed = (now_ms - run.started_ms) / 1000 if run.started_ms else 0.0
        tally = Table(show_header=True, header_style="bold", box=None, padding=(0, 2), pad_edge=False)
        for name in ("orders", "waiting", "paid", "cancelled", "elapsed"):
            tally.add_column(name, justify="right")
        tally.add_row(
            str(len(run.ids)),
            Text(str(counts[""] + counts["created"]), style="yellow"),
            Text(str(counts["paid"]), style="green"),
            Text(str(counts["cancelled"]), style="red"),
            f"{elapsed:5.1f} s",
        )
        return tally

    def _progress(self, status: dict[str, str]) -> Table:
        total = len(self.run.ids)
        done = sum(1 for s in status.values() if s in ("paid", "cancelled"))
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=max(total, 1), completed=done, width=40), f"{done}/{total} settled")
        return bar

    def _next_deadline(self, status: dict[str, str], now_ms: float) -> str:
        deadlines = [self.run.deadline_of.get(oid, 0) for oid, s in status.items() if s in ("", "created")]
        upcoming = [deadline for deadline in deadlines if deadline > now_ms]
        overdue = sum(1 for deadline in deadlines if 0 < deadline <= now_ms)
        if upcoming:
            return f"next deadline in {(min(upcoming) - now_ms) / 1000:5.2f} s"
        if overdue:
            return f"{overdue} past their deadline, not yet announced"
        return "no deadline ahead"

    def _latest(self, rows: int) -> Table:
        """The latest events, one row each (76 columns with 4-digit order numbers)."""
        latest = Table(
            title="latest events",
            title_justify="left",
            header_style="bold",
            box=None,
            padding=(0, 1),
            pad_edge=False,
        )
        latest.add_column("+s", justify="right", no_wrap=True)
        latest.add_column("order", no_wrap=True, overflow="ellipsis")
        latest.add_column("change", no_wrap=True)
        latest.add_column("reason", no_wrap=True)
        latest.add_column("v", justify="right", no_wrap=True)
        latest.add_column("after deadline", justify="right", no_wrap=True)
        for event in self.run.events[-rows:]:
            latest.add_row(
                f"{(event.received_ms - self.run.started_ms) / 1000:.3f}",
                event.order_id,
                Text(f"{event.previous or '-'} -> {event.status}", style=COLOUR.get(event.status, "")),
                event.reason,
                str(event.version),
                self._after_deadline(event),
            )
        return latest


def show_verdict(console: Console, verdict: Verdict) -> None:
    """The summary and what went wrong, if anything."""
    console.print()
    console.print(Text("summary", style="bold"), soft_wrap=True)
    for text in verdict.lines:
        _item(console, text)
    for problem in verdict.problems[:SHOWN_PROBLEMS]:
        _item(console, f"problem: {problem}", "red")
    if len(verdict.problems) > SHOWN_PROBLEMS:
        _item(console, f"... and {len(verdict.problems) - SHOWN_PROBLEMS} more")
    if verdict.problems:
        console.print(Text("result: FAILED", style="bold red"), soft_wrap=True)
    else:
        console.print(Text("result: OK, every expectation held", style="bold green"), soft_wrap=True)


def _item(console: Console, text: str, style: str = "") -> None:
    """One summary item, indented: folded at word boundaries on a terminal
    (its continuation lines indented further), one line otherwise."""
    if console.is_terminal:
        text = textwrap.fill(text, console.width - 1, initial_indent="  ", subsequent_indent="    ")
    else:
        text = f"  {text}"
    console.print(Text(text, style=style), soft_wrap=True)
