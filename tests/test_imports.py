"""How the modules of `listener/` import each other: no circle, a producer
API that loads nothing of MQTT, and a package that loads nothing until a name
is used (what keeps the command line quick is in test_cli_usage.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import listener

PACKAGE = Path(listener.__file__).parent
MQTT = ("aiomqtt", "paho")


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the listener modules it imports, anywhere in its text (inside
    functions too: an import deferred to run time still makes a circle)."""
    names = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name in names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    if submodule in names:  # from listener import logs
                        found.add(submodule)
                    elif node.module in names:
                        found.add(node.module)
        graph[name] = found - {name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (its modules, the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path, then "done"
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for after in sorted(graph.get(node, ())):
            if state.get(after) == "open":
                return [*path[path.index(after) :], after]
            if after not in state and (circle := visit(after)):
                return circle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_the_circle_finder_finds_a_circle() -> None:
    """The check below can fail: the finder sees the circle this package had."""
    had = {
        "listener.config": {"listener.metrics", "listener.errors"},
        "listener.metrics": {"listener.logs"},
        "listener.logs": {"listener.config"},
        "listener.errors": set(),
    }
    assert find_circle(had) == ["listener.config", "listener.metrics", "listener.logs", "listener.config"]
    assert find_circle({**had, "listener.logs": set()}) is None


def test_no_import_circle() -> None:
    graph = import_graph()
    assert {"listener.cli", "listener.api", "listener.config", "listener.urls", "listener.logs"} <= set(graph)
    assert find_circle(graph) is None, " -> ".join(find_circle(graph) or [])


def test_url_parsing_stands_alone() -> None:
    """urls.py is pure and below the settings: config.py uses it, it uses no
    module of the package, so nothing that parses an address can close a circle."""
    graph = import_graph()
    assert graph["listener.urls"] == set()
    assert "listener.urls" in graph["listener.config"]


def test_modules_import_each_other_not_the_package() -> None:
    """`from listener import OrderClient` is for users; inside the package it
    would run the package's lazy loading in the middle of an import."""
    names = module_names()
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == "listener":
                for alias in node.names:
                    assert f"listener.{alias.name}" in names, (name, alias.name)


def loaded_after(code: str) -> set[str]:
    """The top-level names of the modules loaded by `code` in a fresh interpreter."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {name.split(".")[0] for name in json.loads(done.stdout.splitlines()[-1])}


def test_the_producer_api_loads_nothing_of_mqtt() -> None:
    loaded = loaded_after("import listener.api\nfrom listener import OrderClient, Settings, load_settings")
    assert "redis" in loaded  # the check sees what is loaded
    unwanted = loaded & {*MQTT, "structlog", "rich", "prometheus_client"}
    assert not unwanted, unwanted


def test_the_daemon_does_load_mqtt() -> None:
    """The same check on a module that needs MQTT: it can fail."""
    assert set(MQTT) <= loaded_after("import listener.daemon")


def test_the_package_loads_its_names_on_first_use() -> None:
    assert not loaded_after("import listener") & {"redis", "pydantic", "structlog", *MQTT}
    for name in listener.__all__:
        assert getattr(listener, name) is not None, name
    assert sorted(listener.__all__) == sorted(listener._HOME)
    assert set(listener.__all__) <= set(dir(listener))
    assert listener.OrderClient.__module__ == "listener.api"
    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = listener.NoSuchThing


def test_every_module_of_a_subpackage_imports_first() -> None:
    """Each module of a subpackage imported first in a fresh interpreter. The
    graph above sees modules only; a subpackage's `__init__` also runs when
    one of its modules is imported, and one that loads a module importing
    back into the package fails halfway (listener.fastpath.paho_io, imported
    first, once did: listener.mqtt's `__init__` loaded `client`, which imports
    it). The package `listener` itself loads nothing (the test above)."""

    def imports_first(name: str) -> str:
        command = [sys.executable, "-c", f"import {name}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        return "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]

    with ThreadPoolExecutor(max_workers=4) as pool:  # a few interpreters at a time, not all at once
        names = sorted(name for name in module_names() if name.count(".") >= 2)
        assert "listener.fastpath.paho_io" in names
        said = dict(zip(names, pool.map(imports_first, names), strict=True))
    assert not {name: why for name, why in said.items() if why}
