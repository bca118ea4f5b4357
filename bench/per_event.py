"""CPU per event of the daemon's pure steps on the publish path, in µs.

    .venv/bin/python bench/per_event.py [--events N] [--repeat R]

No servers: each step runs over N prebuilt `cancelled` outbox entries (the
fields redis-py hands the outbox reader for an XREAD) in this process, best
of R repetitions, so the figures hold still on a busy host where a whole
burst's CPU time does not. The steps, in the order an event meets them:

* ``parse``: `events.from_outbox_entry`, the entry's fields checked and the
  `StatusEvent` built;
* ``topic check``: `packets.topic_level_ok` on its order id;
* ``publish packet``: its topic, MQTT 5 properties, payload and PUBLISH
  packet (what `Publisher` writes on the socket);
* ``log value``: `events.logged`, its value in the event log;
* ``log append``: `Deletes.queue_log` for a round trip of 100 events of one
  part, and redis-py packing that command for the socket.

To compare with another commit, run this script with that commit's
``listener`` first on the path (``git worktree add /tmp/old <commit>``, then
``PYTHONPATH=/tmp/old .venv/bin/python bench/per_event.py``): the script
uses only names both sides have.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.asyncio.connection import Connection

import listener
from listener.events import StatusEvent, from_outbox_entry, logged
from listener.mqtt.packets import encode_publish, property_bytes, topic_level_ok
from listener.outbox_pump import Deletes

ROUND_TRIP = 100  # events per event log append (a round trip's, of one part)


class Recorder:
    """Stands for a pipeline: keeps the commands queued on it."""

    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any, **options: Any) -> None:
        self.commands.append(args)


def entries(count: int) -> list[dict[bytes, bytes]]:
    return [
        {
            b"o": b"order-%014d" % n,
            b"s": b"cancelled",
            b"p": b"created",
            b"r": b"timeout",
            b"v": b"2",
            b"t": b"%d" % (1796000000000 + n),
            b"c": b"%d-%d" % (1795999100000 + n, n % 7),
        }
        for n in range(count)
    ]


def best(step: Callable[[], object], count: int, repeat: int) -> float:
    """µs per event: the fastest of `repeat` runs of `step` (which handles `count` events)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return min(times) / count * 1e6


def parse(fields: list[dict[bytes, bytes]]) -> None:
    for f in fields:
        from_outbox_entry(f)


def topic_check(events: list[StatusEvent]) -> None:
    for event in events:
        topic_level_ok(event.order_id)


def publish_packet(events: list[StatusEvent]) -> None:
    for mid, event in enumerate(events, 1):
        topic = f"orders/{event.order_id}/status".encode()
        encode_publish(topic, mid % 65535 + 1, property_bytes(event), event.payload())


def log_value(events: list[StatusEvent]) -> None:
    for event in events:
        logged(event)


def log_append(rounds: list[list[bytes]], packer: Connection) -> None:
    for batch in rounds:
        pipe = Recorder()
        Deletes(logged={"order:{3}:log": batch}).queue_log(pipe, 1796000000000)
        for command in pipe.commands:
            packer.pack_command(*command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    fields = entries(args.events)
    events: list[StatusEvent] = [from_outbox_entry(f) for f in fields]
    values = [logged(event) for event in events]
    rounds = [values[i : i + ROUND_TRIP] for i in range(0, len(values), ROUND_TRIP)]
    packer = Connection()
    steps: dict[str, Callable[[], object]] = {
        "parse": lambda: parse(fields),
        "topic check": lambda: topic_check(events),
        "publish packet": lambda: publish_packet(events),
        "log value": lambda: log_value(events),
        "log append": lambda: log_append(rounds, packer),
    }
    print(f"listener from {listener.__path__[0]}")
    print(f"python {platform.python_version()}, redis-py {redis.__version__}, {platform.machine()}")
    print(f"events {args.events:,}, best of {args.repeat}")
    total = 0.0
    for name, step in steps.items():
        us = best(step, args.events, args.repeat)
        total += us
        print(f"  {name:<15} {us:6.2f} µs per event")
    print(f"  {'all':<15} {total:6.2f} µs per event")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
