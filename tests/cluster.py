"""A Redis Cluster on free loopback ports, for the tests of scale-out
(tests/test_scale_out.py): nodes are `listener.servers.redis_server`s with
cluster mode on, joined and given their slots and replicas over plain
sockets, so no redis-cli is needed.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from listener.servers import ServerError, ServerProcess, free_port, redis_server


@dataclass
class RedisClusterProcs:
    """A Redis Cluster of `primaries` primaries, each with `replicas` replicas,
    on free loopback ports (the cluster bus on its own free port, `cluster-port`,
    so bus ports never collide with other servers)."""

    nodes: list[ServerProcess]
    bus_ports: list[int]
    primaries: int
    replicas: int

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def node(self, port: int) -> ServerProcess:
        return next(node for node in self.nodes if node.port == port)

    def start(self, wait: float = 30.0) -> None:
        """Start every node; on first start, join them and assign slots and replicas."""
        for node in self.nodes:
            node.start()
        if not _cluster_ok(self.nodes[0].port):
            _form_cluster(self.ports, self.bus_ports, self.primaries, self.replicas)
        give_up = time.monotonic() + wait
        while not all(_cluster_ok(port) for port in self.ports):
            if time.monotonic() > give_up:
                raise ServerError(f"the cluster on ports {self.ports} did not become ok in {wait} s")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def redis_cluster(workdir: Path, *, primaries: int = 3, replicas: int = 1) -> RedisClusterProcs:
    """Nodes with the project's redis.conf plus cluster mode; not started yet."""
    nodes, bus_ports = [], []
    for index in range(primaries * (1 + replicas)):
        port, bus_port = free_port(), free_port()
        bus_ports.append(bus_port)
        nodes.append(
            redis_server(
                workdir / f"node-{index}",
                port,
                extra=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{port}.conf",
                    "--cluster-port",
                    str(bus_port),
                    "--cluster-node-timeout",
                    "1000",
                    # a replica that was cut off for a while may still take over (tests kill primaries)
                    "--cluster-replica-validity-factor",
                    "0",
                    "--repl-diskless-sync-delay",  # replicas in sync at once, not after 5 s
                    "0",
                ],
            )
        )
    return RedisClusterProcs(nodes, bus_ports, primaries, replicas)


def _cluster_call(port: int, *args: str) -> str:
    """One command to a node, over a plain socket (RESP), reply as text."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
        sock.sendall(payload.encode())
        reply = b""
        sock.settimeout(5)
        while True:
            chunk = sock.recv(65536)
            reply += chunk
            if not chunk or _complete(reply):
                break
    text = reply.decode(errors="replace")
    if text.startswith("-"):
        raise ServerError(f"node {port}: {' '.join(args)}: {text[1:].strip()}")
    return text


def _complete(reply: bytes) -> bool:
    if reply[:1] in (b"+", b"-", b":"):
        return reply.endswith(b"\r\n")
    if reply[:1] == b"$":
        head, _, rest = reply.partition(b"\r\n")
        size = int(head[1:])
        return size < 0 or len(rest) >= size + 2
    return False


def _cluster_ok(port: int) -> bool:
    try:
        return "cluster_state:ok" in _cluster_call(port, "CLUSTER", "INFO")
    except (OSError, ServerError):
        return False


def _form_cluster(ports: list[int], bus_ports: list[int], primaries: int, replicas: int) -> None:
    slots_each = 16384 // primaries
    for index, port in enumerate(ports[:primaries]):
        first = index * slots_each
        last = 16383 if index == primaries - 1 else first + slots_each - 1
        _cluster_call(port, "CLUSTER", "ADDSLOTSRANGE", str(first), str(last))
    for port in ports[1:]:
        _cluster_call(port, "CLUSTER", "MEET", "127.0.0.1", str(ports[0]), str(bus_ports[0]))
    give_up = time.monotonic() + 20
    ids = {port: _cluster_call(port, "CLUSTER", "MYID").split("\r\n")[1] for port in ports}
    for index, port in enumerate(ports[primaries:]):
        primary = ports[index % primaries]
        while True:  # REPLICATE needs the primary known to this node first
            try:
                _cluster_call(port, "CLUSTER", "REPLICATE", ids[primary])
                break
            except ServerError:
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.1)
