"""`order-listener demo`: the whole loop on one machine, shown live.

It starts what is not configured (a Redis and an MQTT broker on free loopback
ports, never 6379 / 1883, with their files in a temporary folder removed at
the end), runs the daemon in this process, subscribes to the status events,
creates sample orders with a short payment window, pays some of them at
random moments before their deadline and shows the rest being cancelled,
live on a terminal or one plain line per event otherwise (CI logs). It ends
with a summary and exit status 0 when every expectation held (each unpaid
order cancelled exactly once and never before its deadline, each paid order
still paid), 1 otherwise, 130 on Ctrl-C, 128 + n on signal n (SIGTERM,
SIGHUP). Every process it started is stopped on the way out, whatever
happened.

The parts: `servers` (what it runs against), `session` (the run in the event
loop), `record` (what it did and saw), `view` (what it shows), `verdict`
(whether every expectation held), `signals` (stop signals), `daemon_log`
(the daemon's log, read back for warnings).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.status import Status
from rich.text import Text

from listener.config import load_settings
from listener.demo.daemon_log import DaemonLog
from listener.demo.servers import DemoError, Plan, start_servers
from listener.demo.session import play
from listener.demo.signals import StopSignals
from listener.errors import ListenerError
from listener.servers import ServerError

__all__ = ["run_demo"]


def run_demo(flags: dict[str, Any], *, orders: int, paid: int, timeout: float) -> int:
    """Run the demo; the exit status: 0 every expectation held, 1 not (or a setup
    problem), 2 bad configuration, 130 Ctrl-C, 128 + n on signal n (143 SIGTERM)."""
    console = Console(highlight=False)
    err = Console(stderr=True, highlight=False)
    workdir = Path(tempfile.mkdtemp(prefix="order-listener-demo-"))
    plan = Plan(workdir)
    daemon_log = DaemonLog(workdir / "daemon.log")
    starting = Status("starting Redis, MQTT and the daemon ...", console=console)
    with StopSignals() as signals:
        try:
            daemon_log.open(str(flags.get("log_level") or "warning"))
            load_settings(**flags)  # a bad configuration fails here, before we start anything
            if console.is_terminal:
                starting.start()
            start_servers(plan, flags)
            demo = play(
                plan, flags, console, orders=orders, paid=paid, window=timeout, on_ready=starting.stop
            )
            return asyncio.run(signals.cancelling(demo))
        except (KeyboardInterrupt, asyncio.CancelledError):  # Ctrl-C; a signal cancels the demo
            _say(err, "\ninterrupted: stopping what the demo started")
            return signals.exit_code
        except (DemoError, ServerError) as exc:
            _say(err, f"order-listener: demo: {exc}")
            return 1
        except ListenerError as exc:
            _say(err, f"order-listener: {exc}")
            return exc.exit_code
        finally:
            plan.stop_processes()
            with contextlib.suppress(Exception):
                starting.stop()
            daemon_log.close()
            _report(err, daemon_log.problems())
            shutil.rmtree(workdir, ignore_errors=True)


def _say(err: Console, text: str) -> None:
    with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
        err.print(Text(text), soft_wrap=True)


def _report(err: Console, problems: list[str]) -> None:
    if problems:
        _say(err, "daemon log (warnings and errors):")
        for line in problems:
            _say(err, f"  {line}")
