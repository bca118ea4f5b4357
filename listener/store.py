"""Calls the Lua scripts and reads orders: the only module that changes order state.

Python decides nothing here about what is allowed; the scripts check and
change atomically and say what happened (done, already, refused, unknown).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, ResponseError

from listener.config import Settings
from listener.connection import RedisClient, connect_redis, redis_lost
from listener.errors import BadRecord
from listener.events import StatusEvent, from_packed
from listener.keys import PARTS, KeyLayout, part_of
from listener.orders import Operation, Order, Reason, Status
from listener.scripts import Scripts
from listener.switch import PauseState, part_switch

ScriptCall = tuple[AsyncScript, list[str], list[Any]]

CREATE_CHUNK = 500  # orders per create script call (one part each)
PIPELINE_CALLS = 40  # script calls per round trip


@dataclass(frozen=True)
class CreateResult:
    order_id: str
    created: bool
    deadline_ms: int | None = None
    existing_status: str | None = None


@dataclass(frozen=True)
class TransitionResult:
    """What a transition script reported. `outcome`: done, already, refused, unknown, notdue."""

    order_id: str
    outcome: str
    status: str
    version: int
    reason: str


@dataclass(frozen=True)
class ExtendResult:
    """What the extend script reported. `outcome`: done, unknown, refused,
    late (overdue while the pause switch holds it), toolong (window over 30
    days). `deadline_ms`: the new deadline when done, else the current one."""

    order_id: str
    outcome: str
    status: str
    version: int
    reason: str
    deadline_ms: int


@dataclass(frozen=True)
class SwitchResult:
    """What the pause or resume script did to one part: `changed` False when
    the part was in that state already; `at_ms` the pause's time (pause) or
    when the overdue orders are due (resume; 0 if it was not paused)."""

    part: int
    changed: bool
    at_ms: int


@dataclass(frozen=True)
class SweepResult:
    part: int
    now_ms: int
    now_us: int  # the same Redis clock in microseconds (sleeps are timed from it)
    next_deadline_ms: int | None  # None: nothing pending in the part
    cancelled: list[tuple[str, int]]  # (order id, deadline ms)
    # (order id, what is wrong): due index members the sweep took out of the
    # index without cancelling them (sweep.lua); their records are left as they are
    dropped: list[tuple[str, str]] = field(default_factory=list)


_SCRIPT_OF: dict[Operation, tuple[str, str | None]] = {
    Operation.PAY: ("pay", None),
    Operation.CANCEL: ("cancel", None),
    Operation.EXPIRE: ("expire", None),
    Operation.DELIVER: ("deliver", Reason.DELIVERED),
    Operation.LOGISTICS_DELIVERED: ("deliver", Reason.LOGISTICS),
    Operation.REFUND: ("refund", Reason.REFUND),
    Operation.LOGISTICS_RETURNED: ("refund", Reason.RETURNED),
}


def _text(value: Any, errors: str = "replace") -> str:
    # a record written by hand may hold any bytes: shown, never a decoding error
    return value.decode(errors=errors) if isinstance(value, bytes) else str(value)


def _order(order_id: str, packed: Any, raw: dict[Any, Any]) -> Order | None:
    """The order from its bucket field (`packed`, or None) and its own hash (`raw`)."""
    fields = {_text(k): _text(v) for k, v in raw.items()}
    if "s" not in fields and packed is not None:
        # pending: "<created entry id>|<deadline ms>", or cancelled by the sweep
        # at its deadline: "<c>|<d>|<updated ms>" (keys.py); own-hash fields win
        created, deadline, *updated = _text(packed).split("|", 2)
        fields.setdefault("c", created)
        fields.setdefault("d", deadline)
        if updated:
            fields.update(s=Status.CANCELLED, v="2", r=Reason.TIMEOUT, u=updated[0])
    if "c" not in fields:
        return None
    created_ms = int(fields["c"].split("-", 1)[0])
    if "s" not in fields:
        # never changed since create: status, version, reason and updated are implied
        fields.update(s=Status.CREATED, v="1", r=Reason.CREATED, u=str(created_ms))
    return Order(
        order_id=order_id,
        status=Status(fields["s"]),
        version=int(fields["v"]),
        reason=Reason(fields["r"]),
        created_ms=created_ms,
        updated_ms=int(fields["u"]),
        deadline_ms=int(fields["d"]),
    )


def _implied_history(order: Order) -> list[StatusEvent]:
    """The events of an order whose record holds no history items but says
    what they were: pending and never changed (its `created` event), or
    cancelled at its deadline straight from pending, as the sweep leaves it
    (version 2, reason timeout: `created`, then `cancelled` at its last
    change; lib.lua). Version 2 means one change since `create`, so its
    deadline is the first one. Empty for any other record."""
    created = StatusEvent(
        order_id=order.order_id,
        status="created",
        previous=None,
        reason="created",
        version=1,
        at_ms=order.created_ms,
        created_ms=order.created_ms,
        deadline_ms=order.deadline_ms,
    )
    if order.version == 1:
        return [created]
    if order.version == 2 and order.status is Status.CANCELLED and order.reason is Reason.TIMEOUT:
        cancelled = StatusEvent(
            order_id=order.order_id,
            status="cancelled",
            previous="created",
            reason="timeout",
            version=2,
            at_ms=order.updated_ms,
            created_ms=order.created_ms,
        )
        return [created, cancelled]
    return []


def _ms(value: Any) -> int:
    """A time in ms that a script took from an order record as it was stored:
    one written by hand may say `1e12` or worse; that must not end the caller
    (it only labels a log line and the lag metric)."""
    try:
        return int(value)
    except ValueError:
        try:
            return int(float(value))
        except (ValueError, OverflowError):
            return 0


class Store:
    def __init__(self, redis: RedisClient, layout: KeyLayout, retention_ms: int) -> None:
        self.redis = redis
        self.layout = layout
        self.retention_ms = retention_ms
        self.scripts = Scripts.register(redis)

    @classmethod
    def from_settings(cls, settings: Settings, redis: RedisClient | None = None) -> Store:
        client = redis if redis is not None else connect_redis(settings)
        return cls(client, KeyLayout(settings.key_prefix), settings.retention_ms)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- running scripts in pipelines ----------------------------------------

    async def run_scripts(self, calls: Sequence[ScriptCall], *, settle: bool = False) -> list[Any]:
        """EVALSHA each call in one pipelined round trip, in order.

        redis-py's own script pipelining sends SCRIPT EXISTS before every
        pipeline (a second round trip on the cancellation path). Instead the
        scripts are loaded once; a call answered NOSCRIPT (Redis restarted
        or flushed its script cache) is loaded and sent again, alone, so a
        call that ran is never run twice.

        An error reply is raised; with `settle`, one that is not an outage (a
        script refusing the data it found) is returned in its call's place.
        """
        replies = await self._evalsha(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
                await self.redis.script_load(script.script)
            again = await self._evalsha([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception) and not (settle and not redis_lost(reply)):
                raise reply
        return replies

    async def _evalsha(self, calls: Sequence[ScriptCall]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                # execute_command: redis-py refuses pipe.evalsha on a cluster
                # pipeline, but routes the raw command by its first key
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    # -- create ------------------------------------------------------------

    async def create_many(self, orders: Sequence[tuple[str, int]]) -> list[CreateResult]:
        """Create (order id, timeout ms) pairs; ids must be valid already.

        Orders are grouped by part, CREATE_CHUNK to a script call, and the calls
        pipelined. An id that exists is reported, not changed.
        """
        by_part: dict[int, list[int]] = defaultdict(list)
        for index, (order_id, _) in enumerate(orders):
            by_part[part_of(order_id)].append(index)
        calls: list[tuple[int, list[int]]] = []
        for part, indexes in by_part.items():
            for start in range(0, len(indexes), CREATE_CHUNK):
                calls.append((part, indexes[start : start + CREATE_CHUNK]))
        results: list[CreateResult | None] = [None] * len(orders)
        for start in range(0, len(calls), PIPELINE_CALLS):
            batch = calls[start : start + PIPELINE_CALLS]
            script_calls: list[ScriptCall] = []
            for part, indexes in batch:
                keys = [self.layout.deadlines(part), self.layout.outbox_created(part)]
                args: list[Any] = [self.layout.wake_channel, part]
                for index in indexes:
                    order_id, timeout_ms = orders[index]
                    keys += [self.layout.order(order_id), self.layout.timer(order_id)]
                    args += [order_id, timeout_ms]
                script_calls.append((self.scripts.create, keys, args))
            replies = await self.run_scripts(script_calls)
            for (_, indexes), reply in zip(batch, replies, strict=True):
                for position, index in enumerate(indexes):
                    flag, value = reply[2 * position], reply[2 * position + 1]
                    order_id = orders[index][0]
                    if int(flag) == 1:
                        results[index] = CreateResult(order_id, True, deadline_ms=int(value))
                    else:
                        results[index] = CreateResult(order_id, False, existing_status=_text(value))
        return [result for result in results if result is not None]

    # -- transitions -------------------------------------------------------

    def _transition_keys(self, order_id: str) -> list[str]:
        """The KEYS of every script that changes one order: its hash, its
        timer, its part's deadline index and outbox."""
        part = part_of(order_id)
        return [
            self.layout.order(order_id),
            self.layout.timer(order_id),
            self.layout.deadlines(part),
            self.layout.outbox(part),
        ]

    def _transition_call(self, operation: Operation, order_id: str) -> ScriptCall:
        name, reason = _SCRIPT_OF[operation]
        keys = self._transition_keys(order_id)
        args: list[Any] = [order_id, self.retention_ms]
        if reason is not None:
            args.append(str(reason))
        return getattr(self.scripts, name), keys, args

    @staticmethod
    def _result(order_id: str, reply: Sequence[Any]) -> TransitionResult:
        return TransitionResult(
            order_id=order_id,
            outcome=_text(reply[0]),
            status=_text(reply[1]),
            version=int(reply[2]),
            reason=_text(reply[3]) if reply[3] is not None else "",
        )

    async def apply(self, operation: Operation, order_id: str) -> TransitionResult:
        (reply,) = await self.run_scripts([self._transition_call(operation, order_id)])
        return self._result(order_id, reply)

    async def apply_many(self, operation: Operation, order_ids: Sequence[str]) -> list[TransitionResult]:
        """The same operation on many orders, pipelined (one script call each)."""
        return cast("list[TransitionResult]", await self._many(operation, order_ids, settle=False))

    async def try_many(
        self, operation: Operation, order_ids: Sequence[str]
    ) -> list[TransitionResult | ResponseError]:
        """`apply_many`, where an order whose script answered an error (its
        record is malformed, say) gets that error in its place instead of
        failing the others; outages are raised."""
        return await self._many(operation, order_ids, settle=True)

    async def _many(
        self, operation: Operation, order_ids: Sequence[str], *, settle: bool
    ) -> list[TransitionResult | ResponseError]:
        out: list[TransitionResult | ResponseError] = []
        for start in range(0, len(order_ids), 500):
            chunk = order_ids[start : start + 500]
            calls = [self._transition_call(operation, oid) for oid in chunk]
            replies = await self.run_scripts(calls, settle=settle)
            out += [
                reply if isinstance(reply, ResponseError) else self._result(oid, reply)
                for oid, reply in zip(chunk, replies, strict=True)
            ]
        return out

    async def extend(self, order_id: str, extension_ms: int) -> ExtendResult:
        """The order's deadline `extension_ms` later (extend.lua); id and
        extension must be valid already."""
        keys = self._transition_keys(order_id)
        (reply,) = await self.run_scripts(
            [(self.scripts.extend, keys, [order_id, self.retention_ms, extension_ms])]
        )
        return ExtendResult(
            order_id=order_id,
            outcome=_text(reply[0]),
            status=_text(reply[1]),
            version=int(reply[2]),
            reason=_text(reply[3]) if reply[3] is not None else "",
            deadline_ms=_ms(reply[4]),
        )

    # -- the pause switch --------------------------------------------------------

    async def pause(self, reason: str, by: str) -> list[SwitchResult]:
        """Pause cancellation for timeout in every part (pause.lua, one call each)."""
        return await self._switch(self.scripts.pause, [reason, by])

    async def resume(self, grace_ms: int) -> list[SwitchResult]:
        """Resume it in every part; the orders overdue now are due after `grace_ms`."""
        return await self._switch(self.scripts.resume, [self.layout.wake_channel, grace_ms])

    async def _switch(self, script: AsyncScript, args: list[Any]) -> list[SwitchResult]:
        replies = await self.run_scripts([(script, [self.layout.pause(part)], args) for part in range(PARTS)])
        return [SwitchResult(part, int(flag) == 1, _ms(at)) for part, (flag, at) in enumerate(replies)]

    async def pause_state(self) -> PauseState:
        """The switches of all parts, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in range(PARTS):
                pipe.hgetall(self.layout.pause(part))
            replies = await pipe.execute()
        return PauseState([part_switch({_text(k): _text(v) for k, v in reply.items()}) for reply in replies])

    # -- deadline index ------------------------------------------------------

    def by_shard(self, parts: Iterable[int]) -> list[list[int]]:
        """`parts` grouped by the Redis Cluster node that holds them (as the
        client knows the topology now); one group on a single Redis."""
        chosen = list(parts)
        if not isinstance(self.redis, RedisCluster):
            return [chosen]
        groups: dict[str, list[int]] = defaultdict(list)
        for part in chosen:
            try:
                node = self.redis.get_node_from_key(self.layout.deadlines(part))
            except RedisClusterException:  # slot not covered right now
                node = None
            groups[node.name if node is not None else "?"].append(part)
        return list(groups.values())

    async def sweep(self, parts: Iterable[int], limit: int) -> list[SweepResult]:
        """Cancel what is due in each part (up to `limit` each), in one round trip."""
        return cast("list[SweepResult]", await self._sweep(parts, limit, settle=False))

    async def try_sweep(self, parts: Iterable[int], limit: int) -> list[SweepResult | ResponseError]:
        """`sweep`, where a part whose script answered an error (a key of the
        part holding the wrong type, say) gets that error in its place instead
        of failing the others; outages are raised."""
        return await self._sweep(parts, limit, settle=True)

    async def _sweep(
        self, parts: Iterable[int], limit: int, *, settle: bool
    ) -> list[SweepResult | ResponseError]:
        chosen = list(parts)
        replies = await self.run_scripts(
            [
                (
                    self.scripts.sweep,
                    [self.layout.deadlines(part), self.layout.outbox(part)],
                    [self.layout.base(part), limit, self.retention_ms],
                )
                for part in chosen
            ],
            settle=settle,
        )
        results: list[SweepResult | ResponseError] = []
        for part, reply in zip(chosen, replies, strict=True):
            if isinstance(reply, ResponseError):
                results.append(reply)
                continue
            now, nxt, flat, micros, bad = reply
            cancelled = [(_text(flat[i]), _ms(flat[i + 1])) for i in range(0, len(flat), 2)]
            # (such an id may be any bytes: it is shown, never used as a key again)
            dropped = [(_text(bad[i], "backslashreplace"), _text(bad[i + 1])) for i in range(0, len(bad), 2)]
            nxt_ms = int(nxt)
            now_ms = int(now)
            results.append(
                SweepResult(
                    part,
                    now_ms,
                    now_ms * 1000 + int(micros),
                    None if nxt_ms < 0 else nxt_ms,
                    cancelled,
                    dropped,
                )
            )
        return results

    async def pending_count(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in range(PARTS):
                pipe.zcard(self.layout.deadlines(part))
            counts = await pipe.execute()
        return sum(int(c) for c in counts)

    # -- reads ---------------------------------------------------------------

    async def get(self, order_id: str) -> Order | None:
        """The order as stored in any layout (keys.py): a pending order's bucket
        field, its own hash, or an own hash of an earlier layout."""
        # The bucket first: an order that leaves its bucket between the two
        # reads (its first transition) is then found in its own hash.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.layout.bucket(order_id), [order_id])  # HMGET: both ACL users have it
            pipe.hgetall(self.layout.order(order_id))
            (packed,), raw = await pipe.execute()
        return _order(order_id, packed, raw)

    async def get_with_history(self, order_id: str) -> tuple[Order, list[StatusEvent]] | None:
        """The order and every event that announced a change of it, oldest
        first; None if there is no such order. The history is kept in the
        order's own hash from its first change on (`h<version>` fields,
        lib.lua), so one HGETALL reads record and history together. Two kinds
        of order have no items, their events following from the record (see
        `_implied_history`). An order that changed before histories were kept
        has an empty or partial one."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self.layout.bucket(order_id), [order_id])
            pipe.hgetall(self.layout.order(order_id))
            (packed,), raw = await pipe.execute()
        order = _order(order_id, packed, raw)
        if order is None:
            return None
        items = sorted(
            (int(name[1:]), value)
            for name, value in raw.items()
            if name[:1] == b"h" and name[1:].isdigit() and len(name) <= 17
        )
        try:
            events = [from_packed(order_id, item) for _, item in items]
        except ValueError as exc:
            raise BadRecord(f"the stored history of {order_id!r} is malformed: {exc}") from None
        return order, events or _implied_history(order)

    async def cancel_times(self, order_ids: Sequence[str]) -> list[tuple[int, int] | None]:
        """(deadline ms, last change ms) of each order as its own hash has them:
        for an order just cancelled, when it was due and when it was cancelled
        (by the Redis clock). None where the hash lacks them."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for order_id in order_ids:
                pipe.hmget(self.layout.order(order_id), ["d", "u"])  # HMGET: both ACL users have it
            replies = await pipe.execute()
        return [None if None in reply else (_ms(reply[0]), _ms(reply[1])) for reply in replies]

    async def now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000
