"""Outbox -> MQTT: every event the scripts appended goes out at least once,
in version order per order; an entry is deleted only after the broker's PUBACK.

One lane per part, all lanes concurrent. Each lane has two streams:
``outbox`` (every transition after `created`) and ``outbox:created``. The
second one can hold a bulk import's backlog; a lane publishes its ``outbox``
first and ``outbox:created`` only when the first is empty, in small chunks
through one gate shared by all lanes, so a cancellation waits behind at most
one such chunk. Per-order order still holds: before an order's later event,
the lane publishes that order's `created` event out of its turn if it is
still unpublished (found by the id kept in the order record) and deletes it.

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
from typing import Any, cast

import aiomqtt

from listener import logs
from listener.events import StatusEvent, from_created_entry, from_outbox_entry
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
    ) -> None:
        self.store = store
        self.redis = store.redis
        self.layout = layout
        self.link = link
        self.redis_service = redis_service
        self.batch = batch
        self.owner = owner or owner_id()
        self.on_published = on_published
        self.held = [asyncio.Event() for _ in range(PARTS)]
        self.valid_until = [0.0] * PARTS  # monotonic time our lease surely lasts
        self.published = 0
        self.stopping = asyncio.Event()
        self._created_gate = asyncio.Semaphore(1)

    async def run(self) -> None:
        """Run the leases and all lanes until `stop()` drained them."""
        async with asyncio.TaskGroup() as group:
            leases = group.create_task(self._keep_leases(), name="outbox-leases")
            lanes = [group.create_task(self._lane(part), name=f"outbox-lane-{part}") for part in range(PARTS)]
            await asyncio.gather(*lanes)
            leases.cancel()
        await self._release_leases()

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

    async def _lane(self, part: int) -> None:
        while not self.stopping.is_set():
            if self.held[part].is_set() and not self.holds(part):
                await asyncio.sleep(0.2)  # held but not renewed lately: wait for the renewal
                continue
            if not self.held[part].is_set():
                waiter = asyncio.ensure_future(self.held[part].wait())
                stop = asyncio.ensure_future(self.stopping.wait())
                try:
                    await asyncio.wait({waiter, stop}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                    stop.cancel()
                continue
            await supervise(f"outbox-lane-{part}", self.redis_service, lambda: self._drain(part))

    async def _drain(self, part: int) -> None:
        """Publish the lane from its first unpublished entry while the lease is held.

        Entries the broker acknowledged are deleted in the same round trip as
        the next read (a pipeline: XDEL, then XREAD), or before returning."""
        hi_key = self.layout.outbox(part)
        lo_key = self.layout.outbox_created(part)
        hi_last, lo_last = b"0-0", b"0-0"
        acked: dict[str, list[bytes]] = {}  # published, PUBACKed, not yet deleted
        try:
            while self.holds(part):
                block = None if self.stopping.is_set() else BLOCK_MS
                reply = await self._read(acked, {hi_key: hi_last, lo_key: lo_last}, block)
                acked = {}
                self.redis_service.ok()
                streams = {_name(stream): entries for stream, entries in reply or []}
                hi = streams.get(hi_key, [])
                if hi:
                    early = await self._publish_hi(part, hi, lo_last)
                    if early is None:
                        return
                    acked[hi_key] = [entry_id for entry_id, _ in hi]
                    if early:
                        acked[lo_key] = early
                    hi_last = hi[-1][0]
                    continue
                lo = streams.get(lo_key, [])[:CREATED_CHUNK]
                if lo:
                    events = await self._parse(lo_key, lo, created=True)
                    async with self._created_gate:
                        if not await self._send(part, [event for _, event in events]):
                            return
                    acked[lo_key] = [entry_id for entry_id, _ in lo]
                    lo_last = lo[-1][0]
                    continue
                if self.stopping.is_set():
                    return
        finally:
            if acked:  # the lease ends, or a stop cut us short: what the broker has must not go out again
                await self._forget(acked)

    async def _forget(self, acked: dict[str, list[bytes]]) -> None:
        """XDEL entries the broker acknowledged, even while being cancelled (a
        short, shielded round trip); if Redis is away they are sent again later."""

        async def delete() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                _queue_deletes(pipe, acked)
                await pipe.execute()

        try:
            async with asyncio.timeout(2.0):
                await asyncio.shield(delete())
        except Exception as exc:  # at least once: a repeat is the worst case
            log.debug("could not delete published entries; they may be sent again", error=str(exc))

    async def _read(
        self, acked: dict[str, list[bytes]], streams: dict[Any, Any], block: int | None
    ) -> list[tuple[bytes, list[Entry]]] | None:
        """XREAD the lane's streams; delete the `acked` entries first, in the same round trip."""
        if not acked:
            return cast(
                "list[tuple[bytes, list[Entry]]] | None",
                await self.redis.xread(streams, count=self.batch, block=block),
            )
        async with self.redis.pipeline(transaction=False) as pipe:
            _queue_deletes(pipe, acked)
            pipe.xread(streams, count=self.batch, block=block)
            replies = await pipe.execute()
        return cast("list[tuple[bytes, list[Entry]]] | None", replies[-1])

    async def _parse(
        self, key: str, entries: Sequence[Entry], *, created: bool
    ) -> list[tuple[bytes, StatusEvent]]:
        """Events of well-formed entries; a malformed one (written by a broken
        producer) is moved to `<key>:dead` and logged, so it cannot block its lane."""
        good: list[tuple[bytes, StatusEvent]] = []
        for entry_id, fields in entries:
            try:
                event = from_created_entry(entry_id, fields) if created else from_outbox_entry(fields)
            except (KeyError, ValueError, UnicodeDecodeError) as exc:
                dead = f"{key}:dead"
                log.error(
                    "malformed outbox entry moved aside",
                    entry=entry_id.decode(),
                    stream=dead,
                    error=repr(exc),
                )
                kept: dict[Any, Any] = {b"id": entry_id, **fields}
                await self.redis.xadd(dead, kept, maxlen=10_000, approximate=True)
                await self.redis.xdel(key, entry_id)
                continue
            good.append((entry_id, event))
        return good

    async def _publish_hi(self, part: int, hi: Sequence[Entry], lo_last: bytes) -> list[bytes] | None:
        """Publish `hi` in order; an order whose `created` event may still wait
        in outbox:created gets it published first. Returns the ids of those
        `created` entries (to delete there), or None if the lease was lost
        before the broker took everything."""
        lo_key = self.layout.outbox_created(part)
        events = [event for _, event in await self._parse(self.layout.outbox(part), hi, created=False)]
        suspects = list(
            dict.fromkeys(e.created_entry for e in events if _id_tuple(e.created_entry) > _id_tuple(lo_last))
        )
        waiting: dict[bytes, StatusEvent] = {}
        if suspects:
            async with self.redis.pipeline(transaction=False) as pipe:
                for created in suspects:
                    pipe.xrange(lo_key, created, created)
                found = cast("list[list[Entry]]", await pipe.execute())
            for entries in found:
                if entries:
                    # a malformed one is moved aside by the created lane in its turn
                    with contextlib.suppress(KeyError, ValueError, UnicodeDecodeError):
                        waiting[entries[0][0]] = from_created_entry(*entries[0])
        early = list(waiting)
        ordered: list[StatusEvent] = []
        for event in events:
            first = waiting.pop(event.created_entry, None)
            if first is not None:
                ordered.append(first)
            ordered.append(event)
        if not await self._send(part, ordered):
            return None
        return early

    async def _send(self, part: int, events: Sequence[StatusEvent]) -> bool:
        """Publish until the broker acknowledged all (True), or until the lane's
        lease is no longer surely ours (False: the entries stay for the next
        holder). A broker outage is the MQTT link's to report and repair; a
        broker that refuses (ACL, quota) is logged once and retried with backoff."""
        refusals = 0
        while True:
            if not self.holds(part):
                return False
            try:
                await self.link.publish(events, part=part)
                break
            except PublishRefused as exc:
                refusals += 1
                if refusals == 1:
                    log.error(
                        "the broker refused events; retrying with backoff",
                        part=part,
                        error=str(exc),
                        fix="allow this user to publish under the topic prefix",
                    )
                await asyncio.sleep(min(5.0, 0.1 * 2**refusals))
            except aiomqtt.MqttError as exc:
                log.debug("publish failed; resending after reconnect", error=str(exc))
                await asyncio.sleep(0.1)
        if refusals:
            log.info("the broker takes events again", part=part)
        self.published += len(events)
        if self.on_published is not None:
            self.on_published(events)
        lane_log = log.bind(part=part)
        if lane_log.is_enabled_for(logging.DEBUG):  # a line per event only when asked for
            for event in events:
                lane_log.debug(
                    "event published", order_id=event.order_id, event_id=event.event_id, status=event.status
                )
        return True

    async def backlog(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for part in range(PARTS):
                pipe.xlen(self.layout.outbox(part))
                pipe.xlen(self.layout.outbox_created(part))
            lengths = await pipe.execute()
        return sum(int(n) for n in lengths)


def _queue_deletes(pipe: Any, acked: dict[str, list[bytes]]) -> None:
    """XDEL of the published entries, queued on a (plain or cluster) pipeline."""
    for key, ids in acked.items():
        pipe.xdel(key, *ids)


def _name(stream: bytes | str) -> str:
    return stream.decode() if isinstance(stream, bytes) else stream
