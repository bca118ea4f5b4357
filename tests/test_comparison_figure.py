"""bench/comparison_figure.py: the figure bench/alternatives.py draws of its
results (docs/comparison.svg), drawn here from a fixed results file."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    # The same file by the name mypy knows it: mypy checks bench/ as the scripts see it, with
    # bench/ on the search path (pyproject.toml, [tool.mypy] mypy_path), and one file may have
    # only one module name. pytest imports it from the repository root, as below.
    from comparison_figure import axis_range, lag_text, redraw, write_figure
else:
    from bench.comparison_figure import axis_range, lag_text, redraw, write_figure

SVG = "{http://www.w3.org/2000/svg}"


def row(
    contender: str, pending: int, rate: float, p50: float | None, p99: float | None, **more: object
) -> dict[str, object]:
    return {
        "contender": contender,
        "broker": "",
        "pending": pending,
        "rate": rate,
        "handled": 300,
        "missing": 0,
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": p99,
        "skipped": "",
        **more,
    }


RESULTS = {
    "measured_at": "2026-12-03 10:00 UTC",
    "machine": "2 x AMD EPYC, Linux 6.18",
    "command": ".venv/bin/python bench/alternatives.py --broker stock tuned",
    "results": [
        row("ours", 0, 100, 2.8, 4.9, broker="stock"),
        row("ours", 0, 100, 2.1, 3.7, broker="tuned"),
        row("expired", 0, 100, 44.2, 183.0),
        row("poll-1s", 0, 100, 503.8, 993.8),
        row("bullmq", 0, 100, None, None, skipped="node is not installed"),
        row("ours", 100_000, 2000, 4.4, 20.9, broker="stock"),
        row("expired", 100_000, 2000, 5952.5, 12267.1, handled=723, missing=5277),
        row("arq", 100_000, 2000, None, None, handled=0, missing=6000),
    ],
}


def draw_from_file(tmp_path: Path) -> ET.Element:
    """Results written as the benchmark writes them, then the figure drawn again from the file alone."""
    json_path, svg_path = tmp_path / "comparison.json", tmp_path / "comparison.svg"
    write_figure(RESULTS, json_path, svg_path)
    assert json.loads(json_path.read_text()) == RESULTS
    first = svg_path.read_text()
    redraw(json_path, svg_path)
    assert svg_path.read_text() == first  # the same results, the same bytes
    return ET.fromstring(first)


def texts(root: ET.Element) -> list[str]:
    return [element.text or "" for element in root.iter(f"{SVG}text")]


def bars(root: ET.Element) -> dict[str, float]:
    """A bar's tooltip (contender, scenario, value) -> its width."""
    return {
        title.text or "": float(rect.attrib["width"])
        for rect in root.iter(f"{SVG}rect")
        if (title := rect.find(f"{SVG}title")) is not None
    }


def test_the_figure_shows_each_contender_and_value_per_scenario(tmp_path: Path) -> None:
    root = draw_from_file(tmp_path)
    shown = texts(root)
    assert shown.count("pending 0, 100 items/s falling due") == 1
    assert shown.count("pending 100,000, 2000 items/s falling due") == 1
    for name in ("ours (stock broker)", "ours (tuned broker)", "expired", "poll-1s", "bullmq", "arq"):
        assert name in shown, name
    assert shown.count("ours (stock broker)") == 2  # in both scenarios; tuned in the first only
    for value in ("p50 2.8 ms", "p99 4.9 ms", "p50 2.1 ms", "p99 3.7 ms", "p50 44.2 ms", "p99 183 ms"):
        assert value in shown, value
    assert "p50 504 ms" in shown and "p99 994 ms" in shown
    assert "p50 5.95 s" in shown and "p99 12.3 s, 5,277 missing" in shown
    assert "skipped: node is not installed" in shown
    assert "nothing handled, 6,000 missing" in shown
    assert RESULTS["command"] in shown and any("2026-12-03" in text for text in shown)


def test_bars_are_on_a_log_scale(tmp_path: Path) -> None:
    width = bars(draw_from_file(tmp_path))
    assert len(width) == 2 * 6  # two bars for each contender measured; none for skipped or nothing handled
    ours = width["ours (stock broker), pending 0, 100 items/s falling due: p99 4.9 ms"]
    expired = width["expired, pending 0, 100 items/s falling due: p99 183 ms"]
    poll = width["poll-1s, pending 0, 100 items/s falling due: p99 994 ms"]
    # equal ratios, equal distances: 4.9 -> 183 ms spans log10(183/4.9) decades, 183 -> 994 ms log10(994/183)
    assert (expired - ours) / (poll - expired) == pytest.approx(
        math.log10(183.0 / 4.9) / math.log10(993.8 / 183.0), rel=1e-3
    )
    # one axis for the whole figure: the same value is as long in either scenario
    later = width["ours (stock broker), pending 100,000, 2000 items/s falling due: p99 20.9 ms"]
    assert ours < later < expired


def test_the_axis_spans_whole_decades_around_every_value() -> None:
    assert axis_range(RESULTS["results"]) == (1.0, 100_000.0)  # type: ignore[arg-type]
    assert axis_range([row("ours", 0, 1, 0.0, 0.05)]) == (0.1, 1.0)  # on-time lags start at the floor
    assert axis_range([row("x", 0, 1, None, None, skipped="no")]) == (1.0, 10.0)
    assert [lag_text(v) for v in (0.05, 2.8, 183.0, 993.8, 1000.0, 12267.1)] == [
        "0.05 ms",
        "2.8 ms",
        "183 ms",
        "994 ms",
        "1 s",
        "12.3 s",
    ]
