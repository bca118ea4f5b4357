"""Servers that say no: Redis out of memory, a broker ACL refusing publishes.
The daemon survives, loses nothing, and says what is wrong."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from listener.errors import Unavailable
from listener.servers import ServerProcess, mosquitto
from tests.conftest import Subscriber, wait_until, watch_topic
from tests.test_deploy import PASSWORDS, REDIS_ACL, acl_with_passwords, redis_version


async def test_redis_out_of_memory_daemon_survives_and_cancels(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    daemon = await start_daemon()
    ids = [f"oom-{i}" for i in range(20)]
    async with OrderClient(settings) as client:
        await client.create_many([(oid, 1.0) for oid in ids])
        await wait_until(lambda: len(subscriber.with_status("created")) == 20, 10, "created events")
        used = int((await redis.info("memory"))["used_memory"])
        # full, with a margin: the outbox frees the published `created` entries a
        # little later, which must not make room again. noeviction refuses new data.
        await redis.config_set("maxmemory", str(used - 1_000_000))
        try:
            with pytest.raises(Unavailable, match=r"is full .maxmemory reached"):
                await client.create("oom-new", timeout=60)
            # the orders still fall due and are cancelled: the sweep frees memory before it writes
            await wait_until(
                lambda: len(subscriber.with_status("cancelled")) == 20, 15, "cancellations under maxmemory"
            )
        finally:
            await redis.config_set("maxmemory", "0")
        # counted once the scripts' replies are read, which may come after the events went out
        await wait_until(
            lambda: daemon.scheduler.cancelled + daemon.listener.cancelled == 20,
            5,
            "the daemon's count of them",
        )
        # still running once memory is back: a new order is cancelled at its deadline
        await client.create("oom-after", timeout=0.3)
        await wait_until(lambda: len(subscriber.of("oom-after")) == 2, 10, "the daemon to go on")


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[tuple[ServerProcess, Path]]:
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "daemon", "d-pw"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "shop", "s-pw"], check=True)
    acl = tmp_path / "acl"
    acl.write_text("user daemon\ntopic read logistics/#\n\nuser shop\ntopic read orders/#\n")
    broker = mosquitto(
        tmp_path / "broker", extra_conf=f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n"
    )
    broker.start()
    yield broker, acl
    broker.stop()


async def test_broker_refusing_publishes_loses_nothing(
    settings: Settings,
    acl_broker: tuple[ServerProcess, Path],
    start_daemon: Callable[..., Awaitable[Daemon]],
) -> None:
    broker, acl = acl_broker
    config = dataclasses.replace(settings, mqtt_url=f"mqtt://daemon:d-pw@127.0.0.1:{broker.port}")
    shop = dataclasses.replace(settings, mqtt_url=f"mqtt://shop:s-pw@127.0.0.1:{broker.port}")
    async with watch_topic(shop, "orders/+/status", "acl-shop") as seen:
        daemon = await start_daemon(config)
        async with OrderClient(settings) as client:
            await client.create("acl-1", timeout=0.3)

        async def kept() -> bool:
            return await daemon.outbox.backlog() == 2  # created + cancelled, refused by the broker

        await wait_until(kept, 10, "both events kept in the outbox")
        assert seen == []
        acl.write_text(
            "user daemon\ntopic read logistics/#\ntopic write orders/#\n\nuser shop\ntopic read orders/#\n"
        )
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto reloads its ACL
        await wait_until(lambda: len(seen) == 2, 20, "the events once the broker allows them")
        assert [r.event["status"] for r in seen] == ["created", "cancelled"]


async def _set_user_without(redis: Redis, settings: Settings, command: str) -> Settings:
    """The daemon's Redis user as deploy/redis-users.acl has it but without
    `command` (as an earlier ACL had it), an empty ACL LOG, and the settings
    that connect as that user."""
    shipped = acl_with_passwords(REDIS_ACL.read_text(), redis_version())
    (rules,) = [line for line in shipped.splitlines() if line.startswith("user order-listener ")]
    assert f" +{command} " in rules, f"the shipped ACL grants {command.upper()}"
    without = rules.replace(f" +{command} ", " ").split()[1:]
    # execute_command is unannotated in redis-py
    await redis.execute_command("ACL", "SETUSER", *without)  # type: ignore[no-untyped-call]
    await redis.acl_log_reset()
    return dataclasses.replace(
        settings,
        redis_url=settings.redis_url.replace(
            "redis://", f"redis://order-listener:{PASSWORDS['order-listener']}@"
        ),
    )


@contextlib.asynccontextmanager
async def daemon_user_without(redis: Redis, settings: Settings, command: str) -> AsyncIterator[Settings]:
    """`_set_user_without` for the block; the user is removed afterwards."""
    try:
        yield await _set_user_without(redis, settings, command)
    finally:
        await redis.execute_command("ACL", "DELUSER", "order-listener")  # type: ignore[no-untyped-call]


@pytest.fixture
async def user_without(
    redis: Redis, settings: Settings
) -> AsyncIterator[Callable[[str], Awaitable[Settings]]]:
    """`_set_user_without` for a daemon: the user is removed only once the
    test's daemons stopped (ask for this fixture before `start_daemon`, which
    is then torn down first). Removed under a running daemon, the user's
    connections fail and the daemon's stop waits out its timeout."""

    async def without(command: str) -> Settings:
        return await _set_user_without(redis, settings, command)

    yield without
    await redis.execute_command("ACL", "DELUSER", "order-listener")  # type: ignore[no-untyped-call]


async def test_daemon_user_without_exists_sweeps_all_the_same(
    settings: Settings,
    redis: Redis,
    user_without: Callable[[str], Awaitable[Settings]],
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """The daemon's Redis user as deploy/redis-users.acl had it before the
    sweep asked EXISTS of its batch (no +exists): Redis refuses it inside the
    script, which then reads every order's hash; the sweep cancels every order."""
    daemon = await start_daemon(await user_without("exists"))
    async with OrderClient(settings) as client:
        await client.create_many([(f"no-exists-{i}", 0.3) for i in range(20)])
        await wait_until(lambda: len(subscriber.with_status("cancelled")) == 20, 15, "the cancellations")
    # every order cancelled by a sweep, counted once its reply is absorbed
    await wait_until(lambda: daemon.scheduler.cancelled == 20, 5, "the sweeps' count of them")
    assert any(entry["object"] == "exists" for entry in await redis.acl_log())


async def test_daemon_user_without_xtrim_deletes_published_entries_with_xdel(
    settings: Settings,
    redis: Redis,
    user_without: Callable[[str], Awaitable[Settings]],
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    """The daemon's Redis user as deploy/redis-users.acl had it before the
    outbox trimmed its streams (no +xtrim): Redis refuses XTRIM, the daemon
    says so and deletes what it published with XDEL; nothing is lost or sent twice."""
    daemon = await start_daemon(await user_without("xtrim"))
    async with OrderClient(settings) as client:
        await client.create_many([(f"no-xtrim-{i}", 0.3) for i in range(20)])
        await wait_until(lambda: len(subscriber.with_status("cancelled")) == 20, 15, "the cancellations")

        async def deleted() -> bool:
            return await daemon.outbox.backlog() == 0

        await wait_until(deleted, 10, "the published entries deleted")
    assert daemon.outbox.trim is False
    assert any(entry["object"] == "xtrim" for entry in await redis.acl_log())
    sent = Counter((event["order_id"], event["status"]) for event in subscriber.events)
    expected = {(f"no-xtrim-{i}", status): 1 for i in range(20) for status in ("created", "cancelled")}
    assert sent == expected, "each event exactly once"
