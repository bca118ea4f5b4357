"""The broker the benchmarks run against: stock (as shops run mosquitto) or tuned."""

from __future__ import annotations

import argparse
from pathlib import Path

from listener.servers import BROKER_PROFILES, ServerProcess, mosquitto


def add_broker_arg(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """--broker PROFILE; with `several`, one or more (a list, default ["stock"])."""
    parser.add_argument(
        "--broker",
        choices=BROKER_PROFILES,
        nargs="+" if several else None,
        default=["stock"] if several else "stock",
        help="stock (default): mosquitto's defaults, as shops run it (Nagle on, 20 in flight); "
        "tuned: set_tcp_nodelay true, max_inflight_messages 0, max_queued_messages 0"
        + ("; give both (--broker stock tuned) to measure on each in one run" if several else ""),
    )


def bench_broker(workdir: Path, profile: str, extra_conf: str = "") -> ServerProcess:
    """The benchmarks' mosquitto: `profile` as given, no persistence."""
    return mosquitto(workdir, profile=profile, durable=False, extra_conf=extra_conf)


def broker_line(profile: str) -> tuple[str, str]:
    text = {
        "stock": "mosquitto, stock (its defaults: Nagle on, max_inflight_messages 20)",
        "tuned": "mosquitto, tuned (set_tcp_nodelay true, max_inflight_messages 0, max_queued_messages 0)",
    }
    return ("broker", text[profile])
