"""The command line as a user runs it: real processes, exit codes, messages, nothing written on bad input."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from listener.config import Settings
from listener.daemon import Daemon
from listener.keys import KeyLayout, part_of
from tests.conftest import CLI, CliResult, Subscriber, env_for, wait_until
from tests.test_refusals import daemon_user_without

Cli = Callable[..., Awaitable[CliResult]]


def no_traceback(result: CliResult) -> None:
    assert "Traceback" not in result.err and "Traceback" not in result.out, result.err


async def test_create_show_pay_cancel(cli: Cli) -> None:
    made = await cli("create", "A-1", "A-2", "--timeout", "60")
    assert made.code == 0, made.err
    assert "created A-1" in made.out and "created A-2" in made.out

    shown = await cli("show", "A-1", "--json")
    assert shown.code == 0
    order = json.loads(shown.out)
    assert order["status"] == "created" and order["version"] == 1 and order["reason"] == "created"
    assert set(order) == {"order_id", "status", "version", "reason", "created", "updated", "deadline"}

    paid = await cli("pay", "A-1")
    assert paid.code == 0 and "paid" in paid.out
    again = await cli("pay", "A-1")
    assert again.code == 0 and "already paid" in again.out and "nothing changed" in again.out

    cancelled = await cli("cancel", "A-2")
    assert cancelled.code == 0 and "cancelled" in cancelled.out
    refused = await cli("pay", "A-2")
    assert refused.code == 1
    assert "'A-2'" in refused.err and "cancelled" in refused.err
    no_traceback(refused)

    human = await cli("show", "A-1")
    assert human.code == 0 and "paid" in human.out


async def test_create_json_prints_one_object(cli: Cli) -> None:
    result = await cli("create", "J-1", "--timeout", "2.5", "--json")
    assert result.code == 0
    body = json.loads(result.out)
    assert body["order_id"] == "J-1" and body["status"] == "created" and body["deadline"].endswith("Z")


async def test_create_existing_id_is_refused_and_unchanged(cli: Cli, redis: Redis) -> None:
    assert (await cli("create", "dup-1", "--timeout", "60")).code == 0
    assert (await cli("pay", "dup-1")).code == 0
    before = await cli("show", "dup-1", "--json")
    result = await cli("create", "dup-1")
    assert result.code == 1
    assert "dup-1" in result.err and "already exists" in result.err and "paid" in result.err
    after = await cli("show", "dup-1", "--json")
    assert before.out == after.out


async def test_unknown_order_exits_1(cli: Cli) -> None:
    for command in ("pay", "cancel", "deliver", "refund", "show"):
        result = await cli(command, "nobody-here")
        assert result.code == 1, command
        assert "nobody-here" in result.err and "does not exist" in result.err
        no_traceback(result)


async def test_bad_ids_and_timeouts_exit_2_and_write_nothing(cli: Cli, redis: Redis) -> None:
    cases = [
        (("create", "has space"), "not allowed"),
        (("create", "x" * 129), "at most 128"),
        (("create", "ok-id", "--timeout", "soon"), "not a number"),
        (("create", "ok-id", "--timeout", "0.05"), "out of range"),
        (("create", "ok-id", "--timeout", "2592001"), "out of range"),
        (("create", "ok-id", "--timeout", "nan"), "finite"),
        (("pay", "bad/id"), "not allowed"),
        (("show", "é"), "not allowed"),
    ]
    for args, message in cases:
        result = await cli(*args)
        assert result.code == 2, (args, result.err)
        assert message in result.err, (args, result.err)
        no_traceback(result)
    assert await redis.dbsize() == 0


async def test_bad_configuration_exits_2(cli: Cli, settings: Settings, redis: Redis) -> None:
    cases = [
        ({"ORDER_LISTENER_REDIS_URL": "http://127.0.0.1:6379"}, "not a Redis URL"),
        ({"ORDER_LISTENER_REDIS_URL": "redis://127.0.0.1:port/0"}, "port"),
        ({"ORDER_LISTENER_MQTT_URL": "mqtt://"}, "no host"),
        ({"ORDER_LISTENER_DEFAULT_TIMEOUT": "-3"}, "ORDER_LISTENER_DEFAULT_TIMEOUT"),
    ]
    for extra, message in cases:
        result = await cli("create", "cfg-1", env=env_for(settings, **extra))
        assert result.code == 2, (extra, result.err)
        assert message in result.err, (extra, result.err)
        no_traceback(result)
    assert await redis.dbsize() == 0


async def test_unreachable_redis_exits_1_quickly(cli: Cli, settings: Settings) -> None:
    env = env_for(settings, ORDER_LISTENER_REDIS_URL="redis://user:s3cret@127.0.0.1:1/0")
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await cli("create", "x-1", env=env)
    assert result.code == 1
    assert "cannot reach Redis" in result.err
    assert "s3cret" not in result.err
    assert loop.time() - started < 10
    no_traceback(result)


async def test_bulk_create_from_stdin(cli: Cli, redis: Redis) -> None:
    lines = "\n".join(f"bulk-{i:05d} {60 + i % 7}" for i in range(2000)) + "\n# a comment\n\n"
    result = await cli("create", "-", "--json", stdin=lines)
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["created"] == 2000 and summary["refused"] == []
    assert await redis.hexists(KeyLayout().bucket("bulk-00042"), "bulk-00042")  # pending: a bucket field
    assert await redis.zcard(KeyLayout().deadlines(part_of("bulk-00042"))) > 0


async def test_bulk_bad_lines_reported_with_numbers_nothing_written(cli: Cli, redis: Redis) -> None:
    text = "good-1 60\nbad id here\ngood-2 abc\ngood-3\n"
    result = await cli("create", "-", stdin=text)
    assert result.code == 2
    assert "line 2:" in result.err and "line 3:" in result.err and "not a number" in result.err
    assert "line 1:" not in result.err and "line 4:" not in result.err
    assert "nothing was created" in result.err
    assert await redis.dbsize() == 0
    no_traceback(result)


async def test_bulk_existing_and_repeated_ids_refused_by_line_others_kept(cli: Cli) -> None:
    assert (await cli("create", "old-1", "--timeout", "60")).code == 0
    text = "new-1 60\nold-1 60\nnew-2\nnew-1 30\n"
    result = await cli("create", "-", stdin=text)
    assert result.code == 1
    assert "line 2:" in result.err and "old-1" in result.err and "already exists" in result.err
    assert "line 4:" in result.err and "first on line 1" in result.err
    assert "2 line(s) refused" in result.err
    for order_id in ("new-1", "new-2"):
        assert json.loads((await cli("show", order_id, "--json")).out)["status"] == "created"


async def test_check_passes_on_the_test_servers(cli: Cli) -> None:
    result = await cli("check")
    assert result.code == 0, result.out + result.err
    assert "keyspace notifications on" in result.out
    assert "allowed to publish and subscribe" in result.out


async def test_check_explains_notifications_off(cli: Cli, redis: Redis) -> None:
    await redis.config_set("notify-keyspace-events", "")
    try:
        result = await cli("check")
    finally:
        await redis.config_set("notify-keyspace-events", "Ex")
    assert result.code == 1
    assert "CONFIG SET notify-keyspace-events Ex" in result.out
    assert "redis.conf" in result.out


async def test_check_reports_unreachable_broker(cli: Cli, settings: Settings) -> None:
    result = await cli("check", env=env_for(settings, ORDER_LISTENER_MQTT_URL="mqtt://u:pw1234@127.0.0.1:1"))
    assert result.code == 1
    assert "mqtt: cannot connect" in result.out and "pw1234" not in result.out


async def test_watch_prints_events(
    cli: Cli, settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    await start_daemon()
    watcher = await asyncio.create_subprocess_exec(
        CLI, "watch", "--count", "2", "--seconds", "20",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env_for(settings),
    )  # fmt: skip
    assert watcher.stderr is not None
    said = await asyncio.wait_for(watcher.stderr.readline(), 20)  # printed once subscribed
    assert said.startswith(b"watching "), said
    assert (await cli("create", "w-1", "--timeout", "60")).code == 0
    assert (await cli("pay", "w-1")).code == 0
    out, err = await asyncio.wait_for(watcher.communicate(), 30)
    assert watcher.returncode == 0, err
    assert b"w-1  - -> created" in out and b"w-1  created -> paid" in out


async def test_timer_fires_through_the_cli(
    cli: Cli, start_daemon: Callable[..., Awaitable[Daemon]], subscriber: Subscriber
) -> None:
    await start_daemon()
    assert (await cli("create", "t-1", "--timeout", "0.5")).code == 0
    await wait_until(lambda: len(subscriber.of("t-1")) == 2, 10, "t-1 cancelled")
    shown = json.loads((await cli("show", "t-1", "--json")).out)
    assert shown["status"] == "cancelled" and shown["reason"] == "timeout" and shown["version"] == 2


async def test_check_names_missing_acl_permissions(cli: Cli, settings: Settings, redis: Redis) -> None:
    await redis.execute_command(  # type: ignore[no-untyped-call]  # unannotated in redis-py
        "ACL", "SETUSER", "limited", "on", ">limited-pw", "~*", "+ping", "+info", "+hello"
    )
    try:
        url = settings.redis_url.replace("redis://", "redis://limited:limited-pw@")
        result = await cli("check", env=env_for(settings, ORDER_LISTENER_REDIS_URL=url))
    finally:
        await redis.execute_command("ACL", "DELUSER", "limited")  # type: ignore[no-untyped-call]
    assert result.code == 1
    assert "not allowed what the daemon needs" in result.out
    assert "SCRIPT LOAD (create)" in result.out and "SUBSCRIBE __keyevent@0__:expired" in result.out
    assert "deploy/redis-users.acl" in result.out
    assert "limited-pw" not in result.out + result.err


async def test_check_notes_a_user_without_the_retention_queue(
    cli: Cli, settings: Settings, redis: Redis
) -> None:
    """The daemon's user as deploy/redis-users.acl had it before the sweep kept
    cancelled records in their buckets (no +llen): the daemon works, a note
    says what it costs and what to grant; no problem, exit 0."""
    passed = await cli("check")
    assert "retention queue" not in passed.out
    async with daemon_user_without(redis, settings, "llen") as config:
        result = await cli("check", env=env_for(config))
    assert result.code == 0, result.out + result.err
    assert "may not use the retention queue" in result.out
    assert "+llen +lindex +lpop +rpush" in result.out
