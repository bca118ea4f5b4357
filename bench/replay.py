"""A replay to a subscriber: `order-listener replay --publish` at each pace.

    .venv/bin/python bench/replay.py [--events 100000] [--broker stock|tuned] [--rates auto 0] [--repeat 2]

A replay most often follows a subscriber that lost events: its queue at the
broker overflowed, or it was away. Does the replay reach it whole? This
writes `--events` `cancelled` events (distinct orders, about 200 bytes each)
to the event log as the daemon logs what it published, starts a
`mosquitto_sub` subscriber (QoS 1, the one `bench/lag.py` uses), runs
`order-listener replay --since <before the events> --publish --rate R` for
each of `--rates` (`auto`: the default, 10,000 a second on a broker left at
its defaults; 0: as fast as the broker takes them), and prints how long the
replay took, when the subscriber had the last event, and how many it never
got (a stock mosquitto drops what is beyond its queue of 1,000 for a
subscriber that falls behind). No daemon runs; fresh servers for each run.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import floor
import lag
from benchlib import print_setup
from brokers import add_broker_arg, broker_line
from redis.asyncio import Redis

from listener.events import LOG_FIELD, logged
from listener.keys import PARTS, KeyLayout, part_of
from listener.servers import ServerProcess

POLL_S = 0.02
PER_ENTRY = 1_000  # events per log entry, as a burst's round trips write them


@dataclass(frozen=True)
class Run:
    replay_s: float  # the command, start to exit (connecting included)
    received_s: float  # from the command's start until the subscriber's last event
    missing: int


async def write_log(redis: Redis, events: int) -> None:
    """`events` cancellations in the event log, each part's in entries of up to PER_ENTRY."""
    by_part: dict[int, list[bytes]] = {part: [] for part in range(PARTS)}
    for event in floor.events_of(events):
        by_part[part_of(event.order_id)].append(logged(event))
    layout = KeyLayout()
    async with redis.pipeline(transaction=False) as pipe:
        for part, values in by_part.items():
            for start in range(0, len(values), PER_ENTRY):
                pipe.xadd(layout.event_log(part), {LOG_FIELD: b"\n".join(values[start : start + PER_ENTRY])})
        await pipe.execute()


async def one_run(events: int, profile: str, rate: str, grace: float) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-replay-"))
    servers: list[ServerProcess] = []
    sub: lag.MosquittoSubSubscriber | None = None
    try:
        redis_proc, broker = lag.start_servers(workdir, servers, profile)
        redis_url = f"redis://127.0.0.1:{redis_proc.port}/0"
        async with Redis.from_url(redis_url) as redis:
            seconds, _ = await redis.time()
            since = f"{seconds - 1}"  # the Redis clock, a second before the log's first entry
            await write_log(redis, events)
        sub = lag.MosquittoSubSubscriber("127.0.0.1", broker.port, workdir)
        await sub.start()  # (returns once it receives)
        env = os.environ | {  # (main cleared every ORDER_LISTENER_* of the environment)
            "ORDER_LISTENER_REDIS_URL": redis_url,
            "ORDER_LISTENER_MQTT_URL": f"mqtt://127.0.0.1:{broker.port}",
        }
        started, started_unix = time.monotonic(), time.time()
        proc = await asyncio.create_subprocess_exec(
            lag.daemon_command()[0],
            *("replay", "--since", since, "--publish", "--rate", rate),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        _, err = await proc.communicate()
        replay_s = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"replay exited {proc.returncode}: {err.decode(errors='replace')}")
        last, got = time.monotonic(), 0
        while time.monotonic() - last < grace and got < events:
            now = (await sub.counts()).cancelled
            if now > got:
                got, last = now, time.monotonic()
            await asyncio.sleep(POLL_S)
        stamps = [stamp for stamp, _ in (await sub.results()).values()]  # mosquitto_sub's own receipt times
        return Run(replay_s, max(stamps, default=started_unix) - started_unix, events - got)
    finally:
        if sub is not None:
            await sub.stop()
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A replay to a mosquitto_sub subscriber, at each pace.")
    parser.add_argument("--events", type=int, default=100_000, metavar="N")
    parser.add_argument("--rates", nargs="+", default=["auto", "0"], metavar="R", help="replay --rate values")
    parser.add_argument("--repeat", type=int, default=2, metavar="N")
    parser.add_argument(
        "--grace", type=float, default=3.0, help="the subscriber's last event: none new for this long"
    )
    add_broker_arg(parser)
    args = parser.parse_args(argv)
    lag.clear_listener_env()
    print_setup(
        f"a replay of {args.events:,} events to a subscriber",
        [("subscriber", f"mosquitto_sub (QoS 1, {lag.TOPIC})"), broker_line(args.broker)],
    )
    for rate in args.rates:
        runs = []
        for n in range(1, args.repeat + 1):
            run = asyncio.run(one_run(args.events, args.broker, rate, args.grace))
            runs.append(run)
            print(
                f"--rate {rate}, run {n}: replay {run.replay_s:.2f} s, last received {run.received_s:.2f} s, "
                f"missing {run.missing:,}",
                flush=True,
            )
        median = statistics.median(run.received_s for run in runs)
        print(f"--rate {rate}: last received {median:.2f} s (median), missing {[r.missing for r in runs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
