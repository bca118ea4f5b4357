"""`order-listener`: the command line. Errors become messages and exit codes here, in one place.

Exit 0 success (also a repeated operation whose result already holds),
1 refused (unknown order, transition not allowed, id taken, server unreachable),
2 bad usage or bad input.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import redis.exceptions
import typer

from listener import logs
from listener.api import Change, OrderClient
from listener.bulk import parse_lines
from listener.config import Settings, load_settings, redact
from listener.errors import BadInput, ListenerError, OrderExists, Unavailable
from listener.events import iso_ms
from listener.orders import Order, parse_timeout, validate_order_id
from listener.scripts import NAMES as SCRIPT_NAMES
from listener.scripts import source as script_source

app = typer.Typer(
    name="order-listener",
    help="Cancels unpaid orders at their deadline and announces every status change over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

T = TypeVar("T")
_flags: dict[str, Any] = {}


def err(message: str) -> None:
    typer.echo(f"order-listener: {message}", err=True)


def settings() -> Settings:
    return load_settings(**_flags)


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine and turn the error family into messages and exit codes."""
    try:
        return asyncio.run(_guard(make))
    except ListenerError as exc:
        err(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def _guard(make: Callable[[], Awaitable[T]]) -> T:
    try:
        return await make()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise Unavailable(f"cannot reach Redis: {redact(str(exc))}") from None


@app.callback()
def main_options(
    redis_url: Annotated[str | None, typer.Option(help="Redis URL [env ORDER_LISTENER_REDIS_URL]")] = None,
    mqtt_url: Annotated[str | None, typer.Option(help="MQTT URL [env ORDER_LISTENER_MQTT_URL]")] = None,
    mqtt_protocol: Annotated[
        str | None, typer.Option(help="5 or 3.1.1 [env ORDER_LISTENER_MQTT_PROTOCOL]")
    ] = None,
    key_prefix: Annotated[str | None, typer.Option(help="[env ORDER_LISTENER_KEY_PREFIX]")] = None,
    topic_prefix: Annotated[str | None, typer.Option(help="[env ORDER_LISTENER_TOPIC_PREFIX]")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug|info|warning|error")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto|json|console")] = None,
) -> None:
    _flags.update(
        redis_url=redis_url,
        mqtt_url=mqtt_url,
        mqtt_protocol=mqtt_protocol,
        key_prefix=key_prefix,
        topic_prefix=topic_prefix,
        log_level=log_level,
        log_format=log_format,
    )


def _configure_logs(config: Settings) -> None:
    logs.configure(config.log_level, config.log_format)


def _settings_or_exit() -> Settings:
    try:
        return settings()
    except ListenerError as exc:
        err(str(exc))
        raise typer.Exit(exc.exit_code) from None


# -- run ----------------------------------------------------------------------


@app.command()
def run() -> None:
    """Run the daemon in the foreground (what the systemd service runs)."""
    config = _settings_or_exit()
    _configure_logs(config)
    from listener.daemon import Daemon

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
        run_async(main)
    except asyncio.CancelledError:
        raise typer.Exit(130) from None


# -- create and transitions --------------------------------------------------------


def _deadline_text(deadline_ms: int) -> str:
    left = deadline_ms / 1000 - time.time()
    return f"{iso_ms(deadline_ms)} (in {left:.1f} s)" if left >= 0 else iso_ms(deadline_ms)


@app.command()
def create(
    order_ids: Annotated[
        list[str], typer.Argument(help="order ids, or - to read 'ORDER_ID [TIMEOUT]' lines from stdin")
    ],
    timeout: Annotated[
        str | None,
        typer.Option(help="seconds to pay (0.1 .. 2592000); default ORDER_LISTENER_DEFAULT_TIMEOUT"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Create orders waiting for payment, each with its timer."""
    config = _settings_or_exit()
    try:
        timeout_ms = parse_timeout(timeout) if timeout is not None else config.default_timeout_ms
        if order_ids == ["-"]:
            _create_bulk(config, timeout_ms, as_json)
            return
        if "-" in order_ids:
            raise BadInput("'-' (read stdin) cannot be mixed with order ids")
        for order_id in order_ids:
            validate_order_id(order_id)
    except BadInput as exc:
        err(str(exc))
        raise typer.Exit(2) from None

    async def go() -> None:
        async with OrderClient(config) as client:
            result = await client.create_prepared([(oid, timeout_ms) for oid in order_ids])
        for made in result.created:
            assert made.deadline_ms is not None
            if not as_json:
                typer.echo(f"created {made.order_id}, deadline {_deadline_text(made.deadline_ms)}")
        if as_json:
            out: dict[str, object]
            if len(order_ids) == 1 and result.created:
                made = result.created[0]
                assert made.deadline_ms is not None
                out = {"order_id": made.order_id, "status": "created", "deadline": iso_ms(made.deadline_ms)}
            else:
                out = {
                    "created": [
                        {"order_id": m.order_id, "deadline": iso_ms(m.deadline_ms or 0)}
                        for m in result.created
                    ],
                    "refused": [
                        {"order_id": m.order_id, "status": m.existing_status} for m in result.existing
                    ],
                }
            typer.echo(json.dumps(out))
        if result.existing:
            for taken in result.existing:
                err(str(OrderExists(taken.order_id, taken.existing_status or "?")))
            raise typer.Exit(1)

    run_async(go)


def _create_bulk(config: Settings, timeout_ms: int, as_json: bool) -> None:
    parsed = parse_lines(sys.stdin, timeout_ms)
    if parsed.bad:
        for problem in parsed.bad[:100]:
            err(str(problem))
        if len(parsed.bad) > 100:
            err(f"... and {len(parsed.bad) - 100} more bad lines")
        err(f"{len(parsed.bad)} bad line(s): nothing was created; fix them and load the file again")
        raise typer.Exit(2)

    async def go() -> None:
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
            typer.echo(
                json.dumps({"created": len(result.created), "refused": refused, "seconds": round(elapsed, 3)})
            )
        else:
            typer.echo(f"created {len(result.created)} orders in {elapsed:.2f} s")
        for item in refused[:100]:
            err(f"line {item['line']}: {item['error']}; nothing changed for it")
        if refused:
            err(f"{len(refused)} line(s) refused; the other {len(result.created)} orders were created")
            raise typer.Exit(1)

    run_async(go)


def _transition(name: str, order_id: str) -> None:
    config = _settings_or_exit()
    try:
        validate_order_id(order_id)
    except BadInput as exc:
        err(str(exc))
        raise typer.Exit(2) from None

    async def go() -> Change:
        async with OrderClient(config) as client:
            method: Callable[[str], Awaitable[Change]] = getattr(client, name)
            return await method(order_id)

    change = run_async(go)
    if change.changed:
        typer.echo(f"{order_id}: {change.status} (version {change.version}, reason {change.reason})")
    else:
        typer.echo(f"{order_id}: already {change.status} (version {change.version}); nothing changed")


_TRANSITIONS = {
    "pay": "created -> paid: the payment arrived; the timer stops.",
    "cancel": "created -> cancelled (reason customer).",
    "deliver": "paid -> delivered: shipping confirmed.",
    "refund": "paid or delivered -> refunded -> cancelled (reason refund).",
}


def _transition_command(name: str) -> Callable[[str], None]:
    def command(order_id: str) -> None:
        _transition(name, order_id)

    return command


for _name, _help in _TRANSITIONS.items():
    app.command(name=_name, help=_help)(_transition_command(_name))


# -- show, check, watch ---------------------------------------------------------


def order_dict(order: Order) -> dict[str, object]:
    return {
        "order_id": order.order_id,
        "status": str(order.status),
        "version": order.version,
        "reason": str(order.reason),
        "created": iso_ms(order.created_ms),
        "updated": iso_ms(order.updated_ms),
        "deadline": iso_ms(order.deadline_ms),
    }


@app.command()
def show(
    order_id: str,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """An order's status, version, last reason, timestamps and deadline."""
    config = _settings_or_exit()
    try:
        validate_order_id(order_id)
    except BadInput as exc:
        err(str(exc))
        raise typer.Exit(2) from None

    async def go() -> Order:
        async with OrderClient(config) as client:
            return await client.get(order_id)

    order = run_async(go)
    if as_json:
        typer.echo(json.dumps(order_dict(order)))
        return
    shown = order_dict(order)
    if order.pending:
        shown["deadline"] = _deadline_text(order.deadline_ms)
    for key, value in shown.items():
        typer.echo(f"{key:>9}: {value}")


@app.command()
def check() -> None:
    """Check Redis (reachable, keyspace notifications, persistence, eviction) and MQTT."""
    config = _settings_or_exit()
    from listener.doctor import run_checks

    problems = run_async(lambda: run_checks(config, typer.echo))
    if problems:
        err(f"{problems} problem(s) found; see the fixes above")
        raise typer.Exit(1)


@app.command()
def watch(
    count: Annotated[int, typer.Option(help="stop after this many events (0: run until Ctrl-C)")] = 0,
    seconds: Annotated[float, typer.Option(help="stop after this many seconds (0: never)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print each event's JSON as is")] = False,
) -> None:
    """Print status events as they are published."""
    config = _settings_or_exit()
    from listener.watch import watch_events

    try:
        run_async(lambda: watch_events(config, count=count, seconds=seconds, raw=as_json))
    except typer.Exit as done:
        if done.exit_code != 130:
            raise


@app.command()
def demo(
    orders: Annotated[int, typer.Option(help="sample orders to create")] = 40,
    paid: Annotated[int, typer.Option(help="how many of them get paid")] = 10,
    timeout: Annotated[float, typer.Option(help="their payment window, seconds")] = 3.0,
) -> None:
    """The whole loop on one machine: embedded Redis and MQTT unless configured."""
    from listener.demo import run_demo

    if paid > orders or orders < 1 or timeout < 0.1:
        err("use --orders >= 1, --paid <= --orders and --timeout >= 0.1")
        raise typer.Exit(2)
    code = run_demo(_flags, orders=orders, paid=paid, timeout=timeout)
    raise typer.Exit(code)


@app.command()
def scripts(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(SCRIPT_NAMES)}")],
) -> None:
    """Print a Lua script exactly as the daemon loads it (for producers in other languages).

    The output is the loaded text byte for byte (no newline added), so SCRIPT LOAD
    of it gives the daemon's SHA1.
    """
    if name not in SCRIPT_NAMES:
        err(f"no script {name!r}; choose one of {', '.join(SCRIPT_NAMES)}")
        raise typer.Exit(2)
    sys.stdout.buffer.write(script_source(name).encode())  # the bytes whose SHA1 Redis computes
    sys.stdout.flush()


def main() -> None:
    app()
