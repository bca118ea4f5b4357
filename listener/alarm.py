"""A wake-up for the event loop at a monotonic time, to a tenth of a millisecond.

asyncio sleeps in epoll, which takes its timeout in whole milliseconds and
rounds it up: a timer fires 0-1 ms late, 0.5 ms on average, which is a sixth
of the lag we allow a cancellation. A thread waiting on a condition sleeps to
the microsecond (the kernel's timer slack, 50 us, is the limit) and wakes the
loop through its self-pipe. It sleeps while nothing is due: no busy polling.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable


class Alarm:
    """Calls `callback` in the event loop at the time last `set` (one pending time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._when = math.inf
        self._closed = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="scheduler-alarm", daemon=True)
        self._thread.start()

    def set(self, when: float) -> None:
        """Ring at `when` (time.monotonic() seconds) instead of any earlier setting."""
        with self._changed:
            if when != self._when:
                self._when = when
                self._changed.notify()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        with self._changed:
            while not self._closed:
                delay = self._when - time.monotonic()
                if delay > 0:
                    self._changed.wait(None if math.isinf(delay) else delay)
                    continue
                self._when = math.inf
                try:
                    self._loop.call_soon_threadsafe(self._callback)
                except RuntimeError:  # the loop is closed: nothing left to wake
                    return
