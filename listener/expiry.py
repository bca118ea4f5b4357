"""The keyspace listener: `__keyevent@<db>__:expired` and the wake channel.

An `expired` event for one of this product's timer keys runs the `expire`
script for that order (a no-op if the scheduler got there first, which is
the usual case). Other keys expire without effect. The ids are collected and
worked off in pipelined batches by a separate task, so reading the
subscription never waits on script calls and a burst of events cannot fill
Redis' pub/sub output buffer; past `MAX_PENDING` ids the listener stops
collecting and asks the scheduler for a full sweep instead (the index holds
every one of them anyway).

The wake channel carries "<part> <deadline ms>" when an order becomes the
earliest of its part, so the sleeping scheduler wakes for it.
"""

from __future__ import annotations

import asyncio
import itertools

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from listener import logs
from listener.keys import KeyLayout
from listener.orders import Operation
from listener.scheduler import DeadlineScheduler
from listener.store import Store
from listener.supervise import Service, supervise

log = logs.get("listener.expiry")

MAX_PENDING = 20_000
BATCH = 500


def expired_channel(db: int) -> str:
    return f"__keyevent@{db}__:expired"


class ExpiryListener:
    def __init__(
        self,
        redis: Redis,
        store: Store,
        layout: KeyLayout,
        db: int,
        scheduler: DeadlineScheduler,
        service: Service,
    ) -> None:
        self.redis = redis
        self.store = store
        self.layout = layout
        self.channel = expired_channel(db)
        self._wake_channel = layout.wake_channel.encode()
        self.scheduler = scheduler
        self.service = service
        self.subscribed = asyncio.Event()
        self._pending: dict[str, None] = {}
        self._have_work = asyncio.Event()
        self._stopping = asyncio.Event()
        self.cancelled = 0
        self.ignored = 0
        self.dropped = 0
        self.received = 0  # expired events seen, ours or not
        self.skipped = 0

    def stop(self) -> None:
        self._stopping.set()
        self._have_work.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(supervise("expiry-worker", self.service, self._work), name="expiry-worker")
            await supervise("expiry-listener", self.service, self._listen)
            self.stop()

    async def _listen(self) -> None:
        pubsub: PubSub = self.redis.pubsub()
        try:
            # Wake channel first, the expiry subscription last (the contract's
            # order), each confirmed by Redis before we go on: subscribe() only
            # sends, a refusal (ACL) would arrive later as the reply.
            for channel in (self.layout.wake_channel, self.channel):
                await pubsub.subscribe(channel)
                await self._confirmed(pubsub)
            self.service.ok()
            if self.subscribed.is_set():
                # A reconnect: events sent while we were away are gone; the index is not.
                self.scheduler.resync()
            self.subscribed.set()
            log.info("subscribed to expired events", channel=self.channel)
            while not self._stopping.is_set():
                message = await pubsub.get_message(timeout=0.5)
                if message is None or message["type"] != "message":
                    continue
                self._on_message(message["channel"], message["data"])
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _confirmed(self, pubsub: PubSub, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    return
                if message["type"] == "message":  # of a channel subscribed just before
                    self._on_message(message["channel"], message["data"])

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if channel == self._wake_channel:
            part, _, deadline = data.partition(b" ")
            if part.isascii() and part.isdigit() and deadline.isascii() and deadline.isdigit():
                self.scheduler.wake(int(part), int(deadline))
            else:
                log.warning("malformed wake message ignored", data=data[:100].decode(errors="replace"))
            return
        order_id = self.layout.parse_timer(data.decode(errors="replace"))
        self.received += 1
        if order_id is None:
            self.ignored += 1
            return
        if order_id in self.scheduler.recent:
            self.skipped += 1  # the scheduler cancelled it; deleting its timer sent this event
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1  # the deadline index still holds it: a full sweep will find it
            self.scheduler.resync()
            return
        self._pending[order_id] = None
        self._have_work.set()

    async def _work(self) -> None:
        while True:
            if not self._pending:
                if self._stopping.is_set():
                    return
                self._have_work.clear()
                await self._have_work.wait()
                continue
            # Expired events are the slow path anyway: a few ms let the
            # scheduler's reply for the same orders land first.
            await asyncio.sleep(0.005)
            batch = []
            for order_id in list(itertools.islice(self._pending, BATCH)):
                if order_id in self.scheduler.recent:  # its sweep result arrived after the event
                    self._pending.pop(order_id)
                    self.skipped += 1
                else:
                    batch.append(order_id)
            if not batch:
                continue
            results = await self.store.apply_many(Operation.EXPIRE, batch)
            self.service.ok()
            for result in results:
                self._pending.pop(result.order_id, None)
                if result.outcome == "done":
                    self.cancelled += 1
                    log.info(
                        "order cancelled", order_id=result.order_id, reason="timeout", via="expired-event"
                    )
