"""What the timers' own expiry costs Redis per order (no daemon, no broker).

    .venv/bin/python bench/expiry_cost.py [--keys 100000]

Every pending order has a timer key with a TTL, and Redis deletes it at its
deadline and sends `expired` to the daemon. On a fresh redis-server with the
project's redis.conf this sets N timer keys (the daemon's key names) whose
TTLs end spread over one second, then measures Redis' CPU time from just
before the first ends until all are gone: once with nobody subscribed to the
`expired` events, once with one subscriber (this process, reading them as
they come, as the daemon does). Prints µs of Redis CPU per key for each.
`bench/sweep_cost.py` leaves most of this out (most of its timers expired before its
sweeps run); a burst of `bench/burst.py` pays both. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

from benchlib import print_setup, redis_cpu
from redis.asyncio import Redis

from listener.keys import PARTS, KeyLayout
from listener.servers import redis_server

SPREAD_MS = 1000  # the TTLs end over this long
LEAD_MS = 3000  # the first TTL ends this long after the first key is set
CHUNK = 5000


class ExpiredCounter:
    """Reads the `expired` events until cancelled; `count`: how many so far."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.count = 0

    async def run(self) -> None:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe("__keyevent@0__:expired")
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self.count += 1
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]


async def one_run(keys: int, subscribed: bool) -> tuple[float, float, int, int]:
    """(Redis CPU s, wall s, keys expired, events read) for `keys` timers."""
    layout = KeyLayout()
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-expiry-"))
    server = redis_server(workdir)
    server.start()
    redis = Redis(port=server.port)
    counter = ExpiredCounter(redis)
    reader = asyncio.create_task(counter.run()) if subscribed else None
    try:
        await redis.ping()
        names = [layout.timer(f"o{n:010d}") for n in range(keys)]
        ends_at = time.time() + LEAD_MS / 1000  # the first TTL ends then
        for first in range(0, keys, CHUNK):
            async with redis.pipeline(transaction=False) as pipe:
                for n in range(first, min(first + CHUNK, keys)):
                    due = ends_at + n * SPREAD_MS / keys / 1000
                    pipe.set(names[n], 1, pxat=int(due * 1000))
                await pipe.execute()
        await asyncio.sleep(max(0.0, ends_at - time.time() - 0.1))
        if await redis.dbsize() < keys:
            raise SystemExit(f"setting the keys took longer than {LEAD_MS} ms: some expired before the start")
        cpu_before, started = await redis_cpu(redis), time.monotonic()
        give_up = started + 60
        while await redis.dbsize() > 0:  # Redis tells of no "all expired": looked at every 20 ms
            if time.monotonic() > give_up:
                raise SystemExit("the timers were not all gone a minute after their TTLs ended")
            await asyncio.sleep(0.02)
        cpu, wall = await redis_cpu(redis) - cpu_before, time.monotonic() - started
        expired = int((await redis.info("stats"))["expired_keys"])
        give_up = time.monotonic() + 10
        while reader is not None and counter.count < expired:  # the last events still on their way
            if time.monotonic() > give_up:
                break  # printed as read: fewer than expired
            await asyncio.sleep(0.05)
        return cpu, wall, expired, counter.count
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await redis.aclose()
        server.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=100_000)
    args = parser.parse_args()
    print_setup("timer expiry cost")
    print(f"timers: {args.keys:,} in {PARTS} parts, TTLs ending over {SPREAD_MS} ms")
    for subscribed in (False, True):
        cpu, wall, expired, read = await one_run(args.keys, subscribed)
        who = "one subscriber" if subscribed else "no subscriber"
        print(
            f"{who:<15} Redis CPU {cpu:.2f} s over {wall:.2f} s = {cpu / args.keys * 1e6:.1f} µs per key "
            f"({expired:,} expired, {read:,} events read)"
        )


if __name__ == "__main__":
    asyncio.run(main())
