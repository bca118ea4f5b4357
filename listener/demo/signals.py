"""SIGTERM and SIGHUP (the terminal closed) end the demo like Ctrl-C.

While the demo's event loop runs, such a signal cancels it (its finally
blocks stop the daemon and the embedded broker); before and after, it raises
KeyboardInterrupt. Either way the servers it started are stopped on the way
out, and the exit status is 128 + the signal's number (130 for Ctrl-C).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")

CTRL_C_EXIT = 130  # 128 + SIGINT, as shells report it


def stop_signals() -> list[signal.Signals]:
    """The signals that end the demo like Ctrl-C (those this platform has)."""
    names = ("SIGTERM", "SIGHUP")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


class StopSignals:
    """Handlers for `stop_signals()` while in this context (main thread only)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in stop_signals():
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)

    @property
    def exit_code(self) -> int:
        """The exit status of a demo that was interrupted."""
        return CTRL_C_EXIT if self.received is None else 128 + self.received

    async def cancelling(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` (in asyncio.run), cancelled by a stop signal."""
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            return await work
        finally:
            self._loop = self._task = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self._task is not None and self._loop is not None and not self._task.done():
            self._loop.call_soon_threadsafe(self._task.cancel)
            return
        raise KeyboardInterrupt
