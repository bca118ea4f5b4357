"""/metrics and /healthz of a running daemon."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import FastPathSetting, Settings
from listener.daemon import Daemon
from listener.servers import ServerProcess, free_port
from tests.conftest import Subscriber, wait_until
from tests.life import cancelled_by_its_expired_event

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


async def test_metrics_and_health(
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    mqtt_server_proc: ServerProcess,
) -> None:
    port = free_port()
    config = dataclasses.replace(settings, metrics_addr=f"127.0.0.1:{port}")
    daemon = await start_daemon(config)
    await asyncio.wait_for(daemon.http_ready.wait(), 5)

    async def switch_read() -> bool:
        return "cancellation" in json.loads((await http_get(port, "/healthz"))[1])

    await wait_until(switch_read, 10, "the pause switch read")
    status, body = await http_get(port, "/healthz")
    assert status == 200 and json.loads(body) == {
        "ok": True,
        "redis": True,
        "mqtt": True,
        "ready": True,
        "cancellation": "running",
    }

    async with OrderClient(settings) as client:
        await client.create_many([(f"m-{i}", 0.2) for i in range(3)] + [("m-paid", 60), ("m-cust", 60)])
        await client.pay("m-paid")
        await client.cancel("m-cust")
    await wait_until(lambda: len(subscriber.with_status("cancelled")) == 4, 10, "4 cancellations")

    async def published_all() -> bool:
        _, text = await http_get(port, "/metrics")
        return 'order_listener_events_published_total{status="cancelled"} 4.0' in text

    await wait_until(published_all, 10, "the counters")
    _, text = await http_get(port, "/metrics")
    assert metric(text, 'order_listener_cancellations_total{reason="timeout"}') == 3
    assert metric(text, 'order_listener_cancellations_total{reason="customer"}') == 1
    assert metric(text, 'order_listener_events_published_total{status="created"}') == 5
    assert metric(text, 'order_listener_events_published_total{status="paid"}') == 1
    assert metric(text, "order_listener_expiry_lag_seconds_count") == 3
    assert metric(text, 'order_listener_expiry_lag_seconds_bucket{le="0.1"}') == 3
    assert metric(text, 'order_listener_connected{service="redis"}') == 1
    assert "order_listener_pending_orders" in text and "order_listener_outbox_pending" in text
    assert "order_listener_reconnects_total" in text
    runs = "fast" if settings.fast_paths is FastPathSetting.AUTO else "fallback"  # CI's second pass: off
    assert metric(text, f'order_listener_fast_path{{mode="{runs}",path="hiredis-drain"}}') == 1

    assert (await http_get(port, "/nope"))[0] == 404

    mqtt_server_proc.stop()

    async def unhealthy() -> bool:
        code, answer = await http_get(port, "/healthz")
        return code == 503 and json.loads(answer)["mqtt"] is False

    await wait_until(unhealthy, 20, "/healthz to answer 503 without the broker")
    mqtt_server_proc.start()

    async def healthy() -> bool:
        return (await http_get(port, "/healthz"))[0] == 200

    await wait_until(healthy, 20, "/healthz back to 200")
    _, text = await http_get(port, "/metrics")
    assert metric(text, 'order_listener_reconnects_total{service="mqtt"}') >= 1


async def test_dashboard_and_alerts_name_only_exported_metrics(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    port = free_port()
    config = dataclasses.replace(settings, metrics_addr=f"127.0.0.1:{port}")
    daemon = await start_daemon(config)
    await asyncio.wait_for(daemon.http_ready.wait(), 5)
    async with OrderClient(settings) as client:  # so that labelled series exist
        await client.create("dash-1", timeout=0.2)
    await wait_until(lambda: len(subscriber.of("dash-1")) == 2, 10, "dash-1 cancelled")

    async def counted() -> bool:
        return "order_listener_cancellations_total{" in (await http_get(port, "/metrics"))[1]

    await wait_until(counted, 10, "the cancellation counted")
    exported = set(
        re.findall(r"^(order_listener_[a-z_]+)", (await http_get(port, "/metrics"))[1], re.MULTILINE)
    )
    for name in ("grafana-dashboard.json", "prometheus-alerts.yml"):
        text = (DEPLOY / name).read_text()
        named = set(re.findall(r"order_listener_[a-z_]+", text))
        assert named, f"{name} names no metric"
        assert named <= exported, f"{name} names metrics that are not exported: {named - exported}"
    json.loads((DEPLOY / "grafana-dashboard.json").read_text())


async def test_the_lag_histogram_counts_cancellations_on_expired_events(
    settings: Settings, redis: Redis, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    """The scheduler's cancellations are timed above; here an order taken out
    of the deadline index, which only its expired event cancels, is timed too:
    from its deadline to its cancellation, as its record has them."""
    port = free_port()
    daemon = await start_daemon(dataclasses.replace(settings, metrics_addr=f"127.0.0.1:{port}"))
    await asyncio.wait_for(daemon.http_ready.wait(), 5)
    await cancelled_by_its_expired_event(settings, redis, subscriber, "m-expired", daemon)
    assert (daemon.listener.cancelled, daemon.scheduler.cancelled) == (1, 0)

    async def timed() -> bool:
        _, text = await http_get(port, "/metrics")
        return metric(text, "order_listener_expiry_lag_seconds_count") == 1

    await wait_until(timed, 10, "the cancellation timed")
    async with OrderClient(settings) as client:
        order = await client.get("m-expired")
    assert order.updated_ms >= order.deadline_ms  # never cancelled before its deadline
    _, text = await http_get(port, "/metrics")
    lag = metric(text, "order_listener_expiry_lag_seconds_sum")
    assert lag == pytest.approx((order.updated_ms - order.deadline_ms) / 1000)


def test_the_lag_histogram_counts_like_prometheus() -> None:
    """A value on a bucket's bound is in that bucket (le), above the last one
    only in +Inf; counts are cumulative; the sum is the values' sum."""
    from listener.metrics import LagHistogram, Metrics

    metrics = Metrics([])
    for seconds in (0.0005, 0.001, 0.0011, 0.3, 100.0):
        metrics.lag.observe(seconds)
    text = metrics.render().decode()
    name = LagHistogram.NAME
    assert metric(text, f'{name}_bucket{{le="0.001"}}') == 2
    assert metric(text, f'{name}_bucket{{le="0.002"}}') == 3
    assert metric(text, f'{name}_bucket{{le="0.5"}}') == 4
    assert metric(text, f'{name}_bucket{{le="60.0"}}') == 4
    assert metric(text, f'{name}_bucket{{le="+Inf"}}') == 5
    assert metric(text, f"{name}_count") == 5
    assert metric(text, f"{name}_sum") == pytest.approx(100.3026)
