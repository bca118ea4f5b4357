"""The sweep script of this checkout against the one of a git revision, side by side.

    .venv/bin/python bench/sweep_ab.py [--against HEAD~1] [--orders 200000] [--batch 250] [--runs 2]

Redis' time per order in the sweep moves by a third from one run to the
next on a shared VM (bench/sweep_cost.py), more than most changes of the
script. So both versions run in the same redis-server (the project's
redis.conf, snapshots off for the measurement), in the same round trips:
N orders due at once, every part swept in turn by one version or the other,
alternating from round to round, until nothing is due. One version is
called by EVALSHA and the other by EVAL, so INFO commandstats times each on
its own; a second run swaps the two, since EVAL itself costs a little more.
Prints Redis' µs per order of each and the ratio (this checkout / the
revision) of each run and their geometric mean. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import subprocess
import tempfile
from pathlib import Path

from benchlib import print_setup
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import load_settings
from listener.keys import PARTS
from listener.scripts import source
from listener.servers import redis_server

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 10_000
RETENTION_MS = 86_400_000


def source_at(revision: str) -> str:
    """The sweep script as `revision` sent it to Redis (lib.lua, then sweep.lua)."""

    def show(name: str) -> str:
        return subprocess.run(
            ["git", "show", f"{revision}:listener/scripts/{name}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    return f"{show('lib.lua')}\n{show('sweep.lua')}"


async def one_run(
    url: str, run: int, by_sha: str, by_eval: str, orders: int, batch: int
) -> tuple[float, float]:
    """µs per order of the EVALSHA script and of the EVAL script."""
    redis = Redis.from_url(url)
    await redis.flushall()
    settings = load_settings(redis_url=url)
    async with OrderClient(settings) as client:
        for start in range(0, orders, CHUNK):
            chunk = range(start, min(orders, start + CHUNK))
            await client.create_many([(f"ab{run}-{i:07d}", 1.0) for i in chunk])
        store = await client.opened()
        layout = store.layout
        sha = await redis.script_load(by_sha)
        await asyncio.sleep(1.2)  # every order is due now (a 1 s window)
        await redis.config_resetstat()
        counts = {"sha": 0, "eval": 0}
        round_no = 0
        while True:
            pipe = redis.pipeline(transaction=False)
            who = []
            for part in range(PARTS):
                keys = [layout.deadlines(part), layout.outbox(part)]
                args: list[str | int] = [layout.base(part), batch, RETENTION_MS]
                if (part + round_no) % 2 == 0:
                    pipe.evalsha(sha, 2, *keys, *args)
                    who.append("sha")
                else:
                    pipe.eval(by_eval, 2, *keys, *args)
                    who.append("eval")
            replies = await pipe.execute()
            round_no += 1
            swept = 0
            for name, reply in zip(who, replies, strict=True):
                counts[name] += len(reply[2]) // 2
                swept += len(reply[2]) // 2
            if not swept:
                break
        stats = await redis.info("commandstats")
    await redis.aclose()
    return (
        stats["cmdstat_evalsha"]["usec"] / max(counts["sha"], 1),
        stats["cmdstat_eval"]["usec"] / max(counts["eval"], 1),
    )


async def measure(url: str, against: str, orders: int, batch: int, runs: int) -> None:
    ours, theirs = source("sweep"), source_at(against)
    redis = Redis.from_url(url)
    await redis.config_set("save", "")  # no snapshot fork in the middle of a run
    await redis.aclose()
    ratios = []
    for run in range(runs):
        if run % 2 == 0:
            mine, other = await one_run(url, run, ours, theirs, orders, batch)
        else:
            other, mine = await one_run(url, run, theirs, ours, orders, batch)
        ratios.append(mine / other)
        called = "EVALSHA" if run % 2 == 0 else "EVAL"
        print(
            f"run {run + 1}: this checkout {mine:.2f} µs/order ({called}), {against} {other:.2f} µs/order, "
            f"ratio {mine / other:.3f}",
            flush=True,
        )
    mean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"this checkout / {against}: {mean:.3f} (geometric mean of {runs} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", default="HEAD~1", help="git revision to compare with (HEAD~1)")
    parser.add_argument("--orders", type=int, default=200_000, help="orders due per run (half each)")
    parser.add_argument(
        "--batch", type=int, default=250, help="orders per part per call (250: the daemon's in a burst)"
    )
    parser.add_argument("--runs", type=int, default=2, help="runs, the roles swapped each time (2)")
    args = parser.parse_args()
    print_setup(
        "sweep A/B",
        [("against", args.against), ("orders", f"{args.orders:,}"), ("batch", str(args.batch))],
    )
    with tempfile.TemporaryDirectory(prefix="sweep-ab-") as tmp:
        server = redis_server(Path(tmp) / "redis")
        server.start()
        try:
            asyncio.run(
                measure(
                    f"redis://127.0.0.1:{server.port}/0", args.against, args.orders, args.batch, args.runs
                )
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
