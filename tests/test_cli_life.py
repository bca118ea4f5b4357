"""deliver and refund from the command line (create, pay and cancel are in
test_cli.py), with a running daemon: exit codes, messages, and the events."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.keys import KeyLayout
from tests.conftest import CliResult, Subscriber, wait_until
from tests.life import lane_barrier, outbox_appends, rows

Cli = Callable[..., Awaitable[CliResult]]


async def ok(cli: Cli, *args: str) -> str:
    result = await cli(*args)
    assert result.code == 0, (args, result.err)
    return result.out.strip()


async def refused(cli: Cli, *args: str) -> str:
    result = await cli(*args)
    assert result.code == 1, (args, result.out, result.err)
    assert "Traceback" not in result.err
    return result.err.strip()


async def test_deliver_and_refund_through_the_cli(
    cli: Cli,
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    await start_daemon()
    await ok(cli, "create", "L-ship", "L-paid", "L-early", "--timeout", "60")
    await ok(cli, "create", "L-late", "--timeout", "0.2")
    await ok(cli, "pay", "L-ship")
    await ok(cli, "pay", "L-paid")

    assert await ok(cli, "deliver", "L-ship") == "L-ship: delivered (version 3, reason delivered)"
    assert await ok(cli, "deliver", "L-ship") == "L-ship: already delivered (version 3); nothing changed"
    assert await ok(cli, "refund", "L-ship") == "L-ship: cancelled (version 5, reason refund)"
    assert await ok(cli, "refund", "L-ship") == "L-ship: already cancelled (version 5); nothing changed"
    assert await ok(cli, "refund", "L-paid") == "L-paid: cancelled (version 4, reason refund)"

    await wait_until(lambda: len(subscriber.of("L-late")) == 2, 10, "L-late to time out")
    layout = KeyLayout(settings.key_prefix)
    appended = await outbox_appends(redis, layout)
    message = await refused(cli, "deliver", "L-early")
    assert "'L-early' is created" in message and "deliver is not allowed" in message
    message = await refused(cli, "refund", "L-early")
    assert "'L-early' is created" in message and "refund is not allowed" in message
    message = await refused(cli, "deliver", "L-ship")
    assert "'L-ship' is cancelled (refund)" in message
    message = await refused(cli, "refund", "L-late")
    assert "'L-late' is cancelled (timeout)" in message and "refund is not allowed" in message
    assert await outbox_appends(redis, layout) == appended

    async with OrderClient(settings) as client:
        for oid in ("L-ship", "L-paid", "L-early", "L-late"):
            await lane_barrier(client, subscriber, oid)
    assert rows(subscriber.of("L-ship")) == [
        ("created", None, "created", 1),
        ("paid", "created", "paid", 2),
        ("delivered", "paid", "delivered", 3),
        ("refunded", "delivered", "refund", 4),
        ("cancelled", "refunded", "refund", 5),
    ]
    assert rows(subscriber.of("L-paid"))[2:] == [
        ("refunded", "paid", "refund", 3),
        ("cancelled", "refunded", "refund", 4),
    ]
    assert rows(subscriber.of("L-early")) == [("created", None, "created", 1)]
    assert rows(subscriber.of("L-late")) == [
        ("created", None, "created", 1),
        ("cancelled", "created", "timeout", 2),
    ]
