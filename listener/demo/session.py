"""One demo session, in the event loop: the daemon runs in this process, a
subscriber receives the status events, sample orders are created with a short
payment window, some of them paid at random moments before their deadline,
and the rest are cancelled by the daemon. Ends when every order reached its
expected status (or `SETTLE_AFTER` s after the last deadline), with the
verdict and its exit status."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiomqtt
from rich.console import Console

from listener.api import OrderClient
from listener.config import Settings, load_settings
from listener.demo.record import Run, event_of
from listener.demo.servers import DemoError, EmbeddedBroker, Plan
from listener.demo.verdict import judge
from listener.demo.view import Display, show_verdict
from listener.errors import ListenerError, Refused
from listener.mqtt import default_client_id, make_client

READY_TIMEOUT = 30.0  # seconds for the daemon to report ready
SETTLE_AFTER = 10.0  # seconds after the last deadline before we give up waiting
GRACE = 0.5  # seconds to keep listening after everything settled (duplicates?)


async def play(
    plan: Plan,
    flags: dict[str, Any],
    console: Console,
    *,
    orders: int,
    paid: int,
    window: float,
    on_ready: Callable[[], None],
) -> int:
    """The demo against the servers of `plan`; its exit status (0: every
    expectation held, 1: not)."""
    broker: EmbeddedBroker | None = None
    daemon_task: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    settings: Settings | None = None
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
            await _reachable(client, plan)
            async with _subscribed(settings, plan, run) as tasks:
                daemon = Daemon(settings)
                daemon_task = asyncio.create_task(daemon.run(stop), name="daemon")
                await _wait_ready(daemon_task, daemon.ready, plan)
                on_ready()
                display = Display(console, run, redis=plan.redis_label, mqtt=plan.mqtt_label)
                return await _watch(display, run, client, tasks, daemon_task)
    finally:
        await _stop_daemon(stop, daemon_task, settings.shutdown_timeout + 2 if settings else 12.0)
        if broker is not None:
            await broker.stop()


async def _reachable(client: OrderClient, plan: Plan) -> None:
    try:
        await client.store.redis.ping()
    except Exception as exc:
        raise DemoError(f"cannot reach Redis ({plan.redis_label}): {exc}") from None


@contextlib.asynccontextmanager
async def _subscribed(settings: Settings, plan: Plan, run: Run) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Receiving the status events into `run`; yields the list of the
    session's tasks (cancelled on the way out)."""
    try:
        subscriber = make_client(settings, identifier=default_client_id("demo"))
        await subscriber.__aenter__()
    except aiomqtt.MqttError as exc:
        raise DemoError(f"cannot reach the MQTT broker ({plan.mqtt_label}): {exc}") from None
    tasks: list[asyncio.Task[None]] = []
    try:
        await subscriber.subscribe(f"{settings.topic_prefix}/+/status", qos=1)
        tasks.append(asyncio.create_task(_receive(subscriber, run), name="demo-receive"))
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await subscriber.__aexit__(None, None, None)


async def _watch(
    display: Display,
    run: Run,
    client: OrderClient,
    tasks: list[asyncio.Task[None]],
    daemon_task: asyncio.Task[None],
) -> int:
    """Create the orders, pay some, watch them settle; judge."""
    with display:
        run.started_ms = time.time() * 1000
        await _create(client, run)
        for oid in sorted(run.to_pay):
            delay = random.uniform(0.15, 0.6) * run.timeout
            tasks.append(asyncio.create_task(_pay_later(client, run, oid, delay), name=f"pay {oid}"))
        await _until_settled(display, run, daemon_task)
        await _linger(display)

    final = await _final_statuses(client, run)
    verdict = judge(run, final, daemon_stopped=_why_stopped(daemon_task), waited=SETTLE_AFTER)
    show_verdict(display.console, verdict)
    return 0 if verdict.ok else 1


async def _create(client: OrderClient, run: Run) -> None:
    result = await client.create_prepared([(oid, round(run.timeout * 1000)) for oid in run.ids])
    if result.existing:  # random ids: only if someone reuses them on purpose
        raise DemoError(f"{len(result.existing)} demo order ids exist already")
    for made in result.created:
        assert made.deadline_ms is not None
        run.deadline_of[made.order_id] = made.deadline_ms


async def _until_settled(display: Display, run: Run, daemon_task: asyncio.Task[None]) -> None:
    """Until every order settled, or something broke, or SETTLE_AFTER s after
    the last deadline."""
    give_up = max(run.deadline_of.values()) / 1000 + SETTLE_AFTER
    while (
        not run.settled() and time.time() < give_up and not daemon_task.done() and run.receive_error is None
    ):
        run.changed.clear()
        display.update()
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
        # cancellation (Ctrl-C) that arrives as its timeout fires.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.1):
                await run.changed.wait()


async def _linger(display: Display) -> None:
    """Keep listening a moment: a second cancellation would show up now."""
    end = time.time() + GRACE
    while time.time() < end:
        display.update()
        await asyncio.sleep(0.05)
    display.update()


async def _final_statuses(client: OrderClient, run: Run) -> dict[str, str]:
    """Each order's status as Redis has it now."""
    final: dict[str, str] = {}
    for oid in run.ids:
        try:
            final[oid] = str((await client.get(oid)).status)
        except ListenerError as exc:
            final[oid] = f"? ({exc})"
    return final


def _why_stopped(daemon_task: asyncio.Task[None]) -> str | None:
    if not daemon_task.done():
        return None
    return "cancelled" if daemon_task.cancelled() else repr(daemon_task.exception())


async def _receive(client: aiomqtt.Client, run: Run) -> None:
    try:
        async for message in client.messages:
            received_ms = time.time() * 1000
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            event = event_of(bytes(payload), received_ms)
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
