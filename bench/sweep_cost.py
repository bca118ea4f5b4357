"""What the sweep script costs Redis per cancelled order (no daemon, no broker).

    .venv/bin/python bench/sweep_cost.py [--orders 100000] [--batch 1000]

On a fresh redis-server with the project's redis.conf: creates N orders
through the Python API with a 1 s window (so they are pending like any
other, in their buckets), waits until all are due, then runs the `sweep`
script as the daemon's scheduler does (every part in one pipelined round
trip, `--batch` orders a part per call) until nothing is due. Prints the
wall time of the sweeps, Redis's own time in EVALSHA (INFO commandstats) per
order, Redis' whole CPU time per order over the sweeps (EVALSHA's time leaves
out writing the append-only file), the memory a cancelled order keeps through
its retention, and Redis' EVALSHA time per order for the `create` script. The burst figure of
bench/burst.py is bounded below by this Redis time. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from benchlib import print_setup, redis_config, redis_cpu, used_memory
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import load_settings
from listener.keys import PARTS, KeyLayout
from listener.servers import redis_server

CHUNK = 10_000


async def evalsha_usec(redis: Redis) -> tuple[int, int]:
    stats = await redis.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {})
    return int(entry.get("calls", 0)), int(entry.get("usec", 0))


async def measure(url: str, orders: int, batch: int) -> None:
    redis = Redis.from_url(url)
    print(f"Redis config: {await redis_config(redis)}", flush=True)
    settings = load_settings(redis_url=url)
    layout = KeyLayout(settings.key_prefix)
    ids = [f"sweep-{i:07d}" for i in range(orders)]
    async with OrderClient(settings) as client:
        await redis.config_resetstat()
        started = time.perf_counter()
        for i in range(0, orders, CHUNK):
            await client.create_many([(oid, 1.0) for oid in ids[i : i + CHUNK]])
        create_s = time.perf_counter() - started
        _, create_us = await evalsha_usec(redis)
        memory = (await redis.info("memory"))["used_memory"]
        await asyncio.sleep(1.2)  # every order is due now (a 1 s window)
        store = await client.opened()
        await redis.config_resetstat()
        calls = swept = 0
        cpu_before = await redis_cpu(redis)
        started = time.perf_counter()
        while True:
            results = await store.sweep(range(PARTS), batch)
            calls += 1
            done = sum(len(r.cancelled) for r in results)
            swept += done
            if done == 0:
                break
        sweep_s = time.perf_counter() - started
        sweep_cpu_s = await redis_cpu(redis) - cpu_before
        _, sweep_us = await evalsha_usec(redis)
        # what the cancelled orders keep while their retention lasts: the
        # outbox entries go once published (no daemon here to do it)
        streams = [key for p in range(PARTS) for key in (layout.outbox(p), layout.outbox_created(p))]
        await redis.delete(*streams)
        kept = await used_memory(redis)
        await redis.flushall()
        empty = await used_memory(redis)  # the server's own baseline
    await redis.aclose()
    print(f"orders            {orders:,} ({memory / orders:.0f} B of Redis memory each while pending)")
    print(f"create            {create_s:.2f} s wall, Redis {create_us / orders:.1f} µs per order")
    print(
        f"sweep             {sweep_s:.2f} s wall in {calls} rounds of {PARTS} parts x {batch}, "
        f"Redis {sweep_us / 1e6:.2f} s = {sweep_us / max(swept, 1):.1f} µs per order ({swept:,} cancelled)"
    )
    print(
        f"sweep, all of it  Redis CPU {sweep_cpu_s:.2f} s = "
        f"{sweep_cpu_s * 1e6 / max(swept, 1):.1f} µs per order "
        "(the scripts, and what EVALSHA's time leaves out: writing the append-only file, "
        "the timers Redis expired meanwhile)"
    )
    print(f"kept              {(kept - empty) / max(swept, 1):.0f} B of Redis memory per cancelled order")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument(
        "--batch", type=int, default=1000, help="orders per part per sweep call (the daemon's)"
    )
    args = parser.parse_args()
    print_setup("sweep cost", [("orders", f"{args.orders:,}"), ("batch", str(args.batch))])
    with tempfile.TemporaryDirectory(prefix="sweep-cost-") as tmp:
        server = redis_server(Path(tmp) / "redis")
        server.start()
        try:
            asyncio.run(measure(f"redis://127.0.0.1:{server.port}/0", args.orders, args.batch))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
