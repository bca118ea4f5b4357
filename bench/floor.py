"""The floor under a burst's publishing: the broker and the subscriber alone.

    .venv/bin/python bench/floor.py [--events 100000] [--broker stock|tuned] [--repeat 3] [--rate R]

How fast can N `cancelled` events get from a publisher through mosquitto to
a `mosquitto_sub` subscriber on this machine, with no daemon and no Redis?
The publishers are `--publishers` (4, as many connections as the daemon
opens to a stock broker) `mosquitto_pub` processes at once (the C client,
MQTT 5, QoS 1, one message per line of its input, its default of 20 in
flight and whatever the broker allows; one client takes at most 65,535
messages), fed N event payloads as the daemon writes them (distinct orders,
about 200 bytes each) in equal shares, each PUBLISH with the properties the
daemon sends (content type, `event_id` and `status` user properties, an
event id as long as the payload's). Unlike the daemon's, every message goes
to one topic (`orders/floor/status`): `mosquitto_pub` takes one. The subscriber is the one `bench/lag.py` and
`bench/burst.py` use (QoS 1 on `orders/+/status`, its receipts written to a
file).

For each run: a fresh mosquitto (`--broker`, stock by default) on a free
loopback port, the subscriber, then the publisher; prints the time until
the publisher had every PUBACK and exited, until the subscriber had them
all (or `--grace` s passed: the rest is missing, dropped by a stock broker's
queue of 1,000 messages for a subscriber that falls behind), and the CPU of
the broker, the subscriber and the publisher. Then the median of the runs.

`--rate R` paces the publishers: R events a second from all of them
together, their input handed over every few milliseconds instead of at
once. A paced floor asks whether a publisher that never outruns the
subscriber (R at or below the rate the subscriber takes when it is not
stalled) still loses events to a stock broker's queue.

What a burst of N adds to this is the daemon's and Redis' work on the same
two cores. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lag
from benchlib import print_setup
from brokers import add_broker_arg, bench_broker, broker_line

from listener.events import StatusEvent

TOPIC = "orders/floor/status"
POLL_S = 0.02
PACE_STEP_S = 0.005  # a paced publisher's input is handed over in steps this long
MAX_PER_CLIENT = 65_535  # a client's message ids: mosquitto_pub loses what is beyond them


@dataclass
class Run:
    published_s: float  # until the publisher had every PUBACK and exited
    received_s: float  # until the subscriber had all (or the grace ran out)
    received: int
    rate: float  # received a second
    broker_cpu: float
    subscriber_cpu: float
    publisher_cpu: float


def events_of(events: int) -> list[StatusEvent]:
    """N `cancelled` events of distinct orders, as the daemon sends them."""
    at = int(time.time() * 1000)
    return [
        StatusEvent(
            order_id=f"{lag.MEASURED_PREFIX}floor-{i}",
            status="cancelled",
            previous="created",
            reason="timeout",
            version=2,
            at_ms=at,
            created_ms=at - 1_800_000,
        )
        for i in range(events)
    ]


def properties(event: StatusEvent) -> list[str]:
    """mosquitto_pub's options for the PUBLISH properties the daemon sends (listener/mqtt/packets.py)."""
    return [
        *("-D", "publish", "content-type", "application/json"),
        *("-D", "publish", "user-property", "event_id", event.event_id),
        *("-D", "publish", "user-property", "status", event.status),
    ]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def one_run(
    profile: str, events: int, publishers: int, grace: float, workdir: Path, rate: float = 0.0
) -> Run:
    broker = bench_broker(workdir / "mosquitto", profile)
    broker.start()
    sub = lag.MosquittoSubSubscriber("127.0.0.1", broker.port, workdir)
    try:
        await sub.start()
        assert broker.proc is not None
        broker_pid, sub_pid = broker.proc.pid, sub.pid()
        made = events_of(events)
        lines = [event.payload() + b"\n" for event in made]
        sources = []
        for n in range(publishers):
            sources.append(workdir / f"payloads-{n}.txt")
            sources[-1].write_bytes(b"".join(lines[n::publishers]))
        extra = properties(made[-1])
        binary = shutil.which("mosquitto_pub")
        if binary is None:
            raise RuntimeError("no mosquitto_pub on PATH (apt-get install mosquitto-clients)")
        cpu_broker, cpu_sub, cpu_children = (
            lag.cpu_seconds(broker_pid),
            lag.cpu_seconds(sub_pid),
            children_cpu(),
        )
        started, started_unix = time.monotonic(), time.time()
        share = rate / publishers
        await asyncio.gather(*(publish(binary, broker.port, source, extra, share) for source in sources))
        published = time.monotonic() - started
        publisher_cpu = children_cpu() - cpu_children
        await wait_received(sub, events, time.monotonic() + grace)
        counts = await sub.counts()
        stamps = await sub.results()
        last = max((stamp for stamp, _ in stamps.values()), default=0.0)
        received = last - started_unix if stamps else float("nan")  # receipts carry the Unix time
        return Run(
            published,
            received,
            counts.measured,
            counts.measured / received if stamps else 0.0,
            lag.cpu_seconds(broker_pid) - cpu_broker,
            lag.cpu_seconds(sub_pid) - cpu_sub,
            publisher_cpu,
        )
    finally:
        await sub.stop()
        broker.stop()


async def publish(binary: str, port: int, source: Path, extra: list[str], rate: float) -> None:
    """One mosquitto_pub, its input the lines of `source`: the whole file at
    once, or (`rate`) that many lines a second, handed over every PACE_STEP_S."""
    argv = [binary, "-h", "127.0.0.1", "-p", str(port), "-t", TOPIC, "-q", "1", "-V", "mqttv5", "-l", *extra]
    with source.open("rb") as feed:
        pub = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if rate else feed,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if rate:
            lines = await asyncio.to_thread(lambda: source.read_bytes().splitlines(keepends=True))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it died: its stderr says why
                await feed_at(pub, lines, rate)
        _, err = await pub.communicate()
    if pub.returncode != 0:
        raise RuntimeError(f"mosquitto_pub exited {pub.returncode}: {err.decode(errors='replace')}")


async def feed_at(pub: asyncio.subprocess.Process, lines: list[bytes], rate: float) -> None:
    """Write `lines` to `pub`'s input at `rate` a second, then close it."""
    assert pub.stdin is not None
    started, written = time.monotonic(), 0
    while written < len(lines):
        due = min(len(lines), int((time.monotonic() - started) * rate) + 1)
        if due > written:
            pub.stdin.write(b"".join(lines[written:due]))
            await pub.stdin.drain()
            written = due
        await asyncio.sleep(PACE_STEP_S)
    pub.stdin.close()


async def wait_received(sub: lag.MosquittoSubSubscriber, events: int, give_up: float) -> None:
    while (await sub.counts()).measured < events:
        if time.monotonic() > give_up:
            return
        await asyncio.sleep(POLL_S)


def show(run: Run, events: int) -> str:
    missing = events - run.received
    return (
        f"published (all PUBACKs) {run.published_s:.2f} s, last received {run.received_s:.2f} s"
        f" ({run.rate:,.0f}/s), missing {missing:,}; CPU s: broker {run.broker_cpu:.2f},"
        f" subscriber {run.subscriber_cpu:.2f}, publisher {run.publisher_cpu:.2f}"
    )


async def main_async(args: argparse.Namespace) -> None:
    runs: list[Run] = []
    for n in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="order-listener-floor-") as tmp:
            run = await one_run(args.broker, args.events, args.publishers, args.grace, Path(tmp), args.rate)
        runs.append(run)
        print(f"run {n + 1}: {show(run, args.events)}", flush=True)
    median = Run(
        statistics.median(r.published_s for r in runs),
        statistics.median(r.received_s for r in runs),
        round(statistics.median(r.received for r in runs)),
        statistics.median(r.rate for r in runs),
        statistics.median(r.broker_cpu for r in runs),
        statistics.median(r.subscriber_cpu for r in runs),
        statistics.median(r.publisher_cpu for r in runs),
    )
    print(f"median of {len(runs)}: {show(median, args.events)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=4, help="mosquitto_pub processes at once")
    parser.add_argument(
        "--grace", type=float, default=60.0, help="wait this long after the publisher for the rest"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        metavar="R",
        help="events a second from all publishers together (0, the default: as fast as they go)",
    )
    add_broker_arg(parser)
    args = parser.parse_args()
    if -(-args.events // args.publishers) > MAX_PER_CLIENT:
        parser.error(f"at most {MAX_PER_CLIENT:,} events per publisher: raise --publishers")
    print_setup(
        "the floor: broker and subscriber alone",
        [
            broker_line(args.broker),
            ("publishers", f"{args.publishers} x mosquitto_pub (C, MQTT 5, QoS 1, -l: a message per line)"),
            ("subscriber", f"mosquitto_sub (QoS 1, {lag.TOPIC})"),
            ("events", f"{args.events:,}"),
            ("pace", f"{args.rate:,.0f} events a second in all" if args.rate else "none: as fast as they go"),
        ],
    )
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
