"""CLI start-up: how long `order-listener` takes to answer, against importing the Redis client alone.

    .venv/bin/python bench/cli_startup.py [--runs 21]

Starts a redis-server on a free port with the project's redis.conf, then runs
each of these as a fresh process, `--runs` times, round-robin (so a change in
the machine's load touches all of them alike), after one warm-up run each:

- `python -c pass`: the interpreter alone, for scale;
- `python -c 'import redis.asyncio'`: the baseline, importing redis-py's
  asyncio client and nothing else;
- `order-listener --version` and `order-listener --help`;
- `order-listener show UNKNOWN`: connects to Redis, finds no such order, exit 1.

It prints the median and the fastest wall time and the median CPU time (user +
system) of each, and how far `show` is from the baseline. The targets: `--help`
and `--version` well under 0.25 s; `show` within about 0.1 s of the baseline.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import print_setup, print_table

from listener.servers import redis_server

CLI = str(Path(sys.executable).parent / "order-listener")


@dataclass
class Case:
    name: str
    argv: list[str]
    expect: int  # the exit status a correct run has
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    def run(self, env: dict[str, str]) -> None:
        began = time.perf_counter()
        proc = subprocess.Popen(
            self.argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert proc.stderr is not None
        said = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != self.expect:
            raise RuntimeError(f"{self.name}: exit {code}, not {self.expect}: {said.decode()[-500:]}")
        self.walls.append(wall)
        self.cpus.append(usage.ru_utime + usage.ru_stime)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=21, help="runs of each command (default 21)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cli-startup-") as folder:
        redis = redis_server(Path(folder) / "redis")
        redis.start()
        try:
            env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_LISTENER_")}
            env["ORDER_LISTENER_REDIS_URL"] = f"redis://127.0.0.1:{redis.port}/0"
            cases = [
                Case("python -c pass", [sys.executable, "-c", "pass"], 0),
                Case("import redis.asyncio (baseline)", [sys.executable, "-c", "import redis.asyncio"], 0),
                Case("order-listener --version", [CLI, "--version"], 0),
                Case("order-listener --help", [CLI, "--help"], 0),
                Case("order-listener show UNKNOWN", [CLI, "show", "no-such-order"], 1),
            ]
            print_setup(
                "CLI start-up: wall and CPU time of a fresh process",
                [("runs", f"{args.runs} of each, round-robin, after one warm-up run each")],
            )
            for case in cases:
                case.run(env)
                case.walls.clear()
                case.cpus.clear()
            for _ in range(args.runs):
                for case in cases:
                    case.run(env)
        finally:
            redis.stop()

    rows = [
        [case.name, ms(statistics.median(case.walls)), ms(min(case.walls)), ms(statistics.median(case.cpus))]
        for case in cases
    ]
    baseline, version, help_, show = cases[1], cases[2], cases[3], cases[4]

    def beyond(case: Case) -> str:
        """`case` minus the baseline: wall median, fastest wall, CPU median."""
        return (
            f"{ms(statistics.median(case.walls) - statistics.median(baseline.walls))} ms wall (median), "
            f"{ms(min(case.walls) - min(baseline.walls))} ms wall (fastest), "
            f"{ms(statistics.median(case.cpus) - statistics.median(baseline.cpus))} ms CPU (median)"
        )

    print_table(
        "milliseconds",
        ["command", "wall median", "wall fastest", "CPU median"],
        rows,
        notes=(
            f"show UNKNOWN beyond the baseline: {beyond(show)} (target: about 100 at most)\n"
            f"--version: {ms(statistics.median(version.walls))}, "
            f"--help: {ms(statistics.median(help_.walls))} ms wall (median; target: well under 250)\n"
            "On a busy machine the wall times spread; the fastest runs and the CPU times show the cost."
        ),
    )


if __name__ == "__main__":
    main()
