"""Cancellations before announcements while the scheduler is behind the deadlines.

When a sweep comes back with a full batch, more orders are due than a round
trip cancels: a burst falling due at once, or a catch-up after an outage.
Cancelling them in Redis is what makes them final (a late payment is refused
from then on); their events are safe in the outbox and can follow. Publishing
them meanwhile costs the CPU the sweeps need wherever Redis, the daemon and
the broker share a machine: the daemon reads and parses each event, the
broker and its subscribers take it in, and Redis serves the reads, all while
Redis should be cancelling. So while the scheduler is behind, the outbox
readers read nothing new, for at most `HOLD_MAX_S` from the start of the
catch-up; then they publish beside the sweeps until it ends. What was in
flight goes on being acknowledged. Events wait at most that long, and the
order of each order's events is untouched: they are only held back.

The scheduler calls `begin` and `end`; the outbox readers call `hold_left`
and `wait`. Plain state and one event: no IO.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from listener import logs

log = logs.get("listener.catch_up")

# How long announcements wait at most for a catch-up to end (docs/design.md,
# "Cancellations first"): a burst of 100,000 is cancelled well within it.
HOLD_MAX_S = 2.0


class CatchUp:
    """Whether the scheduler is behind, since when, and for how long more the
    outbox readers hold off. `hold_max_s`: `HOLD_MAX_S` unless given."""

    def __init__(self, hold_max_s: float | None = None) -> None:
        self.hold_max_s = HOLD_MAX_S if hold_max_s is None else hold_max_s
        self.since: float | None = None  # time.monotonic() when the catch-up began; None: not behind
        self.holds = 0  # waits of the outbox readers, for tests and a reader of the code
        self._behind_before = 0.0  # seconds behind in the catch-ups that ended
        self._over = asyncio.Event()
        self._over.set()
        self._said = False  # the cap was logged for this catch-up

    def begin(self) -> None:
        """A sweep came back full: more is due than a round trip cancels."""
        if self.since is None:
            self.since = time.monotonic()
            self._over.clear()
            self._said = False

    def end(self) -> None:
        """The scheduler caught up (or stopped, or failed)."""
        if self.since is not None:
            self._behind_before += time.monotonic() - self.since
            self.since = None
            self._over.set()

    def behind_s(self) -> float:
        """Seconds the scheduler has been behind in all, the current catch-up
        included (order_listener_catch_up_seconds_total)."""
        now = time.monotonic()
        return self._behind_before + (now - self.since if self.since is not None else 0.0)

    def hold_left(self) -> float:
        """Seconds the outbox readers are still to hold off (0: read on)."""
        if self.since is None:
            return 0.0
        return max(0.0, self.since + self.hold_max_s - time.monotonic())

    async def wait(self, stopping: asyncio.Event) -> None:
        """Until the catch-up ends, its hold runs out, or `stopping` is set."""
        left = self.hold_left()
        if left <= 0 or stopping.is_set():
            return
        self.holds += 1
        over = asyncio.ensure_future(self._over.wait())
        stop = asyncio.ensure_future(stopping.wait())
        try:
            # again if the loop's timer fired a hair before the hold's end
            while left > 0 and not (over.done() or stop.done()):
                await asyncio.wait({over, stop}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                left = self.hold_left()
        finally:
            for waiter in (over, stop):
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
        if self.since is not None and not self._said and self.hold_left() <= 0:
            self._said = True
            # a warning: more was due than the sweeps could cancel for this long
            log.warning(
                "still catching up with the deadlines: announcing beside the cancellations from now on",
                behind_s=round(time.monotonic() - self.since, 3),
            )
