"""The command line's outside beyond the orders: --version and --help that load
nothing they do not need, global options before or after the command, and
errors that name the setting, its value (passwords hidden) and the fix."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable
from importlib.metadata import version

from redis.asyncio import Redis

from listener.config import Settings
from listener.scripts import NAMES
from tests.conftest import CliResult, env_for

Cli = Callable[..., Awaitable[CliResult]]

# What would make a short command slow to start: none of it is needed before
# a command runs, and only `run`, `watch`, `check` and `demo` need any of it.
HEAVY = {
    "pydantic",
    "pydantic_settings",
    "structlog",
    "rich",
    "typer",
    "aiomqtt",
    "paho",
    "prometheus_client",
}


def loaded_by(args: list[str], env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    """(exit status, top-level modules loaded) of `order-listener ARGS` run in
    a fresh interpreter, through the console script's entry point."""
    script = (
        "import json, sys\n"
        "from listener.cli import main\n"
        f"try:\n    main({args!r})\n    code = 0\n"
        "except SystemExit as exc:\n    code = exc.code\n"
        "print(json.dumps([code, sorted(sys.modules)]), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    code, modules = json.loads(done.stderr.splitlines()[-1])
    return int(code or 0), {name.split(".")[0] for name in modules}


def test_help_and_version_load_neither_redis_nor_the_rest() -> None:
    for args in (["--help"], ["--version"], ["pay", "--help"], ["run", "--help"]):
        code, loaded = loaded_by(args)
        assert code == 0, args
        assert "listener" in loaded and "argparse" in loaded  # the check sees what is loaded
        assert not loaded & {"redis", *HEAVY}, (args, loaded & {"redis", *HEAVY})


def test_show_loads_the_redis_client_and_nothing_heavy(settings: Settings) -> None:
    code, loaded = loaded_by(["show", "nobody"], env=env_for(settings))
    assert code == 1
    assert "redis" in loaded
    assert not loaded & HEAVY, loaded & HEAVY


def test_commands_load_what_they_need_when_they_run(settings: Settings) -> None:
    """A bad setting is refused before `run` loads the daemon; `watch` does load
    MQTT (so the checks above can fail)."""
    code, loaded = loaded_by(["run", "--log-level", "verbose"], env=env_for(settings))
    assert code == 2
    assert not loaded & HEAVY, loaded & HEAVY
    code, loaded = loaded_by(
        ["watch", "--seconds", "0.1", "--mqtt-url", "mqtt://127.0.0.1:1"], env_for(settings)
    )
    assert code == 1 and {"aiomqtt", "paho"} <= loaded


async def test_version(cli: Cli) -> None:
    result = await cli("--version")
    assert result.code == 0
    assert result.out == f"order-listener {version('order-expiry-listener')}\n"


async def test_help_lists_every_command_and_the_exit_codes(cli: Cli) -> None:
    result = await cli("--help")
    assert result.code == 0
    for command in ("run", "create", "pay", "cancel", "deliver", "refund", "show", "check", "watch", "demo"):
        assert f"\n    {command} " in result.out, command
    assert "exit status: 0 success" in result.out
    bare = await cli()
    assert bare.code == 2 and "COMMAND" in bare.err


async def test_global_options_after_the_command(cli: Cli, redis: Redis) -> None:
    made = await cli("create", "g-1", "--timeout", "60", "--key-prefix", "other")
    assert made.code == 0, made.err
    assert [key async for key in redis.scan_iter(match="order:*")] == []
    assert [key async for key in redis.scan_iter(match="other:*")] != []
    assert (await cli("show", "g-1")).code == 1  # not under the default prefix
    assert (await cli("show", "g-1", "--key-prefix", "other")).code == 0
    assert (await cli("--key-prefix", "other", "show", "g-1")).code == 0
    after_wins = await cli("--key-prefix", "elsewhere", "show", "g-1", "--key-prefix", "other", "--json")
    assert after_wins.code == 0 and json.loads(after_wins.out)["order_id"] == "g-1"

    run = await cli("run", "--key-prefix", "not a prefix!")  # refused before the daemon starts
    assert run.code == 2
    assert "ORDER_LISTENER_KEY_PREFIX: must be 1-64 letters" in run.err and "'not a prefix!'" in run.err
    helped = await cli("run", "--help")
    for option in ("--redis-url", "--mqtt-url", "--mqtt-protocol", "--key-prefix", "--log-level"):
        assert option in helped.out, option


async def test_a_bad_log_level_lists_the_allowed_values(cli: Cli, settings: Settings) -> None:
    result = await cli("show", "x-1", env=env_for(settings, ORDER_LISTENER_LOG_LEVEL="verbose"))
    assert result.code == 2
    assert result.err == (
        "order-listener: bad configuration:\n"
        "  ORDER_LISTENER_LOG_LEVEL: must be one of debug, info, warning, error (got 'verbose')\n"
    )
    several = await cli(
        "show", "x-1", "--log-format", "xml", env=env_for(settings, ORDER_LISTENER_SWEEP_BATCH="lots")
    )
    assert several.code == 2
    assert "ORDER_LISTENER_LOG_FORMAT: must be one of auto, json, console (got 'xml')" in several.err
    assert "ORDER_LISTENER_SWEEP_BATCH: must be a whole number from 1 to 5000 (got 'lots')" in several.err


async def test_unreachable_servers_are_named_with_the_fix(cli: Cli, settings: Settings) -> None:
    redis_down = await cli(
        "show", "x-1", env=env_for(settings, ORDER_LISTENER_REDIS_URL="redis://u:s3cret@127.0.0.1:1/0")
    )
    assert redis_down.code == 1
    assert "cannot reach Redis at redis://u:***@127.0.0.1:1/0" in redis_down.err
    assert "ORDER_LISTENER_REDIS_URL" in redis_down.err and "s3cret" not in redis_down.err

    broker_down = await cli(
        "watch",
        "--seconds",
        "5",
        env=env_for(settings, ORDER_LISTENER_MQTT_URL="mqtt://u:pw1234@127.0.0.1:1"),
    )
    assert broker_down.code == 1
    assert "cannot reach the MQTT broker at mqtt://u:***@127.0.0.1:1" in broker_down.err
    assert "start the broker there, or point ORDER_LISTENER_MQTT_URL" in broker_down.err
    assert "pw1234" not in broker_down.err + broker_down.out


async def test_check_gives_each_fix_once(cli: Cli, redis: Redis) -> None:
    await redis.config_set("notify-keyspace-events", "")
    try:
        result = await cli("check")
    finally:
        await redis.config_set("notify-keyspace-events", "Ex")
    assert result.code == 1
    assert "FAIL  redis: expired events are not published: keyspace notifications" in result.out
    assert result.out.count("fix: redis-cli CONFIG SET notify-keyspace-events Ex") == 1
    assert "Fix:" not in result.out


async def test_scripts_help_names_every_script(cli: Cli) -> None:
    result = await cli("scripts", "--help")
    assert result.code == 0
    for name in NAMES:
        assert name in result.out, name
