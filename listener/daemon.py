"""The daemon: every long-lived task in one TaskGroup, readiness, graceful shutdown.

Start: MQTT connected and subscribed to logistics -> catch-up sweep of the
deadline index -> Redis expiry subscription (made last) -> READY=1.
Stop (SIGTERM/SIGINT): stop listening and sweeping (an in-flight script
finishes), publish what is in the outbox as far as the broker allows within
`shutdown_timeout`, release the outbox leases, close. Whatever is not
published stays in Redis for the next start or another daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine
from typing import Any

import sdnotify

from listener import logs
from listener.config import FastPathSetting, Settings
from listener.connection import RedisClient, connect_redis, is_cluster, open_cluster
from listener.expiry import ExpiryListener
from listener.fastpath import FastPaths
from listener.http_server import serve
from listener.keys import KeyLayout
from listener.logistics import LogisticsHandler
from listener.metrics import Metrics
from listener.mqtt import MqttLink
from listener.mqtt.drops import DropWatch
from listener.notifications import check_notifications
from listener.outbox import Outbox
from listener.scheduler import DeadlineScheduler
from listener.store import Store
from listener.supervise import Service, is_transient, supervise
from listener.switch import PauseState
from listener.urls import mqtt_target, redis_target

log = logs.get("listener.daemon")


class Daemon:
    def __init__(self, settings: Settings, *, redis: RedisClient | None = None) -> None:
        """With `redis` given, that client is used; else the daemon asks the
        configured node at start whether it is part of a Redis Cluster."""
        self.settings = settings
        self._detect = redis is None
        self.layout = KeyLayout(settings.key_prefix)
        self.redis_service = Service(
            "redis",
            url=redis_target(settings.redis_url).shown,
            fix="start Redis there, or point ORDER_LISTENER_REDIS_URL at it (check: order-listener check)",
        )
        self.mqtt_service = Service(
            "mqtt",
            url=mqtt_target(settings.mqtt_url).shown,
            fix="start the broker there, or point ORDER_LISTENER_MQTT_URL at it; older brokers: "
            "ORDER_LISTENER_MQTT_PROTOCOL=3.1.1 (check: order-listener check)",
        )
        self.fast_paths = FastPaths(enabled=settings.fast_paths is FastPathSetting.AUTO)
        self.metrics = Metrics([self.redis_service, self.mqtt_service], self.fast_paths)
        self.ready = asyncio.Event()
        self.listener_task: asyncio.Task[None] | None = None  # started once caught up
        self.http_ready = asyncio.Event()
        self.pause_state: PauseState | None = None  # as last read (None: not read yet)
        self._notifier = sdnotify.SystemdNotifier()
        self._build(redis if redis is not None else connect_redis(settings))
        # the scheduler of the latest _build (a rebuild starts the count again, as a restart would)
        self.metrics.count_catch_up(lambda: self.scheduler.catch_up.behind_s())

    def _build(self, redis: RedisClient) -> None:
        """The parts that talk to Redis, on this client."""
        settings = self.settings
        self.redis = redis
        self.store = Store(self.redis, self.layout, settings.retention_ms)
        self.logistics = LogisticsHandler(self.store, settings.logistics_topic, self.redis_service)
        logged = settings.event_log_retention_ms > 0
        self.drop_watch = DropWatch(self.metrics.broker_dropped.inc, replay=logged)
        self.metrics.broker_drops_watched.set_function(lambda: float(self.drop_watch.watched))
        self.link = MqttLink(
            settings,
            self.mqtt_service,
            subscriptions=[settings.logistics_topic],
            handler=self.logistics,
            fast_paths=self.fast_paths,
            drops=self.drop_watch,
        )
        self.scheduler = DeadlineScheduler(
            self.store,
            self.redis_service,
            batch=settings.sweep_batch,
            resync_interval=settings.resync_interval,
            on_cancelled=self._count_cancelled,
            on_dropped=lambda _order_id, _problem: self.metrics.malformed_records.inc(),
        )
        self.listener = ExpiryListener(
            self.redis,
            self.store,
            self.layout,
            redis_target(settings.redis_url).db,
            self.scheduler,
            self.redis_service,
            settings,
            self.fast_paths,
            on_cancelled=self._count_cancelled,
        )
        self.outbox = Outbox(
            self.store,
            self.layout,
            self.link,
            self.redis_service,
            batch=settings.publish_batch,
            created_rate=settings.created_rate,
            on_published=self.metrics.events_published,
            on_dead_letter=self.metrics.dead_lettered,
            event_log_ms=settings.event_log_retention_ms,
            catch_up=self.scheduler.catch_up,
        )

    def _count_cancelled(self, _order_id: str, deadline_ms: int, cancelled_ms: int) -> None:
        """An order cancelled at its deadline, by the scheduler or on its expired event."""
        self.metrics.cancelled(deadline_ms, cancelled_ms)

    async def _use_cluster_if_there(self) -> None:
        """A Redis Cluster behind the URL? Then rebuild on a cluster client
        (nothing runs yet). Waits, with backoff, for Redis to answer."""
        if not self._detect:
            return
        self._detect = False
        if await supervise("redis-connect", self.redis_service, lambda: is_cluster(self.settings)):
            await self.redis.aclose()
            cluster = await supervise(
                "redis-connect", self.redis_service, lambda: open_cluster(self.settings)
            )
            self._build(cluster)

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "starting",
            redis=redis_target(self.settings.redis_url).shown,
            mqtt=mqtt_target(self.settings.mqtt_url).shown,
            key_prefix=self.settings.key_prefix,
            topic_prefix=self.settings.topic_prefix,
        )
        watchdog_task = asyncio.create_task(self._watchdog(), name="watchdog")  # from the start on
        try:
            if not await self._until_stopped(self._use_cluster_if_there(), stop):
                log.info("stopped before Redis answered")
                return
            async with asyncio.TaskGroup() as group:
                mqtt_task = group.create_task(self.link.run(), name="mqtt")
                outbox_task = group.create_task(self.outbox.run(), name="outbox")
                sweep_task = group.create_task(self.scheduler.run(), name="scheduler")
                start_task = group.create_task(self._start(group), name="readiness")
                extra = [
                    start_task,
                    group.create_task(self._watch_switch(), name="pause-switch"),
                    group.create_task(self._tick_drops(), name="broker-drops"),
                ]
                if self.settings.metrics_addr:  # gauges are sampled only for someone to read them
                    extra.append(group.create_task(self._sample_gauges(), name="gauges"))
                    extra.append(
                        group.create_task(
                            serve(
                                self.settings.metrics_addr,
                                self.metrics,
                                self.health,
                                self.http_ready,
                                self.health_details,
                            ),
                            name="metrics",
                        )
                    )
                await stop.wait()
                await self._shutdown(sweep_task, outbox_task)
                for task in (*extra, mqtt_task):
                    task.cancel()
        finally:
            watchdog_task.cancel()
            await asyncio.gather(watchdog_task, return_exceptions=True)
            await self.redis.aclose()
        log.info("stopped", published=self.outbox.published, cancelled=self.scheduler.cancelled)

    @staticmethod
    async def _until_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
        """Run `work` unless `stop` comes first (then cancel it): True if it finished."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            return False
        task.result()  # its error, if any, is ours
        return True

    async def _start(self, group: asyncio.TaskGroup) -> None:
        await self._warn_if_notifications_off()
        await self.link.subscribed.wait()
        await self.scheduler.caught_up.wait()
        self.listener_task = group.create_task(self.listener.run(), name="expiry")
        await self.listener.subscribed.wait()
        self.ready.set()
        self._notifier.notify("READY=1")
        self._notifier.notify("STATUS=cancelling orders at their deadline")
        log.info("ready", pending=await self._pending_or_none())

    def health(self) -> dict[str, bool]:
        """What /healthz reports: 200 only while all are true."""
        return {
            "redis": self.redis_service.up,
            "mqtt": self.mqtt_service.up,
            "ready": self.ready.is_set(),
        }

    def health_details(self) -> dict[str, object]:
        """What /healthz says besides its checks: whether cancellation is paused."""
        return self.pause_state.as_dict() if self.pause_state is not None else {}

    async def _watch_switch(self) -> None:
        """Read the pause switch every resync interval: for /healthz, the
        metrics and a log line when it changes (the scripts themselves obey
        the switch; this is only for people to see it)."""
        shown = ""
        while True:
            try:
                state = await self.store.pause_state()
            except Exception as exc:  # an outage: the tasks that need Redis report it
                if not is_transient(exc):
                    raise
            else:
                self.pause_state = state
                first = state.first
                self.metrics.paused.set(1 if first is not None else 0)
                self.metrics.paused_since.set(first.since_ms / 1000 if first is not None else 0)
                text = state.describe()
                if text != shown:
                    if first is not None:
                        log.warning(text, reason=first.reason, by=first.by, parts=len(state.paused_parts))
                    elif shown:
                        log.info(text)
                    shown = text
            await asyncio.sleep(self.settings.resync_interval)

    async def _tick_drops(self, every: float = 5.0) -> None:
        """The broker-drops watch's own clock (mqtt/drops.py, DropWatch.tick)."""
        while True:
            await asyncio.sleep(every)
            self.drop_watch.tick()

    async def _sample_gauges(self, every: float = 5.0) -> None:
        while True:
            try:
                self.metrics.pending_orders.set(await self.store.pending_count())
                self.metrics.outbox_pending.set(await self.outbox.backlog())
            except Exception as exc:  # an outage: the tasks that need Redis report it
                if not is_transient(exc):
                    raise
            await asyncio.sleep(every)

    async def _pending_or_none(self) -> int | None:
        try:
            return await self.store.pending_count()
        except Exception:
            return None

    async def _warn_if_notifications_off(self) -> None:
        result = await supervise(
            "notifications-check", self.redis_service, lambda: check_notifications(self.redis)
        )
        if result.ok:
            log.info("keyspace notifications checked", setting=result.current)
        else:
            log.error("keyspace notifications", problem=result.message, fix=result.fix)

    async def _watchdog(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or not usec.isdigit():
            return
        interval = int(usec) / 1e6 / 2
        while True:
            self._notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _shutdown(self, sweep_task: asyncio.Task[None], outbox_task: asyncio.Task[None]) -> None:
        log.info("stopping: finishing in-flight work")
        self._notifier.notify("STOPPING=1")
        self.listener.stop()
        self.scheduler.stop()
        pending = [t for t in (sweep_task, self.listener_task) if t is not None]
        _, late = await asyncio.wait(pending, timeout=self.settings.shutdown_timeout / 2)
        for task in late:
            task.cancel()
        self.outbox.stop()
        done, _ = await asyncio.wait({outbox_task}, timeout=self.settings.shutdown_timeout / 2)
        if not done:
            outbox_task.cancel()
            await asyncio.wait({outbox_task})  # not `await`: a cancel of ours must not be swallowed
            left = None
            with contextlib.suppress(Exception):
                left = await self.outbox.backlog()
            if left == 0:
                log.info("stopped: the outbox had nothing left to publish")
            else:
                log.warning("stopped before the outbox was empty; the events stay in Redis", unpublished=left)
