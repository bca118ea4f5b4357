"""The fast paths (listener/fastpath): fast by default, each fallback taken
when forced, on an untested version, on a missing private name, on a probe
that fails, and at run time on a reply or failure the fast code does not
expect (for good, logged once, no reconnect); orders are cancelled either
way. The read loop is bounded. pyproject's pins are the tested versions.

Each test sets the mode it is about, so this file is not in CI's second pass
(which forces the fallbacks on the tests that use the fast paths)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import io
import json
import pkgutil
import re
import tomllib
import types
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import hiredis
import pytest
from redis._parsers import hiredis as redis_hiredis
from redis.asyncio import Redis

from listener import fastpath, logs
from listener.config import FastPathSetting, LogFormat, Settings, load_settings
from listener.daemon import Daemon
from listener.errors import ConfigError
from listener.fastpath import FastPaths, Unfit, hiredis_drain, require
from listener.servers import ServerProcess
from tests.conftest import DaemonProcess, Subscriber, quiet_logs, wait_until
from tests.life import cancelled_by_its_expired_event

ROOT = Path(__file__).resolve().parent.parent
NAME = hiredis_drain.NAME
Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    """The daemon's log from info up, as parsed JSON lines."""
    out = io.StringIO()
    logs.configure("info", LogFormat.JSON, stream=out)
    try:
        yield lambda: [json.loads(line) for line in out.getvalue().splitlines() if line.startswith("{")]
    finally:
        quiet_logs()


def path_lines(lines: Lines, event: str = "fast path") -> list[dict[str, Any]]:
    return [line for line in lines() if line["event"] == event and line.get("path") == NAME]


def with_mode(settings: Settings, mode: str) -> Settings:
    return dataclasses.replace(settings, fast_paths=FastPathSetting(mode))


def gauge(daemon: Daemon, mode: str) -> float:
    """order_listener_fast_path{path="hiredis-drain", mode=...} as /metrics serves it."""
    text = daemon.metrics.render().decode()
    match = re.search(rf'^order_listener_fast_path{{mode="{mode}",path="{NAME}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"no order_listener_fast_path for {NAME}, {mode} in /metrics"
    return float(match.group(1))


def assert_runs(daemon: Daemon, mode: str) -> None:
    path = daemon.fast_paths.get(NAME)
    assert path is not None and path.mode == mode, path
    other = "fallback" if mode == "fast" else "fast"
    assert (gauge(daemon, mode), gauge(daemon, other)) == (1.0, 0.0)


async def expire_foreign_keys(redis: Redis, daemon: Daemon, count: int, tag: str) -> None:
    """`count` keys not of ours expiring together (a burst of `expired` events,
    many to a socket read); waits until the listener saw them all."""
    before = daemon.listener.ignored
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.set(f"burst:{tag}:{i}", "1", px=50)
        await pipe.execute()
    await wait_until(lambda: daemon.listener.ignored >= before + count, 15, f"{count} expired events read")


# -- deciding -----------------------------------------------------------------


async def test_fast_by_default(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    monkeypatch: pytest.MonkeyPatch,
    log_lines: Lines,
) -> None:
    monkeypatch.delenv("ORDER_LISTENER_FAST_PATHS", raising=False)  # CI's second pass sets it
    default = load_settings(
        redis_url=settings.redis_url, mqtt_url=settings.mqtt_url, resync_interval=1.0, shutdown_timeout=5.0
    )
    assert default.fast_paths is FastPathSetting.AUTO
    daemon = await start_daemon(default)
    assert_runs(daemon, "fast")
    (line,) = path_lines(log_lines)
    assert line["mode"] == "fast" and line["level"] == "info"
    assert f"redis {importlib.metadata.version('redis')}" in line["why"]
    await expire_foreign_keys(redis, daemon, 300, "default")
    assert daemon.listener.read_buffered > 0, "every event came through get_message: the path did not run"


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDER_LISTENER_FAST_PATHS", "off")
    assert load_settings().fast_paths is FastPathSetting.OFF
    monkeypatch.setenv("ORDER_LISTENER_FAST_PATHS", "fast")
    with pytest.raises(ConfigError, match="ORDER_LISTENER_FAST_PATHS"):
        load_settings()


async def test_forced_off_reaches_a_spawned_daemon_which_still_cancels(
    settings: Settings,
    redis: Redis,
    spawn_daemon: Callable[..., Awaitable[DaemonProcess]],
    subscriber: Subscriber,
) -> None:
    """`order-listener run` with ORDER_LISTENER_FAST_PATHS=off: says so at
    start and cancels an order that only its expired event can cancel."""
    daemon = await spawn_daemon(ORDER_LISTENER_FAST_PATHS="off")
    await daemon.wait_ready()
    lines = [json.loads(line) for line in daemon.log.read_text().splitlines() if line.startswith("{")]
    (line,) = [x for x in lines if x["event"] == "fast path" and x.get("path") == NAME]
    assert (line["mode"], line["why"]) == ("fallback", fastpath.FORCED_OFF)
    await cancelled_by_its_expired_event(settings, redis, subscriber, "off-spawned")


async def test_forced_off_in_process_reads_everything_through_get_message(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
) -> None:
    daemon = await start_daemon(with_mode(settings, "off"))
    assert_runs(daemon, "fallback")
    await expire_foreign_keys(redis, daemon, 300, "off")
    assert daemon.listener.read_buffered == 0
    await cancelled_by_its_expired_event(settings, redis, subscriber, "off-in-process", daemon)
    assert daemon.listener.cancelled == 1


async def test_an_untested_version_falls_back_with_its_log_line(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    monkeypatch: pytest.MonkeyPatch,
    log_lines: Lines,
) -> None:
    """The installed redis-py is not the one the path was tested with (as after
    an upgrade): the daemon falls back, says why, and still cancels."""
    older = replace(hiredis_drain.SPEC, tested={"redis": "8.0", "hiredis": "3.5"})
    monkeypatch.setattr(hiredis_drain, "SPEC", older)
    daemon = await start_daemon(with_mode(settings, "auto"))
    assert_runs(daemon, "fallback")
    (line,) = path_lines(log_lines)
    installed = importlib.metadata.version("redis")
    assert (line["mode"], line["level"]) == ("fallback", "warning")
    assert line["why"] == f"redis {installed} not tested (tested 8.0.x)"
    await cancelled_by_its_expired_event(settings, redis, subscriber, "untested")
    assert daemon.listener.read_buffered == 0


def test_an_uninstalled_distribution_falls_back() -> None:
    spec = replace(hiredis_drain.SPEC, tested={**hiredis_drain.TESTED, "no-such-distribution-x": "1.0"})
    path = FastPaths().decide(spec)
    assert (path.mode, path.why) == ("fallback", "no-such-distribution-x not installed")


@pytest.mark.parametrize("name", ["NOT_ENOUGH_DATA", "_AsyncHiredisParser"])
def test_a_missing_private_name_falls_back(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A redis-py whose hiredis module lacks a name the path uses (the module
    is swapped for a copy without it; redis-py itself keeps working)."""
    names = {key: value for key, value in vars(redis_hiredis).items() if key != name}
    monkeypatch.setattr(hiredis_drain, "_redis_hiredis", types.SimpleNamespace(**names))
    path = FastPaths().decide(hiredis_drain.SPEC)
    assert (path.mode, path.why) == ("fallback", f"missing redis._parsers.hiredis.{name}")


def test_the_probe_notices_a_reader_made_without_the_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A redis-py that still has every name but no longer hands hiredis the
    marker: the loop would never end on it."""

    def on_connect(self: Any, connection: Any) -> None:
        self._reader = hiredis.Reader()  # hiredis' own "no reply yet": False

    monkeypatch.setattr(redis_hiredis._AsyncHiredisParser, "on_connect", on_connect)
    path = FastPaths().decide(hiredis_drain.SPEC)
    assert path.mode == "fallback" and "NOT_ENOUGH_DATA" in path.why


def test_require_names_every_missing_name() -> None:
    require(hiredis.Reader, ("gets", "feed"), "hiredis.Reader")
    with pytest.raises(Unfit) as caught:
        require(hiredis.Reader, ("gets", "_nope", "_nor_this"), "hiredis.Reader")
    assert str(caught.value) == "missing hiredis.Reader._nope, hiredis.Reader._nor_this"


def test_a_decision_is_made_and_logged_once(log_lines: Lines) -> None:
    paths = FastPaths()
    first = paths.decide(hiredis_drain.SPEC)
    assert paths.decide(hiredis_drain.SPEC) is first
    assert len(path_lines(log_lines)) == 1
    assert list(paths) == [first]


# -- at run time ----------------------------------------------------------------


class FlakyReader(hiredis.Reader):
    """hiredis' reader as redis-py makes it, which, once `fault` is set, answers
    the one read that follows a pub/sub message (on the listener's
    subscription, that is the drain's) with `fault()`: what an upgraded
    library could do. The buffer is left as it was."""

    fault: ClassVar[Callable[[], Any] | None] = None
    _after_message = False

    def gets(self, *args: Any) -> Any:
        fault = FlakyReader.fault
        if fault is not None and self._after_message:
            FlakyReader.fault = None
            self._after_message = False
            return fault()
        reply = super().gets(*args)
        self._after_message = isinstance(reply, list) and reply[:1] == [b"message"]
        return reply


def _changed_signature() -> Any:
    raise TypeError("gets() missing 1 required positional argument: 'decode'")


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        (lambda: False, "hiredis' gets() answered False, not redis-py's NOT_ENOUGH_DATA"),
        (_changed_signature, "hiredis' gets() raised TypeError: gets() missing 1 required"),
    ],
    ids=["not-the-marker", "gets-raises"],
)
async def test_a_failure_at_run_time_falls_back_for_good_without_a_reconnect(
    settings: Settings,
    redis: Redis,
    start_daemon: Callable[..., Awaitable[Daemon]],
    subscriber: Subscriber,
    monkeypatch: pytest.MonkeyPatch,
    log_lines: Lines,
    fault: Callable[[], Any],
    why: str,
) -> None:
    monkeypatch.setattr(hiredis, "Reader", FlakyReader)  # what redis-py makes on connecting
    monkeypatch.setattr(FlakyReader, "fault", None)
    daemon = await start_daemon(with_mode(settings, "auto"))
    assert_runs(daemon, "fast")
    (listener_before,) = await redis.client_list(_type="pubsub")

    monkeypatch.setattr(FlakyReader, "fault", fault)
    await expire_foreign_keys(redis, daemon, 300, "fault")  # every one read, none lost
    assert FlakyReader.fault is None, "the fault was never met: the test proved nothing"
    assert_runs(daemon, "fallback")
    path = daemon.fast_paths.get(NAME)
    assert path is not None and path.why.startswith(why)

    taken = daemon.listener.read_buffered
    await expire_foreign_keys(redis, daemon, 300, "after")
    assert daemon.listener.read_buffered == taken, "the path ran again after falling back"
    await cancelled_by_its_expired_event(settings, redis, subscriber, "after-fault")
    assert daemon.redis_service.reconnects == 0
    (listener_after,) = await redis.client_list(_type="pubsub")
    assert listener_after["id"] == listener_before["id"], "the subscription was made anew"
    failed = path_lines(log_lines, "fast path failed: falling back for good")
    assert len(failed) == 1 and failed[0]["level"] == "error"


async def test_the_read_loop_takes_at_most_max_replies_a_call(
    redis: Redis, redis_server_proc: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 messages in one socket read, at most 10 a call: the drain says when
    it stopped at the bound, and the caller's loop gets them all, in order."""
    monkeypatch.setattr(hiredis_drain, "MAX_REPLIES", 10)
    drain = hiredis_drain.HiredisDrain(FastPaths(), lost=lambda: None)
    assert drain.active
    client = Redis(port=redis_server_proc.port, protocol=2)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("drain-test")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(50):
                pipe.publish("drain-test", str(i))
            await pipe.execute()
        got: list[bytes] = []
        per_call: list[tuple[bool, int]] = []
        while len(got) < 50:
            message = await pubsub.get_message(timeout=5)
            assert message is not None and message["type"] == "message"
            got.append(message["data"])
            more = True
            while more:
                before = drain.taken
                more = drain.drain(pubsub.connection, lambda _channel, data: got.append(data))
                per_call.append((more, drain.taken - before))
        assert got == [str(i).encode() for i in range(50)]
        assert per_call[0] == (True, 10), per_call  # they came together: the first call stopped at the bound
        assert all(taken <= 10 for _, taken in per_call)
        assert drain.taken > 10 and drain.active
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


# -- the pins -----------------------------------------------------------------


def all_specs() -> list[fastpath.Spec]:
    specs = []
    for module in pkgutil.iter_modules(fastpath.__path__):
        spec = getattr(importlib.import_module(f"listener.fastpath.{module.name}"), "SPEC", None)
        if isinstance(spec, fastpath.Spec):
            specs.append(spec)
    return specs


def test_pyproject_pins_each_distribution_to_the_minor_version_tested() -> None:
    """A fast path's tested versions and pyproject.toml's pins say the same."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins: dict[str, str] = {}
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?(.*)", requirement)
        assert match, requirement
        pins[match.group(1).lower()] = match.group(2).replace(" ", "")
    specs = all_specs()
    assert NAME in {spec.name for spec in specs}
    for spec in specs:
        for distribution, minor in spec.tested.items():
            major, _, low = minor.partition(".")
            assert pins.get(distribution) == f">={minor},<{major}.{int(low) + 1}", (spec.name, distribution)


def test_ci_runs_the_readme_test_command_with_the_fallbacks_pass() -> None:
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command in (ROOT / "README.md").read_text().splitlines()
    assert command.endswith(" && ORDER_LISTENER_FAST_PATHS=off .venv/bin/pytest -m fastpath")
