"""Which failures are outages to ride out (pure)."""

from __future__ import annotations

import pytest
import redis.exceptions as redis_errors

from listener.supervise import is_transient


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
