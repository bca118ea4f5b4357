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

On a Redis Cluster each node announces only its own expiries, so the listener
keeps one subscription per primary, follows the topology (a failover, a new
primary) every `TOPOLOGY_EVERY` seconds and at once when a subscription
fails, and asks the scheduler for a full sweep whenever a subscription was
lost or a primary changed (events sent meanwhile are gone; the index is not).
A PUBLISH on a cluster reaches every node, so each subscription also carries
the wake channel (a wake heard twice is harmless).

redis-py 8 has a cluster keyspace-notification helper, but it polls the nodes
in turn (up to 100 ms each, so a wake could wait) and repairs lost
subscriptions silently; here a lost subscription must trigger that sweep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import time

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from listener import logs
from listener.config import Settings
from listener.connection import (
    NodeAddress,
    RedisClient,
    cluster_primaries,
    configured_node,
    subscription_client,
)
from listener.fastpath import FastPaths
from listener.fastpath.hiredis_drain import HiredisDrain
from listener.keys import KeyLayout
from listener.notifications import expired_channel
from listener.orders import Operation
from listener.scheduler import CancelledHook, DeadlineScheduler
from listener.store import Store, TransitionResult
from listener.supervise import Service, describe, is_transient, supervise

log = logs.get("listener.expiry")

MAX_PENDING = 20_000
BATCH = 500
TOPOLOGY_EVERY = 2.0  # seconds between looks at a cluster's primaries
# How long an expired event waits for the scheduler's own cancellation of its
# order to be known before the expire script runs for it: Redis' expiry often
# announces a timer a moment before the sweep that cancels its order is known
# here, and a much shorter wait runs the script for nothing (docs/figures.md,
# "Measurements behind design choices").
GRACE = 0.1
PING_EVERY = 15.0  # seconds between PINGs on a subscription (a dead connection fails the send)


class ExpiryListener:
    def __init__(
        self,
        redis: RedisClient,
        store: Store,
        layout: KeyLayout,
        db: int,
        scheduler: DeadlineScheduler,
        service: Service,
        settings: Settings,
        fast_paths: FastPaths,
        *,
        on_cancelled: CancelledHook | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings  # on a cluster: how to reach each primary
        self.store = store
        self.layout = layout
        self.channel = expired_channel(db)
        self._wake_channel = layout.wake_channel.encode()
        self.scheduler = scheduler
        self.service = service
        self.on_cancelled = on_cancelled  # as the scheduler's: for each order cancelled here
        self.subscribed = asyncio.Event()
        self._pending: dict[str, float] = {}  # order id -> when its event came (monotonic), oldest first
        self._have_work = asyncio.Event()
        self._stopping = asyncio.Event()
        self.cancelled = 0
        self.ignored = 0
        self.dropped = 0
        self.refused = 0  # expire scripts answered with an error (a malformed record)
        self.received_from: collections.Counter[str] = collections.Counter()  # expired events, per node
        self.skipped = 0
        # The messages one socket read brought, taken straight from hiredis'
        # buffer after each get_message (listener/fastpath/hiredis_drain.py).
        self._drain = HiredisDrain(fast_paths, lost=scheduler.resync)
        self._listening: set[str] = set()  # nodes whose subscription is confirmed now
        self._ever_listened: set[str] = set()
        self._expected: set[str] = set()  # nodes that must be listened to
        self._topology_stale = asyncio.Event()

    @property
    def read_buffered(self) -> int:
        """Messages taken from the parser's buffer rather than through get_message."""
        return self._drain.taken

    @property
    def received(self) -> int:
        """Expired events seen, ours or not."""
        return sum(self.received_from.values())

    def stop(self) -> None:
        self._stopping.set()
        self._have_work.set()
        self._topology_stale.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(supervise("expiry-worker", self.service, self._work), name="expiry-worker")
            if isinstance(self.redis, RedisCluster):
                await self._follow_cluster(self.redis)
            else:
                self._expected = {"redis"}
                client = subscription_client(self.settings)
                try:
                    await supervise("expiry-listener", self.service, lambda: self._listen(client, "redis"))
                finally:
                    await client.aclose()
            self.stop()

    async def _follow_cluster(self, cluster: RedisCluster) -> None:
        """One subscription per primary, kept in step with the topology."""
        sessions: dict[str, asyncio.Task[None]] = {}
        try:
            while not self._stopping.is_set():
                self._topology_stale.clear()
                nodes = await self._primaries(cluster)
                if set(nodes) != self._expected:
                    log.info("following the cluster's primaries", primaries=sorted(nodes))
                    if self._expected - set(nodes):
                        self.scheduler.resync()  # a primary went away: what did it not announce?
                    self._expected = set(nodes)
                self._reconcile(sessions, nodes)
                self._update_subscribed()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TOPOLOGY_EVERY):
                        await self._topology_stale.wait()
        finally:
            for task in sessions.values():
                task.cancel()
            await asyncio.gather(*sessions.values(), return_exceptions=True)

    async def _primaries(self, cluster: RedisCluster) -> dict[str, NodeAddress]:
        """The primaries now, asked on a side connection; the shared client
        is refreshed only when they changed (a refresh reconnects all its
        connections). While no node answers: the ones known."""
        known = [NodeAddress(n.host, int(n.port)) for n in cluster.get_primaries()]
        try:
            primaries = await cluster_primaries(self.settings, [configured_node(self.settings), *known])
        except Exception as exc:
            if not is_transient(exc):
                raise
            primaries = known
        if {n.name for n in primaries} != {n.name for n in known}:
            try:
                await cluster.nodes_manager.initialize()
            except Exception as exc:  # its own commands will retry (and refresh) anyway
                if not is_transient(exc):
                    raise
        return {node.name: node for node in primaries}

    def _reconcile(self, sessions: dict[str, asyncio.Task[None]], nodes: dict[str, NodeAddress]) -> None:
        """A listening session per primary: end those of former primaries,
        start missing ones. A session that ended with an error other than an
        outage (those it retries itself) is a bug: raised here."""
        for name in list(sessions):
            if name not in nodes:
                sessions.pop(name).cancel()
                self._listening.discard(name)
        for name, node in nodes.items():
            task = sessions.get(name)
            if task is not None and not task.done():
                continue
            failure = task.exception() if task is not None and not task.cancelled() else None
            if failure is not None:
                raise failure
            sessions[name] = asyncio.create_task(self._node_session(node), name=f"expiry-listener-{name}")

    async def _node_session(self, node: NodeAddress) -> None:
        client = subscription_client(self.settings, node)
        try:

            async def listen() -> None:
                try:
                    await self._listen(client, node.name)
                except Exception as exc:
                    if is_transient(exc):
                        self._topology_stale.set()  # a failover? look at the topology now
                    raise

            await supervise(f"expiry-listener {node.name}", self.service, listen)
        finally:
            await client.aclose()

    def _update_subscribed(self) -> None:
        if self._expected and self._expected <= self._listening:
            self.subscribed.set()

    async def _listen(self, redis: Redis, node: str) -> None:
        pubsub: PubSub = redis.pubsub()
        try:
            # Wake channel first, the expiry subscription last (the contract's
            # order), each confirmed by Redis before we go on: subscribe() only
            # sends, a refusal (ACL) would arrive later as the reply.
            for channel in (self.layout.wake_channel, self.channel):
                await pubsub.subscribe(channel)
                await self._confirmed(pubsub, node)
            self.service.ok()
            if node in self._ever_listened:
                # A reconnect: events sent while we were away are gone; the index is not.
                self.scheduler.resync()
            self._ever_listened.add(node)
            self._listening.add(node)
            self._update_subscribed()
            log.info("subscribed to expired events", channel=self.channel, node=node)
            await self._serve(pubsub, node)
        finally:
            self._listening.discard(node)
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _serve(self, pubsub: PubSub, node: str) -> None:
        """Read the subscription until stop() or a failure (raised). The reads
        block without a timeout of their own: a timeout armed per read costs
        more than the read (a burst brings one event per order), so stop()
        cancels the reader and a PING every PING_EVERY s finds a dead connection."""
        tasks = [
            asyncio.create_task(self._read(pubsub, node), name=f"expiry-read {node}"),
            asyncio.create_task(self._keep_alive(pubsub), name=f"expiry-ping {node}"),
            asyncio.create_task(self._stopping.wait(), name=f"expiry-stop {node}"),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and (failure := task.exception()) is not None:
                raise failure

    async def _read(self, pubsub: PubSub, node: str) -> None:
        on_message = functools.partial(self._on_message, node)
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                on_message(message["channel"], message["data"])
            # the rest of that socket read, taken in bounded portions; the
            # other tasks run in between
            while self._drain.drain(pubsub.connection, on_message):  # noqa: ASYNC110 - not a wait
                await asyncio.sleep(0)

    @staticmethod
    async def _keep_alive(pubsub: PubSub) -> None:
        while True:
            await asyncio.sleep(PING_EVERY)
            await pubsub.ping()  # the reply is read (and skipped) by _read

    async def _confirmed(self, pubsub: PubSub, node: str, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    return
                if message["type"] == "message":  # of a channel subscribed just before
                    self._on_message(node, message["channel"], message["data"])

    def _on_message(self, node: str, channel: bytes, data: bytes) -> None:
        if channel == self._wake_channel:
            part, _, deadline = data.partition(b" ")
            # bytes.isdigit: ASCII digits only; the lengths keep int() cheap (anyone may publish here)
            if 0 < len(part) <= 3 and part.isdigit() and 0 < len(deadline) <= 16 and deadline.isdigit():
                self.scheduler.wake(int(part), int(deadline))
            else:
                log.warning("malformed wake message ignored", data=data[:100].decode(errors="replace"))
            return
        self.received_from[node] += 1
        order_id = self.layout.parse_timer(data.decode(errors="replace"))
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
        self._pending.setdefault(order_id, time.monotonic())
        self._have_work.set()

    async def _work(self) -> None:
        while True:
            if not self._pending:
                if self._stopping.is_set():
                    return
                self._have_work.clear()
                await self._have_work.wait()
                continue
            # The scheduler cancels at the deadline; Redis' own expiry often
            # announces the timer a little earlier. Each event waits GRACE for
            # the scheduler's reply about its order (then it is skipped) before
            # the expire script runs for it.
            ripe = time.monotonic() - (0.0 if self._stopping.is_set() else GRACE)
            oldest = next(iter(self._pending.values()))
            if oldest > ripe:
                await asyncio.sleep(oldest - ripe)
                continue
            batch = self._ripe(ripe)
            if not batch:
                continue
            results = await self.store.try_many(Operation.EXPIRE, batch)
            self.service.ok()
            done = self._settle(batch, results)
            if done and self.on_cancelled is not None:
                await self._report_cancelled(done, self.on_cancelled)

    def _ripe(self, ripe: float) -> list[str]:
        """The next batch of orders whose events came before `ripe` and which
        the scheduler has not cancelled meanwhile (those are skipped)."""
        batch = []
        for order_id, came in list(itertools.islice(self._pending.items(), BATCH)):
            if came > ripe:
                break
            if order_id in self.scheduler.recent:  # its sweep result arrived after the event
                self._pending.pop(order_id)
                self.skipped += 1
            else:
                batch.append(order_id)
        return batch

    def _settle(self, batch: list[str], results: list[TransitionResult | ResponseError]) -> list[str]:
        """Count and log what the expire scripts did; the orders they cancelled."""
        done = []
        for order_id, result in zip(batch, results, strict=True):
            self._pending.pop(order_id, None)
            if isinstance(result, Exception):
                # a record the script refuses (written by hand or by a broken
                # producer): this order stays as it is, the others go on
                self.refused += 1
                log.error("expired order not cancelled", order_id=order_id, error=describe(result))
            elif result.outcome == "done":
                self.cancelled += 1
                done.append(order_id)
                log.info("order cancelled", order_id=result.order_id, reason="timeout", via="expired-event")
        return done

    async def _report_cancelled(self, order_ids: list[str], hook: CancelledHook) -> None:
        """The hook for each order cancelled here, with its deadline and the
        moment of its cancellation as its record has them (the expire script
        answers neither)."""
        for order_id, times in zip(order_ids, await self.store.cancel_times(order_ids), strict=True):
            if times is not None:
                hook(order_id, *times)
