"""The async producer API: what a shop's backend calls instead of a subprocess.

    from listener import OrderClient

    async with OrderClient.from_env() as orders:
        await orders.create("A-1001", timeout=900)
        await orders.pay("A-1001")

Every call is one atomic script in Redis; the daemon publishes the events.
`extend` gives one order more time to pay; `pause` and `resume` are the
incident switch (no order is cancelled for timeout while paused).
Errors: BadInput (malformed id or timeout), OrderExists, UnknownOrder,
Refused (the status forbids it; nothing changed), Unavailable (Redis down).
`create_many` and `change_many` do many orders in pipelined round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.exceptions

from listener.config import Settings, load_settings
from listener.connection import RedisClient, open_redis, redis_lost
from listener.errors import BadInput, OrderExists, Refused, Unavailable, UnknownOrder
from listener.orders import (
    Operation,
    Order,
    parse_extension,
    parse_grace,
    parse_timeout,
    validate_order_id,
    validate_pause_text,
)
from listener.store import CreateResult, Store, SwitchResult, TransitionResult
from listener.switch import PauseState
from listener.urls import redis_target


@dataclass(frozen=True)
class Change:
    """The result of a transition that succeeded. `changed` is False for a
    repeated operation (pay of a paid order): nothing was written or published."""

    order_id: str
    status: str
    version: int
    reason: str
    changed: bool


@dataclass(frozen=True)
class Extension:
    """An extended order: still `created`, with its new deadline (Unix ms,
    Redis clock) and the version of its `extended` event."""

    order_id: str
    version: int
    deadline_ms: int


@dataclass(frozen=True)
class Switched:
    """What `pause` or `resume` did: `changed` False when every part was in
    that state already (nothing changed); `at_ms` the time of the pause, or
    when the orders overdue at the resume are cancelled."""

    changed: bool
    parts_changed: int
    at_ms: int


def _switched(results: list[SwitchResult]) -> Switched:
    changed = [result for result in results if result.changed]
    times = [result.at_ms for result in (changed or results) if result.at_ms]
    return Switched(changed=bool(changed), parts_changed=len(changed), at_ms=min(times, default=0))


def default_author() -> str:
    """Who pauses or resumes, when the caller does not say: user@host."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container)
        user = "?"
    return f"{user}@{socket.gethostname()}"[:250]


@dataclass(frozen=True)
class BulkResult:
    created: list[CreateResult]
    existing: list[CreateResult]  # ids already taken: nothing changed for them


_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
    redis.exceptions.SlotNotCoveredError,  # a Redis Cluster in the middle of a failover
)


# What a producer may ask (the clock and logistics do the rest).
_CALLER_OPERATIONS = ("pay", "cancel", "deliver", "refund")


def _outcome(operation: Operation, result: TransitionResult) -> Change | UnknownOrder | Refused:
    if result.outcome == "unknown":
        return UnknownOrder(result.order_id)
    if result.outcome in ("refused", "notdue"):
        return Refused(result.order_id, str(operation), result.status, result.reason)
    return Change(
        order_id=result.order_id,
        status=result.status,
        version=result.version,
        reason=result.reason,
        changed=result.outcome == "done",
    )


class OrderClient:
    def __init__(self, settings: Settings, *, redis: RedisClient | None = None) -> None:
        self.settings = settings
        self._shown = redis_target(settings.redis_url).shown
        self._store = Store.from_settings(settings, redis) if redis is not None else None
        self._opening = asyncio.Lock()

    @classmethod
    def from_env(cls, **overrides: Any) -> OrderClient:
        """Settings from ORDER_LISTENER_* variables, with keyword overrides."""
        return cls(load_settings(**overrides))

    async def __aenter__(self) -> OrderClient:
        await self.opened()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()

    async def opened(self) -> Store:
        """The store, connected on first use: to one Redis, or to a Redis Cluster
        when the configured node is part of one (asked once)."""
        if self._store is None:
            async with self._opening:
                if self._store is None:
                    async with self._reaching_redis():
                        redis = await open_redis(self.settings)
                    self._store = Store.from_settings(self.settings, redis)
        return self._store

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("OrderClient is not open yet: use `async with OrderClient(...)`")
        return self._store

    @contextlib.asynccontextmanager
    async def _reaching_redis(self) -> AsyncIterator[None]:
        try:
            yield
        except _UNAVAILABLE as exc:
            raise Unavailable(
                f"cannot reach Redis at {self._shown}: {exc}; start redis-server there, or point "
                "ORDER_LISTENER_REDIS_URL (--redis-url) at the Redis to use"
            ) from None
        except redis.exceptions.OutOfMemoryError:
            raise Unavailable(
                f"Redis at {self._shown} is full (maxmemory reached, noeviction): nothing was written; "
                "free memory or raise maxmemory"
            ) from None
        except redis.exceptions.ResponseError as exc:  # NOPERM, READONLY, BUSY, ...
            raise Unavailable(f"Redis at {self._shown} refused the operation: {exc}") from None
        except redis.exceptions.AuthenticationError as exc:
            raise Unavailable(f"Redis at {self._shown} refused our credentials: {exc}") from None
        except redis.exceptions.RedisClusterException as exc:
            if not redis_lost(exc):  # cross-slot and the like: a bug, keep its traceback
                raise
            raise Unavailable(
                f"cannot reach the Redis Cluster at {self._shown}: {exc}; check that its nodes are up, "
                "or point ORDER_LISTENER_REDIS_URL (--redis-url) at a node of the cluster to use"
            ) from None

    # -- create ------------------------------------------------------------

    def _timeout_ms(self, timeout: float | str | None) -> int:
        return self.settings.default_timeout_ms if timeout is None else parse_timeout(timeout)

    async def create(self, order_id: str, timeout: float | str | None = None) -> CreateResult:
        """Create one order; raises OrderExists if the id is taken (nothing changes)."""
        validate_order_id(order_id)
        timeout_ms = self._timeout_ms(timeout)
        store = await self.opened()
        async with self._reaching_redis():
            (result,) = await store.create_many([(order_id, timeout_ms)])
        if not result.created:
            raise OrderExists(order_id, result.existing_status or "?")
        return result

    async def create_many(self, orders: Iterable[str | tuple[str, float | str | None]]) -> BulkResult:
        """Create many orders in pipelined batches. Every id and timeout is
        validated first: one bad item raises BadInput and nothing is written.
        Ids that exist already are reported in `existing` and left alone."""
        prepared: list[tuple[str, int]] = []
        for item in orders:
            order_id, timeout = (item, None) if isinstance(item, str) else item
            prepared.append((validate_order_id(order_id), self._timeout_ms(timeout)))
        return await self.create_prepared(prepared)

    async def create_prepared(self, prepared: Sequence[tuple[str, int]]) -> BulkResult:
        """Like create_many for (id, timeout ms) pairs already validated."""
        store = await self.opened()
        async with self._reaching_redis():
            results = await store.create_many(prepared)
        return BulkResult(
            created=[r for r in results if r.created],
            existing=[r for r in results if not r.created],
        )

    # -- transitions ---------------------------------------------------------

    async def _apply(self, operation: Operation, order_id: str) -> Change:
        validate_order_id(order_id)
        store = await self.opened()
        async with self._reaching_redis():
            result = await store.apply(operation, order_id)
        outcome = _outcome(operation, result)
        if not isinstance(outcome, Change):
            raise outcome
        return outcome

    async def change_many(
        self, operation: str, order_ids: Iterable[str]
    ) -> list[Change | UnknownOrder | Refused]:
        """`operation` ("pay", "cancel", "deliver" or "refund") on many orders,
        in pipelined round trips, in the order given. Every id is validated
        first: one bad id raises BadInput and nothing is written. Each result
        is the Change, or the error that the single call would have raised
        (nothing changed for that order)."""
        if operation not in _CALLER_OPERATIONS:
            raise BadInput(f"operation {operation!r} is not one of {', '.join(_CALLER_OPERATIONS)}")
        chosen = Operation(operation)
        ids = [validate_order_id(order_id) for order_id in order_ids]
        store = await self.opened()
        async with self._reaching_redis():
            results = await store.apply_many(chosen, ids)
        return [_outcome(chosen, result) for result in results]

    async def pay(self, order_id: str) -> Change:
        """created -> paid; the timer stops. Repeated on a paid or delivered order."""
        return await self._apply(Operation.PAY, order_id)

    async def cancel(self, order_id: str) -> Change:
        """created -> cancelled (reason customer). Repeated on a cancelled order."""
        return await self._apply(Operation.CANCEL, order_id)

    async def deliver(self, order_id: str) -> Change:
        """paid -> delivered (shipping confirmed). Repeated on a delivered order."""
        return await self._apply(Operation.DELIVER, order_id)

    async def refund(self, order_id: str) -> Change:
        """paid or delivered -> refunded -> cancelled (two events, reason refund)."""
        return await self._apply(Operation.REFUND, order_id)

    async def extend(self, order_id: str, by: float | str) -> Extension:
        """More time to pay: the deadline `by` seconds later (decimals allowed,
        ms precision). Only while the order is `created` and its deadline has
        not passed; the new window, counted from now, is at most 30 days.
        Raises BadInput (malformed `by`, or a window over 30 days), UnknownOrder,
        or Refused: another status; or the deadline passed (then the order is
        cancelled, reason timeout, unless cancellation is paused: then nothing
        changes). Not idempotent: each call adds `by`."""
        validate_order_id(order_id)
        extension_ms = parse_extension(by)
        store = await self.opened()
        async with self._reaching_redis():
            result = await store.extend(order_id, extension_ms)
        if result.outcome == "done":
            return Extension(order_id, result.version, result.deadline_ms)
        if result.outcome == "unknown":
            raise UnknownOrder(order_id)
        if result.outcome == "toolong":
            raise BadInput(
                f"order {order_id!r}: extending by {extension_ms / 1000:.3f}".rstrip("0").rstrip(".")
                + " s would leave more than 30 days "
                "to pay; nothing changed"
            )
        if result.outcome == "late":
            raise Refused(
                order_id, "extend", result.status, "its deadline passed while cancellation is paused"
            )
        raise Refused(order_id, "extend", result.status, result.reason)

    # -- the pause switch ----------------------------------------------------------

    async def pause(self, reason: str = "", by: str | None = None) -> Switched:
        """Pause cancellation for timeout, for every daemon, until `resume`.
        Orders keep their deadlines; payments after the deadline are accepted.
        Repeating it changes nothing (`changed` False)."""
        validate_pause_text(reason, "reason")
        author = validate_pause_text(by if by is not None else default_author(), "by")
        store = await self.opened()
        async with self._reaching_redis():
            return _switched(await store.pause(reason, author or "?"))

    async def resume(self, grace: float | str = 0) -> Switched:
        """Resume cancellation for timeout. The unpaid orders whose deadline
        passed are cancelled `grace` seconds from now (0: at once); the others
        at their deadline. Repeating it changes nothing (`changed` False)."""
        grace_ms = parse_grace(grace)
        store = await self.opened()
        async with self._reaching_redis():
            return _switched(await store.resume(grace_ms))

    async def pause_state(self) -> PauseState:
        """Whether cancellation is paused, since when, why and by whom."""
        store = await self.opened()
        async with self._reaching_redis():
            return await store.pause_state()

    # -- reads -----------------------------------------------------------------

    async def history(self, order_id: str) -> list[dict[str, object]]:
        """Every event that announced a change of the order, oldest first: the
        same JSON objects as were published (event_id, status, previous,
        reason, at, version, and deadline where the event has one). Kept as
        long as the order's record. Raises UnknownOrder."""
        _, events = await self.get_with_history(order_id)
        return events

    async def get_with_history(self, order_id: str) -> tuple[Order, list[dict[str, object]]]:
        """The order and its history (`history`), read together."""
        validate_order_id(order_id)
        store = await self.opened()
        async with self._reaching_redis():
            found = await store.get_with_history(order_id)
        if found is None:
            raise UnknownOrder(order_id)
        order, events = found
        return order, [event.as_dict() for event in events]

    async def get(self, order_id: str) -> Order:
        validate_order_id(order_id)
        store = await self.opened()
        async with self._reaching_redis():
            order = await store.get(order_id)
        if order is None:
            raise UnknownOrder(order_id)
        return order
