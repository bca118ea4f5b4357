"""The daemon's metrics, in Prometheus' official client library with a
registry of this daemon's own (several daemons can live in one process, as
in the tests). Served at /metrics by listener/http_server.py.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from listener.catch_up import HOLD_MAX_S
from listener.events import StatusEvent
from listener.fastpath import MODES, FastPaths
from listener.supervise import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LAG_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)


class _ServiceCollector(Collector):
    def __init__(self, services: list[Service]) -> None:
        self.services = services

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(
            "order_listener_connected", "1 while the daemon is connected to the service", labels=["service"]
        )
        again = CounterMetricFamily(
            "order_listener_reconnects", "Times the service came back after an outage", labels=["service"]
        )
        for service in self.services:
            up.add_metric([service.name], 1.0 if service.up else 0.0)
            again.add_metric([service.name], float(service.reconnects))
        yield up
        yield again


class LagHistogram(Collector):
    """The expiry lag histogram, counted by the event loop alone and read by
    the /metrics handler on the same loop. prometheus_client's Histogram takes
    a lock and walks its buckets for each observation: in a burst of 100,000
    cancellations that was a few percent of the daemon's time."""

    NAME = "order_listener_expiry_lag_seconds"

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # per bucket, the last one +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        help_text = "From an order's deadline to its cancellation in Redis"
        yield HistogramMetricFamily(self.NAME, help_text, buckets=cumulative, sum_value=self.sum)


class _CatchUpCollector(Collector):
    def __init__(self, read: Callable[[], float]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "order_listener_catch_up_seconds",
            "Time the scheduler was behind its deadlines (more due than a sweep round trip cancels; "
            f"announcements wait meanwhile, at most {HOLD_MAX_S:g} s per catch-up): its rate is the share "
            "of time behind",
            value=self.read(),
        )


class _FastPathCollector(Collector):
    def __init__(self, fast_paths: FastPaths) -> None:
        self.fast_paths = fast_paths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "order_listener_fast_path",
            "1 for the way each fast path runs: fast, or fallback (the libraries' public way)",
            labels=["path", "mode"],
        )
        for path in self.fast_paths:
            for mode in MODES:
                gauge.add_metric([path.name, mode], 1.0 if path.mode == mode else 0.0)
        yield gauge


class Metrics:
    def __init__(self, services: list[Service], fast_paths: FastPaths | None = None) -> None:
        self.registry = CollectorRegistry()
        self.cancellations = Counter(
            "order_listener_cancellations",
            "Orders cancelled, by reason (counted as their events are published)",
            ["reason"],
            registry=self.registry,
        )
        self.published = Counter(
            "order_listener_events_published",
            "Status events acknowledged by the broker, by status",
            ["status"],
            registry=self.registry,
        )
        self.lag = LagHistogram(LAG_BUCKETS)
        self.registry.register(self.lag)
        self.outbox_pending = Gauge(
            "order_listener_outbox_pending", "Events waiting in the outbox streams", registry=self.registry
        )
        self.pending_orders = Gauge(
            "order_listener_pending_orders",
            "Orders waiting for payment (deadline index size)",
            registry=self.registry,
        )
        self.malformed_records = Counter(
            "order_listener_malformed_records",
            "Due orders the sweep could not cancel (an id the rules refuse, or a missing, malformed "
            "or not pending record): taken out of the deadline index, each logged once",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "order_listener_dead_letters",
            "Outbox entries that make no valid event (a broken producer), moved to a dead-letter stream",
            registry=self.registry,
        )
        self.paused = Gauge(
            "order_listener_cancellation_paused",
            "1 while cancellation for timeout is paused (order-listener pause), else 0",
            registry=self.registry,
        )
        self.paused_since = Gauge(
            "order_listener_cancellation_paused_since_seconds",
            "Unix time the current pause began (0 while not paused): time() minus it is how long",
            registry=self.registry,
        )
        self.broker_dropped = Counter(
            "order_listener_broker_dropped_messages",
            "Messages the broker reports it dropped since this daemon connected (mosquitto's "
            "$SYS/broker/publish/messages/dropped: every topic and client; a subscriber's queue was full)",
            registry=self.registry,
        )
        self.broker_drops_watched = Gauge(
            "order_listener_broker_drops_watched",
            "1 once the broker sent its count of dropped messages (mosquitto's $SYS), else 0: "
            "order_listener_broker_dropped_messages_total means nothing without it",
            registry=self.registry,
        )
        self.registry.register(_ServiceCollector(services))
        if fast_paths is not None:
            self.registry.register(_FastPathCollector(fast_paths))

    def count_catch_up(self, read: Callable[[], float]) -> None:
        """Serve `read()`, the seconds the scheduler was behind in all, as a counter."""
        self.registry.register(_CatchUpCollector(read))

    def cancelled(self, deadline_ms: int, cancelled_ms: int) -> None:
        self.lag.observe(max(0.0, (cancelled_ms - deadline_ms) / 1000))

    def dead_lettered(self) -> None:
        self.dead_letters.inc()

    def events_published(self, events: Sequence[StatusEvent]) -> None:
        """Count a published batch: one `inc` per label, not per event."""
        statuses = collections.Counter(event.status for event in events)
        for status, count in statuses.items():
            self.published.labels(status).inc(count)
        if statuses["cancelled"]:
            reasons = collections.Counter(event.reason for event in events if event.status == "cancelled")
            for reason, count in reasons.items():
                self.cancellations.labels(reason).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
