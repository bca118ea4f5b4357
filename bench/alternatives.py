"""The daemon against the usual alternatives: lag from deadline to handling, and Redis CPU.

    .venv/bin/python bench/alternatives.py                      # quick: about 5 minutes
    .venv/bin/python bench/alternatives.py --broker stock tuned # ours on both brokers: docs' figure
    .venv/bin/python bench/alternatives.py --contenders ours expired --pending 0 --rate 100

For every number of pending items P (default 0 and 100,000: due in an hour),
every rate R (default 100 and 2,000 items falling due per second) and every
contender, on a fresh redis-server with the project's redis.conf:

1. the contender's consumer is started (a separate process) and P pending
   items with far deadlines are created;
2. idle cost: for `--idle` seconds (5) nothing is due; the Redis CPU used
   (INFO cpu, used_cpu_sys + used_cpu_user) and the consumer's CPU are read;
3. for `--duration` seconds R items a second (a batch every `--tick-ms` ms, 2 by default) are created,
   each due `--timeout` seconds (2) later; each item's lag is the consumer's
   time of handling minus its deadline (Unix ms on this machine's clock, which
   Redis shares). An item not handled `--grace` seconds after the last
   deadline is missing. The Redis CPU of this part (creating, and waiting for
   the last item) is reported too.

The contenders:

  ours        the daemon (`order-listener run`) with bench/lag.py's machinery: deadline
              -> `cancelled` event received by an MQTT subscriber (mosquitto_sub, or with
              --subscriber process an aiomqtt client) through mosquitto. It includes
              the MQTT hop; the others do not.
  expired     plain keys `SET id 1 PXAT deadline`; a redis.asyncio subscriber on
              `__keyevent@0__:expired` records when each event arrives.
  poll-1s     one sorted set (score = deadline); a poller runs ZRANGEBYSCORE -inf now,
  poll-100ms  then ZREM of what it got, then sleeps 1 s (or 100 ms): the naive design.
  arq         arq deferred jobs (`enqueue_job(..., _defer_until=deadline)`), an arq worker
              (defaults but max_jobs, keep_result 0) whose no-op job records the time.
  bullmq      BullMQ delayed jobs (node, bench/bullmq_bench.mjs: producer and worker with a
              no-op processor); bullmq and ioredis are installed with npm into bench/.node
              at the first run. Skipped, with the reason, without node and npm.

Only ours uses MQTT, so only ours depends on the broker: `--broker stock`
(default) or `tuned` (bench/brokers.py), or `--broker stock tuned` to measure
ours on each in the same run (one mosquitto per profile, for the whole run;
the others are measured once).

arq is the `bench` extra of pyproject (pip install -e '.[bench]'); without it
the arq contender is skipped with the reason. Every consumer runs in its own
process. It prints the setup, a line per contender as it ends, then a table
and the same table in Markdown. Nothing is asserted.

Every run ends by writing its results as JSON and drawing them
(bench/comparison_figure.py): lag p50 and p99 per contender and scenario on a
log scale, to `--figure` (default docs/comparison.svg) with the JSON beside it
(docs/comparison.json), so the picture in the docs is always the latest
measurement. A quick or partial run overwrites them too: point `--figure`
elsewhere for those.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import lag
from benchlib import (
    BULLMQ_SCRIPT,
    Consumer,
    Lags,
    Node,
    bullmq_available,
    child_output_loop,
    fmt,
    idle_cost,
    lags_of,
    print_setup,
    print_table,
    redis_config,
    redis_cpu,
)
from brokers import add_broker_arg, bench_broker, broker_line
from comparison_figure import write_figure
from lag import cpu_model
from redis.asyncio import Redis

from listener.servers import ServerProcess, redis_server

CONTENDERS = ["ours", "expired", "poll-1s", "poll-100ms", "arq", "bullmq"]
POLL_INTERVAL = {"poll-1s": 1.0, "poll-100ms": 0.1}
EXPIRED_CHANNEL = "__keyevent@0__:expired"
ZSET_KEY = "due"
FAR_MS = 3600 * 1000
LOAD_CHUNK = 10_000
ARQ_CHUNK = 1000
ARQ_CONCURRENCY = 50  # enqueue_job calls at once
SCRIPT = Path(__file__).resolve()
FIGURE = SCRIPT.parent.parent / "docs" / "comparison.svg"


@dataclass
class Result:
    contender: str
    pending: int
    rate: float
    broker: str = ""  # ours: the broker profile it ran against; the others use no broker
    lags: Lags = field(default_factory=Lags)
    idle_redis: float = math.nan  # % of one core
    idle_consumer: float = math.nan
    load_redis: float = math.nan
    load_consumer: float = math.nan
    load_s: float = math.nan  # creating the pending items
    skipped: str = ""
    note: str = ""
    row: lag.Row | None = None  # ours: lag.py's figures

    @property
    def label(self) -> str:
        return f"{self.contender} ({self.broker} broker)" if self.broker else self.contender


@dataclass(frozen=True)
class Config:
    duration: float
    timeout: float
    grace: float
    idle: float
    arq_max_jobs: int
    bullmq_concurrency: int
    workdir: Path
    mqtt_port: int
    mosquitto_pid: int
    node: Node
    arq: str  # arq's version, or "" when it is not installed
    tick_ms: float = lag.TICK_MS  # every producer's pacing
    subscriber: str = "mosquitto_sub"  # ours: who receives the `cancelled` events


# -- the children (consumers), run as `alternatives.py --child KIND URL [ARG]` -----------------


async def child_expired(url: str) -> None:
    redis = Redis.from_url(url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(EXPIRED_CHANNEL)
    while (await pubsub.get_message(timeout=5.0)) is None:  # the subscribe confirmation
        pass
    records: list[tuple[str, float]] = []
    stop = asyncio.Event()

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                records.append((message["data"].decode(), time.time() * 1000))

    listener = asyncio.create_task(listen())
    print('{"ready": true}', flush=True)
    await child_output_loop(records, stop)
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await redis.aclose()


async def child_poll(url: str, interval: float) -> None:
    redis = Redis.from_url(url)
    await redis.ping()
    records: list[tuple[str, float]] = []
    stop = asyncio.Event()

    async def poll() -> None:
        while True:
            # Members only (no withscores), as bytes (no decode_responses): redis-py's
            # type covers every form of the reply.
            due = cast("list[bytes]", await redis.zrangebyscore(ZSET_KEY, "-inf", time.time() * 1000))
            if due:
                await redis.zrem(ZSET_KEY, *due)
                now = time.time() * 1000
                records.extend((item.decode(), now) for item in due)
            await asyncio.sleep(interval)

    poller = asyncio.create_task(poll())
    print('{"ready": true}', flush=True)
    await child_output_loop(records, stop)
    poller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await poller
    await redis.aclose()


async def child_arq(url: str, max_jobs: int) -> None:
    from arq.connections import RedisSettings, create_pool
    from arq.worker import Worker, func

    records: list[tuple[str, float]] = []
    stop = asyncio.Event()

    async def handle(ctx: dict[str, Any], item_id: str) -> None:
        records.append((item_id, time.time() * 1000))

    pool = await create_pool(RedisSettings.from_dsn(url))
    worker = Worker(
        functions=[func(handle, name="handle")],
        redis_pool=pool,
        max_jobs=max_jobs,
        keep_result=0,
        handle_signals=False,
    )
    runner = asyncio.create_task(worker.main())
    print('{"ready": true}', flush=True)
    await child_output_loop(records, stop)
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await worker.close()


def run_child(kind: str, url: str, argument: str) -> None:
    if kind == "expired":
        asyncio.run(child_expired(url))
    elif kind == "poll":
        asyncio.run(child_poll(url, float(argument)))
    elif kind == "arq":
        asyncio.run(child_arq(url, int(argument)))
    else:
        raise SystemExit(f"unknown child {kind!r}")


def python_consumer(name: str, kind: str, url: str, argument: str = "") -> Consumer:
    return Consumer(name, [sys.executable, str(SCRIPT), "--child", kind, url, argument or "-"])


# -- producers ---------------------------------------------------------------------------------

AddBatch = Callable[[list[str], int], Awaitable[dict[str, float]]]


async def paced(
    rate: float, duration: float, timeout_ms: int, add: AddBatch, tick_s: float
) -> dict[str, float]:
    """R items a second for `duration` s, a batch per tick; their deadlines (Unix ms)."""
    total = round(rate * duration)
    deadlines: dict[str, float] = {}
    done = 0
    tick = 0
    start = time.monotonic()
    while done < total:
        want = min(total, math.floor(rate * (time.monotonic() - start)) + 1)
        if want > done:
            deadlines.update(await add([f"m-{i}" for i in range(done, want)], timeout_ms))
            done = want
        tick += 1
        pause = start + tick * tick_s - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        else:
            tick = math.ceil((time.monotonic() - start) / tick_s)
    return deadlines


def now_ms() -> int:
    return int(time.time() * 1000)


async def expired_add(redis: Redis, ids: list[str], timeout_ms: int) -> dict[str, float]:
    deadline = now_ms() + timeout_ms
    async with redis.pipeline(transaction=False) as pipe:
        for item in ids:
            pipe.set(item, "1", pxat=deadline)
        await pipe.execute()
    return dict.fromkeys(ids, float(deadline))


async def poll_add(redis: Redis, ids: list[str], timeout_ms: int) -> dict[str, float]:
    deadline = now_ms() + timeout_ms
    await redis.zadd(ZSET_KEY, dict.fromkeys(ids, deadline))
    return dict.fromkeys(ids, float(deadline))


async def arq_add(pool: Any, ids: list[str], timeout_ms: int) -> dict[str, float]:
    deadline = now_ms() + timeout_ms
    when = datetime.fromtimestamp(deadline / 1000, tz=UTC)
    jobs = []
    for start in range(0, len(ids), ARQ_CONCURRENCY):  # the client's pool has a connection limit
        jobs += await asyncio.gather(
            *(
                pool.enqueue_job("handle", item, _job_id=item, _defer_until=when)
                for item in ids[start : start + ARQ_CONCURRENCY]
            )
        )
    if any(job is None for job in jobs):
        raise RuntimeError("arq refused a job id (already enqueued)")
    return dict.fromkeys(ids, float(deadline))


async def load_pending(kind: str, redis: Redis, arq_pool: Any, count: int) -> None:
    """`count` items due in an hour, in chunks."""
    chunk = ARQ_CHUNK if kind == "arq" else LOAD_CHUNK
    for start in range(0, count, chunk):
        ids = [f"p-{i}" for i in range(start, min(count, start + chunk))]
        if kind == "expired":
            async with redis.pipeline(transaction=False) as pipe:
                for item in ids:
                    pipe.set(item, "1", px=FAR_MS)
                await pipe.execute()
        elif kind.startswith("poll"):
            await redis.zadd(ZSET_KEY, dict.fromkeys(ids, now_ms() + FAR_MS))
        else:
            await arq_add(arq_pool, ids, FAR_MS)


class LoadMeter:
    """Redis CPU (INFO cpu) and the consumer's CPU (/proc) between start() and stop(), in % of a core."""

    def __init__(self, redis: Redis, pid: int, result: Result) -> None:
        self.redis = redis
        self.pid = pid
        self.result = result
        self.redis_cpu = self.consumer_cpu = self.wall = 0.0

    async def start(self) -> None:
        self.redis_cpu, self.consumer_cpu = await redis_cpu(self.redis), lag.cpu_seconds(self.pid)
        self.wall = time.monotonic()

    async def stop(self) -> None:
        elapsed = time.monotonic() - self.wall
        self.result.load_redis = 100 * (await redis_cpu(self.redis) - self.redis_cpu) / elapsed
        self.result.load_consumer = 100 * (lag.cpu_seconds(self.pid) - self.consumer_cpu) / elapsed


# -- one contender -----------------------------------------------------------------------------


async def wait_handled(cfg: Config, consumer: Consumer, deadlines: dict[str, float]) -> None:
    """Until every item was handled, or `grace` s after the last deadline."""
    if not deadlines:
        return
    last = max(deadlines.values()) / 1000
    while sum(1 for item in deadlines if item in consumer.handled) < len(deadlines):
        if time.time() > last + cfg.grace or not consumer.alive():
            return
        await asyncio.sleep(0.1)


def python_consumer_for(cfg: Config, kind: str, url: str) -> Consumer:
    """The consumer process of a Python contender (expired, a poller, arq)."""
    if kind == "expired":
        return python_consumer(kind, "expired", url)
    if kind.startswith("poll"):
        return python_consumer(kind, "poll", url, str(POLL_INTERVAL[kind]))
    return python_consumer(kind, "arq", url, str(cfg.arq_max_jobs))


def adder_for(kind: str, redis: Redis, arq_pool: Any) -> AddBatch:
    """How a Python contender's producer adds a batch of items."""
    if kind == "expired":
        return lambda ids, timeout: expired_add(redis, ids, timeout)
    if kind.startswith("poll"):
        return lambda ids, timeout: poll_add(redis, ids, timeout)
    return lambda ids, timeout: arq_add(arq_pool, ids, timeout)


async def run_python_contender(cfg: Config, kind: str, redis: Redis, url: str, result: Result) -> None:
    timeout_ms = round(cfg.timeout * 1000)
    consumer = python_consumer_for(cfg, kind, url)
    arq_pool: Any = None
    if kind == "arq":
        from arq.connections import RedisSettings, create_pool

        arq_pool = await create_pool(RedisSettings.from_dsn(url))
    await consumer.start(cfg.workdir)
    try:
        began = time.monotonic()
        await load_pending(kind, redis, arq_pool, result.pending)
        result.load_s = time.monotonic() - began
        result.idle_redis, result.idle_consumer = await idle_cost(redis, consumer.pid, cfg.idle)
        meter = LoadMeter(redis, consumer.pid, result)
        await meter.start()
        add = adder_for(kind, redis, arq_pool)
        deadlines = await paced(result.rate, cfg.duration, timeout_ms, add, cfg.tick_ms / 1000)
        await wait_handled(cfg, consumer, deadlines)
        await meter.stop()
        result.lags = lags_of(deadlines, consumer.handled)
        if not consumer.alive():
            result.note = f"the consumer exited: {consumer.stderr_tail()}"
    finally:
        await consumer.stop()
        if arq_pool is not None:
            await arq_pool.aclose()


async def run_bullmq(cfg: Config, redis: Redis, port: int, result: Result) -> None:
    node = cfg.node.node
    worker = Consumer(
        "bullmq-worker",
        [
            node,
            str(BULLMQ_SCRIPT),
            "worker",
            "--port",
            str(port),
            "--concurrency",
            str(cfg.bullmq_concurrency),
        ],
    )
    await worker.start(cfg.workdir)
    producer = await asyncio.create_subprocess_exec(
        node,
        str(BULLMQ_SCRIPT),
        "produce",
        "--port",
        str(port),
        "--rate",
        f"{result.rate:g}",
        "--duration",
        f"{cfg.duration:g}",
        "--timeout",
        f"{cfg.timeout:g}",
        "--pending",
        str(result.pending),
        "--tick",
        f"{cfg.tick_ms:g}",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        limit=1 << 28,
    )
    assert producer.stdin is not None and producer.stdout is not None
    try:
        loaded = json.loads(await asyncio.wait_for(producer.stdout.readline(), timeout=600))
        result.load_s = float(loaded["seconds"])
        result.idle_redis, result.idle_consumer = await idle_cost(redis, worker.pid, cfg.idle)
        meter = LoadMeter(redis, worker.pid, result)
        await meter.start()
        producer.stdin.write(b"go\n")
        await producer.stdin.drain()
        deadlines: dict[str, float] = {}
        while True:
            line = await asyncio.wait_for(producer.stdout.readline(), timeout=cfg.duration + 120)
            if not line:
                raise RuntimeError(f"the BullMQ producer ended early ({await producer.wait()})")
            message = json.loads(line)
            if "deadlines" in message:
                deadlines.update({str(k): float(v) for k, v in message["deadlines"].items()})
            if message.get("done"):
                break
        await wait_handled(cfg, worker, deadlines)
        await meter.stop()
        result.lags = lags_of(deadlines, worker.handled)
    finally:
        if producer.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                producer.kill()
            await producer.wait()
        await worker.stop()


class OursHooks:
    """Idle cost before lag.py's measured part, Redis CPU during it."""

    def __init__(self, cfg: Config, result: Result) -> None:
        self.cfg = cfg
        self.result = result
        self.meter: LoadMeter | None = None

    async def before(self, redis: Redis, daemon_pid: int) -> None:
        self.result.idle_redis, self.result.idle_consumer = await idle_cost(redis, daemon_pid, self.cfg.idle)
        self.meter = LoadMeter(redis, daemon_pid, self.result)
        await self.meter.start()

    async def after(self, redis: Redis) -> None:
        if self.meter is not None:
            await self.meter.stop()


async def run_ours(cfg: Config, redis: Redis, server: ServerProcess, index: int, result: Result) -> None:
    assert server.proc is not None
    bench = lag.Bench(
        redis_url=f"redis://127.0.0.1:{server.port}/0",
        mqtt_host="127.0.0.1",
        mqtt_port=cfg.mqtt_port,
        workdir=cfg.workdir,
        duration=cfg.duration,
        timeout_s=cfg.timeout,
        grace=cfg.grace,
        subscriber=cfg.subscriber,
        daemon_log_level="warning",
        server_pids={"redis": server.proc.pid, "mosquitto": cfg.mosquitto_pid},
        tick_s=cfg.tick_ms / 1000,
    )
    row = await lag.scenario(bench, redis, result.pending, result.rate, index, OursHooks(cfg, result))
    result.load_s = row.load_s
    result.note = lag.describe(row)
    result.row = row


async def run_contender(cfg: Config, kind: str, pending: int, rate: float, index: int) -> Result:
    result = Result(kind, pending, rate)
    if kind == "bullmq" and not cfg.node.ok:
        result.skipped = cfg.node.reason
        return result
    if kind == "arq" and not cfg.arq:
        result.skipped = "arq is not installed: pip install -e '.[bench]'"
        return result
    server = redis_server(cfg.workdir / f"redis-{index}")
    server.start()
    redis = Redis.from_url(f"redis://127.0.0.1:{server.port}/0")
    try:
        if index == 1:
            print(f"Redis config: {await redis_config(redis)}", flush=True)
        if kind == "ours":
            await run_ours(cfg, redis, server, index, result)
        elif kind == "bullmq":
            await run_bullmq(cfg, redis, server.port, result)
        else:
            await run_python_contender(cfg, kind, redis, f"redis://127.0.0.1:{server.port}/0", result)
    except Exception as exc:  # one contender failing must not lose the others' figures
        result.skipped = f"failed: {type(exc).__name__}: {exc}"[:300]
    finally:
        await redis.aclose()
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    return result


# -- report --------------------------------------------------------------------------------------


def stats(result: Result) -> tuple[int, int, float, float, float]:
    """measured, missing, p50, p99, max."""
    row = result.row
    if row is not None:
        return row.measured, row.missing, row.p50_ms, row.p99_ms, row.max_ms
    p50, p99, top = result.lags.stats()
    return result.lags.measured, result.lags.missing, p50, p99, top


def summary_line(result: Result) -> str:
    head = f"{result.label}, pending {result.pending:,}, {result.rate:g}/s:"
    if result.skipped:
        return f"{head} skipped: {result.skipped}"
    measured, missing, p50, p99, top = stats(result)
    return (
        f"{head} {measured:,} handled, {missing:,} missing; lag ms p50 {fmt(p50)}, p99 {fmt(p99)}, "
        f"max {fmt(top)}; pending loaded in {result.load_s:.1f} s; Redis CPU idle "
        f"{fmt(result.idle_redis)}%, consumer CPU idle {fmt(result.idle_consumer)}%, "
        f"Redis CPU under load {fmt(result.load_redis)}%, "
        f"consumer CPU under load {fmt(result.load_consumer)}%"
    )


HEADERS = [
    "contender",
    "pending",
    "rate/s",
    "handled",
    "missing",
    "p50 ms",
    "p99 ms",
    "max ms",
    "Redis CPU idle %",
    "consumer CPU idle %",
    "Redis CPU load %",
    "consumer CPU load %",
    "p99 / ours",  # ours on the first broker given
]


def table_rows(results: Sequence[Result]) -> list[list[str]]:
    ours: dict[tuple[int, float], float] = {}  # ours on the first broker given (stock by default)
    for r in results:
        if r.contender == "ours" and not r.skipped:
            ours.setdefault((r.pending, r.rate), stats(r)[3])
    rows = []
    for result in results:
        if result.skipped:
            rows.append(
                [result.label, f"{result.pending:,}", f"{result.rate:g}"]
                + ["skipped"]
                + ["-"] * (len(HEADERS) - 4)
            )
            continue
        measured, missing, p50, p99, top = stats(result)
        base = ours.get((result.pending, result.rate), math.nan)
        ratio = p99 / base if base and not math.isnan(base) and not math.isnan(p99) else math.nan
        rows.append(
            [
                result.label,
                f"{result.pending:,}",
                f"{result.rate:g}",
                f"{measured:,}",
                f"{missing:,}",
                fmt(p50),
                fmt(p99),
                fmt(top),
                fmt(result.idle_redis, 2),
                fmt(result.idle_consumer, 2),
                fmt(result.load_redis),
                fmt(result.load_consumer),
                fmt(ratio, 2 if ratio < 10 else 0) if not math.isnan(ratio) else "-",
            ]
        )
    return rows


NOTES = (
    "lag: deadline -> handled (ours: -> `cancelled` event received by an MQTT subscriber; the others\n"
    "record when their handler ran and publish nothing). CPU in % of one core: idle = nothing due for\n"
    "the idle seconds with the pending items; load = while creating the measured items and until the\n"
    "last one was handled (or the grace time ended). consumer = the daemon (ours: not its MQTT\n"
    "subscriber), the expired-event subscriber, the poller or the worker (not the producer).\n"
    "missing: not handled within the grace time after the last deadline (their lag is not counted)."
)


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Lag and Redis CPU of the daemon and of the alternatives.")
    parser.add_argument("--pending", type=int, nargs="+", default=[0, 100_000], metavar="P")
    parser.add_argument("--rate", type=float, nargs="+", default=[100, 2000], metavar="R")
    parser.add_argument(
        "--duration", type=float, default=3.0, metavar="S", help="seconds of paced creates (default 3)"
    )
    parser.add_argument("--timeout", type=float, default=2.0, metavar="S", help="item due S after creation")
    parser.add_argument(
        "--grace", type=float, default=10.0, metavar="S", help="wait after the last deadline (default 10)"
    )
    parser.add_argument("--idle", type=float, default=5.0, metavar="S", help="idle measurement (default 5)")
    parser.add_argument(
        "--tick-ms",
        type=float,
        default=lag.TICK_MS,
        metavar="MS",
        help=f"every producer's pacing: one add call every MS ms (default {lag.TICK_MS:g})",
    )
    parser.add_argument(
        "--subscriber",
        choices=["mosquitto_sub", "process"],
        default="mosquitto_sub",
        help="ours: the MQTT subscriber that receives the `cancelled` events (mosquitto_sub, the "
        "C client, default, or aiomqtt in its own process)",
    )
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=CONTENDERS)
    parser.add_argument("--arq-max-jobs", type=int, default=50, help="arq worker max_jobs (default 50)")
    parser.add_argument(
        "--bullmq-concurrency", type=int, default=50, help="BullMQ worker concurrency (default 50)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    add_broker_arg(parser, several=True)
    parser.add_argument(
        "--figure",
        type=Path,
        default=FIGURE,
        metavar="SVG",
        help="where the figure of the results goes, their JSON beside it with the suffix .json "
        "(default docs/comparison.svg)",
    )
    parser.add_argument("--child", nargs=3, metavar=("KIND", "URL", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.broker = list(dict.fromkeys(args.broker))  # each profile once, in the order given
    if args.child is None:
        if any(p < 0 for p in args.pending) or any(r <= 0 for r in args.rate):
            parser.error("--pending must be >= 0 and --rate > 0")
        if args.duration <= 0 or not 0.1 <= args.timeout <= 3600 or args.idle < 0:
            parser.error("--duration must be > 0, --timeout 0.1 .. 3600, --idle >= 0")
    return args


def arq_version() -> str:
    try:
        from importlib.metadata import version

        return version("arq")
    except Exception:
        return ""


def runs(args: argparse.Namespace, configs: dict[str, Config]) -> list[tuple[str, str, int, float]]:
    """(contender, broker, pending, rate) in the order they run: ours once per broker given."""
    return [
        (kind, broker, pending, rate)
        for pending in args.pending
        for rate in args.rate
        for kind in args.contenders
        for broker in (configs if kind == "ours" else [""])
    ]


async def run_all(configs: dict[str, Config], args: argparse.Namespace, results: list[Result]) -> None:
    """`configs`: one per broker profile (its mosquitto); the others' runs take the first."""
    first = next(iter(configs.values()))
    for index, (kind, broker, pending, rate) in enumerate(runs(args, configs), start=1):
        result = await run_contender(configs[broker] if broker else first, kind, pending, rate, index)
        result.broker = broker
        print(summary_line(result), flush=True)
        if kind == "ours" and result.note:
            print("  " + result.note.replace("\n", "\n  "), flush=True)
        elif result.note:
            print(f"  {result.note}", flush=True)
        results.append(result)


def figure_data(args: argparse.Namespace, argv: Sequence[str], results: Sequence[Result]) -> dict[str, Any]:
    """What bench/comparison_figure.py draws: the setup in short and each result's lag."""

    def number(value: float) -> float | None:
        return None if math.isnan(value) else round(value, 3)

    rows = []
    for result in results:
        measured, missing, p50, p99, top = stats(result)
        rows.append(
            {
                "contender": result.contender,
                "broker": result.broker,
                "pending": result.pending,
                "rate": result.rate,
                "handled": measured,
                "missing": missing,
                "p50_ms": number(p50),
                "p99_ms": number(p99),
                "max_ms": number(top),
                "skipped": result.skipped,
            }
        )
    return {
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} x {cpu_model()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "command": shlex.join([".venv/bin/python", "bench/alternatives.py", *argv]),
        "workload": f"{args.duration:g} s of items falling due at each rate, each due {args.timeout:g} s "
        f"after creation; grace {args.grace:g} s",
        "results": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child is not None:
        kind, url, argument = args.child
        run_child(kind, url, argument)
        return 0
    lag.clear_listener_env()
    node = bullmq_available() if "bullmq" in args.contenders else Node(False, "not selected")
    arq = arq_version() if "arq" in args.contenders else ""
    print_setup(
        "Setup",
        [
            ("contenders", " ".join(args.contenders)),
            (
                "workload",
                f"pending {args.pending} x rate {args.rate}/s, {args.duration:g} s of creates each, "
                f"items due {args.timeout:g} s after creation, pending items due in 1 h; "
                f"idle {args.idle:g} s; grace {args.grace:g} s; an add call every {args.tick_ms:g} ms",
            ),
            (
                "servers",
                "a fresh redis-server (repo redis.conf) per contender; one mosquitto per broker for the run",
            ),
            *(broker_line(profile) for profile in args.broker),
            (
                "measures",
                f"ours: deadline -> `cancelled` received by an MQTT subscriber ({args.subscriber}; "
                "includes the MQTT hop); "
                "expired, pollers, arq, BullMQ: deadline -> their handler ran (no MQTT publish)",
            ),
            ("arq", f"{arq}, max_jobs {args.arq_max_jobs}, keep_result 0, poll_delay 0.5 s" if arq else "-"),
            (
                "BullMQ",
                f"{node.reason}, concurrency {args.bullmq_concurrency}, removeOnComplete"
                if node.ok
                else f"skipped: {node.reason}",
            ),
            ("figure", f"{args.figure} and {args.figure.with_suffix('.json')}"),
        ],
    )
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-alternatives-"))
    brokers = {profile: bench_broker(workdir / f"mosquitto-{profile}", profile) for profile in args.broker}
    results: list[Result] = []
    try:
        configs = {}
        for profile, broker in brokers.items():
            broker.start()
            assert broker.proc is not None
            configs[profile] = Config(
                duration=args.duration,
                timeout=args.timeout,
                grace=args.grace,
                idle=args.idle,
                arq_max_jobs=args.arq_max_jobs,
                bullmq_concurrency=args.bullmq_concurrency,
                workdir=workdir,
                mqtt_port=broker.port,
                mosquitto_pid=broker.proc.pid,
                node=node,
                arq=arq,
                tick_ms=args.tick_ms,
                subscriber=args.subscriber,
            )
        asyncio.run(run_all(configs, args, results))
    finally:
        for broker in brokers.values():
            broker.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        if results:
            print_table("Lag from deadline to handling, and Redis CPU", HEADERS, table_rows(results), NOTES)
            figure = args.figure.resolve()
            write_figure(figure_data(args, argv, results), figure.with_suffix(".json"), figure)
            print(f"figure: {figure} (results: {figure.with_suffix('.json')})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
