"""A burst: N orders all falling due in the same second.

    .venv/bin/python bench/burst.py [--broker stock|tuned] [--orders 100000] [--lead 20]
        [--subscriber mosquitto_sub|process] [--sub-nodelay]

Starts its own redis-server (the project's redis.conf) and mosquitto on free
loopback ports, the daemon as a separate process and an MQTT subscriber
(mosquitto_sub, the C client, by default: a Python subscriber cannot take
tens of thousands of messages a second; `--subscriber process` uses
bench/lag.py's aiomqtt one; `--sub-nodelay` runs mosquitto_sub with
`--nodelay`, so that its PUBACKs are not held back by Nagle's algorithm).
Then:

1. creates N orders in bulk through the Python API (chunks of 10,000), each
   with a timeout that puts its deadline in the second that starts `--lead`
   seconds (20) after the start, spread evenly over that second;
2. just before that second, reads the daemon's RSS and resets its peak
   (VmHWM, by writing 5 to /proc/<pid>/clear_refs), and the outbox backlog
   (the `created` events of the burst still unpublished);
3. waits until every order's `cancelled` event reached the subscriber, or
   `--grace` seconds (120) after the second, or until nothing new arrived
   for `--quiet` seconds (10): the CPU figures cover that wait;
4. prints: the time from the start of that second (and from its end) to the
   last `cancelled` event received, the throughput, the missing count, the
   lag of each order from its own deadline (p50, p99, max), the daemon's RSS
   before, at its peak during the burst (VmHWM and the largest VmRSS sampled
   every 20 ms) and 5 s after, when the last order was cancelled in Redis
   (the latest `at` of the events: the rest is publishing), and the CPU the
   daemon, Redis, mosquitto, the subscriber and the whole machine used.

The target: every order cancelled in Redis within 2.5 s of that second's
start, and every `cancelled` event received within 6 s.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lag
from benchlib import (
    fmt,
    lags_of,
    print_setup,
    print_table,
    redis_config,
    redis_cpu,
    reset_peak_rss,
    rss_kb,
)
from brokers import add_broker_arg, broker_line
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import load_settings
from listener.keys import KeyLayout
from listener.servers import ServerProcess

CHUNK = 500  # orders per create call: small, so each timeout is computed just before its create
SAMPLE = 0.02  # RSS sampling interval, s
SPREAD_MS = 950  # deadlines spread over the first 950 ms of the second (a create call takes a few ms)


@dataclass
class Burst:
    orders: int
    second: float = 0.0  # Unix s of the start of the due second
    create_s: float = 0.0
    create_done_before: float = 0.0  # s left before the second when the creates ended
    deadline_min_ms: float = math.nan  # relative to the second
    deadline_max_ms: float = math.nan
    backlog_at_second: int = 0  # outbox entries unpublished when the second began
    created_received_at_second: int = 0
    received: int = 0
    missing: int = 0
    first_s: float = math.nan  # first and last `cancelled` received, s after the second's start
    last_s: float = math.nan
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    rss_start_kb: int = 0
    rss_before_kb: int = 0
    rss_peak_sampled_kb: int = 0
    hwm_kb: int = 0
    hwm_reset: bool = False
    rss_after_kb: int = 0
    last_cancelled_s: float = math.nan  # the latest `at` (Redis clock at cancel), s after the second
    daemon_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    broker_cpu_s: float = 0.0
    subscriber_cpu_s: float = 0.0
    machine_cpu_s: float = 0.0  # every process on the machine, all cores
    commands: list[tuple[str, int, float]] = field(default_factory=list)  # name, calls, Redis s
    housekeeping: dict[str, int] = field(default_factory=dict)  # INFO stats deltas during the burst
    daemon_exit: int | None = None
    log: str = ""
    notes: list[str] = field(default_factory=list)


async def sample_rss(pid: int, peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], rss_kb(pid)[0])
        await asyncio.sleep(SAMPLE)


async def wait_for_all(
    sub: lag.Subscriber, daemon: lag.DaemonProcess, count: int, until: float, quiet: float
) -> None:
    """Until `count` orders' `cancelled` events arrived, the clock passed `until`,
    or nothing new arrived for `quiet` seconds (the rest were dropped, by a stock
    broker's queue for the subscriber: waiting on would only add idle CPU to the
    figures)."""
    seen, last_new = 0, time.monotonic()
    while (measured := (await sub.counts()).measured) < count:
        daemon.check_alive()
        if measured != seen:
            seen, last_new = measured, time.monotonic()
        if time.time() > until or (seen and time.monotonic() - last_new > quiet):
            return
        await asyncio.sleep(0.05)


async def run(
    args: argparse.Namespace, redis_proc: ServerProcess, broker: ServerProcess, workdir: Path
) -> Burst:
    result = Burst(args.orders)
    redis_url = f"redis://127.0.0.1:{redis_proc.port}/0"
    mqtt_url = f"mqtt://127.0.0.1:{broker.port}"
    redis = Redis.from_url(redis_url)
    print(f"Redis config: {await redis_config(redis)}", flush=True)
    sub: lag.Subscriber
    if args.subscriber == "mosquitto_sub":
        sub = lag.MosquittoSubSubscriber("127.0.0.1", broker.port, workdir, nodelay=args.sub_nodelay)
    else:
        sub = lag.ProcessSubscriber("127.0.0.1", broker.port)
    await sub.start()
    log_path = workdir / "daemon.log"
    daemon = lag.spawn_daemon(
        redis_url, mqtt_url, log_path, "warning", ORDER_LISTENER_EVENT_LOG_RETENTION=args.event_log
    )
    pid = daemon.proc.pid
    assert broker.proc is not None
    broker_pid, sub_pid = broker.proc.pid, sub.pid()
    layout = KeyLayout()
    try:
        async with OrderClient(load_settings(redis_url=redis_url, mqtt_url=mqtt_url)) as orders:
            await lag.wait_ready(daemon, orders, sub)
            result.rss_start_kb = rss_kb(pid)[0]
            result.second = math.floor(time.time()) + args.lead
            base_ms = result.second * 1000
            deadlines: dict[str, float] = {}
            began = time.monotonic()
            for start in range(0, args.orders, CHUNK):
                now = time.time() * 1000
                chunk = [
                    (
                        f"{lag.MEASURED_PREFIX}burst-{i}",
                        max(100, round(base_ms + i * SPREAD_MS / args.orders - now)),
                    )
                    for i in range(start, min(args.orders, start + CHUNK))
                ]
                made = await orders.create_prepared(chunk)
                if made.existing:
                    raise RuntimeError(f"{len(made.existing)} orders existed already")
                for created in made.created:
                    assert created.deadline_ms is not None
                    deadlines[created.order_id] = float(created.deadline_ms)
            result.create_s = time.monotonic() - began
            result.create_done_before = result.second - time.time()
            if result.create_done_before < 1:
                result.notes.append(
                    f"the creates ended {result.create_done_before:.1f} s before the second: raise --lead"
                )
            result.deadline_min_ms = min(deadlines.values()) - base_ms
            result.deadline_max_ms = max(deadlines.values()) - base_ms

            # just before the second: RSS, peak reset, backlog
            await asyncio.sleep(max(0.0, result.second - 0.3 - time.time()))
            daemon.check_alive()
            result.rss_before_kb = rss_kb(pid)[0]
            result.hwm_reset = reset_peak_rss(pid)
            result.backlog_at_second = await lag.backlog(redis, layout)
            result.created_received_at_second = (await sub.counts()).created
            peak = [result.rss_before_kb]
            sampler = asyncio.create_task(sample_rss(pid, peak))
            await asyncio.sleep(max(0.0, result.second - time.time()))
            cpu_daemon, cpu_redis = lag.cpu_seconds(pid), await redis_cpu(redis)
            cpu_broker, cpu_sub = lag.cpu_seconds(broker_pid), lag.cpu_seconds(sub_pid)
            cpu_machine = lag.machine_seconds()[0]
            commands_before = await lag.command_usage(redis)
            stats_before = await redis.info("stats")
            try:
                await wait_for_all(sub, daemon, len(deadlines), result.second + 1 + args.grace, args.quiet)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            result.daemon_cpu_s = lag.cpu_seconds(pid) - cpu_daemon
            result.redis_cpu_s = await redis_cpu(redis) - cpu_redis
            result.broker_cpu_s = lag.cpu_seconds(broker_pid) - cpu_broker
            result.subscriber_cpu_s = lag.cpu_seconds(sub_pid) - cpu_sub
            result.machine_cpu_s = lag.machine_seconds()[0] - cpu_machine
            result.commands = command_delta(commands_before, await lag.command_usage(redis))
            stats_after = await redis.info("stats")
            result.housekeeping = {
                name: int(stats_after.get(name, 0)) - int(stats_before.get(name, 0))
                for name in ("expired_keys", "total_forks", "expired_time_cap_reached_count")
            }
            result.rss_peak_sampled_kb = peak[0]
            result.hwm_kb = rss_kb(pid)[1]
            await asyncio.sleep(5)
            result.rss_after_kb = rss_kb(pid)[0]

            received = await sub.results()
            ours = {order_id: times for order_id, times in received.items() if order_id in deadlines}
            handled = {order_id: at * 1000 for order_id, (at, _) in ours.items()}
            lags = lags_of(deadlines, handled)
            result.received = lags.measured
            result.missing = lags.missing
            result.p50_ms, result.p99_ms, result.max_ms = lags.stats()
            if handled:
                result.first_s = min(handled.values()) / 1000 - result.second
                result.last_s = max(handled.values()) / 1000 - result.second
                result.last_cancelled_s = max(at_ms for _, at_ms in ours.values()) / 1000 - result.second
    finally:
        result.daemon_exit = await lag.stop_daemon(daemon)
        await sub.stop()
        await redis.aclose()
    lines, top = lag.log_summary(log_path)
    result.log = f"{lines} lines" + (f", most often {top}" if lines else "")
    return result


def command_delta(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> list[tuple[str, int, float]]:
    """(command, calls, seconds) run between the two, most time first. A script's
    time is counted under evalsha and again under each command it runs."""
    rows = []
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0:
            rows.append((name, calls - calls0, (usec - usec0) / 1e6))
    return sorted(rows, key=lambda row: -row[2])


def mb(kb: int) -> str:
    return f"{kb / 1024:,.1f}"


def report(result: Burst, subscriber: str) -> None:
    span = result.last_s - result.first_s
    print()
    print(
        f"{result.orders:,} orders created in {result.create_s:.1f} s, ending "
        f"{result.create_done_before:.1f} s before their second; deadlines from "
        f"+{result.deadline_min_ms:.0f} to +{result.deadline_max_ms:.0f} ms into the second"
    )
    print(
        f"when the second began: {result.backlog_at_second:,} outbox entries unpublished, "
        f"{result.created_received_at_second:,} `created` events received"
    )
    for note in result.notes:
        print(f"NOTE: {note}")
    headers = ["measure", "value"]
    rows = [
        ["orders due in one second", f"{result.orders:,}"],
        ["`cancelled` received", f"{result.received:,}"],
        ["missing", f"{result.missing:,}"],
        ["first received, s after the second's start", fmt(result.first_s, 2)],
        ["last received, s after the second's start", fmt(result.last_s, 2)],
        ["last received, s after the second's end", fmt(result.last_s - 1, 2)],
        ["throughput, events/s (second's start -> last)", fmt(result.received / result.last_s, 0)],
        ["throughput, events/s (first -> last)", fmt(result.received / span, 0) if span > 0 else "-"],
        ["lag from own deadline p50 ms", fmt(result.p50_ms)],
        ["lag from own deadline p99 ms", fmt(result.p99_ms)],
        ["lag from own deadline max ms", fmt(result.max_ms)],
        ["daemon RSS after start MB", mb(result.rss_start_kb)],
        ["daemon RSS before the second MB", mb(result.rss_before_kb)],
        [
            "daemon peak RSS during MB (VmHWM" + (", reset before)" if result.hwm_reset else ", whole life)"),
            mb(result.hwm_kb),
        ],
        ["daemon largest sampled RSS during MB", mb(result.rss_peak_sampled_kb)],
        ["daemon RSS 5 s after MB", mb(result.rss_after_kb)],
        ["last cancelled in Redis (its `at`), s after the second's start", fmt(result.last_cancelled_s, 2)],
        ["daemon CPU s during the burst", f"{result.daemon_cpu_s:.2f}"],
        ["Redis CPU s during the burst", f"{result.redis_cpu_s:.2f}"],
        ["mosquitto CPU s during the burst", f"{result.broker_cpu_s:.2f}"],
        ["subscriber CPU s during the burst", f"{result.subscriber_cpu_s:.2f}"],
        ["whole machine CPU s during the burst (all cores)", f"{result.machine_cpu_s:.2f}"],
    ]
    print_table(
        f"Burst: {result.orders:,} orders due in the same second (subscriber {subscriber})",
        headers,
        rows,
        "target: all cancelled in Redis within 2.5 s of the second's start, all received within 6 s",
    )
    print(
        "Redis commands during the burst (a script's time includes its commands'): "
        + ", ".join(f"{name} {calls:,} calls {secs:.2f} s" for name, calls, secs in result.commands[:8])
    )
    print(
        "Redis during the burst: "
        + ", ".join(f"{name} {value:,}" for name, value in result.housekeeping.items())
        + " (expired_keys: timers Redis expired before a sweep deleted them; total_forks: "
        "RDB snapshots and AOF rewrites begun)"
    )
    print(f"daemon exit status {result.daemon_exit}; its log: {result.log}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="N orders falling due in the same second.")
    parser.add_argument("--orders", type=int, default=100_000, metavar="N", help="default 100000")
    parser.add_argument(
        "--lead", type=float, default=20.0, metavar="S", help="the second starts S s after the start (20)"
    )
    parser.add_argument("--grace", type=float, default=120.0, metavar="S", help="wait after the second (120)")
    parser.add_argument(
        "--quiet", type=float, default=10.0, metavar="S", help="stop waiting after S s with nothing new (10)"
    )
    parser.add_argument("--subscriber", choices=["mosquitto_sub", "process"], default="mosquitto_sub")
    parser.add_argument(
        "--sub-nodelay",
        action="store_true",
        help="mosquitto_sub with --nodelay (TCP_NODELAY on the subscriber's socket)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--event-log",
        default="86400",
        metavar="S",
        help="the daemon's ORDER_LISTENER_EVENT_LOG_RETENTION (86400, the default; 0: no event log)",
    )
    add_broker_arg(parser)
    args = parser.parse_args(argv)
    if args.orders < 1 or args.lead < 2 or args.grace < 0 or args.quiet <= 0:
        parser.error("--orders >= 1, --lead >= 2, --grace >= 0, --quiet > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lag.clear_listener_env()
    print_setup(
        "Setup",
        [
            ("orders", f"{args.orders:,} due within one second starting {args.lead:g} s after the start"),
            (
                "subscriber",
                f"{args.subscriber}{' --nodelay' if args.sub_nodelay else ''} (QoS 1, {lag.TOPIC});"
                " daemon log level warning",
            ),
            broker_line(args.broker),
        ],
    )
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-burst-"))
    servers: list[ServerProcess] = []
    try:
        redis_proc, broker = lag.start_servers(workdir, servers, args.broker)
        result = asyncio.run(run(args, redis_proc, broker, workdir))
    finally:
        for server in reversed(servers):
            server.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result, args.subscriber)
    return 0


if __name__ == "__main__":
    sys.exit(main())
