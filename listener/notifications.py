"""Is Redis announcing expired keys? `notify-keyspace-events` must hold `E`
(the keyevent channel) and `x` (expired) for the expiry listener to hear
timers expire; without them cancellations come from the deadline index
only. The daemon logs the result at start and `order-listener check`
reports it, each time with the exact command that fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster

from listener.connection import RedisClient


def expired_channel(db: int) -> str:
    """Where Redis announces the keys of database `db` that expired."""
    return f"__keyevent@{db}__:expired"


@dataclass(frozen=True)
class NotificationCheck:
    ok: bool
    current: str | None  # None: CONFIG GET not allowed
    message: str  # what was found
    fix: str = ""  # what to change, when not ok


async def check_notifications(redis: RedisClient) -> NotificationCheck:
    """Are `expired` keyevent notifications on? Says exactly what to change if not.
    On a Redis Cluster every node is asked (the setting is not replicated, and a
    replica that takes over must have it too)."""
    if not isinstance(redis, RedisCluster):
        return await _check_node(redis, None)
    checks = [await _check_node(redis, node) for node in redis.get_nodes()]
    bad = [check for check in checks if not check.ok]
    if not bad:
        settings = sorted({check.current or "" for check in checks})
        return NotificationCheck(
            True, ",".join(settings), f"keyspace notifications on, on all {len(checks)} cluster nodes"
        )
    return NotificationCheck(
        False,
        bad[0].current,
        "; ".join(check.message for check in bad),
        "; ".join(dict.fromkeys(check.fix for check in bad if check.fix)),
    )


async def _check_node(redis: RedisClient, node: ClusterNode | None) -> NotificationCheck:
    where = "" if node is None else f"on cluster node {node.name}: "
    try:
        if node is None:
            reply = await redis.config_get("notify-keyspace-events")
        else:
            reply = await redis.config_get("notify-keyspace-events", target_nodes=node)
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        if node is None:
            raise  # one Redis: an outage, retried by the caller
        # one node of a cluster (a replica that died, an address we cannot
        # reach): that node's problem, not a reason to wait
        return NotificationCheck(
            False,
            None,
            f"{where}cannot reach the node to check it ({exc})",
            "make sure every node of the cluster is up and reachable from here",
        )
    except redis_errors.ResponseError as exc:  # ACL or a managed Redis without CONFIG
        return NotificationCheck(
            False,
            None,
            f"{where}cannot read notify-keyspace-events ({exc})",
            "make sure it contains 'E' and 'x' (e.g. notify-keyspace-events Ex in redis.conf)",
        )
    current = str(reply.get("notify-keyspace-events", ""))
    flags = set(current)
    has_events = "E" in flags
    has_expired = "x" in flags or "A" in flags
    if has_events and has_expired:
        return NotificationCheck(True, current, f"{where}keyspace notifications on ({current!r})")
    wanted = "".join(sorted(flags | {"E", "x"}, key=lambda c: (c not in "KE", c)))
    return NotificationCheck(
        False,
        current,
        f"{where}keyspace notifications for expired keys are off (notify-keyspace-events is "
        f"{current!r}); until they are on, cancellations come from the deadline index only",
        f"redis-cli CONFIG SET notify-keyspace-events {wanted} "
        f"and put 'notify-keyspace-events {wanted}' in redis.conf so it survives a restart "
        "(on Redis Cluster: on every node)",
    )
