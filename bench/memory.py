"""Redis memory per pending order, by key kind, against a plain TTL key and a BullMQ job.

    .venv/bin/python bench/memory.py [--orders 100000] [--sample 1000] [--no-daemon]

On a fresh redis-server (the project's redis.conf, own port), with the daemon
running (it publishes the `created` events, so the outbox streams drain as in
production; `--no-daemon` leaves it out and the `created` events stay):

1. INFO memory used_memory before and after creating N orders (ids of 20
   characters, timeout 1 h) through the public API (`OrderClient.create_many`),
   once right after the creates and once when the outbox is empty again;
   divided by N: the bytes per pending order;
2. the breakdown: every key is read with SCAN and sorted into kinds by its name
   with the order id, the part (`{7}`) and any other number (`:<n>`, a bucket)
   blanked, so it measures whatever the layout is now, not a list of key
   names; per kind, MEMORY USAGE (SAMPLES 0: exact) of every key, or of
   `--sample` of them times the count; divided by N. What MEMORY USAGE does not
   see (the expires dict, the keyspace's hash tables, allocator rounding) is
   the rest;
3. for comparison, each on a fresh redis-server: N plain keys `SET <20-char id> 1
   PX 3600000`, and (when node is present and bench/.node holds bullmq:
   bench/alternatives.py installs it) N BullMQ delayed jobs with 20-character
   job ids and empty data, with the same breakdown.

The daemon of steps 1 and 2 runs with the event log off
(ORDER_LISTENER_EVENT_LOG_RETENTION=0): the log is bounded by time, not by the
pending orders. Then, on another fresh redis-server:

4. the event log: the same N creates with the daemon logging (the default
   retention, a day): MEMORY USAGE (SAMPLES 0) of the 16 log streams divided
   by the events they hold, the bytes per logged event; and the orders' own share
   (used_memory delta less the log's), which is step 2's figure again.

Target of the issue: at most 350 bytes per pending order. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lag
from benchlib import (
    BULLMQ_SCRIPT,
    bullmq_available,
    daemon_cancels_probe,
    print_setup,
    print_table,
    redis_config,
    used_memory,
)
from brokers import add_broker_arg, bench_broker
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import load_settings
from listener.event_log import events_of
from listener.keys import PARTS, KeyLayout
from listener.servers import ServerProcess, redis_server

TIMEOUT_S = 3600
PROBE = "memory-probe"
PART = re.compile(r"\{\d+\}")
NUMBER = re.compile(r":\d+(?=:|$)")  # a numbered key (a bucket, a shard): one kind for all numbers


@dataclass
class Kind:
    pattern: str
    type: str
    count: int = 0
    per_item_bytes: float = 0.0  # the kind's share per item (total estimated / N)
    mean_bytes: float = 0.0  # MEMORY USAGE of one key, mean over the sample (or all)


@dataclass
class Measure:
    name: str
    items: int
    delta_bytes: int = 0  # used_memory after - before
    kinds: list[Kind] = field(default_factory=list)
    note: str = ""

    @property
    def per_item(self) -> float:
        return self.delta_bytes / self.items


def ids_of(count: int, tag: str) -> list[str]:
    return [f"{tag}{i:0{20 - len(tag)}d}" for i in range(count)]


async def breakdown(redis: Redis, id_pattern: re.Pattern[str], items: int, sample: int) -> list[Kind]:
    """Every key sorted into kinds (id and part blanked); bytes per item of each kind."""
    keys_by_kind: dict[str, list[bytes]] = {}
    async for raw in redis.scan_iter(count=10_000):
        name = raw.decode(errors="replace")
        pattern = NUMBER.sub(":<n>", PART.sub("{P}", id_pattern.sub("<id>", name)))
        keys_by_kind.setdefault(pattern, []).append(raw)
    kinds = []
    for pattern, keys in keys_by_kind.items():
        chosen = random.sample(keys, sample) if len(keys) > sample else keys
        async with redis.pipeline(transaction=False) as pipe:
            for key in chosen:
                pipe.memory_usage(key, samples=0)
            for key in chosen[:1]:
                pipe.type(key)
            replies = await pipe.execute()
        sizes = [int(size or 0) for size in replies[: len(chosen)]]
        kind_type = replies[-1].decode() if isinstance(replies[-1], bytes) else str(replies[-1])
        mean = sum(sizes) / len(sizes) if sizes else 0.0
        kinds.append(Kind(pattern, kind_type, len(keys), mean * len(keys) / items, mean))
    kinds.sort(key=lambda kind: -kind.per_item_bytes)
    return kinds


async def backlog_empty(redis: Redis, give_up_s: float, daemon: lag.DaemonProcess) -> bool:
    layout = KeyLayout()
    give_up = time.monotonic() + give_up_s
    while await lag.backlog(redis, layout) > 0:
        daemon.check_alive()
        if time.monotonic() > give_up:
            return False
        await asyncio.sleep(0.2)
    return True


async def settle(redis: Redis) -> int:
    """used_memory once it stops moving (lazy frees, client buffers): the lowest of a few reads."""
    readings = []
    for _ in range(5):
        readings.append(await used_memory(redis))
        await asyncio.sleep(0.1)
    return min(readings)


def fresh_redis(workdir: Path, name: str) -> tuple[ServerProcess, Redis, str]:
    server = redis_server(workdir / name)
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    return server, Redis.from_url(url), url


async def measure_orders(
    args: argparse.Namespace, workdir: Path, broker: ServerProcess | None
) -> list[Measure]:
    server, redis, url = fresh_redis(workdir, "redis-orders")
    print(f"Redis config: {await redis_config(redis)}", flush=True)
    mqtt_url = f"mqtt://127.0.0.1:{broker.port}" if broker is not None else "mqtt://127.0.0.1:1"
    daemon: lag.DaemonProcess | None = None
    measures = []
    try:
        async with OrderClient(load_settings(redis_url=url, mqtt_url=mqtt_url)) as orders:
            if broker is not None:
                daemon = lag.spawn_daemon(
                    url, mqtt_url, workdir / "daemon.log", "warning", ORDER_LISTENER_EVENT_LOG_RETENTION="0"
                )
                await daemon_cancels_probe(orders, daemon, PROBE)
                await backlog_empty(redis, 30, daemon)
            before = await settle(redis)
            ids = ids_of(args.orders, "o")
            result = await orders.create_many([(order_id, TIMEOUT_S) for order_id in ids])
            if result.existing:
                raise RuntimeError(f"{len(result.existing)} orders existed already")
        right_after = await settle(redis)
        id_pattern = re.compile(r"o\d{19}")
        first = Measure("orders, right after the creates", args.orders, right_after - before)
        first.note = f"outbox entries then: {await lag.backlog(redis, KeyLayout()):,}"
        measures.append(first)
        if daemon is not None:
            drained = await backlog_empty(redis, 120 + args.orders / 2000, daemon)
            steady = Measure("orders, outbox published (steady)", args.orders, await settle(redis) - before)
            steady.note = "" if drained else "the outbox did not drain in time"
            steady.kinds = await breakdown(redis, id_pattern, args.orders, args.sample)
            measures.append(steady)
        else:
            first.kinds = await breakdown(redis, id_pattern, args.orders, args.sample)
    finally:
        if daemon is not None:
            await lag.stop_daemon(daemon)
        await redis.aclose()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    return measures


async def log_usage(redis: Redis) -> tuple[int, int]:
    """(MEMORY USAGE of every part's event log stream, the events they hold:
    an entry holds a round trip's events, a line each in one field)."""
    layout = KeyLayout()
    async with redis.pipeline(transaction=False) as pipe:
        for part in range(PARTS):
            pipe.memory_usage(layout.event_log(part), samples=0)
            pipe.xrange(layout.event_log(part))
        replies = await pipe.execute()
    events = sum(len(events_of(fields)) for entries in replies[1::2] for _, fields in entries)
    return sum(int(r or 0) for r in replies[::2]), events


async def measure_event_log(args: argparse.Namespace, workdir: Path, broker: ServerProcess) -> list[Measure]:
    server, redis, url = fresh_redis(workdir, "redis-event-log")
    mqtt_url = f"mqtt://127.0.0.1:{broker.port}"
    daemon = lag.spawn_daemon(url, mqtt_url, workdir / "daemon-log.log", "warning")
    try:
        async with OrderClient(load_settings(redis_url=url, mqtt_url=mqtt_url)) as orders:
            await daemon_cancels_probe(orders, daemon, PROBE)
            await backlog_empty(redis, 30, daemon)
            before = await settle(redis)
            log_before, events_before = await log_usage(redis)
            ids = ids_of(args.orders, "o")
            await orders.create_many([(order_id, TIMEOUT_S) for order_id in ids])
        drained = await backlog_empty(redis, 120 + args.orders / 2000, daemon)
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:  # the last appends ride the daemon's next round trip
            if (await log_usage(redis))[1] >= events_before + args.orders:
                break
            await asyncio.sleep(0.2)
        after = await settle(redis)
        log_bytes, events = await log_usage(redis)
        logged = Measure("event log, per logged event", events - events_before, log_bytes - log_before)
        logged.note = "MEMORY USAGE of the 16 streams / events"
        rest = Measure(
            "orders, event log on, the log's share left out",
            args.orders,
            after - before - (log_bytes - log_before),
        )
        rest.note = "" if drained else "the outbox did not drain in time"
        return [logged, rest]
    finally:
        await lag.stop_daemon(daemon)
        await redis.aclose()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


async def measure_ttl_keys(args: argparse.Namespace, workdir: Path) -> Measure:
    server, redis, _ = fresh_redis(workdir, "redis-ttl")
    try:
        before = await settle(redis)
        ids = ids_of(args.orders, "k")
        for start in range(0, len(ids), 10_000):
            async with redis.pipeline(transaction=False) as pipe:
                for key in ids[start : start + 10_000]:
                    pipe.set(key, "1", px=TIMEOUT_S * 1000)
                await pipe.execute()
        measure = Measure("plain TTL key (SET id 1 PX)", args.orders, await settle(redis) - before)
        measure.kinds = await breakdown(redis, re.compile(r"k\d{19}"), args.orders, args.sample)
    finally:
        await redis.aclose()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    return measure


async def measure_bullmq(args: argparse.Namespace, workdir: Path, node: str) -> Measure:
    server, redis, _ = fresh_redis(workdir, "redis-bullmq")
    try:
        before = await settle(redis)
        proc = await asyncio.create_subprocess_exec(
            node,
            str(BULLMQ_SCRIPT),
            "fill",
            "--port",
            str(server.port),
            "--count",
            str(args.orders),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"bullmq_bench.mjs fill failed: {err.decode(errors='replace')[-500:]}")
        added = json.loads(out.decode().strip().splitlines()[-1])
        measure = Measure("BullMQ delayed job (empty data)", args.orders, await settle(redis) - before)
        measure.note = f"added in {added['seconds']:.1f} s"
        measure.kinds = await breakdown(redis, re.compile(r"b\d{19}"), args.orders, args.sample)
    finally:
        await redis.aclose()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    return measure


def print_measures(measures: Sequence[Measure]) -> None:
    rows = [
        [m.name, f"{m.items:,}", f"{m.delta_bytes / 2**20:,.1f}", f"{m.per_item:,.0f}", m.note or "-"]
        for m in measures
    ]
    print_table(
        "Redis memory per item (INFO memory used_memory after - before, / items)",
        ["what", "items", "MB", "bytes/item", "note"],
        rows,
        "target (issue): at most 350 bytes per pending order",
    )
    for m in measures:
        if not m.kinds:
            continue
        accounted = sum(kind.per_item_bytes for kind in m.kinds)
        rows = [
            [
                kind.pattern,
                kind.type,
                f"{kind.count:,}",
                f"{kind.mean_bytes:,.0f}",
                f"{kind.per_item_bytes:,.1f}",
            ]
            for kind in m.kinds
        ]
        rows.append(["(not seen by MEMORY USAGE: expires dict, hash tables, ...)", "", "", "", ""])
        rows[-1][4] = f"{m.per_item - accounted:,.1f}"
        rows.append(["total (used_memory delta / items)", "", "", "", f"{m.per_item:,.1f}"])
        print_table(
            f"Breakdown: {m.name} ({m.items:,} items)",
            ["key kind", "type", "keys", "MEMORY USAGE per key", "bytes per item"],
            rows,
            "<id>: the item's 20-character id; {P}: the part (hash tag); <n>: any number. MEMORY USAGE\n"
            "of every key of a kind, or of a sample times the count; bytes per item = that / items.",
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Redis memory per pending order.")
    parser.add_argument("--orders", type=int, default=100_000, metavar="N", help="default 100000")
    parser.add_argument("--sample", type=int, default=1000, help="keys per kind for MEMORY USAGE (1000)")
    parser.add_argument(
        "--no-daemon", action="store_true", help="no daemon: the `created` events stay queued"
    )
    parser.add_argument("--no-bullmq", action="store_true", help="skip the BullMQ comparison")
    add_broker_arg(parser)
    args = parser.parse_args(argv)
    if args.orders < 1 or args.sample < 1:
        parser.error("--orders and --sample must be >= 1")
    return args


async def run_all(
    args: argparse.Namespace, workdir: Path, broker: ServerProcess | None, node: str
) -> list[Measure]:
    measures = await measure_orders(args, workdir, broker)
    if broker is not None:
        measures += await measure_event_log(args, workdir, broker)
    measures.append(await measure_ttl_keys(args, workdir))
    if node:
        measures.append(await measure_bullmq(args, workdir, node))
    return measures


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lag.clear_listener_env()
    node = "" if args.no_bullmq else "skipped (--no-bullmq)"
    node_path = ""
    if not args.no_bullmq:
        found = bullmq_available(install=False)
        node = found.reason if found.ok else f"skipped: {found.reason}"
        node_path = found.node if found.ok else ""
    print_setup(
        "Setup",
        [
            (
                "items",
                f"{args.orders:,} each, 20-character ids, due in {TIMEOUT_S} s; "
                f"MEMORY USAGE sample {args.sample}",
            ),
            (
                "daemon",
                "not running"
                if args.no_daemon
                else "running (publishes the `created` events); event log off, then on (step 4)",
            ),
            ("BullMQ", node),
            ("servers", "a fresh redis-server (repo redis.conf) per measurement"),
        ],
    )
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-memory-"))
    broker = None if args.no_daemon else bench_broker(workdir / "mosquitto", args.broker)
    try:
        if broker is not None:
            broker.start()
        measures = asyncio.run(run_all(args, workdir, broker, node_path))
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print_measures(measures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
