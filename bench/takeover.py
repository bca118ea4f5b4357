"""One lane's backlog: how fast the daemon publishes a single lane's outbox.

    .venv/bin/python bench/takeover.py [--events 50000] [--broker stock|tuned] [--repeat 2]

A lane whose daemon died, or whose outbox filled while the broker was away,
holds a backlog of its own while the other 15 lanes are empty. This writes
`--events` `cancelled` entries (distinct orders, as the expire script writes
them) to lane 5's `outbox` stream before the daemon starts, then starts it
and times, from the first entry deleted, until the stream is empty (every
entry published and acknowledged) and until a `mosquitto_sub` subscriber
(QoS 1) had them all. On a stock broker the lane publishes on one of the
daemon's 4 connections, with 20 messages in flight; on the tuned one on its
only connection. Fresh servers for each run; prints each run and the median.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import lag
from benchlib import print_setup
from brokers import add_broker_arg, broker_line
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from listener.keys import KeyLayout
from listener.servers import ServerProcess

LANE = 5
POLL_S = 0.005


async def one_run(events: int, profile: str) -> tuple[float, float | None]:
    """Seconds from the first entry deleted until the lane's stream was empty,
    and until the subscriber had every event (None: not within 30 s)."""
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-takeover-"))
    servers: list[ServerProcess] = []
    sub: lag.MosquittoSubSubscriber | None = None
    daemon: lag.DaemonProcess | None = None
    try:
        redis_proc, broker = lag.start_servers(workdir, servers, profile)
        redis_url = f"redis://127.0.0.1:{redis_proc.port}/0"
        redis = Redis.from_url(redis_url)
        key = KeyLayout().outbox(LANE)
        async with redis.pipeline(transaction=False) as pipe:
            for n in range(events):
                # a cancellation of an order whose `created` event went long ago
                fields: dict[FieldT, EncodableT] = {"o": f"T{n}", "s": "cancelled", "p": "created"}
                fields |= {"r": "timeout", "v": "2", "t": str(1_700_000_000_000 + n), "c": "1-0"}
                pipe.xadd(key, fields)
            await pipe.execute()
        sub = lag.MosquittoSubSubscriber("127.0.0.1", broker.port, workdir)
        await sub.start()  # (returns once it receives)
        mqtt_url = f"mqtt://127.0.0.1:{broker.port}"
        daemon = lag.spawn_daemon(redis_url, mqtt_url, workdir / "daemon.log", "warning")
        start: float | None = None
        while (left := await redis.xlen(key)) or start is None:
            if start is None and left < events:
                start = time.monotonic()
            daemon.check_alive()
            await asyncio.sleep(POLL_S)
        drained = time.monotonic() - start
        received: float | None = None
        while time.monotonic() - start < 30:
            if (await sub.counts()).cancelled >= events:
                received = time.monotonic() - start
                break
            await asyncio.sleep(POLL_S)
        await redis.aclose()
        return drained, received
    finally:
        if daemon is not None:
            await lag.stop_daemon(daemon)
        if sub is not None:
            await sub.stop()
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="How fast one lane's backlog is published.")
    parser.add_argument("--events", type=int, default=50_000, metavar="N")
    parser.add_argument("--repeat", type=int, default=2, metavar="R")
    add_broker_arg(parser)
    args = parser.parse_args(argv)
    lag.clear_listener_env()
    print_setup(
        f"one lane's backlog of {args.events:,} cancellations",
        [("subscriber", f"mosquitto_sub (QoS 1, {lag.TOPIC})"), broker_line(args.broker)],
    )
    drained: list[float] = []
    for run in range(1, args.repeat + 1):
        seconds, received = asyncio.run(one_run(args.events, args.broker))
        drained.append(seconds)
        got = f"{received:.2f} s" if received is not None else "not all within 30 s"
        rate = args.events / seconds
        print(f"run {run}: stream empty after {seconds:.2f} s ({rate:,.0f}/s); all received: {got}")
    median = statistics.median(drained)
    print(f"median: {median:.2f} s, {args.events / median:,.0f} events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
