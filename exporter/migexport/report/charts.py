"""One chart as inline SVG, drawn by matplotlib (a bare Figure and its SVG canvas, never a display): the
series, the thresholds as dashed lines, the migration's run shaded between its start and end, and the end
of the watch window.

The SVG is made to sit inside the HTML page: no XML declaration or DOCTYPE, no metadata block, text as
<text> in the page's own fonts (no embedded glyphs, no font files), ids salted per chart so that two
charts on one page never share a clip-path id.
"""

from __future__ import annotations

import html
import io
import math
import re
from datetime import UTC, datetime

import matplotlib
import matplotlib.dates as mdates
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from migexport.report.timelines import Chart

STYLES = {"live": "-", "baseline": "--", "trigger": "--", "limit": ":"}
FIXED = {"baseline": "#1f77b4", "trigger": "#d62728", "limit": "#8c1c13"}
LIVE = ["#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def _when(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _value_format(unit: str) -> FuncFormatter:
    def seconds(v: float, _pos: object) -> str:
        if v == 0:
            return "0"
        if abs(v) < 1:
            return f"{v * 1000:g} ms"
        return f"{v:g} s"

    def ratio(v: float, _pos: object) -> str:
        return f"{v * 100:g} %"

    def count(v: float, _pos: object) -> str:
        return f"{v:g}"

    return FuncFormatter({"s": seconds, "ratio": ratio}.get(unit, count))


def render_svg(
    chart: Chart,
    start: float,
    end: float,
    run: tuple[float, float | None],
    watch_end: float,
    baseline: tuple[float, float] | None = None,
) -> str:
    # parse_math off: a label with "$" (a standby's application_name) is text, not TeX to fail on.
    settings = {"svg.fonttype": "none", "svg.hashsalt": chart.key, "font.size": 8, "text.parse_math": False}
    with matplotlib.rc_context(settings):
        # Fixed margins, the legend in the right-hand quarter: a layout engine would draw every chart twice more.
        # A bare Figure, not pyplot: no global figure registry, no GUI backend, nothing to close.
        fig = Figure(figsize=(7.6, 2.3))
        fig.subplots_adjust(left=0.08, right=0.7, bottom=0.2, top=0.95)
        ax = fig.add_subplot()
        _draw(ax, chart, start, end, run, watch_end)
        if baseline is not None and baseline[1] > start:
            ax.axvspan(_when(max(baseline[0], start)), _when(baseline[1]), color="#dbe9f6", alpha=0.6, label="baseline")
            _legend(ax)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    return _inline(buf.getvalue(), chart)


def _draw(ax: Axes, chart: Chart, start: float, end: float, run: tuple[float, float | None], watch_end: float) -> None:
    colours = iter(LIVE * 4)
    for line in chart.lines:
        if not line.points:
            continue
        colour = FIXED.get(line.style) or next(colours)
        xs = [_when(t) for t, _ in line.points]
        ys = [v for _, v in line.points]
        ax.plot(xs, ys, STYLES.get(line.style, "-"), color=colour, linewidth=1.2, label=line.label)
    _thresholds(ax, chart)
    started, ended = run
    ax.axvspan(
        _when(started), _when(ended if ended is not None else end), color="#fde9a9", alpha=0.6, label="migration"
    )
    ax.axvline(_when(started), color="#2e7d32", linewidth=1.2)
    if ended is not None:
        ax.axvline(_when(ended), color="#c62828", linewidth=1.2)
    if start < watch_end <= end:
        ax.axvline(_when(watch_end), color="#555555", linestyle=":", linewidth=1, label="watch window ends")
    if not any(line.points for line in chart.lines):
        ax.text(0.5, 0.5, "no data in this window", transform=ax.transAxes, ha="center", va="center", color="#777")
    ax.set_xlim(_when(start), _when(end))
    ax.set_ylim(0, _top(chart))
    if chart.unit == "count":
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(_value_format(chart.unit))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
    ax.set_xlabel("UTC")
    ax.grid(True, color="#e5e5e5", linewidth=0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    _legend(ax)


def _legend(ax: Axes) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)


def _top(chart: Chart) -> float:
    """The y range: the data and the lowest threshold (the first line that matters), with some air."""
    values = [v for line in chart.lines for _, v in line.points if math.isfinite(v)]
    lowest = min((value for value, _, _ in chart.thresholds), default=0.0)
    top = max([*values, lowest, 0.0]) * 1.15
    return top if top > 0 else {"count": 1.0, "s": 0.001, "ratio": 0.01}.get(chart.unit, 1.0)


def _thresholds(ax: Axes, chart: Chart) -> None:
    """Dashed lines; a threshold far above the data (a 10-minute rollback lag over a lag of seconds) is
    named in the legend instead of squashing the chart."""
    top = _top(chart)
    fmt = _value_format(chart.unit)
    for value, label, colour in chart.thresholds:
        if value <= top:
            ax.axhline(value, color=colour, linestyle="--", linewidth=1, label=f"{label} ({fmt(value, None)})")
        else:
            ax.plot([], [], color=colour, linestyle="--", linewidth=1, label=f"{label} ({fmt(value, None)}, above)")


_PROLOGUE = re.compile(r"^.*?(?=<svg)", re.DOTALL)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)


def _inline(svg: str, chart: Chart) -> str:
    """matplotlib's standalone SVG file -> an element for the page."""
    svg = _PROLOGUE.sub("", svg, count=1)
    svg = _METADATA.sub("", svg)
    # Sized by the page (CSS), labelled for screen readers and for tests that look for every chart.
    label = html.escape(chart.title, quote=True)
    return svg.replace("<svg ", f'<svg role="img" aria-label="{label}" data-chart="{chart.key}" ', 1)
