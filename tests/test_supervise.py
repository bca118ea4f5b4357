"""Which failures are outages to ride out, and how they are retried."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.exceptions as redis_errors
import structlog
from redis.asyncio.connection import Connection

from listener.config import Settings
from listener.daemon import Daemon
from listener.servers import ServerProcess
from listener.supervise import Service, is_transient, supervise
from tests.conftest import wait_until


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.ConnectionError("Connection closed by server."),
        redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis_errors.ResponseError("UNBLOCKED force unblock from blocking operation, instance state changed"),
        redis_errors.ResponseError(
            "Command # 2 (XREAD BLOCK 1000 COUNT 500 STREAMS order:{2}:outbox ...) of pipeline caused error: "
            "('UNBLOCKED force unblock from blocking operation, instance state changed',)"
        ),
        redis_errors.ResponseError("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is no"),
        redis_errors.SlotNotCoveredError("slot 42 is not covered by the cluster"),
        redis_errors.RedisClusterException(
            "Redis Cluster cannot be connected. Please provide at least one node"
        ),
    ],
)
def test_failover_and_outage_replies_are_transient(exc: Exception) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis_errors.ResponseError("create: timeout of x must be whole milliseconds from 100 to 2592000000"),
        redis_errors.ResponseError(
            "Command # 1 (EVALSHA ...) of pipeline caused error: ('ERR order record is malformed',)"
        ),
        redis_errors.RedisClusterException("No way to dispatch this command to Redis Cluster"),
        ValueError("a bug"),
    ],
)
def test_bugs_and_refusals_are_not(exc: Exception) -> None:
    assert not is_transient(exc)


async def test_a_connection_closed_under_a_command_is_an_outage(redis_server_proc: ServerProcess) -> None:
    """The cluster client disconnects a failed node's connections while other
    tasks still send on them; redis-py then fails a command on the missing
    writer with an AttributeError (seen when a primary was killed under
    load). Here the state that race leaves: a connection closed, and the
    write step of a command that had already found it connected. (The race
    itself needs a task switch between the check and the write, which
    `asyncio.wait_for` makes on Python 3.11 and not later.)"""
    connection = Connection(host="127.0.0.1", port=redis_server_proc.port, socket_timeout=5.0)
    await connection.connect()  # type: ignore[no-untyped-call]  # unannotated in redis-py
    await connection.disconnect(nowait=True)
    with pytest.raises(AttributeError, match="'NoneType' object") as raised:
        await connection._send_packed_command([b"PING\r\n"])
    assert is_transient(raised.value)


def test_a_none_in_our_own_code_is_a_bug() -> None:
    with pytest.raises(AttributeError, match="'NoneType' object") as raised:
        None.writelines([])  # type: ignore[attr-defined]
    assert not is_transient(raised.value)


class Flaky:
    """A body failing with the given errors in turn, then returning "done"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


async def test_a_stale_connection_while_up_is_retried_at_once_without_an_outage() -> None:
    service = Service("redis")
    service.ok()  # others reach it
    body = Flaky(redis_errors.ConnectionError("Connection closed by server."))
    started = time.monotonic()
    assert await supervise("lane", service, body) == "done"
    assert body.calls == 2
    assert time.monotonic() - started < 0.04  # no backoff sleep (the first would be up to 50 ms)
    assert service.up and service.reconnects == 0


async def test_a_second_failure_is_an_outage_with_backoff() -> None:
    service = Service("redis")
    service.ok()
    body = Flaky(*[redis_errors.ConnectionError("Connection refused")] * 3)
    assert await supervise("lane", service, body) == "done"
    assert body.calls == 4  # one at once, then two after backoff
    assert not service.up  # marked down; the body reports ok() itself once it works


async def test_a_task_in_a_long_backoff_tries_again_when_another_reaches_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scheduler must not sleep out its backoff after Redis is back: the
    first task to reach the service wakes the others."""
    monkeypatch.setattr("listener.supervise.delays", lambda cap: iter([3600.0] * 10))
    service = Service("redis")
    body = Flaky(redis_errors.ConnectionError("Connection refused"))
    waiting = asyncio.create_task(supervise("scheduler", service, body))
    await wait_until(lambda: body.calls == 1 and not service.up, 5, "the first failure")
    assert not waiting.done()
    service.ok()  # another task's connection works again
    assert await asyncio.wait_for(waiting, 5) == "done"
    assert body.calls == 2


async def test_a_task_whose_server_stays_down_keeps_to_its_backoff_while_others_reach_theirs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Redis Cluster with one node down: the other nodes' tasks keep
    reporting "redis" up; the lost node's listener is woken once, then keeps
    to its backoff instead of retrying at each of their successes."""
    monkeypatch.setattr("listener.supervise.delays", lambda cap: iter([0.25] * 1000))
    service = Service("redis")
    calls = 0

    async def lost_node() -> None:
        nonlocal calls
        calls += 1
        raise redis_errors.ConnectionError("Connection refused")

    async def other_nodes() -> None:
        while True:
            service.ok()
            await asyncio.sleep(0.001)

    flapping = asyncio.create_task(other_nodes())
    retrying = asyncio.create_task(supervise("expiry-listener lost-node", service, lost_node))
    try:
        await asyncio.sleep(1.0)  # the window in which attempts are counted
    finally:
        retrying.cancel()
        flapping.cancel()
        await asyncio.gather(retrying, flapping, return_exceptions=True)
    # at the backoff's pace (4 steps in the second), each step with the one
    # at-once retry a stale connection gets when others reach the service,
    # plus the one early wake; woken at every success it would be hundreds
    assert 2 <= calls <= 12, calls


async def test_a_task_woken_in_one_outage_is_woken_again_in_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """Woken early once in an outage, the task's session then works for a
    while (others kept the service up throughout, as on a cluster): its next
    outage wakes it early again instead of leaving it to a long backoff."""
    monkeypatch.setattr("listener.supervise.delays", lambda cap: iter([3600.0] * 100))
    monkeypatch.setattr("listener.supervise.STABLE_AFTER", 0.2)
    service = Service("redis")
    service.ok()
    calls = 0

    async def session() -> str:
        nonlocal calls
        calls += 1
        if calls == 3:
            await asyncio.sleep(0.3)  # worked for longer than STABLE_AFTER
        if calls < 5:
            raise redis_errors.ConnectionError("Connection refused")
        return "done"

    task = asyncio.create_task(supervise("scheduler", service, session))
    await wait_until(lambda: calls == 2 and not service.up, 5, "the first outage's wait")
    service.ok()
    await wait_until(lambda: calls == 4 and not service.up, 5, "the second outage's wait")
    service.ok()
    assert await asyncio.wait_for(task, 5) == "done"


async def test_a_bug_is_raised_not_retried() -> None:
    service = Service("redis")
    service.ok()
    body = Flaky(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await supervise("lane", service, body)
    assert body.calls == 1


async def test_the_outage_warning_names_where_and_what_to_do(
    settings: Settings, start_daemon: Callable[..., Awaitable[Daemon]]
) -> None:
    """A daemon whose broker is unreachable says which URL (password hidden)
    and what to do, once, while it retries."""
    config = dataclasses.replace(settings, mqtt_url="mqtt://shop:pw-1234@127.0.0.1:1")
    with structlog.testing.capture_logs() as captured:
        daemon = await start_daemon(config, wait_ready=False)
        attempts = 0
        failed = daemon.mqtt_service.failed

        def counted(exc: BaseException, task: str) -> None:
            nonlocal attempts
            attempts += 1
            failed(exc, task)

        daemon.mqtt_service.failed = counted  # type: ignore[method-assign]
        await wait_until(lambda: any(e.get("service") == "mqtt" for e in captured), 10, "the mqtt warning")
        await wait_until(lambda: attempts >= 3, 15, "more failed attempts: the warning must not repeat")
    (warning,) = [e for e in captured if e.get("service") == "mqtt" and e["log_level"] == "warning"]
    assert warning["event"] == "mqtt unavailable; retrying with backoff"
    assert warning["url"] == "mqtt://shop:***@127.0.0.1:1"
    assert "ORDER_LISTENER_MQTT_URL" in warning["fix"]
    assert "pw-1234" not in repr(captured)
