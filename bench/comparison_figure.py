"""The comparison figure: lag p50 and p99 of ours and of the alternatives, as SVG.

bench/alternatives.py writes its results as JSON and calls `write_figure` at
the end of every run, so docs/comparison.svg is always the latest measurement.
To draw again from a results file without measuring (after changing this
drawing, say):

    .venv/bin/python bench/comparison_figure.py docs/comparison.json docs/comparison.svg

Hand-written SVG, not a plotting library: the figure is one kind of chart
(horizontal bars on a log axis), and writing it here keeps the output
byte-for-byte the same for the same results (a readable diff in review), its
text as text (searchable, and checked by tests/test_comparison_figure.py), and
the bench extra free of a plotting stack (numpy, pillow, fonts) for one picture.
Standard library only, so a test can import it without the benchmarks' set-up.

The results file: {"measured_at", "machine", "command", "results": [{"contender",
"broker" ("" but for ours), "pending", "rate", "handled", "missing", "p50_ms",
"p99_ms", "max_ms" (null when nothing was measured), "skipped" (why, or "")}, ...]}.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

WIDTH = 860
LABEL_X = 16  # contender names
PLOT_LEFT = 200  # where the axis starts (its lowest decade)
PLOT_RIGHT = 660  # its highest decade; value texts go to the right of the bars
BAR = 11  # height of one bar; a contender has two (p50 above p99)
ROW = 2 * BAR + 8
SECTION_HEAD = 26
COMMAND_COLUMNS = 120  # of 11 px monospace: what the width holds
FLOOR_MS = 0.1  # lags at or below this (a handler that ran on time) are drawn at the axis start

OURS = {"p50": "#9ecae1", "p99": "#2171b5"}
PEERS = {"p50": "#d9d9d9", "p99": "#737373"}


def label(result: Mapping[str, Any]) -> str:
    """`ours (stock broker)`, `ours (tuned broker)`, or the contender's name."""
    broker = result.get("broker") or ""
    return f"{result['contender']} ({broker} broker)" if broker else str(result["contender"])


def scenario(result: Mapping[str, Any]) -> str:
    return f"pending {int(result['pending']):,}, {float(result['rate']):g} items/s falling due"


def lag_text(ms: float) -> str:
    """Three significant digits, in ms below a second and in s above."""
    return f"{ms / 1000:.3g} s" if ms >= 1000 else f"{ms:.3g} ms"


def _value(result: Mapping[str, Any], name: str) -> float | None:
    value = result.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


def axis_range(results: Sequence[Mapping[str, Any]]) -> tuple[float, float]:
    """Whole decades around every value drawn (at least one decade)."""
    values = [
        v
        for r in results
        if not r.get("skipped")
        for v in (_value(r, "p50_ms"), _value(r, "p99_ms"))
        if v is not None
    ]
    if not values:
        return 1.0, 10.0
    low = 10 ** math.floor(math.log10(max(FLOOR_MS, min(values))))
    high = 10 ** math.ceil(math.log10(max(FLOOR_MS, max(values))))
    return low, high if high > low else low * 10


class _Scale:
    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = math.log10(low), math.log10(high)

    def x(self, ms: float) -> float:
        at = (math.log10(max(ms, 10**self.low)) - self.low) / (self.high - self.low)
        return PLOT_LEFT + at * (PLOT_RIGHT - PLOT_LEFT)

    def decades(self) -> list[float]:
        return [10.0**k for k in range(round(self.low), round(self.high) + 1)]


def _text(x: float, y: float, text: str, **attrs: str) -> str:
    extra = "".join(f' {name.replace("_", "-")}="{value}"' for name, value in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(text)}</text>'


def _bar(y: float, scale: _Scale, ms: float, colour: str, title: str) -> str:
    width = max(1.0, scale.x(ms) - PLOT_LEFT)
    return (
        f'<rect x="{PLOT_LEFT}" y="{y:.1f}" width="{width:.2f}" height="{BAR}" fill="{colour}">'
        f"<title>{escape(title)}</title></rect>"
    )


def _contender_rows(result: Mapping[str, Any], y: float, scale: _Scale) -> list[str]:
    name = label(result)
    parts = [
        _text(LABEL_X, y + BAR + 4, name, font_weight="bold" if result["contender"] == "ours" else "normal")
    ]
    if result.get("skipped"):
        return [*parts, _text(PLOT_LEFT + 4, y + BAR + 4, f"skipped: {str(result['skipped'])[:80]}")]
    colours = OURS if result["contender"] == "ours" else PEERS
    missing = int(result.get("missing") or 0)
    lost = f", {missing:,} missing" if missing else ""
    values = {which: _value(result, f"{which}_ms") for which in ("p50", "p99")}
    if values["p99"] is None:
        return [*parts, _text(PLOT_LEFT + 4, y + BAR + 4, f"nothing handled{lost}")]
    for row, (which, ms) in enumerate(values.items()):
        top = y + row * BAR
        if ms is None:
            continue
        shown = f"{which} {lag_text(ms)}" + (lost if which == "p99" else "")
        parts.append(_bar(top, scale, ms, colours[which], f"{name}, {scenario(result)}: {shown}"))
        parts.append(_text(scale.x(ms) + 4, top + BAR - 1, shown, font_size="10"))
    return parts


def _scenarios(results: Sequence[Mapping[str, Any]]) -> dict[tuple[int, float], list[Mapping[str, Any]]]:
    grouped: dict[tuple[int, float], list[Mapping[str, Any]]] = {}
    for result in results:
        grouped.setdefault((int(result["pending"]), float(result["rate"])), []).append(result)
    return grouped


def _axis(y: float, scale: _Scale, bottom: float) -> list[str]:
    """Decade lines from `y` to `bottom`, labelled above."""
    parts = []
    for decade in scale.decades():
        x = scale.x(decade)
        parts.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x:.1f}" y2="{bottom:.1f}" stroke="#e0e0e0"/>')
        parts.append(_text(x, y - 4, lag_text(decade), text_anchor="middle", font_size="10", fill="#555"))
    return parts


def _legend(y: float) -> list[str]:
    parts = []
    x = float(LABEL_X)
    for who, colours in (("ours", OURS), ("the others", PEERS)):
        for which in ("p50", "p99"):
            parts.append(
                f'<rect x="{x:.1f}" y="{y - BAR:.1f}" width="14" height="{BAR}" fill="{colours[which]}"/>'
            )
            parts.append(_text(x + 18, y, f"{who} {which}", font_size="11"))
            x += 120
    return parts


def draw(data: Mapping[str, Any]) -> str:
    """The SVG text of the figure for a results file's content."""
    results: list[Mapping[str, Any]] = list(data["results"])
    scale = _Scale(*axis_range(results))
    grouped = _scenarios(results)
    head = [
        _text(
            LABEL_X,
            24,
            "Lag from deadline to handling: p50 and p99, log scale",
            font_size="15",
            font_weight="bold",
        ),
        _text(
            LABEL_X,
            42,
            "ours: to the cancelled event received over MQTT (its broker named); "
            "the others: to their handler running",
            font_size="11",
        ),
        _text(
            LABEL_X,
            58,
            f"{data.get('measured_at', '?')}, {data.get('machine', '?')}",
            font_size="11",
            fill="#555",
        ),
    ]
    command = textwrap.wrap(str(data.get("command", "")), COMMAND_COLUMNS, break_on_hyphens=False) or [""]
    for line, text in enumerate(command):
        head.append(
            _text(LABEL_X, 74 + 14 * line, text, font_size="11", fill="#555", font_family="monospace")
        )
    y = 74 + 14 * len(command)
    head += _legend(y + 10)
    body: list[str] = []
    y += 44
    for rows in grouped.values():
        body.append(_text(LABEL_X, y, scenario(rows[0]), font_size="13", font_weight="bold"))
        top = y + 8
        bottom = top + 14 + ROW * len(rows)
        body += _axis(top + 14, scale, bottom)
        y = top + 18
        for result in rows:
            body += _contender_rows(result, y, scale)
            y += ROW
        y += SECTION_HEAD
    height = round(y)
    return "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
            f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
            *head,
            *body,
            "</svg>",
            "",
        ]
    )


def write_figure(data: Mapping[str, Any], json_path: Path, svg_path: Path) -> None:
    """The results as JSON and the figure drawn from them, side by side."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    svg_path.write_text(draw(data))


def redraw(json_path: Path, svg_path: Path) -> None:
    svg_path.write_text(draw(json.loads(json_path.read_text())))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} RESULTS.json FIGURE.svg")
    redraw(Path(sys.argv[1]), Path(sys.argv[2]))
