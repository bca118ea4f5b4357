"""A producer in another language, with nothing of the Python package: the
Node.js example (examples/node-producer) creates, pays and cancels orders
through the documented key layout and scripts against a running daemon, and
validates every event it receives with Ajv in strict mode against the shipped
schema. The records it leaves are then read back through the Python API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from listener.api import OrderClient
from listener.config import Settings
from listener.daemon import Daemon
from tests.conftest import CliResult

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node-producer"
SCHEMA = Path(__file__).resolve().parent.parent / "listener" / "schemas" / "status-event.schema.json"
STAMP = EXAMPLE / "node_modules" / ".lock-sha256"  # the lock `npm ci` last installed
# What the example does to each order (its "plan"), and the status and reason that must follow.
FINAL = {"pay": ("paid", "paid"), "cancel": ("cancelled", "customer"), "timeout": ("cancelled", "timeout")}


@pytest.fixture(scope="module")
def node() -> str:
    """node, with the example's dependencies installed from its lock (again only
    when the lock changed)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node and npm are needed for the Node.js producer (apt-get install -y nodejs npm)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # .ci/run installs them: missing there is a failure, not a skip
        pytest.skip(reason)
    lock = hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text() != lock:
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
        STAMP.write_text(lock)
    return node


Producer = Callable[..., Awaitable[tuple[int, dict[str, Any], str]]]


@pytest.fixture
async def producer(
    node: str,
    settings: Settings,
    start_daemon: Callable[..., Awaitable[Daemon]],
    cli: Callable[..., Awaitable[CliResult]],
    tmp_path: Path,
) -> Producer:
    """A running daemon, and a runner of the example against it that hands it
    the scripts exactly as `order-listener scripts NAME` prints them. The runner
    returns the example's exit code, its summary and its stderr."""
    await start_daemon()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("create", "pay", "cancel"):
        printed = await cli("scripts", name)
        assert printed.code == 0, printed.err
        (scripts / f"{name}.lua").write_text(printed.out)

    async def run(*args: str) -> tuple[int, dict[str, Any], str]:
        proc = await asyncio.create_subprocess_exec(
            node,
            str(EXAMPLE / "producer.mjs"),
            "--redis",
            settings.redis_url,
            "--mqtt",
            settings.mqtt_url,
            "--scripts",
            str(scripts),
            "--retention",
            str(settings.retention_ms),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode is not None
        try:
            summary = json.loads(out)
        except json.JSONDecodeError:
            pytest.fail(f"no JSON summary (exit {proc.returncode}):\n{out.decode()}\n{err.decode()}")
        return proc.returncode, summary, err.decode()

    return run


async def test_node_producer_against_a_running_daemon(producer: Producer, settings: Settings) -> None:
    code, summary, err = await producer("--orders", "12", "--timeout", "1000")

    # (the refusal of an invalid id is checked last, below)
    assert [f for f in summary["failures"] if not f.startswith("create accepted")] == [], summary
    assert summary["orders"] == {
        "created": 12,
        "paid": 4,
        "cancelled_by_customer": 4,
        "cancelled_by_timeout": 4,
    }, summary
    assert summary["events"] == {"received": 24, "invalid": 0, "all_valid": True}, summary
    assert summary["versions_in_order"] is True
    assert len(summary["per_order"]) == 12
    for order_id, seen in summary["per_order"].items():
        assert seen["statuses"] == ["created", FINAL[seen["plan"]][0]], (order_id, seen)
        assert seen["versions"] == [1, 2], (order_id, seen)

    # What the Python side reads from the records the Node.js producer left.
    async with OrderClient(settings) as client:
        for order_id, seen in summary["per_order"].items():
            order = await client.get(order_id)
            assert (order.status.value, order.reason.value, order.version) == (*FINAL[seen["plan"]], 2)

    # The script itself refuses an id the product could not announce.
    bad = summary["invalid_id"]
    assert bad["refused"] is True, f"create.lua accepted the invalid id {bad['id']!r}: {summary['failures']}"
    assert bad["error"], bad
    assert code == 0 and summary["ok"] is True, (summary, err)


async def test_node_producer_fails_on_an_event_its_schema_refuses(producer: Producer, tmp_path: Path) -> None:
    """The validation can fail: with a schema that allows no timeout, the
    timed-out order's cancellation is reported invalid and the example exits 1."""
    schema = json.loads(SCHEMA.read_text())
    schema["properties"]["reason"]["enum"].remove("timeout")
    stricter = tmp_path / "no-timeout.schema.json"
    stricter.write_text(json.dumps(schema))
    code, summary, _ = await producer("--orders", "3", "--timeout", "500", "--schema", str(stricter))
    assert code == 1 and summary["ok"] is False
    assert summary["events"]["invalid"] == 1 and summary["events"]["all_valid"] is False
    assert any("invalid event" in f and '"reason":"timeout"' in f for f in summary["failures"]), summary
