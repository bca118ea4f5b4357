"""Connecting to Redis: one server or a Redis Cluster, told apart by asking the
configured node (any one node of a cluster will do).

Both kinds of client run the same commands and scripts: every order's keys,
its part's deadline index and outbox share one hash tag, so each script runs
on one node. What differs is pub/sub: keyspace notifications are local to the
node that expires the key, so on a cluster the expiry listener subscribes on
every primary (`cluster_primaries`, `node_client`).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from listener.config import Settings
from listener.errors import ConfigError
from listener.urls import redis_target


def _log() -> Any:
    """The logger, imported when there is something to log: loading structlog
    (and the rich it loads) costs a short command more than its own work."""
    from listener import logs

    return logs.get("listener.connection")


RedisClient = Redis | RedisCluster

# Losing Redis is normal: these end a session (the daemon backs off and goes
# on), and tell a producer that Redis is unavailable, not that it sent a bug.
REDIS_TRANSIENT: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,
    redis_errors.TryAgainError,
    redis_errors.OutOfMemoryError,  # maxmemory reached: back off until memory is freed
    redis_errors.BusyLoadingError,
    # Redis Cluster: a failover or resharding under way (CLUSTERDOWN,
    # MASTERDOWN, slots not covered yet); the client finds the new topology
    redis_errors.ClusterError,
    redis_errors.SlotNotCoveredError,
    # refused by the ACL or the password: an operator can fix it while we wait
    redis_errors.NoPermissionError,
    redis_errors.AuthenticationError,
)

# Error replies that say the node changed role under us (a failover): a
# blocked XREAD is answered "UNBLOCKED ... (master -> replica?)".
TRANSIENT_REPLIES = ("UNBLOCKED", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "READONLY")


_CONNECTION_MODULE = os.path.join("redis", "asyncio", "connection.py")


def _closed_under_us(exc: BaseException) -> bool:
    """A connection closed by one task while another used it: redis-py's
    asyncio connection drops its reader and writer on disconnect, and a
    command already past its "is connected" check then fails with
    "'NoneType' object has no attribute 'writelines'" (or is not callable,
    one level down in asyncio). Seen when the cluster client disconnects the
    connections of a node killed under load. Told apart from a bug of ours
    by where it was raised: inside redis-py's connection code, on a None."""
    if not isinstance(exc, AttributeError | TypeError) or "'NoneType' object" not in str(exc):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return any(frame.filename.endswith(_CONNECTION_MODULE) for frame in frames)


def redis_lost(exc: BaseException) -> bool:
    """Redis lost, or in the middle of a failover (not a refusal, not a bug)."""
    if isinstance(exc, REDIS_TRANSIENT) or _closed_under_us(exc):
        return True
    if isinstance(exc, redis_errors.RedisClusterException):
        # "Redis Cluster cannot be connected ...": no node reachable now. The
        # class also covers misuse (cross-slot, no way to dispatch): bugs.
        return "cannot be connected" in str(exc)
    if not isinstance(exc, redis_errors.ResponseError):
        return False
    text = str(exc)
    # in a pipeline: "Command # 2 (XREAD ...) of pipeline caused error: ('UNBLOCKED ...',)"
    _, wrapped, reply = text.partition("of pipeline caused error: (")
    return (reply.strip("'\"") if wrapped else text).startswith(TRANSIENT_REPLIES)


def _options(settings: Settings, timeout: float) -> dict[str, Any]:
    """Connection options shared by both clients.

    No automatic retries: a pipeline retried after its reply was lost would run
    `create` twice and report the caller's own new orders as taken. Idle
    connections are checked before use (health_check_interval); outages are
    the caller's: the daemon's loops back off and resume, the CLI says
    Redis is unreachable (exit 1)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": 3.0,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 15,
        "driver_info": None,  # no CLIENT SETINFO at connect: one command fewer for the ACL to allow
    }
    if redis_target(settings.redis_url).tls:
        options |= {
            "ssl_cert_reqs": "required",
            "ssl_ca_certs": settings.redis_tls_ca or None,
            "ssl_certfile": settings.redis_tls_cert or None,
            "ssl_keyfile": settings.redis_tls_key or None,
        }
    return options


def connect_redis(settings: Settings, *, timeout: float = 5.0) -> Redis:
    """A client for the configured URL as one Redis server (not connected yet)."""
    return Redis.from_url(redis_target(settings.redis_url).url, **_options(settings, timeout))


def subscription_client(settings: Settings, node: NodeAddress | None = None) -> Redis:
    """A client for a pub/sub subscription: to the configured server, or to one
    `node` of a cluster. It speaks RESP2, on which redis-py reads a pub/sub
    message faster than on RESP3 (a burst brings one `expired` event per
    order; docs/figures.md)."""
    options = _options(settings, 5.0) | {"protocol": 2}
    client = Redis.from_url(redis_target(settings.redis_url).url, **options)
    if node is not None:
        client.connection_pool.connection_kwargs.update(host=node.host, port=node.port)
    return client


def connect_cluster(settings: Settings, *, timeout: float = 5.0) -> RedisCluster:
    """A cluster client that learns the cluster from the configured node."""
    target = redis_target(settings.redis_url)
    if target.db != 0:
        raise ConfigError(
            f"{target.shown} is a Redis Cluster node, and a cluster has only database 0: "
            "use .../0 in ORDER_LISTENER_REDIS_URL"
        )
    # Redirections (MOVED, ASK) are followed whatever the retries; a command
    # lost with its node fails to the caller, who backs off and goes on.
    return RedisCluster.from_url(target.url, **_options(settings, timeout))


@dataclass(frozen=True)
class NodeAddress:
    host: str
    port: int

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"


async def is_cluster(settings: Settings) -> bool:
    """Does the configured node run in cluster mode? (INFO cluster)"""
    probe = connect_redis(settings)
    try:
        info = await probe.info("cluster")
    except redis_errors.ResponseError as exc:
        if "not allowed in cluster mode" in str(exc):  # SELECT of a database other than 0
            return True
        if not isinstance(exc, redis_errors.NoPermissionError):
            raise
        _log().warning(
            "cannot ask Redis whether it is a cluster (INFO not allowed); assuming one server",
            fix="grant +info to this user (deploy/redis-users.acl)",
        )
        return False
    finally:
        await probe.aclose()
    return str(info.get("cluster_enabled", "0")) == "1"


async def open_cluster(settings: Settings, *, timeout: float = 5.0) -> RedisCluster:
    """A cluster client with the topology loaded from the configured node."""
    cluster = connect_cluster(settings, timeout=timeout)
    try:
        await cluster.initialize()
    except BaseException:
        await cluster.aclose()
        raise
    _log().info("connected to a Redis Cluster", primaries=[node.name for node in cluster.get_primaries()])
    return cluster


async def open_redis(settings: Settings, *, timeout: float = 5.0) -> RedisClient:
    """The right client for the configured URL: a cluster client if the node
    is part of a Redis Cluster, else a plain one. Raises what the connection
    raises when Redis is unreachable."""
    if await is_cluster(settings):
        return await open_cluster(settings, timeout=timeout)
    return connect_redis(settings, timeout=timeout)


def node_client(settings: Settings, node: NodeAddress, *, timeout: float = 5.0) -> Redis:
    """A plain client to one node of a cluster, with the configured credentials and TLS."""
    client = connect_redis(settings, timeout=timeout)
    client.connection_pool.connection_kwargs.update(host=node.host, port=node.port)
    return client


def configured_node(settings: Settings) -> NodeAddress:
    """The node the URL names."""
    parts = urlsplit(redis_target(settings.redis_url).url)
    return NodeAddress(parts.hostname or "127.0.0.1", parts.port or 6379)


async def cluster_primaries(settings: Settings, candidates: Sequence[NodeAddress]) -> list[NodeAddress]:
    """The primaries as the first candidate that answers tells (CLUSTER SLOTS),
    each asked on a short-lived connection of its own: refreshing the shared
    cluster client instead would reconnect every connection it has."""
    last: Exception | None = None
    for node in dict.fromkeys(candidates):  # in order, each once
        client = node_client(settings, node, timeout=2.0)
        try:
            reply = await client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            last = exc
            continue
        finally:
            await client.aclose()
        found: dict[str, NodeAddress] = {}
        for entry in reply:
            host, port = entry[2][0], int(entry[2][1])
            text = host.decode() if isinstance(host, bytes) else str(host)
            address = NodeAddress(text or node.host, port)  # an empty host: the node we asked
            found[address.name] = address
        return sorted(found.values(), key=lambda address: address.name)
    raise last if last is not None else redis_errors.ConnectionError("no cluster node to ask")
