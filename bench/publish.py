"""MQTT publish throughput and CPU per event of `MqttLink.publish`.

    .venv/bin/python bench/publish.py [--events N] [--repeat R] [VARIANT ...]

A VARIANT is a comma-separated list of ``name=value`` (defaults in brackets):
``proto`` MQTT version, ``5`` or ``3.1.1`` [5]; ``conns`` MQTT connections
(`ORDER_LISTENER_MQTT_CONNECTIONS`) [1]; ``lanes`` concurrent publishers, like
the outbox lanes [16]; ``batch`` events per `publish` call [500]; ``uvloop``
``0``/``1``, run on uvloop (it must be importable; not a dependency) [0];
``broker`` ``stock`` (mosquitto's defaults) or ``tuned`` (Nagle off,
``max_inflight_messages 0``) [stock]; ``rmax`` the broker's
``max_inflight_messages`` on top of that, which mosquitto announces to MQTT 5
clients as Receive Maximum, 0 for none [the profile's].
Without variants a standard set runs.

For each variant and repetition, a fresh process starts a mosquitto on a free
loopback port (never 1883) and a `mosquitto_sub` (QoS 1 on `orders/+/status`,
a separate C process), connects an `MqttLink`, and lets `lanes` tasks publish
N prebuilt `cancelled` events in batches of `batch`, each call waiting for the
broker's PUBACKs like an outbox lane does. It prints publish throughput
(events/s, until the last PUBACK), the time until the subscriber had them all,
and the publisher's CPU per event (µs, user + system of the whole process).
Then the median of the repetitions per variant.

``--profile`` runs the first variant once under cProfile and prints the top
functions by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import inspect
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from brokers import bench_broker

from listener.config import load_settings
from listener.events import StatusEvent
from listener.mqtt import MqttLink
from listener.supervise import Service

DEFAULT_VARIANTS = [
    "proto=5",
    "proto=3.1.1",
    "proto=5,batch=10",
    "proto=5,conns=2",
    "proto=5,conns=4",
    "proto=5,rmax=20",
]
KNOWN = {
    "proto": "5",
    "conns": "1",
    "lanes": "16",
    "batch": "500",
    "uvloop": "0",
    "rmax": "",
    "broker": "stock",
}


@dataclass
class Result:
    variant: str
    events: int
    publish_s: float
    received_s: float
    cpu_s: float

    @property
    def rate(self) -> float:
        return self.events / self.publish_s

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.events * 1e6


def parse_variant(text: str) -> dict[str, str]:
    spec = dict(KNOWN)
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in KNOWN:
            raise SystemExit(f"unknown variant setting {name!r}; known: {', '.join(KNOWN)}")
        spec[name] = value
    return spec


def make_events(count: int) -> list[StatusEvent]:
    base = 1_795_564_749_929
    return [
        StatusEvent(
            order_id=f"bench-{i:07d}",
            status="cancelled",
            previous="created",
            reason="timeout",
            version=2,
            at_ms=base + 2000 + i,
            created_ms=base + i,
            created_entry=f"{base + i}-0".encode(),
        )
        for i in range(count)
    ]


async def measure(spec: dict[str, str], count: int, workdir: Path) -> Result:
    rmax = spec["rmax"]
    extra = f"max_inflight_messages {int(rmax)}\n" if rmax else ""
    broker = bench_broker(workdir, spec["broker"], extra_conf=extra)
    broker.start()
    sub: asyncio.subprocess.Process | None = None
    try:
        binary = shutil.which("mosquitto_sub")
        if binary is None:
            raise SystemExit("no mosquitto_sub on PATH (apt-get install mosquitto-clients)")
        sub = await asyncio.create_subprocess_exec(
            *[binary, "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-t", "orders/+/status"],
            *["-C", str(count), "-i", f"bench-sub-{os.getpid()}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(0.3)  # let it subscribe
        settings = load_settings(
            mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
            mqtt_protocol=spec["proto"],
            mqtt_connections=int(spec["conns"]),  # ignored by versions without the setting
        )
        link = MqttLink(settings, Service("mqtt"))
        runner = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 10)
            await link.publish(make_events(10))  # warm up (the subscriber counts these too)
            events = make_events(count - 10)
            lanes = int(spec["lanes"])
            batch = int(spec["batch"])
            parts: list[list[StatusEvent]] = [events[i::lanes] for i in range(lanes)]

            by_part = "part" in inspect.signature(link.publish).parameters  # older versions: one link

            async def lane(part: int, mine: list[StatusEvent]) -> None:
                for start in range(0, len(mine), batch):
                    chunk = mine[start : start + batch]
                    await (link.publish(chunk, part=part) if by_part else link.publish(chunk))

            cpu0, wall0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(lane(n, mine) for n, mine in enumerate(parts)))
            cpu1, wall1 = time.process_time(), time.perf_counter()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sub.wait(), 60)
            received = time.perf_counter()
            if sub.returncode != 0:
                raise SystemExit(f"the subscriber did not get all {count} events")
            return Result(
                ",".join(f"{k}={v}" for k, v in spec.items()),
                count - 10,
                wall1 - wall0,
                received - wall0,
                cpu1 - cpu0,
            )
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    finally:
        if sub is not None and sub.returncode is None:
            sub.kill()
            await sub.wait()
        broker.stop()


def run_child(spec: dict[str, str], count: int) -> Result:
    if spec["uvloop"] == "1":
        import uvloop

        uvloop.install()
    with tempfile.TemporaryDirectory(prefix="publish-bench-") as tmp:
        return asyncio.run(measure(spec, count, Path(tmp)))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="*", default=DEFAULT_VARIANTS)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # one measurement, as JSON on stdout
        result = run_child(parse_variant(args.variants[0]), args.events)
        print(json.dumps(result.__dict__))
        return
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        result = run_child(parse_variant(args.variants[0]), args.events)
        profiler.disable()
        print(f"{result.variant}: {result.rate:,.0f} events/s, {result.cpu_us:.1f} µs CPU/event (profiled)")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return
    results: dict[str, list[Result]] = {}
    for round_ in range(args.repeat):
        for variant in args.variants:
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--events", str(args.events), variant],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            result = Result(**json.loads(out.strip().splitlines()[-1]))
            results.setdefault(variant, []).append(result)
            print(
                f"[{round_ + 1}] {variant:<28} {result.rate:>9,.0f} events/s  "
                f"{result.cpu_us:6.1f} µs CPU/event  all received after {result.received_s:.2f} s",
                flush=True,
            )
    print(f"\nmedians of {args.repeat}, {args.events:,} events each")
    print(f"{'variant':<28} {'events/s':>10} {'µs CPU/event':>13} {'received s':>11}")
    for variant, runs in results.items():
        print(
            f"{variant:<28} {statistics.median(r.rate for r in runs):>10,.0f} "
            f"{statistics.median(r.cpu_us for r in runs):>13.1f} "
            f"{statistics.median(r.received_s for r in runs):>11.2f}"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
