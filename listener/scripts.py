"""The Lua scripts: read from `listener/scripts/*.lua`, loaded once, called by SHA.

Every script is ``lib.lua`` followed by its own file, so the helpers (clock,
argument checks, event append, state change) are written once. A producer in
another language can load the same concatenation (`order-listener scripts
NAME` prints it, byte for byte, so its SHA1 is the daemon's) and call it with
the KEYS/ARGV documented at the top of each file.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

NAMES = (
    "create",
    "pay",
    "cancel",
    "expire",
    "deliver",
    "refund",
    "sweep",
    "lease",
    "release",
)


def source(name: str) -> str:
    """The full text of script `name` as sent to Redis."""
    folder = resources.files("listener") / "scripts"
    lib = (folder / "lib.lua").read_text()
    own = (folder / f"{name}.lua").read_text()
    return f"{lib}\n{own}"


@dataclass(frozen=True)
class Scripts:
    """The registered scripts of one Redis client."""

    create: AsyncScript
    pay: AsyncScript
    cancel: AsyncScript
    expire: AsyncScript
    deliver: AsyncScript
    refund: AsyncScript
    sweep: AsyncScript
    lease: AsyncScript
    release: AsyncScript

    @classmethod
    def register(cls, redis: Redis | RedisCluster) -> Scripts:
        loaded: dict[str, Any] = {name: redis.register_script(source(name)) for name in NAMES}
        return cls(**loaded)
