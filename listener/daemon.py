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
from dataclasses import dataclass

import redis.exceptions as redis_errors
import sdnotify
from redis.asyncio import Redis

from listener import logs
from listener.config import Settings, mqtt_target, redis_target
from listener.expiry import ExpiryListener
from listener.keys import KeyLayout
from listener.logistics import LogisticsHandler
from listener.metrics import Metrics, serve
from listener.mqtt import MqttLink
from listener.outbox import Outbox
from listener.scheduler import DeadlineScheduler
from listener.store import Store, connect_redis
from listener.supervise import TRANSIENT, Service, supervise

log = logs.get("listener.daemon")


@dataclass(frozen=True)
class NotificationCheck:
    ok: bool
    current: str | None  # None: CONFIG GET not allowed
    message: str


async def check_notifications(redis: Redis) -> NotificationCheck:
    """Are `expired` keyevent notifications on? Says exactly what to change if not."""
    try:
        reply = await redis.config_get("notify-keyspace-events")
    except redis_errors.ResponseError as exc:  # ACL or a managed Redis without CONFIG
        return NotificationCheck(
            False,
            None,
            f"cannot read notify-keyspace-events ({exc}); make sure it contains 'E' and 'x' "
            "(e.g. notify-keyspace-events Ex in redis.conf)",
        )
    current = str(reply.get("notify-keyspace-events", ""))
    flags = set(current)
    has_events = "E" in flags
    has_expired = "x" in flags or "A" in flags
    if has_events and has_expired:
        return NotificationCheck(True, current, f"keyspace notifications on ({current!r})")
    wanted = "".join(sorted(flags | {"E", "x"}, key=lambda c: (c not in "KE", c)))
    return NotificationCheck(
        False,
        current,
        f"keyspace notifications for expired keys are off (notify-keyspace-events is "
        f"{current!r}). Fix: redis-cli CONFIG SET notify-keyspace-events {wanted} "
        f"and put 'notify-keyspace-events {wanted}' in redis.conf so it survives a restart "
        "(on Redis Cluster: on every node). Until then cancellations come from the "
        "deadline index only.",
    )


class Daemon:
    def __init__(self, settings: Settings, *, redis: Redis | None = None) -> None:
        self.settings = settings
        self.redis = redis if redis is not None else connect_redis(settings)
        self.layout = KeyLayout(settings.key_prefix)
        self.store = Store(self.redis, self.layout, settings.retention_ms)
        self.redis_service = Service("redis")
        self.mqtt_service = Service("mqtt")
        self.logistics = LogisticsHandler(self.store, settings.logistics_topic, self.redis_service)
        self.link = MqttLink(
            settings,
            self.mqtt_service,
            subscriptions=[settings.logistics_topic],
            handler=self.logistics,
        )
        self.metrics = Metrics([self.redis_service, self.mqtt_service])
        self.scheduler = DeadlineScheduler(
            self.store,
            self.redis_service,
            batch=settings.sweep_batch,
            resync_interval=settings.resync_interval,
            on_cancelled=lambda _order_id, deadline, at: self.metrics.cancelled(deadline, at),
        )
        self.listener = ExpiryListener(
            self.redis,
            self.store,
            self.layout,
            redis_target(settings.redis_url).db,
            self.scheduler,
            self.redis_service,
        )
        self.outbox = Outbox(
            self.redis,
            self.store.scripts,
            self.layout,
            self.link,
            self.redis_service,
            batch=settings.publish_batch,
            on_published=lambda event: self.metrics.event_published(event.status, event.reason),
        )
        self.ready = asyncio.Event()
        self.listener_task: asyncio.Task[None] | None = None  # started once caught up
        self.http_ready = asyncio.Event()
        self._notifier = sdnotify.SystemdNotifier()

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "starting",
            redis=redis_target(self.settings.redis_url).shown,
            mqtt=mqtt_target(self.settings.mqtt_url).shown,
            key_prefix=self.settings.key_prefix,
            topic_prefix=self.settings.topic_prefix,
        )
        try:
            async with asyncio.TaskGroup() as group:
                mqtt_task = group.create_task(self.link.run(), name="mqtt")
                outbox_task = group.create_task(self.outbox.run(), name="outbox")
                sweep_task = group.create_task(self.scheduler.run(), name="scheduler")
                start_task = group.create_task(self._start(group), name="readiness")
                watchdog_task = group.create_task(self._watchdog(), name="watchdog")
                extra = [start_task, watchdog_task]
                if self.settings.metrics_addr:  # gauges are sampled only for someone to read them
                    extra.append(group.create_task(self._sample_gauges(), name="gauges"))
                    extra.append(
                        group.create_task(
                            serve(self.settings.metrics_addr, self.metrics, self.health, self.http_ready),
                            name="metrics",
                        )
                    )
                await stop.wait()
                await self._shutdown(sweep_task, outbox_task)
                for task in (*extra, mqtt_task):
                    task.cancel()
        finally:
            await self.redis.aclose()
        log.info("stopped", published=self.outbox.published, cancelled=self.scheduler.cancelled)

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

    async def _sample_gauges(self, every: float = 5.0) -> None:
        while True:
            try:
                self.metrics.pending_orders.set(await self.store.pending_count())
                self.metrics.outbox_pending.set(await self.outbox.backlog())
            except TRANSIENT:
                pass  # the tasks that need Redis report the outage
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
            log.error("keyspace notifications", problem=result.message)

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
            log.warning("stopped before the outbox was empty; the events stay in Redis", unpublished=left)
