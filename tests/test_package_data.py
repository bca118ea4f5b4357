"""The project's redis.conf reaches an installed package: `listener/redis.conf`
is a symlink to the top-level file (one copy in the repository), and a wheel
built from the repository carries its content, which the server launcher of
a non-editable install finds."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import listener
from listener.servers import redis_conf, redis_server

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ROOT / "redis.conf"


def test_the_package_reads_the_top_level_redis_conf(tmp_path: Path) -> None:
    packaged = Path(listener.__file__).parent / "redis.conf"
    assert packaged.is_symlink(), "listener/redis.conf must stay a link to the top-level redis.conf"
    assert packaged.resolve() == TOP_LEVEL.resolve()
    assert redis_conf().read_bytes() == TOP_LEVEL.read_bytes()
    server = redis_server(tmp_path)
    assert server.argv[1] == str(redis_conf())


def source_tree(into: Path) -> Path:
    """What a build reads from the repository, copied (links kept as links):
    a build in the checkout would leave build/ there, and its egg-info could
    add files that the configuration does not."""
    into.mkdir()
    for name in ("pyproject.toml", "README.md", "redis.conf"):
        shutil.copy2(ROOT / name, into / name)
    shutil.copytree(
        ROOT / "listener", into / "listener", symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    return into


@pytest.mark.slow
def test_a_non_editable_install_finds_redis_conf(tmp_path: Path) -> None:
    source, wheels, venv = source_tree(tmp_path / "source"), tmp_path / "wheels", tmp_path / "venv"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("listener/redis.conf") == TOP_LEVEL.read_bytes()

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    # the installed copy, run from outside the repository (listener.servers needs
    # nothing but the standard library)
    found = subprocess.run(
        [
            str(python),
            "-c",
            "import listener, listener.servers as s; print(listener.__file__, s.redis_conf())",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert found.returncode == 0, found.stderr
    package_file, conf = found.stdout.split()
    assert Path(package_file).is_relative_to(venv), package_file
    assert Path(conf).is_relative_to(venv) and not Path(conf).is_symlink(), conf
    assert Path(conf).read_bytes() == TOP_LEVEL.read_bytes()
