"""Outbox -> MQTT: every event the scripts appended goes out at least once,
in version order per order; an entry is deleted only after the broker's PUBACK.

One lane per part. Each lane has two streams: ``outbox`` (every transition
after `created`) and ``outbox:created`` (a bulk import's backlog can wait
there without delaying a cancellation). How a reader keeps the broker's
window full and the order of events is in `listener.outbox_pump`.

On a single Redis one reader serves all lanes: one XREAD over every held
lane's streams and one round trip to delete what the broker acknowledged and
read on. On a Redis Cluster each lane has its own reader (its streams are a
slot of their own).

With several daemons, a lane is published by the holder of its lease
(``<prefix>:{P}:lease``), so events of one order never race each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import aiomqtt
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, OutOfMemoryError, ResponseError

from listener import logs
from listener.catch_up import CatchUp
from listener.connection import redis_lost
from listener.events import StatusEvent, from_created_entry, from_outbox_entry
from listener.keys import PARTS, KeyLayout
from listener.mqtt import MqttLink, Publisher
from listener.mqtt.link import Connection
from listener.outbox_pump import BLOCK_MS, POLL_S, Deletes, Pump, debug_published
from listener.store import Store
from listener.supervise import Service, is_transient, supervise

log = logs.get("listener.outbox")

LEASE_MS = 6000
RENEW_EVERY = 2.0
LEASE_MARGIN = 1.0  # seconds: stop publishing a lane this long before the lease could lapse
BROKEN_RETRY = 10.0  # seconds a lane whose stream has the wrong type is left out before a new look
PUBLISH_TIMEOUT = 10.0  # seconds without a PUBACK while publishes are in flight: send again
FORGET_WAIT_S = 2.0  # how long the deletes of what the broker acknowledged are waited for

Entry = tuple[bytes, dict[bytes, bytes]]


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


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
        created_rate: float | None = None,
        owner: str | None = None,
        on_published: Callable[[Sequence[StatusEvent]], None] | None = None,
        on_dead_letter: Callable[[], None] | None = None,
        event_log_ms: int = 0,
        catch_up: CatchUp | None = None,
    ) -> None:
        self.store = store
        # the scheduler's: nothing new is read while it is behind (listener/catch_up.py)
        self.catch_up = catch_up or CatchUp()
        self.event_log_ms = event_log_ms  # keep acknowledged events this long for `replay`; 0: no log
        self.log_failed_at = -math.inf  # monotonic time of the last "event log append failed" line
        self.redis = store.redis
        self.layout = layout
        self.link = link
        self.redis_service = redis_service
        self.batch = batch
        self.created_rate = created_rate
        self.owner = owner or owner_id()
        self.on_published = on_published
        self.on_dead_letter = on_dead_letter
        self.dead_letters = 0  # entries moved to a dead-letter stream
        self.held = [asyncio.Event() for _ in range(PARTS)]
        self.valid_until = [0.0] * PARTS  # monotonic time our lease surely lasts
        self.published = 0
        self.stopping = asyncio.Event()
        # Delete what was read in order with XTRIM MINID (far cheaper for Redis
        # than XDEL of every id: docs/figures.md); False once Redis
        # refused XTRIM (an ACL from before it was needed). Not on a Redis
        # Cluster: its client follows a failover within a session, and a new
        # primary that lost writes and whose clock lags could give new entries
        # ids below a trim point still to be sent; XDEL by id cannot touch them.
        # (On a single Redis a lost connection ends the session, whose last
        # deletes go by id: see _forget.)
        self.trim = not isinstance(self.redis, RedisCluster)
        self.broken: dict[int, float] = {}  # part -> until when its lane is left out (wrong key type)
        # deletes that outlived their wait, with the keys they are on
        self.forgetting: dict[asyncio.Task[None], set[str]] = {}
        self.closed = False  # run() ended: a delete that fails now is not sent again by anyone
        # Deletes that ended sessions could not send (Redis away): each lane's
        # next session sends its own before its first read (_send_left_over).
        self.left_over = Deletes()
        self.pumps: set[Pump] = set()  # of the readers running now

    def read_ahead(self) -> int:
        """Events read from the outbox that wait for room in the broker's window."""
        return sum(len(pump.hi) + len(pump.lo) for pump in self.pumps)

    async def run(self) -> None:
        """Run the leases and all lanes until `stop()` drained them."""
        try:
            async with asyncio.TaskGroup() as group:
                leases = group.create_task(self._keep_leases(), name="outbox-leases")
                readers = [
                    group.create_task(self._reader(parts), name=_task_name(parts)) for parts in self._groups()
                ]
                await asyncio.gather(*readers)
                leases.cancel()
            if self.forgetting:  # deletes that outlived their wait: what they delete is not sent again
                await asyncio.wait(set(self.forgetting), timeout=FORGET_WAIT_S)
            if self.left_over:  # a last try; what Redis does not take is said below
                left, self.left_over = self.left_over, Deletes()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(FORGET_WAIT_S):
                        await self._send_left_over(left)
            await self._release_leases()
        finally:
            self.closed = True
            if self.left_over:  # Redis away, or a stop that timed out
                self._not_deleted(self.left_over, "the daemon stopped before they could be deleted")
                self.left_over = Deletes()

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
        await _first_of(*(self.held[part] for part in parts), self.stopping)

    async def _drain(self, parts: list[int]) -> None:
        """Publish the lanes of `parts` from their first unpublished entry, each
        while its lease is held, keeping the broker's window full (see
        listener.outbox_pump)."""
        pump = Pump(
            parts,
            self.layout,
            holds=self.holds,
            run_pipeline=self._with_deletes,
            xrange_one=self._xrange_each,
            parse=lambda key, entries, created: self._parse(key, entries, created=created),
            batch=self.batch,
            created_rate=self.created_rate,
            log=self.event_log_ms > 0,
        )
        await self._after_last_session(pump)
        mine = set(parts)
        refusals = 0
        reading = _ReadUnderWay(pump, self._set_aside_or_raise, self.redis_service)
        publishers: list[Publisher] = []
        self.pumps.add(pump)
        try:
            while True:
                # cancellations first: nothing new is read while the scheduler is behind
                await self.catch_up.wait(self.stopping)
                got, mine = await self._settle_lanes(pump, reading, parts, mine)
                connection = await self._broker(pump, reading, mine) if mine else None
                if connection is None:
                    return  # no lane held, or stopping with the broker away and nothing of them to publish
                publishers = connection.publishers
                if pump.gone or pump.refused:
                    await reading.settle()
                    refusals = await self._start_over(pump, refusals)
                    continue
                stopping = self.stopping.is_set()
                readable = self._readable(mine)
                if not readable:
                    await reading.settle()
                    await asyncio.sleep(1.0)  # every held lane's stream is of the wrong type
                    continue
                room = any(publisher.room for publisher in publishers)
                if not reading.task and (room or pump.deletes) and pump.read_due(publishers):
                    read = await reading.read(readable, stopping)
                    if read is None:
                        continue  # lanes were set aside
                    got = got or read
                deferred = not pump.send_due(publishers)
                try:
                    # while a read is under way only transitions go: a cancellation it
                    # brings must not wait behind `created` events sent meanwhile
                    sent = 0 if deferred else pump.send(publishers, created=not reading.task)
                except aiomqtt.MqttError as exc:  # the connection went while sending
                    pump.gone = str(exc)  # (a lost connection also zeroes what was in flight)
                    continue
                refusals = self._report_published(pump, refusals)
                if stopping and not (reading.task or got or sent or pump.open or pump.queued()):
                    return
                if sent:
                    continue
                await _wait_for_something_to_send(
                    pump, publishers, deferred=deferred, got=got, reading=reading.task
                )
                await _resend_if_silent(pump, publishers, reading)
        finally:
            self.pumps.discard(pump)
            await reading.cancel()  # (its deletes go back to the pump: forgotten below)
            try:
                await _until_answered(pump, publishers)
            finally:
                await self._forget(pump.take_deletes())  # what the broker has must not go out again

    async def _broker(self, pump: Pump, reading: _ReadUnderWay, lanes: set[int]) -> Connection | None:
        """The broker's connection. None when the daemon stops while the
        broker is away and `lanes` have nothing left to publish: waiting for
        the broker would only hold the stop up until its timeout. With
        something left it waits on, and the shutdown's timeout ends the wait
        and says how much stays in Redis."""
        if not self.link.connected.is_set():
            await _first_of(self.link.connected, self.stopping)
            if not self.link.connected.is_set() and await self._nothing_left(pump, reading, lanes):
                return None
        return await self.link.connection()

    async def _nothing_left(self, pump: Pump, reading: _ReadUnderWay, lanes: set[int]) -> bool:
        """Whether `lanes` have no entry left to publish, once the deletes of
        what the broker acknowledged are sent (False when Redis cannot say)."""
        await reading.settle()  # what a read under way brings is queued: left to publish
        await self._forget(pump.take_deletes())
        if pump.open or pump.queued():
            return False
        try:
            return await self.backlog(lanes) == 0
        except Exception:  # Redis away too: it cannot say
            return False

    async def _settle_lanes(
        self, pump: Pump, reading: _ReadUnderWay, parts: list[int], mine: set[int]
    ) -> tuple[bool, set[int]]:
        """A finished read's entries to the queues, and the lanes of `parts`
        whose lease is held now: the reader forgets what it read and sent of a
        lane in `mine` that lost its lease (the next holder sends it), once the
        read under way is settled. Returns whether a read brought something,
        and the lanes."""
        got = await reading.settle() if reading.done() else False
        now_mine = {part for part in parts if self.held[part].is_set()}
        if now_mine != mine:
            got = await reading.settle() or got
            for part in mine - now_mine:
                pump.reset_part(part)  # lease lost: the next holder sends it
        return got, now_mine

    async def _start_over(self, pump: Pump, refusals: int) -> int:
        """The connection was lost (it is back now) or the broker refused events:
        every lane starts over from its first undeleted entry, after a refusal
        with backoff (one error line for a run of refusals). Returns the count of
        refusals in a row."""
        if pump.gone:
            log.debug("publish failed; resending after reconnect", error=pump.gone)
            pump.reset()
            return refusals
        refusals += 1
        if refusals == 1:
            log.error(
                "the broker refused events; retrying with backoff",
                error=", ".join(sorted(set(pump.refused))),
                fix="allow this user to publish under the topic prefix",
            )
        pump.reset()
        await asyncio.sleep(min(5.0, 0.1 * 2**refusals))
        return refusals

    async def _set_aside_or_raise(self, pump: Pump, readable: list[int], exc: ResponseError) -> None:
        """The read of `readable` failed with `exc`: a lane whose stream holds
        another type is left out for a while (and read again from its first entry
        once repaired); any other error is raised."""
        broken = await self._set_aside(readable) if "WRONGTYPE" in str(exc) else set()
        if not broken:
            raise exc
        for part in broken:
            pump.reset_part(part)  # read again from its first entry once repaired

    def _report_published(self, pump: Pump, refusals: int) -> int:
        """Report what the broker acknowledged since the last look; the first
        acknowledgement after refusals says the broker takes events again.
        Returns the count of refusals in a row (0 once an event went through)."""
        if not pump.published:
            return refusals
        self._report(pump.published)
        pump.published = []
        if refusals:
            log.info("the broker takes events again")
        return 0

    def _readable(self, mine: set[int]) -> list[int]:
        now = time.monotonic()
        return sorted(part for part in mine if self.broken.get(part, 0.0) <= now)

    async def _set_aside(self, parts: list[int]) -> set[int]:
        """A lane stream that is not a stream (written by hand) fails the XREAD
        of every lane: find it and leave its lane out for a while, with an
        error line, so the other lanes go on. Its dead-letter streams are looked
        at too. Returns the lanes left out (none: the error was another one's)."""
        kinds = (
            self.layout.outbox,
            self.layout.outbox_created,
            lambda part: self.layout.dead_letters(self.layout.outbox(part)),
            lambda part: self.layout.dead_letters(self.layout.outbox_created(part)),
        )
        keys = [kind(part) for part in parts for kind in kinds]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xlen(key)
            replies = await pipe.execute(raise_on_error=False)
        broken: set[int] = set()
        for index, (key, reply) in enumerate(zip(keys, replies, strict=True)):
            if isinstance(reply, ResponseError):
                part = parts[index // len(kinds)]
                log.error(  # again every BROKEN_RETRY seconds while it lasts
                    "an outbox stream holds another type: its lane is left out until it is a stream",
                    part=part,
                    key=key,
                    fix=f"move the key aside (RENAME {key} {key}:broken); the lane resumes by itself",
                )
                self.broken[part] = time.monotonic() + BROKEN_RETRY
                broken.add(part)
        return broken

    def _report(self, events: list[StatusEvent]) -> None:
        self.published += len(events)
        if self.on_published is not None:
            self.on_published(events)
        debug_published(events)

    async def _forget(self, deletes: Deletes) -> None:
        """Delete entries the broker acknowledged, even while being cancelled (a
        short, shielded round trip); if Redis is away they are kept for the
        lane's next session (`left_over`). By id (XDEL), not XTRIM: this runs
        when a session ends, maybe on a failure, and after a failover a new
        primary whose writes and clock lag could give new entries ids below
        the trim point; XDEL cannot touch them. Nothing to delete: no round trip."""
        if not deletes:
            return

        # A delete that outlives its timeout goes on alone: kept referenced
        # until it ends, and its failure read and logged then, not left to
        # the loop's "exception was never retrieved".
        task = asyncio.create_task(self._delete_by_id(deletes), name="outbox-forget")
        self.forgetting[task] = deletes.keys()
        task.add_done_callback(lambda done: self._forgotten(done, deletes))
        with contextlib.suppress(Exception):  # _forgotten deals with it
            async with asyncio.timeout(FORGET_WAIT_S):
                await asyncio.shield(task)

    def _forgotten(self, task: asyncio.Task[None], deletes: Deletes) -> None:
        self.forgetting.pop(task, None)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        if is_transient(exc) and not self.closed:  # Redis away: the lane's next session sends them first
            self.left_over.merge(deletes)
            log.info(
                "published entries not deleted yet (Redis away): deleted before their lane reads on",
                entries=deletes.entries(),
                error=str(exc),
            )
        else:
            self._not_deleted(deletes, str(exc))

    def _not_deleted(self, deletes: Deletes, error: str) -> None:
        # A warning: subscribers may see these events twice (same event ids)
        # when the next session of their lanes (or the next daemon) reads them again.
        log.warning(
            "could not delete published entries; they may be sent again",
            entries=deletes.entries(),
            error=error,
        )

    async def _after_last_session(self, pump: Pump) -> None:
        """The deletes of the lanes' last session go before this one reads:
        those under way are waited for (FORGET_WAIT_S), those it could not
        send are sent."""
        keys = pump.keys()
        if under_way := [task for task, on in self.forgetting.items() if on & keys]:
            await asyncio.wait(under_way, timeout=FORGET_WAIT_S)
        await self._send_left_over(self.left_over.take(keys))

    async def _send_left_over(self, deletes: Deletes) -> None:
        """The deletes ended sessions could not send, before a lane reads (by
        id, as in _forget). Redis away again: kept, and the error raised (the
        session starts over later); refused: said, and let go."""
        if not deletes:
            return
        try:
            await self._delete_by_id(deletes)
        except BaseException as exc:
            if isinstance(exc, Exception) and not is_transient(exc):
                self._not_deleted(deletes, str(exc))
                return
            self.left_over.merge(deletes)  # Redis away again, or cancelled
            raise

    async def _delete_by_id(self, deletes: Deletes) -> None:
        """The deletes alone, by id (XDEL): see _forget."""
        await self._with_deletes(deletes, lambda pipe: None, trim=False)

    async def _xrange_each(self, lookups: list[tuple[str, bytes]]) -> list[list[Entry]]:
        """The entry of each (stream, id), or an empty list: one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, entry_id in lookups:
                pipe.xrange(key, entry_id, entry_id)
            # an id Redis refuses (written by hand) is not found: its entry is moved aside in turn
            replies = await pipe.execute(raise_on_error=False)
        return [[] if isinstance(reply, Exception) else reply for reply in replies]

    async def _with_deletes(
        self, acked: Deletes, then: Callable[[Any], None], *, trim: bool = True
    ) -> list[Any]:
        """One pipeline: the event log appends and the deletes of `acked`, then
        what `then` queues; its replies. An append Redis refuses costs only
        those log entries: the pipeline goes again without them (a failover's
        READONLY or LOADING is an outage, raised like any other). If Redis
        refuses the XTRIM command (NOPERM: the daemon's ACL predates it), say
        so once and delete with XDEL from then on.

        Errors are raised by the pipeline, not returned in its replies: that
        is what makes redis-py's cluster pipeline send it again after a
        failover (a lost connection to a primary that handed over), instead
        of this lane starting over and sending what was in flight twice."""
        while True:
            trimming = trim and self.trim  # what this attempt sends (other lanes may change self.trim)
            async with self.redis.pipeline(transaction=False) as pipe:
                appends = acked.queue_log(pipe, self._log_min_id()) if acked.logged else 0
                acked.queue(pipe, trim=trimming)
                then(pipe)
                try:
                    replies = await pipe.execute()
                    acked.logged = {}  # appended: never twice from here
                    return list(replies)
                except ResponseError as exc:
                    # full (noeviction) loses the log entries, as the deletes free memory;
                    # a failover's READONLY or LOADING is an outage
                    refused = isinstance(exc, OutOfMemoryError) or not redis_lost(exc)
                    if 0 < _failed_command(exc) <= appends and refused:
                        self._log_refusals([exc])
                        acked.logged = {}  # lost for the log; the deletes go again without them
                        continue
                    # not a refused key: "... no permissions to run the 'xtrim' command"
                    refused_trim = isinstance(exc, NoPermissionError) and "'xtrim' command" in str(exc)
                    if not trimming or not refused_trim:
                        raise
            if not self.trim:
                continue  # another lane found it out first and said so
            self.trim = False
            log.warning(
                "Redis refused XTRIM: published entries are deleted with XDEL, which costs Redis far more",
                fix="add +xtrim to the daemon's Redis user (see deploy/redis-users.acl)",
            )

    def _log_min_id(self) -> int:
        """Where the event log is trimmed: entries older than its retention go,
        by this machine's clock; a margin more is kept (the retention again,
        at most a minute), so a clock that far ahead of Redis' does not trim
        what `replay` promises."""
        return max(0, int(time.time() * 1000) - self.event_log_ms - min(self.event_log_ms, 60_000))

    def _log_refusals(self, replies: Sequence[Any]) -> None:
        """An event log append Redis refused (full with noeviction, a key of
        another type, an ACL without XADD) loses those log entries, never the
        events: they are published and their outbox entries deleted all the
        same. Said at most once a minute."""
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if errors and time.monotonic() - self.log_failed_at > 60:
            self.log_failed_at = time.monotonic()
            log.error(
                "event log append refused: these events were published but are not in the log for replay",
                streams=len(errors),
                error=str(errors[0]),
                fix="free memory in Redis, or move a key of another type away from <prefix>:{P}:log",
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

    async def backlog(self, parts: Iterable[int] = range(PARTS)) -> int:
        """Entries in the outbox streams of `parts` (every lane by default)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in parts:
                pipe.xlen(self.layout.outbox(part))
                pipe.xlen(self.layout.outbox_created(part))
            lengths = await pipe.execute()
        return sum(int(n) for n in lengths)


def _task_name(parts: list[int]) -> str:
    return f"outbox-lane-{parts[0]}" if len(parts) == 1 else "outbox-lanes"


def _failed_command(exc: ResponseError) -> int:
    """The position (from 1) of the pipeline command an error reply came from,
    as redis-py names it ("Command # 3 (XADD ...) of pipeline caused error");
    0 when it does not say."""
    match = re.match(r"Command # (\d+) ", str(exc))
    return int(match.group(1)) if match else 0


class _ReadUnderWay:
    """A pump's read that goes on beside its sends. A read waits in Redis
    behind other clients' commands (a sweep of thousands of orders holds Redis
    for milliseconds); awaited in turn, it would idle the window all that
    while. So while transitions are queued the read runs as a task of its
    own and its entries join the queues when it returns. Only transitions go out
    meanwhile: `created` events in turn wait for the read, so a cancellation
    it brings still overtakes a backlog of them. A lane starts over only once
    the read is settled: a reset under it would take its stale entries."""

    def __init__(
        self,
        pump: Pump,
        set_aside_or_raise: Callable[[Pump, list[int], ResponseError], Awaitable[None]],
        redis_service: Service,
    ) -> None:
        self.pump = pump
        self.set_aside_or_raise = set_aside_or_raise
        self.redis_service = redis_service
        self.task: asyncio.Task[bool] | None = None
        self.lanes: list[int] = []

    def done(self) -> bool:
        return self.task is not None and self.task.done()

    async def read(self, readable: list[int], stopping: bool) -> bool | None:
        """Read now: beside the sends when transitions are queued (False:
        nothing yet); else in turn (True if it brought something; None: lanes
        of it were set aside). With nothing queued or in flight the read waits
        in Redis for the next entry (up to BLOCK_MS)."""
        pump = self.pump
        if pump.hi:
            self.task = asyncio.create_task(pump.read(readable, None), name="outbox-read")
            self.lanes = readable
            return False
        block = None if (stopping or pump.open) else BLOCK_MS
        return await self._outcome(pump.read(readable, block), readable)

    async def settle(self) -> bool:
        """Wait for the read under way, if any: True if it brought something."""
        if self.task is None:
            return False
        task, self.task = self.task, None
        return bool(await self._outcome(task, self.lanes))

    async def _outcome(self, read: Awaitable[bool], lanes: list[int]) -> bool | None:
        """What `read` of `lanes` brought (True: something); None when lanes of
        it were set aside (a stream of the wrong type); any other error raised."""
        try:
            got = await read
        except ResponseError as exc:
            await self.set_aside_or_raise(self.pump, lanes, exc)
            return None
        self.redis_service.ok()
        return got

    async def cancel(self) -> None:
        """Stop the read under way (its deletes go back to the pump)."""
        if self.task is not None:
            task, self.task = self.task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _first_of(*events: asyncio.Event) -> None:
    """Until one of `events` is set."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def _wait_for_something_to_send(
    pump: Pump,
    publishers: list[Publisher],
    *,
    deferred: bool,
    got: bool,
    reading: asyncio.Task[bool] | None,
) -> None:
    """Nothing was sent this round (`deferred`: the writes were held back for a
    fuller window; `got`: the read brought something): wait for what can let
    events go. A read under way (`reading`) ends every wait: it may bring them."""
    room = any(publisher.room for publisher in publishers)  # PUBACKs came while reading
    if deferred or not room or reading is not None:
        # the window is (nearly) full (of this reader's publishes or another
        # lane's, on a cluster), or the connection is going, or a read is under
        # way (what it brings goes first; `created` events wait for it)
        await _changed(publishers, 1.0, reading)
    elif pace := pump.pace_wait():  # the `created` backlog's pace holds it
        await _changed(publishers, pace) if pump.open else await asyncio.sleep(pace)
    elif pump.open:
        await _changed(publishers, POLL_S if not pump.queued() else 1.0)
    elif not got and pump.queued():
        await asyncio.sleep(0.2)  # held, but the lease is being renewed


async def _until_answered(pump: Pump, publishers: list[Publisher]) -> None:
    """A session that ends (Redis away, say) with publishes in flight waits
    for their PUBACKs, or for the broker's silence of PUBLISH_TIMEOUT: what
    they acknowledge is deleted then, not read and sent again by the lane's
    next session. Not while the task is cancelled (a stop that timed out),
    nor when the connection is gone (nothing will answer)."""
    task = asyncio.current_task()
    if not publishers or (task is not None and task.cancelling()):
        return
    while pump.open and not pump.gone and (left := PUBLISH_TIMEOUT - pump.idle_for()) > 0:
        await _changed(publishers, left)
    if pump.open:  # the broker fell silent: their room in the window goes to the next session
        _give_up_in_flight(pump, publishers)


async def _resend_if_silent(pump: Pump, publishers: list[Publisher], reading: _ReadUnderWay) -> None:
    """No PUBACK for PUBLISH_TIMEOUT while publishes are in flight: forget them
    and start every lane over (once the read under way is settled), so they go
    out again."""
    if pump.open and pump.idle_for() > PUBLISH_TIMEOUT:
        await reading.settle()
        log.warning("no PUBACK from the broker; sending again", seconds=PUBLISH_TIMEOUT)
        _give_up_in_flight(pump, publishers)
        pump.reset()


def _give_up_in_flight(pump: Pump, publishers: list[Publisher]) -> None:
    """The pump's publishes the broker has not answered: no longer routed to
    it, and their room in each window freed (they go out again unless deleted)."""
    pump.open -= sum(publisher.forget(pump) for publisher in publishers)


async def _changed(
    publishers: list[Publisher], timeout: float, reading: asyncio.Task[bool] | None = None
) -> None:
    """Until a PUBACK on any of the connections, the end of the read under way,
    or `timeout`. Every connection's waiter is registered before anything else
    runs: a PUBACK read in the meantime would otherwise wake nobody, and the
    wait would last the whole `timeout` with the window empty."""
    if len(publishers) == 1 and reading is None:
        await publishers[0].changed(timeout)
        return
    if any(publisher.lost for publisher in publishers):
        await asyncio.sleep(0.01)  # the link is replacing the connection: let it
        return
    waiters = [publisher.waiter() for publisher in publishers]
    try:
        ends: list[asyncio.Future[Any]] = [*waiters, reading] if reading is not None else [*waiters]
        await asyncio.wait(ends, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:  # (never the read: it goes on)
            waiter.cancel()
