"""Outages and reconnects: one warning per outage, one info line when back,
capped exponential backoff with full jitter between attempts (``backoff``).

Each long-lived task runs its body through `supervise`; the body reports
`Service.ok()` once its connection works, which ends the outage and resets
the backoff. The first task back wakes every task still waiting out its
backoff, so an outage ends for all of them when it ends for one (a scheduler
in a long wait would otherwise cancel late after a short Redis restart). A
task is woken so once an outage: on a Redis Cluster with one node down the
others keep reaching "redis", and the tasks of the lost node must keep to
their backoff instead of retrying at each of those successes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import aiomqtt
import backoff

from listener import logs
from listener.connection import REDIS_TRANSIENT, redis_lost

log = logs.get("listener.supervise")

# Losing a server is normal: these end a session, never the daemon. What
# losing Redis looks like is told in connection.py (the producer API needs it
# too, without MQTT); here the broker and the network join it.
TRANSIENT: tuple[type[BaseException], ...] = (*REDIS_TRANSIENT, aiomqtt.MqttError, OSError)

# NOSCRIPT after a Redis restart is handled where scripts are called (store.py).


def is_transient(exc: BaseException) -> bool:
    """Losing a server, or a server in the middle of a failover."""
    return isinstance(exc, TRANSIENT) or redis_lost(exc)


T = TypeVar("T")

STABLE_AFTER = 10.0  # seconds up before an outage counts as new (backoff starts over)


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


class Service:
    """The state of one dependency ("redis" or "mqtt"), shared by every task using it."""

    def __init__(self, name: str, *, url: str = "", fix: str = "") -> None:
        self.name = name
        self.url = url  # where it is (password hidden), and what to do while it is down: for the warning
        self.fix = fix
        self.up = False
        self.generation = 0  # rises each time the service comes (back) up
        self.reconnects = 0
        self._down_since: float | None = None
        self.up_since = 0.0  # monotonic time it last came up
        self._back = asyncio.Event()  # set (and replaced) each time the service comes back

    def ok(self) -> None:
        if self.up:
            return
        self.up = True
        self.generation += 1
        self.up_since = time.monotonic()
        self._back.set()
        self._back = asyncio.Event()
        if self._down_since is not None:
            self.reconnects += 1
            log.info(
                f"{self.name} is back",
                service=self.name,
                outage_s=round(time.monotonic() - self._down_since, 3),
            )
            self._down_since = None

    def failed(self, exc: BaseException, task: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            where = {"url": self.url, "fix": self.fix} if self.url else {}
            log.warning(
                f"{self.name} unavailable; retrying with backoff",
                service=self.name,
                task=task,
                error=describe(exc),
                **where,
            )
        self.up = False

    async def wait_back(self, timeout: float) -> bool:
        """Sleep `timeout` seconds, less if another task reaches the service
        meanwhile; whether it was less."""
        try:
            await asyncio.wait_for(self._back.wait(), timeout)
        except TimeoutError:
            return False
        return True


def delays(cap: float) -> Iterator[float]:
    """Capped exponential backoff with full jitter (seconds), from 50 ms."""
    expo = backoff.expo(base=2, factor=0.05, max_value=cap)
    next(expo)  # the generator's first value is a priming None
    for delay in expo:
        yield backoff.full_jitter(delay)


async def supervise(
    task: str,
    service: Service,
    body: Callable[[], Awaitable[T]],
    *,
    cap: float = 5.0,
) -> T:
    """Run `body` until it returns (its result is ours); after a transient
    failure wait and run it again. The body reports `service.ok()` itself once
    it reached the service (a body may return without touching it)."""
    waits = delays(cap)
    seen = service.generation
    retried_in = -1  # the generation in which we last retried at once
    may_wake = True  # not woken early yet in this outage
    while True:
        started = time.monotonic()
        try:
            result = await body()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() - started > STABLE_AFTER:
                # this task's session worked for a while: a new outage for it,
                # whatever the shared service's state says (on a cluster others
                # may have kept "redis" up throughout)
                waits = delays(cap)
                may_wake = True
            if service.up and service.generation != retried_in:
                # Others reach the service: most likely a pooled connection
                # that went stale in an outage that has ended. Try again at
                # once, without an outage warning or the old outage's backoff.
                retried_in = service.generation
                log.debug("retrying at once", service=service.name, task=task, error=describe(exc))
                continue
            if service.generation != seen:
                seen = service.generation
                if time.monotonic() - service.up_since > STABLE_AFTER:  # it worked for a while: a new outage
                    waits = delays(cap)
                    may_wake = True
            service.failed(exc, task)
            if may_wake:
                may_wake = not await service.wait_back(next(waits))
            else:
                await asyncio.sleep(next(waits))
        else:
            return result
