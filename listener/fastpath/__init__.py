"""Fast paths: where the daemon uses another library's private parts for
speed, each decided once per daemon, logged, exported as a metric, and able
to fall back to the library's public way.

Private names can vanish, or worse keep their names and change what they
mean, in any release. So a fast path lives in a module of its own in this
package and declares a `Spec`:

* ``name``: what the log line and the metric call it;
* ``tested``: each distribution it relies on and the minor version it was
  tested with (``{"redis": "8.1"}`` means 8.1.x). pyproject.toml pins the
  same minor versions; a test checks that both say the same;
* ``check``: looks up every private name the path touches (with `require`),
  nothing it does not touch, and may probe the library's behaviour. It raises
  `Unfit` (or anything else) when the path cannot run.

A daemon makes one `FastPaths` registry from its settings
(``ORDER_LISTENER_FAST_PATHS``: ``auto``, or ``off`` to force every fallback;
only listener/config.py reads the environment) and each part asks it to
`decide(spec)` before it takes the fast path. The decision, in this order:

1. forced off: fallback;
2. a distribution missing, or installed at a minor version other than the
   tested one: fallback (an untested version is not risked);
3. ``check`` raises: fallback, with what it said;
4. otherwise: fast.

Each decision is made once per registry and logged once, as ``fast path``
with ``path``, ``mode`` (``fast`` or ``fallback``) and ``why``; the daemon
exports it as ``order_listener_fast_path{path, mode}`` (1 for the mode that
runs, 0 for the other).

A failure inside a fast path while it runs must not reach the code around it
(where it would look like a broken connection and start a reconnect loop):
the path catches it, calls `fall_back(name, why)` and goes on the public way.
The path stays off for the rest of the daemon's life; the fall back is logged
once (an error) and the metric follows.

Adding a fast path, e.g. paho's publish path::

    # listener/fastpath/paho_publish.py
    def _check() -> None:
        require(mqtt_client.Client, ("_sock", "_out_packet", ...), "paho.mqtt.client.Client")

    SPEC = Spec("paho-publish", {"paho-mqtt": "2.2", "aiomqtt": "2.5"}, _check)

    # where the client is made, with the daemon's registry:
    if fast_paths.decide(SPEC).fast:
        ...  # the fast way
    # inside the fast code, on a failure it does not expect:
    fast_paths.fall_back(SPEC.name, f"{type(exc).__name__}: {exc}")
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from listener import logs

log = logs.get("listener.fastpath")

Mode = Literal["fast", "fallback"]
MODES: tuple[Mode, ...] = ("fast", "fallback")
FORCED_OFF = "forced off (ORDER_LISTENER_FAST_PATHS=off)"


class Unfit(Exception):
    """A fast path cannot run here: a private name is missing, or a probe of
    the library's behaviour did not give what the path relies on."""


@dataclass(frozen=True)
class FastPath:
    """Which way a fast path runs, and why."""

    name: str
    mode: Mode
    why: str

    @property
    def fast(self) -> bool:
        return self.mode == "fast"


@dataclass(frozen=True)
class Spec:
    """A fast path's declaration: see the module's docstring."""

    name: str
    tested: Mapping[str, str]  # distribution -> the minor version tested, "8.1" for 8.1.x
    check: Callable[[], None]


def require(owner: object, names: Iterable[str], label: str) -> None:
    """Raise `Unfit` naming each of `names` that `owner` (a module, a class,
    an object) does not have; `label` is how the message calls `owner`."""
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        raise Unfit("missing " + ", ".join(f"{label}.{name}" for name in missing))


def installed_versions(tested: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(what is installed as tested, e.g. "redis 8.1.0"; what is not, e.g.
    "redis 8.2.0 not tested (tested 8.1.x)" or "hiredis not installed")."""
    good: list[str] = []
    bad: list[str] = []
    for distribution, minor in tested.items():
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            bad.append(f"{distribution} not installed")
            continue
        if version.split(".")[:2] == minor.split("."):
            good.append(f"{distribution} {version}")
        else:
            bad.append(f"{distribution} {version} not tested (tested {minor}.x)")
    return good, bad


class FastPaths:
    """One daemon's fast paths: each decided once, then read by its code,
    the log and the metrics."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # False: every path falls back (ORDER_LISTENER_FAST_PATHS=off)
        self._paths: dict[str, FastPath] = {}

    def decide(self, spec: Spec) -> FastPath:
        """The way `spec`'s path runs in this daemon (decided and logged on the
        first call, the same record after)."""
        known = self._paths.get(spec.name)
        if known is not None:
            return known
        path = self._judge(spec)
        self._paths[spec.name] = path
        if path.fast or path.why == FORCED_OFF:
            log.info("fast path", path=path.name, mode=path.mode, why=path.why)
        else:
            log.warning("fast path", path=path.name, mode=path.mode, why=path.why)
        return path

    def _judge(self, spec: Spec) -> FastPath:
        if not self.enabled:
            return FastPath(spec.name, "fallback", FORCED_OFF)
        good, bad = installed_versions(spec.tested)
        if bad:
            return FastPath(spec.name, "fallback", "; ".join(bad))
        try:
            spec.check()
        except Unfit as exc:
            return FastPath(spec.name, "fallback", str(exc))
        except Exception as exc:  # whatever an untried library does to a probe: not this path's day
            return FastPath(spec.name, "fallback", f"check failed: {type(exc).__name__}: {exc}")
        return FastPath(spec.name, "fast", ", ".join(good) + " as tested; private names checked")

    def fall_back(self, name: str, why: str) -> FastPath:
        """Turn a path off for good after it failed at run time (logged once)."""
        known = self._paths.get(name)
        if known is not None and not known.fast:
            return known
        path = FastPath(name, "fallback", why)
        self._paths[name] = path
        log.error("fast path failed: falling back for good", path=name, mode=path.mode, why=why)
        return path

    def get(self, name: str) -> FastPath | None:
        return self._paths.get(name)

    def __iter__(self) -> Iterator[FastPath]:
        return iter(list(self._paths.values()))
