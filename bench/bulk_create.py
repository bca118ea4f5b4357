"""Bulk create: how long N orders take through the Python API and through the CLI.

    .venv/bin/python bench/bulk_create.py [--api 100000 1000000] [--cli 100000] [--no-daemon]

For each size, on a fresh redis-server (the project's redis.conf, own port)
with the daemon running (as in production it publishes the `created` events
meanwhile, to a mosquitto with no subscriber; `--no-daemon` leaves it out):

- API: `OrderClient.create_many(ids, timeout 3600 s)`, one call with all of
  them (it validates every id, then pipelines the create script, 500 orders
  per call); the time of that call;
- CLI: `order-listener create - --json` reading `ORDER_ID 3600` lines on its
  standard input; the wall time of the whole process (start-up and parsing
  included) and the time the CLI itself reports for its create call.

Order ids are 20 characters. It prints seconds and orders per second for each,
and checks the count of orders in Redis afterwards (the deadline index).
Targets of the issue: 100,000 in at most 5 s, 1,000,000 in at most 60 s.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lag
from benchlib import daemon_cancels_probe, print_setup, print_table, redis_config, rss_kb, used_memory
from brokers import add_broker_arg, bench_broker, broker_line
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import load_settings
from listener.keys import PARTS, KeyLayout
from listener.servers import ServerProcess, redis_server

TIMEOUT_S = 3600
PROBE = "bulk-probe"


@dataclass
class Run:
    how: str
    orders: int
    seconds: float = 0.0
    inner_seconds: float = float("nan")  # the CLI's own figure
    in_index: int = 0  # orders in the deadline index afterwards
    memory_mb: float = 0.0  # Redis used_memory afterwards
    daemon_rss_mb: float = 0.0
    note: str = ""


def order_ids(count: int, tag: str) -> list[str]:
    return [f"{tag}{i:0{20 - len(tag)}d}" for i in range(count)]


async def pending_count(redis: Redis) -> int:
    layout = KeyLayout()
    async with redis.pipeline(transaction=False) as pipe:
        for part in range(PARTS):
            pipe.zcard(layout.deadlines(part))
        return sum(int(n) for n in await pipe.execute())


def cli_command() -> list[str]:
    return [lag.daemon_command()[0], "create", "-", "--json"]


async def one(
    how: str, count: int, index: int, workdir: Path, broker: ServerProcess | None, first: bool
) -> Run:
    run = Run(how, count)
    server = redis_server(workdir / f"redis-{index}")
    server.start()
    redis_url = f"redis://127.0.0.1:{server.port}/0"
    redis = Redis.from_url(redis_url)
    daemon: lag.DaemonProcess | None = None
    try:
        if first:
            print(f"Redis config: {await redis_config(redis)}", flush=True)
        mqtt_url = f"mqtt://127.0.0.1:{broker.port}" if broker is not None else "mqtt://127.0.0.1:1"
        settings = load_settings(redis_url=redis_url, mqtt_url=mqtt_url)
        async with OrderClient(settings) as orders:
            if broker is not None:
                daemon = lag.spawn_daemon(redis_url, mqtt_url, workdir / f"daemon-{index}.log", "warning")
                await daemon_cancels_probe(orders, daemon, PROBE)
            ids = order_ids(count, "a" if how == "API" else "c")
            if how == "API":
                began = time.perf_counter()
                result = await orders.create_many([(order_id, TIMEOUT_S) for order_id in ids])
                run.seconds = time.perf_counter() - began
                if result.existing:
                    run.note = f"{len(result.existing)} refused"
            else:
                text = "".join(f"{order_id} {TIMEOUT_S}\n" for order_id in ids).encode()
                env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_LISTENER_")}
                env["ORDER_LISTENER_REDIS_URL"] = redis_url
                began = time.perf_counter()
                done = await asyncio.to_thread(
                    subprocess.run, cli_command(), input=text, capture_output=True, env=env, check=False
                )
                run.seconds = time.perf_counter() - began
                if done.returncode != 0:
                    run.note = f"exit {done.returncode}: {done.stderr.decode(errors='replace')[-300:]}"
                else:
                    report = json.loads(done.stdout)
                    run.inner_seconds = float(report.get("seconds", float("nan")))
        run.in_index = await pending_count(redis)
        run.memory_mb = await used_memory(redis) / 2**20
        if daemon is not None:
            daemon.check_alive()
            run.daemon_rss_mb = rss_kb(daemon.proc.pid)[0] / 1024
    finally:
        if daemon is not None:
            await lag.stop_daemon(daemon)
        await redis.aclose()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    return run


async def run_all(
    args: argparse.Namespace, workdir: Path, broker: ServerProcess | None, runs: list[Run]
) -> None:
    index = 0
    for how, sizes in (("API", args.api), ("CLI", args.cli)):
        for count in sizes:
            index += 1
            run = await one(how, count, index, workdir, broker, index == 1)
            print(
                f"{how} {count:,}: {run.seconds:.2f} s, {count / run.seconds:,.0f} orders/s"
                + (f" (the CLI's own figure {run.inner_seconds:.2f} s)" if how == "CLI" else "")
                + f"; {run.in_index:,} in the deadline index; Redis used_memory {run.memory_mb:,.0f} MB"
                + (f"; {run.note}" if run.note else ""),
                flush=True,
            )
            runs.append(run)


def target(count: int) -> str:
    if count == 100_000:
        return "<= 5 s"
    if count == 1_000_000:
        return "<= 60 s"
    return "-"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time to create N orders through the API and the CLI.")
    parser.add_argument(
        "--api", type=int, nargs="*", default=[100_000, 1_000_000], metavar="N", help="default 100000 1000000"
    )
    parser.add_argument("--cli", type=int, nargs="*", default=[100_000], metavar="N", help="default 100000")
    parser.add_argument(
        "--no-daemon", action="store_true", help="no daemon (nor mosquitto) running meanwhile"
    )
    add_broker_arg(parser)
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.api + args.cli):
        parser.error("sizes must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lag.clear_listener_env()
    print_setup(
        "Setup",
        [
            ("sizes", f"API {args.api}, CLI {args.cli}; 20-character ids, timeout {TIMEOUT_S} s"),
            (
                "daemon",
                "not running" if args.no_daemon else "running, publishing `created` events to mosquitto",
            ),
            ("servers", "a fresh redis-server (repo redis.conf) per size"),
            broker_line(args.broker),
        ],
    )
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-bulk-"))
    broker = None if args.no_daemon else bench_broker(workdir / "mosquitto", args.broker)
    runs: list[Run] = []
    try:
        if broker is not None:
            broker.start()
        asyncio.run(run_all(args, workdir, broker, runs))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        if runs:
            rows = [
                [
                    run.how,
                    f"{run.orders:,}",
                    f"{run.seconds:.2f}",
                    f"{run.orders / run.seconds:,.0f}",
                    f"{run.inner_seconds:.2f}" if run.how == "CLI" else "-",
                    target(run.orders),
                    f"{run.in_index:,}",
                    f"{run.memory_mb:,.0f}",
                    f"{run.daemon_rss_mb:,.0f}" if run.daemon_rss_mb else "-",
                ]
                for run in runs
            ]
            print_table(
                "Bulk create",
                [
                    "via",
                    "orders",
                    "seconds",
                    "orders/s",
                    "CLI's own s",
                    "target",
                    "in index",
                    "Redis MB",
                    "daemon MB",
                ],
                rows,
                "seconds: the API call, or the whole CLI process; in index: orders in the deadline\n"
                "index after; Redis MB: used_memory after; daemon MB: the daemon's RSS after\n"
                "(it publishes `created` events meanwhile)",
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
