"""Outbox -> MQTT: every event the scripts appended goes out at least once,
in version order per order; an entry is deleted only after the broker's PUBACK.

One lane per part. Each lane has two streams: ``outbox`` (every transition
after `created`) and ``outbox:created``. The second one can hold a bulk
import's backlog; a lane publishes its ``outbox`` first and
``outbox:created`` only when the first is empty, in chunks of at most
CREATED_CHUNK over all lanes, so a cancellation waits behind at most one such
chunk. Per-order order still holds: before an order's later event, the lane
publishes that order's `created` event out of its turn if it is still
unpublished (found by the id kept in the order record) and deletes it.

On a single Redis one reader serves all lanes: one XREAD over every held
lane's streams, one MQTT write for what they have, one round trip to delete
what the broker acknowledged and read on. At a steady load most lanes hold an
event or two at a time, and a round trip and a socket write per lane cost
more than the events. On a Redis Cluster each lane has its own reader (its
streams are a slot of their own).

With several daemons, a lane is published by the holder of its lease
(``<prefix>:{P}:lease``), so events of one order never race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import aiomqtt
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from listener import logs
from listener.events import StatusEvent, from_created_entry, from_outbox_entry, is_entry_id
from listener.keys import PARTS, KeyLayout
from listener.mqtt import MqttLink, PublishRefused
from listener.store import Store
from listener.supervise import Service, supervise

log = logs.get("listener.outbox")

LEASE_MS = 6000
RENEW_EVERY = 2.0
LEASE_MARGIN = 1.0  # seconds: stop publishing a lane this long before the lease could lapse
CREATED_CHUNK = 100
BLOCK_MS = 1000

Entry = tuple[bytes, dict[bytes, bytes]]


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _id_tuple(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


class Outbox:
    """The lanes, their leases, and counters for metrics and tests."""

    def __init__(
        self,
        store: Store,
        layout: KeyLayout,
        link: MqttLink,
        redis_service: Service,
        *,
        batch: int = 500,
        owner: str | None = None,
        on_published: Callable[[Sequence[StatusEvent]], None] | None = None,
        on_dead_letter: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.redis = store.redis
        self.layout = layout
        self.link = link
        self.redis_service = redis_service
        self.batch = batch
        self.owner = owner or owner_id()
        self.on_published = on_published
        self.on_dead_letter = on_dead_letter
        self.dead_letters = 0  # entries moved to a dead-letter stream
        self.held = [asyncio.Event() for _ in range(PARTS)]
        self.valid_until = [0.0] * PARTS  # monotonic time our lease surely lasts
        self.published = 0
        self.stopping = asyncio.Event()
        self._created_gate = asyncio.Semaphore(1)
        # Delete what was read in order with XTRIM MINID (a few hundredths of a
        # microsecond an entry) instead of XDEL (about 2.6 us); False once Redis
        # refused XTRIM (an ACL from before it was needed). Not on a Redis
        # Cluster: its client follows a failover within a session, and a new
        # primary that lost writes and whose clock lags could give new entries
        # ids below a trim point still to be sent; XDEL by id cannot touch them.
        # (On a single Redis a lost connection ends the session, whose last
        # deletes go by id: see _forget.)
        self.trim = not isinstance(self.redis, RedisCluster)

    async def run(self) -> None:
        """Run the leases and all lanes until `stop()` drained them."""
        async with asyncio.TaskGroup() as group:
            leases = group.create_task(self._keep_leases(), name="outbox-leases")
            readers = [
                group.create_task(self._reader(parts), name=_task_name(parts)) for parts in self._groups()
            ]
            await asyncio.gather(*readers)
            leases.cancel()
        await self._release_leases()

    def _groups(self) -> list[list[int]]:
        """Lanes read together, in one XREAD: all of them on a single Redis (one
        round trip and one MQTT write serve every lane with something to send);
        one each on a Redis Cluster, where every part is a slot of its own."""
        if isinstance(self.redis, RedisCluster):
            return [[part] for part in range(PARTS)]
        return [list(range(PARTS))]

    def stop(self) -> None:
        """Lanes publish what is there now, then end."""
        self.stopping.set()

    # -- leases --------------------------------------------------------------

    async def _keep_leases(self) -> None:
        while True:
            await supervise("outbox-leases", self.redis_service, self._renew_once)
            if self.link.service.up:
                await asyncio.sleep(RENEW_EVERY)
            else:  # take the leases the moment the broker is there
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RENEW_EVERY):
                        await self.link.connected.wait()

    async def _renew_once(self) -> None:
        if not self.link.service.up:
            # Without a broker we cannot publish: let the leases lapse so a
            # daemon that has one takes the lanes over.
            for event in self.held:
                event.clear()
            return
        sent = time.monotonic()
        try:
            replies = await self.store.run_scripts(
                [
                    (self.store.scripts.lease, [self.layout.lease(p)], [self.owner, LEASE_MS])
                    for p in range(PARTS)
                ]
            )
        except BaseException:
            for event in self.held:  # without renewal we cannot be sure we hold them
                event.clear()
            raise
        for part, got in enumerate(replies):
            if int(got):
                if not self.held[part].is_set():
                    log.debug("lane lease taken", part=part, owner=self.owner)
                self.valid_until[part] = sent + LEASE_MS / 1000 - LEASE_MARGIN
                self.held[part].set()
            else:
                self.held[part].clear()

    def holds(self, part: int) -> bool:
        """The lease is ours and certainly not expired in Redis yet."""
        return self.held[part].is_set() and time.monotonic() < self.valid_until[part]

    async def _release_leases(self) -> None:
        try:
            await self.store.run_scripts(
                [(self.store.scripts.release, [self.layout.lease(p)], [self.owner]) for p in range(PARTS)]
            )
        except Exception as exc:  # leases lapse by themselves within LEASE_MS
            log.debug("lease release failed", error=str(exc))

    # -- lanes ---------------------------------------------------------------

    async def _reader(self, parts: list[int]) -> None:
        task = _task_name(parts)
        while not self.stopping.is_set():
            if not any(self.held[part].is_set() for part in parts):
                await self._until_held(parts)
                continue
            if not any(self.holds(part) for part in parts):
                await asyncio.sleep(0.2)  # held but not renewed lately: wait for the renewal
                continue
            await supervise(task, self.redis_service, lambda: self._drain(parts))

    async def _until_held(self, parts: list[int]) -> None:
        waiters = [asyncio.ensure_future(self.held[part].wait()) for part in parts]
        waiters.append(asyncio.ensure_future(self.stopping.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _drain(self, parts: list[int]) -> None:
        """Publish the lanes of `parts` from their first unpublished entry, each
        while its lease is held.

        One XREAD reads every held lane; the events of all of them go to the
        broker together, and what it acknowledged is deleted in the same round
        trip as the next read (a pipeline: XTRIM or XDEL, then XREAD), or before returning."""
        last: dict[str, bytes] = {}  # stream -> id of the last entry published
        for part in parts:
            last[self.layout.outbox(part)] = b"0-0"
            last[self.layout.outbox_created(part)] = b"0-0"
        acked = _Published()  # published, PUBACKed, not yet deleted
        turn = 0  # the lane whose `created` backlog goes first (round robin)
        try:
            while True:
                mine = [part for part in parts if self.holds(part)]
                if not mine:
                    return
                block = None if self.stopping.is_set() else BLOCK_MS
                hi = {key: last[key] for key in map(self.layout.outbox, mine)}
                lo = {key: last[key] for key in map(self.layout.outbox_created, mine)}
                got = await self._read(acked, hi, lo, block)
                acked = _Published()
                self.redis_service.ok()
                if not got:
                    if self.stopping.is_set():
                        return
                    continue
                plan = await self._plan(mine, got, last, turn)
                turn += 1
                sent = await self._send(plan)
                for part in sent:
                    acked.add(plan[part].acked)
                    last.update(plan[part].last)
                # a lane left out lost its lease: it is not read any more
        finally:
            if acked:  # the lease ends, or a stop cut us short: what the broker has must not go out again
                await self._forget(acked)

    async def _plan(
        self, mine: list[int], got: dict[str, list[Entry]], last: dict[str, bytes], turn: int
    ) -> dict[int, _Lane]:
        """What each lane sends now: its transitions if it has any (an order's
        `created` event still waiting goes out just before them), else a chunk
        of its `created` backlog, at most CREATED_CHUNK over all lanes."""
        plan: dict[int, _Lane] = {}
        budget = CREATED_CHUNK
        waiting = await self._waiting_created(mine, got, last)
        for index in range(len(mine)):
            part = mine[(turn + index) % len(mine)]
            hi_key, lo_key = self.layout.outbox(part), self.layout.outbox_created(part)
            hi = got.get(hi_key, [])
            if hi:
                events = [event for _, event in await self._parse(hi_key, hi, created=False)]
                early = waiting.get(part, {})
                ordered: list[StatusEvent] = []
                pulled: list[bytes] = []  # `created` entries sent out of turn, deleted with the rest
                for event in events:
                    first = early.pop(event.created_entry, None)
                    if first is not None:
                        ordered.append(first)
                        pulled.append(event.created_entry)
                    ordered.append(event)
                lane = _Lane(
                    ordered, _Published({hi_key: [entry_id for entry_id, _ in hi]}), {hi_key: hi[-1][0]}
                )
                if pulled:
                    lane.acked.early[lo_key] = pulled
                plan[part] = lane
                continue
            lo = got.get(lo_key, [])[:budget]
            if lo:
                budget -= len(lo)
                events = [event for _, event in await self._parse(lo_key, lo, created=True)]
                plan[part] = _Lane(
                    events,
                    _Published({lo_key: [entry_id for entry_id, _ in lo]}),
                    {lo_key: lo[-1][0]},
                    created=True,
                )
        return plan

    async def _waiting_created(
        self, mine: list[int], got: dict[str, list[Entry]], last: dict[str, bytes]
    ) -> dict[int, dict[bytes, StatusEvent]]:
        """Per lane, the `created` events, still unpublished, of orders with a
        transition to publish now (found by the entry id kept in the order record);
        one round trip for all lanes."""
        lookups: list[tuple[int, bytes]] = []
        for part in mine:
            hi = got.get(self.layout.outbox(part))
            if not hi:
                continue
            lo_last = _id_tuple(last[self.layout.outbox_created(part)])
            suspects: dict[bytes, None] = {}
            for _, fields in hi:
                created = fields.get(b"c")  # a malformed one is the dead-letter path's to report
                if created is not None and is_entry_id(created) and _id_tuple(created) > lo_last:
                    suspects[created] = None
            lookups += [(part, created) for created in suspects]
        waiting: dict[int, dict[bytes, StatusEvent]] = {}
        if not lookups:
            return waiting
        async with self.redis.pipeline(transaction=False) as pipe:
            for part, created in lookups:
                pipe.xrange(self.layout.outbox_created(part), created, created)
            found = cast("list[list[Entry]]", await pipe.execute())
        for (part, _), entries in zip(lookups, found, strict=True):
            if entries:
                # a malformed one is moved aside when its lane reads it in turn
                with contextlib.suppress(ValueError):
                    waiting.setdefault(part, {})[entries[0][0]] = from_created_entry(*entries[0])
        return waiting

    async def _forget(self, acked: _Published) -> None:
        """Delete entries the broker acknowledged, even while being cancelled (a
        short, shielded round trip); if Redis is away they are sent again later.
        By id (XDEL), not XTRIM: this runs when a session ends, maybe on a
        failure, and after a failover a new primary whose writes and clock lag
        could give new entries ids below the trim point; XDEL cannot touch them."""

        async def delete() -> None:
            await self._with_deletes(acked, lambda pipe: None, trim=False)

        try:
            async with asyncio.timeout(2.0):
                await asyncio.shield(delete())
        except Exception as exc:  # at least once: a repeat is the worst case
            log.debug("could not delete published entries; they may be sent again", error=str(exc))

    async def _read(
        self, acked: _Published, hi: dict[Any, Any], lo: dict[Any, Any], block: int | None
    ) -> dict[str, list[Entry]]:
        """Entries after the given ids: up to `batch` of each transitions stream
        (`hi`), a share of CREATED_CHUNK of each `created` stream (`lo`: a
        backlog there is not read again and again in full while transitions go
        first). One round trip, which first deletes the `acked` entries. When
        there is nothing, one blocking XREAD of all of them, up to `block` ms."""
        lo_count = max(1, CREATED_CHUNK // max(1, len(lo)))

        def reads(pipe: Any) -> None:
            pipe.xread(hi, count=self.batch)
            pipe.xread(lo, count=lo_count)

        replies = await self._with_deletes(acked, reads)
        got = _by_stream(replies[-2]) | _by_stream(replies[-1])
        if got or block is None:
            return got
        return _by_stream(await self.redis.xread({**hi, **lo}, count=self.batch, block=block))

    async def _with_deletes(
        self, acked: _Published, then: Callable[[Any], None], *, trim: bool = True
    ) -> list[Any]:
        """One pipeline: the deletes of `acked`, then what `then` queues; its replies.
        If Redis refuses the XTRIM command (NOPERM: the daemon's ACL predates it),
        say so once and delete with XDEL from then on."""
        while True:
            trimming = trim and self.trim  # what this attempt sends (other lanes may change self.trim)
            async with self.redis.pipeline(transaction=False) as pipe:
                acked.queue_deletes(pipe, trim=trimming)
                then(pipe)
                try:
                    return await pipe.execute()
                except NoPermissionError as exc:
                    # not a refused key: "... no permissions to run the 'xtrim' command"
                    if not trimming or "'xtrim' command" not in str(exc).lower():
                        raise
            if not self.trim:
                continue  # another lane found it out first and said so
            self.trim = False
            log.warning(
                "Redis refused XTRIM: published entries are deleted with XDEL, which costs "
                "Redis about 100 times as much",
                fix="add +xtrim to the daemon's Redis user (see deploy/redis-users.acl)",
            )

    async def _parse(
        self, key: str, entries: Sequence[Entry], *, created: bool
    ) -> list[tuple[bytes, StatusEvent]]:
        """Events of well-formed entries. One that makes no valid event (from a
        broken or older producer) is moved to `<key>:dead` with one error line
        and the dead-letter metric; the lane goes on."""
        good: list[tuple[bytes, StatusEvent]] = []
        for entry_id, fields in entries:
            try:
                event = from_created_entry(entry_id, fields) if created else from_outbox_entry(fields)
            except ValueError as exc:  # UnicodeDecodeError is one too
                await self._dead_letter(key, entry_id, fields, str(exc))
                continue
            good.append((entry_id, event))
        return good

    async def _dead_letter(self, key: str, entry_id: bytes, fields: dict[bytes, bytes], error: str) -> None:
        """Copy the entry to `<key>:dead` under its own id, then delete it. Once
        only: a copy made before (by a daemon stopped before the delete, or by a
        second daemon on the lane during a lease handover) is found by its id
        and fields. A copy gets a new id only if the dead-letter stream already
        holds later ids (after a failover to a Redis whose clock lags)."""
        dead = self.layout.dead_letters(key)
        # the entry's own fields, then where it came from and why it is here
        kept: dict[Any, Any] = {**fields, b"id": entry_id, b"error": error.encode()}
        copied = True
        try:
            await self.redis.xadd(dead, kept, id=entry_id, maxlen=10_000, approximate=True)
        except ResponseError as exc:
            if "equal or smaller" not in str(exc):
                raise
            there = await self.redis.xrange(dead, entry_id, entry_id)
            if there and there[0][1] == kept:
                copied = False
            else:
                await self.redis.xadd(dead, kept, maxlen=10_000, approximate=True)
        await self.redis.xdel(key, entry_id)
        if not copied:
            return
        self.dead_letters += 1
        if self.on_dead_letter is not None:
            self.on_dead_letter()
        log.error(
            "malformed outbox entry moved to the dead-letter stream",
            order_id=fields.get(b"o", b"")[:200].decode(errors="replace"),
            entry=entry_id.decode(errors="replace"),
            stream=dead,
            error=error,
        )

    async def _send(self, plan: dict[int, _Lane]) -> list[int]:
        """Publish the planned events until the broker acknowledged them all,
        and return the lanes published: those whose lease stayed surely ours
        (a lane that lost it keeps its entries for the next holder). A broker
        outage is the MQTT link's to report and repair; a broker that refuses
        (ACL, quota) is logged once and retried with backoff."""
        refusals = 0
        gate = self._created_gate if any(lane.created for lane in plan.values()) else contextlib.nullcontext()
        async with gate:
            while True:
                parts = [part for part in plan if self.holds(part)]
                if not parts:
                    return []
                try:
                    await self.link.publish_lanes({part: plan[part].events for part in parts})
                    break
                except PublishRefused as exc:
                    refusals += 1
                    if refusals == 1:
                        log.error(
                            "the broker refused events; retrying with backoff",
                            parts=parts,
                            error=str(exc),
                            fix="allow this user to publish under the topic prefix",
                        )
                    await asyncio.sleep(min(5.0, 0.1 * 2**refusals))
                except aiomqtt.MqttError as exc:
                    log.debug("publish failed; resending after reconnect", error=str(exc))
                    await asyncio.sleep(0.1)
        if refusals:
            log.info("the broker takes events again", parts=parts)
        for part in parts:
            events = plan[part].events
            self.published += len(events)
            if self.on_published is not None:
                self.on_published(events)
            if log.is_enabled_for(logging.DEBUG):  # a line per event only when asked for
                for event in events:
                    log.debug(
                        "event published",
                        part=part,
                        order_id=event.order_id,
                        event_id=event.event_id,
                        status=event.status,
                    )
        return parts

    async def backlog(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in range(PARTS):
                pipe.xlen(self.layout.outbox(part))
                pipe.xlen(self.layout.outbox_created(part))
            lengths = await pipe.execute()
        return sum(int(n) for n in lengths)


@dataclass
class _Lane:
    """What one lane sends in a round: its events, the entries to delete
    once the broker has them, and how far its streams are then read."""

    events: list[StatusEvent]
    acked: _Published
    last: dict[str, bytes]
    created: bool = False  # a chunk of the `created` backlog (goes through the shared gate)


def _task_name(parts: list[int]) -> str:
    return f"outbox-lane-{parts[0]}" if len(parts) == 1 else "outbox-lanes"


@dataclass
class _Published:
    """Entries the broker acknowledged, to delete, per stream: `in_order`, the
    entries read in turn (every entry up to the last of them is published, so
    XTRIM MINID deletes them at once), and `early`, `created` entries sent out
    of turn, ahead of the lane's read (XDEL, one by one)."""

    in_order: dict[str, list[bytes]] = field(default_factory=dict)
    early: dict[str, list[bytes]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.in_order or self.early)

    def add(self, other: _Published) -> None:
        for mine, theirs in ((self.in_order, other.in_order), (self.early, other.early)):
            for key, ids in theirs.items():
                mine.setdefault(key, []).extend(ids)

    def queue_deletes(self, pipe: Any, *, trim: bool) -> None:
        """The deletes, queued on a (plain or cluster) pipeline."""
        for key, ids in self.early.items():
            pipe.xdel(key, *ids)
        for key, ids in self.in_order.items():
            if trim:
                ms, seq = _id_tuple(ids[-1])  # read in stream order: the last is the highest
                pipe.xtrim(key, minid=f"{ms}-{seq + 1}", approximate=False)
            else:
                pipe.xdel(key, *ids)


def _by_stream(reply: Any) -> dict[str, list[Entry]]:
    """An XREAD reply as stream name -> entries."""
    return {_name(stream): entries for stream, entries in reply or []}


def _name(stream: bytes | str) -> str:
    return stream.decode() if isinstance(stream, bytes) else stream
