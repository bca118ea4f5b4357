"""`order-listener`: the command line. Errors become messages and exit codes here, in one place.

Exit 0 success (also a repeated operation whose result already holds),
1 refused (unknown order, transition not allowed, id taken, server unreachable),
2 bad usage or bad input.

Built on the standard library's argparse (a CLI framework that loads a
validation library to convert each argument costs more than most commands
take to run), and each command imports what it needs when it runs: the Redis
client, the daemon, MQTT and the logging library; `--help` and `--version`
need none of them. bench/cli_startup.py measures it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from listener.errors import BadInput, ListenerError

if TYPE_CHECKING:
    from listener.api import BulkResult, Change
    from listener.config import Settings
    from listener.errors import Refused, UnknownOrder
    from listener.orders import Order
    from listener.switch import PauseState

T = TypeVar("T")
_flags: dict[str, Any] = {}  # the global options given, before or after the command

EXIT_CODES = """\
exit status: 0 success (also a repeated operation whose result already holds),
1 refused (unknown order, transition not allowed, id taken, server unreachable),
2 bad usage or bad input"""


def err(message: str) -> None:
    print(f"order-listener: {message}", file=sys.stderr, flush=True)


def out(text: str) -> None:
    print(text, flush=True)


def settings() -> Settings:
    from listener.config import load_settings

    return load_settings(**_flags)


def _settings_or_exit() -> Settings:
    try:
        return settings()
    except ListenerError as exc:
        err(str(exc))
        raise SystemExit(exc.exit_code) from None


def _bad_input(exc: BadInput) -> SystemExit:
    err(str(exc))
    return SystemExit(2)


def run_async(make: Callable[[], Awaitable[T]], config: Settings | None = None) -> T:
    """Run a coroutine and turn the error family into messages and exit codes."""
    import asyncio

    try:
        return asyncio.run(_guard(make, config))
    except ListenerError as exc:
        err(str(exc))
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


async def _guard(make: Callable[[], Awaitable[T]], config: Settings | None) -> T:
    import redis.exceptions

    from listener.errors import Unavailable
    from listener.urls import redact

    try:
        return await make()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        where = f" at {redact(config.redis_url)}" if config is not None else ""
        raise Unavailable(
            f"cannot reach Redis{where}: {redact(str(exc))}; start redis-server there, or point "
            "ORDER_LISTENER_REDIS_URL (--redis-url) at the Redis to use"
        ) from None


# -- run ----------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> None:
    import asyncio
    import signal

    config = _settings_or_exit()  # a bad setting is refused before the daemon's modules load
    from listener import logs
    from listener.daemon import Daemon

    logs.configure(config.log_level, config.log_format)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                stop.set()
            elif current is not None:  # a second signal: out at once (all state is in Redis)
                current.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        await Daemon(config).run(stop)

    try:
        run_async(main, config)
    except asyncio.CancelledError:
        raise SystemExit(130) from None


# -- create and transitions --------------------------------------------------------


def _deadline_text(deadline_ms: int) -> str:
    from listener.events import iso_ms

    left = deadline_ms / 1000 - time.time()
    return f"{iso_ms(deadline_ms)} (in {left:.1f} s)" if left >= 0 else iso_ms(deadline_ms)


def _bad_lines(problems: Sequence[object], nothing: str) -> SystemExit:
    """Malformed stdin lines: each one (up to 100), then what happened: exit 2."""
    for problem in problems[:100]:
        err(str(problem))
    if len(problems) > 100:
        err(f"... and {len(problems) - 100} more bad lines")
    err(f"{len(problems)} bad line(s): {nothing}; fix them and load the file again")
    return SystemExit(2)


def _check_listed_ids(order_ids: Sequence[str]) -> None:
    """Ids given as arguments: each must be valid, and '-' (stdin) stands alone."""
    from listener.orders import validate_order_id

    if "-" in order_ids:
        raise BadInput("'-' (read stdin) cannot be mixed with order ids")
    for order_id in order_ids:
        validate_order_id(order_id)


def cmd_create(args: argparse.Namespace) -> None:
    from listener.orders import parse_timeout

    order_ids: list[str] = args.order_ids
    as_json: bool = args.json
    config = _settings_or_exit()
    try:
        timeout_ms = parse_timeout(args.timeout) if args.timeout is not None else config.default_timeout_ms
        if order_ids == ["-"]:
            _create_bulk(config, timeout_ms, as_json)
            return
        _check_listed_ids(order_ids)
    except BadInput as exc:
        raise _bad_input(exc) from None

    async def go() -> None:
        from listener.api import OrderClient

        async with OrderClient(config) as client:
            result = await client.create_prepared([(oid, timeout_ms) for oid in order_ids])
        _report_created(result, order_ids, as_json)

    run_async(go, config)


def _created_json(result: BulkResult, order_ids: Sequence[str]) -> dict[str, object]:
    """One id asked for and created: that order; otherwise the lists created and refused."""
    from listener.events import iso_ms

    if len(order_ids) == 1 and result.created:
        made = result.created[0]
        assert made.deadline_ms is not None
        return {"order_id": made.order_id, "status": "created", "deadline": iso_ms(made.deadline_ms)}
    return {
        "created": [{"order_id": m.order_id, "deadline": iso_ms(m.deadline_ms or 0)} for m in result.created],
        "refused": [{"order_id": m.order_id, "status": m.existing_status} for m in result.existing],
    }


def _report_created(result: BulkResult, order_ids: Sequence[str], as_json: bool) -> None:
    """The orders created on stdout (text or JSON), the ids taken on stderr: exit 1 if any was."""
    import json

    from listener.errors import OrderExists

    if as_json:
        out(json.dumps(_created_json(result, order_ids)))
    else:
        for made in result.created:
            assert made.deadline_ms is not None
            out(f"created {made.order_id}, deadline {_deadline_text(made.deadline_ms)}")
    if result.existing:
        for taken in result.existing:
            err(str(OrderExists(taken.order_id, taken.existing_status or "?")))
        raise SystemExit(1)


def _create_bulk(config: Settings, timeout_ms: int, as_json: bool) -> None:
    from listener.bulk import parse_lines

    parsed = parse_lines(sys.stdin, timeout_ms)
    if parsed.bad:
        raise _bad_lines(parsed.bad, "nothing was created")

    async def go() -> None:
        import json

        from listener.api import OrderClient

        started = time.perf_counter()
        async with OrderClient(config) as client:
            result = await client.create_prepared([(line.order_id, line.timeout_ms) for line in parsed.lines])
        elapsed = time.perf_counter() - started
        number_of = {line.order_id: line.number for line in parsed.lines}
        refused = [
            {
                "line": number_of[m.order_id],
                "order_id": m.order_id,
                "status": m.existing_status,
                "error": f"order {m.order_id!r} already exists (status {m.existing_status})",
            }
            for m in result.existing
        ] + [
            {"line": p.number, "order_id": p.order_id, "status": "created", "error": p.message}
            for p in parsed.repeated
        ]
        refused.sort(key=lambda item: int(str(item["line"])))
        if as_json:
            out(
                json.dumps({"created": len(result.created), "refused": refused, "seconds": round(elapsed, 3)})
            )
        else:
            out(f"created {len(result.created)} orders in {elapsed:.2f} s")
        for item in refused[:100]:
            err(f"line {item['line']}: {item['error']}; nothing changed for it")
        if refused:
            err(f"{len(refused)} line(s) refused; the other {len(result.created)} orders were created")
            raise SystemExit(1)

    run_async(go, config)


def _change_text(change: Change) -> str:
    if change.changed:
        return f"{change.order_id}: {change.status} (version {change.version}, reason {change.reason})"
    return f"{change.order_id}: already {change.status} (version {change.version}); nothing changed"


def cmd_transition(args: argparse.Namespace) -> None:
    """pay, cancel, deliver or refund on the ids given, or on those read from
    stdin (`-`), all in pipelined round trips: a result per id, on stdout,
    refusals on stderr (with their line numbers for stdin)."""
    name: str = args.command
    config = _settings_or_exit()
    try:
        order_ids, numbers = _ids_to_change(args.order_ids)
    except BadInput as exc:
        raise _bad_input(exc) from None

    async def go() -> list[Change | UnknownOrder | Refused]:
        from listener.api import OrderClient

        async with OrderClient(config) as client:
            return await client.change_many(name, order_ids)

    results = run_async(go, config) if order_ids else []
    _report_changes(results, numbers)


def _ids_to_change(order_ids: list[str]) -> tuple[list[str], list[int] | None]:
    """The ids given, or those read from stdin (`-`) with their line numbers
    (None for ids given as arguments). Bad stdin lines end the command (exit 2)."""
    from listener.bulk import parse_ids

    if order_ids != ["-"]:
        _check_listed_ids(order_ids)
        return order_ids, None
    parsed = parse_ids(sys.stdin)
    if parsed.bad:
        raise _bad_lines(parsed.bad, "nothing was changed")
    read = [line.order_id for line in parsed.lines]
    _check_listed_ids(read)
    return read, [line.number for line in parsed.lines]


def _report_changes(results: Sequence[Change | UnknownOrder | Refused], numbers: list[int] | None) -> None:
    """A line per id on stdout, each refusal on stderr (by line number for stdin):
    exit 1 if any was refused."""
    refused = 0
    for index, result in enumerate(results):
        if isinstance(result, ListenerError):
            refused += 1
            err(
                str(result) if numbers is None else f"line {numbers[index]}: {result}; nothing changed for it"
            )
        else:
            out(_change_text(result))
    if refused:
        if len(results) > 1:
            what = "line(s)" if numbers is not None else "order(s)"
            err(f"{refused} {what} refused; the other {len(results) - refused} went through")
        raise SystemExit(1)


# -- extend, pause, resume ------------------------------------------------------------


def cmd_extend(args: argparse.Namespace) -> None:
    """More time to pay for one order: its deadline SECONDS later."""
    from listener.orders import parse_extension, validate_order_id

    order_id: str = args.order_id
    config = _settings_or_exit()
    try:
        validate_order_id(order_id)
        parse_extension(args.by)
    except BadInput as exc:
        raise _bad_input(exc) from None

    async def go() -> None:
        from listener.api import OrderClient

        async with OrderClient(config) as client:
            extended = await client.extend(order_id, args.by)
        out(
            f"{order_id}: created (version {extended.version}, reason extended), "
            f"deadline {_deadline_text(extended.deadline_ms)}"
        )

    run_async(go, config)


def cmd_pause(args: argparse.Namespace) -> None:
    """The incident switch: no order is cancelled for timeout until `resume`."""
    from listener.api import default_author
    from listener.orders import validate_pause_text

    reason: str = args.reason
    config = _settings_or_exit()
    try:
        validate_pause_text(reason, "reason")
    except BadInput as exc:
        raise _bad_input(exc) from None

    async def go() -> None:
        from listener import logs
        from listener.api import OrderClient
        from listener.events import iso_ms

        author = default_author()
        async with OrderClient(config) as client:
            switched = await client.pause(reason, author)
            state = await client.pause_state()
        if switched.changed:
            logs.configure(config.log_level, config.log_format)  # to stderr: stdout is the command's answer
            logs.get("listener.cli").warning(
                "cancellation for timeout paused", reason=reason, by=author, parts=switched.parts_changed
            )
            out(
                "paused: no order is cancelled for timeout until 'order-listener resume' "
                f"(since {iso_ms(switched.at_ms)})"
            )
        else:
            out("already paused; nothing changed")
        out(state.describe())

    run_async(go, config)


def cmd_resume(args: argparse.Namespace) -> None:
    """Undo `pause`: the orders whose deadline passed are cancelled after the grace."""
    from listener.orders import parse_grace

    config = _settings_or_exit()
    try:
        grace_ms = parse_grace(args.grace)
    except BadInput as exc:
        raise _bad_input(exc) from None

    async def go() -> None:
        from listener import logs
        from listener.api import OrderClient, default_author
        from listener.events import iso_ms

        async with OrderClient(config) as client:
            switched = await client.resume(grace_ms / 1000)
        if switched.changed:
            logs.configure(config.log_level, config.log_format)  # to stderr: stdout is the command's answer
            logs.get("listener.cli").warning(
                "cancellation for timeout resumed", by=default_author(), grace_s=grace_ms / 1000
            )
            when = "now" if grace_ms == 0 else f"at {iso_ms(switched.at_ms)}"
            out(f"resumed: the unpaid orders whose deadline passed are cancelled {when}")
        elif switched.at_ms:
            out(
                f"already resumed; the overdue orders are cancelled at {iso_ms(switched.at_ms)}; "
                "nothing changed"
            )
        else:
            out("not paused; nothing changed")

    run_async(go, config)


# -- show, check, watch, demo, scripts -------------------------------------------


def order_dict(order: Order) -> dict[str, object]:
    from listener.events import iso_ms

    return {
        "order_id": order.order_id,
        "status": str(order.status),
        "version": order.version,
        "reason": str(order.reason),
        "created": iso_ms(order.created_ms),
        "updated": iso_ms(order.updated_ms),
        "deadline": iso_ms(order.deadline_ms),
    }


def cmd_show(args: argparse.Namespace) -> None:
    from listener.orders import validate_order_id

    order_id: str = args.order_id
    config = _settings_or_exit()
    try:
        validate_order_id(order_id)
    except BadInput as exc:
        raise _bad_input(exc) from None
    if args.history:
        _show_history(config, order_id, args.json)
        return

    async def go() -> tuple[Order, PauseState]:
        from listener.api import OrderClient

        async with OrderClient(config) as client:
            return await client.get(order_id), await client.pause_state()

    order, switch = run_async(go, config)
    if args.json:
        import json

        out(json.dumps({**order_dict(order), **_switch_dict(switch)}))
        return
    shown = order_dict(order)
    if order.pending:
        shown["deadline"] = _deadline_text(order.deadline_ms)
    for key, value in shown.items():
        out(f"{key:>9}: {value}")
    if switch.paused or switch.held_parts:
        out(f"     note: {switch.describe()}")


def _switch_dict(switch: PauseState) -> dict[str, object]:
    """`show --json` says nothing of the switch while cancellation runs as usual."""
    return switch.as_dict() if switch.paused or switch.held_parts else {}


def _logs_to_stderr(config: Settings) -> None:
    """Log lines (such as the one naming a Redis Cluster's primaries) go to
    stderr, at warning and above: stdout is the command's output alone."""
    from listener import logs

    level = config.log_level if config.log_level in ("warning", "error") else "warning"
    logs.configure(level, config.log_format)


def _show_history(config: Settings, order_id: str, as_json: bool) -> None:
    """`show --history`: the order, then every event that announced a change of it."""
    _logs_to_stderr(config)

    async def go() -> tuple[Order, list[dict[str, object]]]:
        from listener.api import OrderClient

        async with OrderClient(config) as client:
            return await client.get_with_history(order_id)

    order, history = run_async(go, config)
    if as_json:
        import json

        out(json.dumps({**order_dict(order), "history": history}))
        return
    shown = order_dict(order)
    if order.pending:
        shown["deadline"] = _deadline_text(order.deadline_ms)
    for key, value in shown.items():
        out(f"{key:>9}: {value}")
    out("")
    if not history:
        out("history: none kept (the order changed before histories were recorded)")
        return
    rows = [["version", "at", "status", "previous", "reason", "deadline", "event_id"]]
    for event in history:
        rows.append(
            [
                str(event["version"]),
                str(event["at"]),
                str(event["status"]),
                str(event["previous"] or "-"),
                str(event["reason"]),
                str(event.get("deadline", "-")),
                str(event["event_id"]),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def cmd_replay(args: argparse.Namespace) -> None:
    """`replay`: the logged events from --since (to --until), of one order or
    all, as JSON lines (the MQTT payloads) or published again."""
    from listener.event_log import parse_since, parse_time
    from listener.orders import validate_order_id

    config = _settings_or_exit()
    try:
        since = parse_since(args.since)
        until = parse_time(args.until, "--until") if args.until is not None else None
        if args.order is not None:
            validate_order_id(args.order)
        if args.rate is not None and not args.publish:
            raise BadInput("--rate goes with --publish: it paces the publishing")
        rate = config.created_rate if args.rate is None else _replay_rate(args.rate)
    except BadInput as exc:
        raise _bad_input(exc) from None
    _logs_to_stderr(config)

    async def go() -> int:
        from listener.api import OrderClient
        from listener.event_log import EventLog, publish_again

        async with OrderClient(config) as client:
            log = EventLog(await client.opened(), config.event_log_retention_ms)
            if not args.publish:
                count = 0
                async for event in log.events(since, until, args.order):
                    sys.stdout.write(event.payload().decode() + "\n")
                    count += 1
                sys.stdout.flush()
                return count
            # what was logged before the replay began: one slower than the
            # daemon's publishing would never reach the end of the log otherwise
            end = until if until is not None else await client.store.now_ms() + 1
            shown_at = 0.0  # a terminal line at most every 0.1 s: progress comes with every PUBACK read

            def progress(done: int) -> None:
                nonlocal shown_at
                now = time.monotonic()
                if now - shown_at >= 0.1:
                    shown_at = now
                    print(f"\rpublished {done}", end="", file=sys.stderr, flush=True)

            terminal = sys.stderr.isatty()
            selected = log.events(since, end, args.order)
            count, pace = await publish_again(config, selected, progress if terminal else None, rate)
        if terminal:
            print(file=sys.stderr)
        paced = f", at most {pace:,.0f} a second" if pace else ""
        err(f"published {count} event(s) again, with their event_ids{paced}")
        return count

    run_async(go, config)


def _replay_rate(text: str) -> float | None:
    from listener.config import parse_rate

    try:
        return parse_rate(text)
    except ValueError as exc:
        raise BadInput(f"--rate {exc}") from None


def cmd_check(args: argparse.Namespace) -> None:
    from listener.doctor import run_checks

    config = _settings_or_exit()
    problems = run_async(lambda: run_checks(config, out), config)
    if problems:
        err(f"{problems} problem(s) found; see the fixes above")
        raise SystemExit(1)


def cmd_watch(args: argparse.Namespace) -> None:
    from listener.watch import watch_events

    config = _settings_or_exit()
    try:
        run_async(lambda: watch_events(config, count=args.count, seconds=args.seconds, raw=args.json), config)
    except SystemExit as done:
        if done.code != 130:  # Ctrl-C is how a watch ends
            raise


def cmd_demo(args: argparse.Namespace) -> None:
    if args.paid > args.orders or args.orders < 1 or args.timeout < 0.1:
        err("use --orders >= 1, --paid <= --orders and --timeout >= 0.1")
        raise SystemExit(2)
    from listener.demo import run_demo

    raise SystemExit(run_demo(_flags, orders=args.orders, paid=args.paid, timeout=args.timeout))


def cmd_scripts(args: argparse.Namespace) -> None:
    """The loaded text byte for byte (no newline added), so SCRIPT LOAD of it gives the daemon's SHA1."""
    from listener.scripts import NAMES, source

    name: str = args.name
    if name not in NAMES:
        err(f"no script {name!r}; choose one of {', '.join(NAMES)}")
        raise SystemExit(2)
    sys.stdout.buffer.write(source(name).encode())  # the bytes whose SHA1 Redis computes
    sys.stdout.flush()


# -- the parser -------------------------------------------------------------------


class _Version(argparse.Action):
    """`--version`: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **_: Any) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="print the version",
        )

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> NoReturn:
        from importlib.metadata import PackageNotFoundError, version

        try:
            number = version("order-expiry-listener")
        except PackageNotFoundError:  # run from a source tree that was never installed
            number = "unknown (not installed)"
        out(f"order-listener {number}")
        parser.exit()


# name, metavar, help; flags given before and after the command (SUPPRESS: an
# option not given after the command leaves one given before it alone)
_GLOBAL_OPTIONS = (
    ("redis_url", "URL", "Redis URL [env ORDER_LISTENER_REDIS_URL]"),
    ("mqtt_url", "URL", "MQTT URL [env ORDER_LISTENER_MQTT_URL]"),
    ("mqtt_protocol", "VERSION", "5 or 3.1.1 [env ORDER_LISTENER_MQTT_PROTOCOL]"),
    ("key_prefix", "PREFIX", "first part of every Redis key [env ORDER_LISTENER_KEY_PREFIX]"),
    ("topic_prefix", "PREFIX", "events go to PREFIX/<order id>/status [env ORDER_LISTENER_TOPIC_PREFIX]"),
    ("log_level", "LEVEL", "debug, info, warning or error [env ORDER_LISTENER_LOG_LEVEL]"),
    ("log_format", "FORMAT", "auto, json or console [env ORDER_LISTENER_LOG_FORMAT]"),
)

_TRANSITIONS = {
    "pay": "created -> paid: the payment arrived; the timer stops.",
    "cancel": "created -> cancelled (reason customer).",
    "deliver": "paid -> delivered: shipping confirmed.",
    "refund": "paid or delivered -> refunded -> cancelled (reason refund).",
}

SCRIPT_NAMES = "create, pay, cancel, expire, deliver, refund, sweep, lease, release, extend, pause or resume"


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("global options (before or after the command)")
    for name, metavar, text in _GLOBAL_OPTIONS:
        group.add_argument(
            f"--{name.replace('_', '-')}", metavar=metavar, help=text, default=argparse.SUPPRESS
        )

    parser = argparse.ArgumentParser(
        prog="order-listener",
        usage="%(prog)s [--version] [GLOBAL OPTIONS] COMMAND [OPTIONS] [ARGUMENTS]",
        description="Cancels unpaid orders at their deadline and announces every status change over MQTT.",
        epilog=f"Run 'order-listener COMMAND --help' for a command's options.\n\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands", prog="order-listener"
    )

    def command(
        name: str, run: Callable[[argparse.Namespace], None], text: str, arguments: str = ""
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=text,
            description=text,
            usage=f"%(prog)s [OPTIONS]{' ' + arguments if arguments else ''}",
            parents=[common],
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run)
        return sub

    command("run", cmd_run, "Run the daemon in the foreground (what the systemd service runs).")

    create = command(
        "create", cmd_create, "Create orders waiting for payment, each with its timer.", "ORDER_ID... | -"
    )
    create.add_argument(
        "order_ids",
        nargs="+",
        metavar="ORDER_ID",
        help="order ids, or - to read 'ORDER_ID [TIMEOUT]' lines from stdin",
    )
    create.add_argument(
        "--timeout",
        metavar="SECONDS",
        help="seconds to pay (0.1 .. 2592000); default ORDER_LISTENER_DEFAULT_TIMEOUT",
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")

    for name, text in _TRANSITIONS.items():
        transition = command(name, cmd_transition, text, "ORDER_ID... | -")
        transition.add_argument(
            "order_ids",
            nargs="+",
            metavar="ORDER_ID",
            help="order ids, or - to read one ORDER_ID a line from stdin",
        )

    show = command(
        "show",
        cmd_show,
        "An order's status, version, last reason, timestamps and deadline; --history: its transitions.",
        "ORDER_ID",
    )
    show.add_argument("order_id", metavar="ORDER_ID")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.add_argument(
        "--history",
        action="store_true",
        help="also every transition, as the event that announced it (with --json: a 'history' list)",
    )

    replay = command(
        "replay",
        cmd_replay,
        "The published events again, from the event log: as JSON lines (the MQTT payloads), "
        "or published again with their event_ids.",
        "--since TIME|EVENT_ID",
    )
    replay.add_argument(
        "--since",
        required=True,
        metavar="TIME|EVENT_ID",
        help="events published at or after TIME (ISO 8601 with a zone, or Unix seconds), "
        "or after the event EVENT_ID",
    )
    replay.add_argument("--until", metavar="TIME", help="only events published before TIME")
    replay.add_argument("--order", metavar="ORDER_ID", help="only this order's events")
    replay.add_argument(
        "--publish",
        action="store_true",
        help="publish them again on their topics (QoS 1, same event_ids) instead of printing them",
    )
    replay.add_argument(
        "--rate",
        metavar="R|auto",
        help="with --publish: at most R events a second, 0 for as fast as the broker takes them, auto for "
        "10,000 on a broker that looks untuned (MQTT 5, Receive Maximum below 100; no pace on MQTT 3.1.1) "
        "(default: ORDER_LISTENER_CREATED_RATE), so that a subscriber's queue at the broker does not "
        "overflow again",
    )

    extend = command(
        "extend",
        cmd_extend,
        "More time to pay: the deadline of a created order SECONDS later (reason extended).",
        "ORDER_ID --by SECONDS",
    )
    extend.add_argument("order_id", metavar="ORDER_ID")
    extend.add_argument(
        "--by",
        metavar="SECONDS",
        required=True,
        help="seconds added to the current deadline (decimals allowed, > 0; the new window at most 30 days)",
    )

    pause = command(
        "pause",
        cmd_pause,
        "Incident switch: no order is cancelled for timeout, by any daemon, until 'resume'.",
    )
    pause.add_argument("--reason", metavar="TEXT", default="", help="why (shown by check, show, the logs)")

    resume = command(
        "resume",
        cmd_resume,
        "Undo 'pause': the unpaid orders whose deadline passed are cancelled after the grace.",
    )
    resume.add_argument(
        "--grace",
        metavar="SECONDS",
        default="0",
        help="how long the overdue orders may still be paid (default 0: cancelled at once)",
    )

    command(
        "check", cmd_check, "Check Redis (reachable, keyspace notifications, persistence, eviction) and MQTT."
    )

    watch = command("watch", cmd_watch, "Print status events as they are published.")
    watch.add_argument(
        "--count", type=int, default=0, help="stop after this many events (0: run until Ctrl-C)"
    )
    watch.add_argument("--seconds", type=float, default=0.0, help="stop after this many seconds (0: never)")
    watch.add_argument("--json", action="store_true", help="print each event's JSON as is")

    demo = command(
        "demo", cmd_demo, "The whole loop on one machine: embedded Redis and MQTT unless configured."
    )
    demo.add_argument("--orders", type=int, default=40, help="sample orders to create (default 40)")
    demo.add_argument("--paid", type=int, default=10, help="how many of them get paid (default 10)")
    demo.add_argument("--timeout", type=float, default=3.0, help="their payment window, seconds (default 3)")

    scripts = command(
        "scripts",
        cmd_scripts,
        "Print a Lua script exactly as the daemon loads it (for producers in other languages).",
        "NAME",
    )
    scripts.add_argument("name", metavar="NAME", help=SCRIPT_NAMES)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    _flags.update({name: getattr(args, name) for name, _, _ in _GLOBAL_OPTIONS if hasattr(args, name)})
    try:
        args.run(args)
    except BrokenPipeError:  # `order-listener ... | head`: the reader has all it wants
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise SystemExit(1) from None
