"""The report as a self-contained HTML page or a Markdown summary, and `write_report()`.

Both are Jinja2 templates (templates/report.html.j2 with autoescape, templates/report.md.j2); this module
only turns the gathered data into display values. The criteria keep Prometheus' exact value strings (the
page carries each in a <data value="..."> element) next to a readable form.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from migexport.config import Config
from migexport.report.data import CriterionRow, ReportData, gather, stamp
from migexport.report.prometheus import Prometheus, ReportError
from migexport.state import write_atomic

FORMATS = {"html": ".html", "markdown": ".md"}
# The checklist's wording of each row, and how its numbers read.
METRICS = {
    "duration": "Migration duration",
    "error_rate_change": "Error rate change",
    "response_time_change": "Response time change",
    "rollback_required": "Rollback required",
    "data_integrity": "Data integrity",
}
STATUS_TEXT = {
    "succeeded": "SUCCEEDED",
    "failed": "FAILED",
    "timed_out": "TIMED OUT",
    "running": "RUNNING",
    "lost": "LOST",
}


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds:.2f} s"  # an instant ALTER is 0.03 s, not "0.0 s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _percent(value: float, signed: bool = False) -> str:
    if round(value * 100, 2) == 0:
        return "0 %"  # not "-0 %": a change too small to show has no sign
    text = f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"
    return text.rstrip("0").rstrip(".") + " %"


def criterion_text(criterion: str, value: float, role: str) -> str:
    """A criterion's target or actual value as the checklist writes it."""
    if value != value:  # NaN: what Prometheus returned, shown as such
        return "NaN"
    if criterion == "duration":
        return duration_text(value)
    if criterion == "rollback_required":
        return "Yes" if value >= 1 else "No"
    if criterion == "data_integrity":
        return _percent(value)
    return _percent(value, signed=role == "actual")


def target_text(row: CriterionRow) -> str:
    if row.target is None:
        return "—"
    text = criterion_text(row.criterion, row.target.value, "target")
    return {"duration": "< ", "error_rate_change": "< ", "response_time_change": "< "}.get(row.criterion, "") + text


@dataclass(frozen=True)
class CriterionView:
    metric: str
    target: str
    target_raw: str
    actual: str
    actual_raw: str
    result: str
    criterion: str


def criteria_view(rows: list[CriterionRow]) -> list[CriterionView]:
    return [
        CriterionView(
            metric=METRICS.get(r.criterion, r.criterion) + (f" ({r.instance})" if r.instance else ""),
            target=target_text(r),
            target_raw=r.target.text if r.target else "",
            actual=criterion_text(r.criterion, r.actual.value, "actual") if r.actual else "no data",
            actual_raw=r.actual.text if r.actual else "",
            result=r.result,
            criterion=r.criterion,
        )
        for r in rows
    ]


def slower_rows(slower: dict[str, Any] | None) -> list[dict[str, Any]]:
    """report/slower.py's slower statements, in the columns the page shows."""
    return [
        {
            "target": s.get("target", ""),
            "queryid": s.get("queryid", ""),
            "role": s.get("role", ""),
            "calls": _count(s.get("calls_since")),
            "baseline_mean": _seconds(s.get("mean_baseline_seconds")),
            "mean_now": _seconds(s.get("mean_now_seconds")),
            "ratio": f"× {s['ratio']:.1f}" if isinstance(s.get("ratio"), int | float) else "—",
            "since_reset": s.get("mean_now_source") == "since_reset",
            "query": s.get("query") or "(text not captured)",  # a cut text already ends in "…"
        }
        for s in (slower or {}).get("slower", [])
    ]


def new_rows(slower: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Statements now among the top by time that the baseline's snapshot did not have."""
    return [
        {
            "target": s.get("target", ""),
            "queryid": s.get("queryid", ""),
            "role": s.get("role", ""),
            "calls": _count(s.get("calls")),
            "mean": _seconds(s.get("mean_seconds")),
            "total": _seconds(s.get("total_exec_seconds")),
            "query": s.get("query") or "(text not read)",  # a cut text already ends in "…"
        }
        for s in (slower or {}).get("new", [])
    ]


def _count(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "—"


def _first(d: dict[str, Any], *keys: str) -> Any:
    return next((d[k] for k in keys if d.get(k) is not None), None)


def _seconds(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{value * 1000:.3g} ms" if value < 1 else f"{value:.3g} s"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("migexport.report", "templates"),
        autoescape=jinja2.select_autoescape(["html", "html.j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["stamp"] = stamp
    env.filters["clock"] = lambda ts: time.strftime("%H:%M:%S", time.gmtime(ts))
    env.filters["duration"] = duration_text
    env.filters["summary"] = lambda d: "; ".join(
        f"{k.replace('_', ' ')}: {stamp(v) if k == 'at' and isinstance(v, int | float) else v}" for k, v in d.items()
    )
    env.filters["labels"] = lambda d: ", ".join(f"{k}={v}" for k, v in d.items())
    env.filters["cell"] = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    return env


def _context(data: ReportData) -> dict[str, Any]:
    m = data.migration
    return {
        "d": data,
        "m": m,
        "status": STATUS_TEXT.get(m.status, m.status.upper()),
        "criteria": criteria_view(data.criteria),
        "slower": slower_rows(data.slower),
        "new_statements": new_rows(data.slower),
        "slower_notes": list((data.slower or {}).get("notes", [])),
        "slower_available": bool((data.slower or {}).get("available")),
        "min_ratio": (data.slower or {}).get("min_ratio"),
        "verdict": _verdict(data),
    }


def _verdict(data: ReportData) -> str:
    results = [r.result for r in data.criteria]
    if not results:
        return "no success criteria in Prometheus for this migration"
    if "FAIL" in results:
        failed = [METRICS.get(r.criterion, r.criterion) for r in data.criteria if r.result == "FAIL"]
        return "FAILED: " + ", ".join(dict.fromkeys(failed))
    return "all criteria with data PASSED" + (" (some have no data)" if "NO DATA" in results else "")


def render_html(data: ReportData) -> str:
    from migexport.report.charts import render_svg
    from migexport.report.timelines import step_for

    m, w = data.migration, data.window
    run = (m.started_at, m.ended_at)
    watch_end = m.ended_at + m.watch_window_seconds if m.ended_at is not None else w.end + 1
    baseline = (w.baseline_at, w.baseline_end) if w.baseline_at is not None and w.baseline_end is not None else None
    charts = [(c, render_svg(c, w.start, w.end, run, watch_end, baseline)) for c in data.charts]
    step = step_for(w.start, w.end)
    return _environment().get_template("report.html.j2").render(**_context(data), charts=charts, step=step)


def render_markdown(data: ReportData) -> str:
    return _environment().get_template("report.md.j2").render(**_context(data))


def default_output(config: Config, migration_id: str, fmt: str) -> Path:
    """Next to the run log: <log dir>/migexport-report-<id>.html (or .md)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", migration_id)
    return config.resolve(config.migration.log_file).parent / f"migexport-report-{safe}{FORMATS[fmt]}"


def write_report(
    config: Config,
    migration_id: str | None = None,
    output: str | Path | None = None,
    fmt: str = "html",
    prometheus_url: str | None = None,
    force: bool = False,
) -> Path:
    """Gather, render and write the report; ReportError (one line) when it cannot be written."""
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r}: one of {', '.join(FORMATS)}")
    url = prometheus_url or config.slis.prometheus_url
    if not url:
        raise ReportError("no Prometheus to ask: set slis.prometheus_url in the config or give --prometheus-url URL")
    prom = Prometheus(url)
    if output is not None and Path(output).exists() and not force:  # before asking anything
        raise ReportError(f"{output} exists; use --force to replace it")
    data = gather(config, prom, migration_id)
    path = Path(output) if output is not None else default_output(config, data.migration.migration_id, fmt)
    if path.exists() and not force:
        raise ReportError(f"{path} exists; use --force to replace it")
    text = render_html(data) if fmt == "html" else render_markdown(data)
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
