"""The report's charts: the series of the Migration dashboard's panels (dashboards.py), over the report's
window, with the thresholds the alerts use drawn as lines.

The live series use the recording rules of `migexport rules` by the names promql.series_names() gives
(they carry the rate window, e.g. migexport:statement_latency_seconds:rate5m), as the dashboard does.
Baselines are merged over migration_id: the baseline file is the same whichever migration was watched,
so its line spans the whole window (the baseline's own sampling included).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from migexport.config import Thresholds
from migexport.promql import error_ratio_trigger, fmt, latency_trigger, probe_latency_trigger, series_names
from migexport.report.prometheus import Prometheus, Series, quote

if TYPE_CHECKING:
    from migexport.report.data import Migration

# About this many points per line: enough for a printed page, small enough for a small page.
POINTS = 480


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str  # "{target} → {standby}": label names in braces
    style: str = "live"  # live, baseline, trigger, limit


@dataclass(frozen=True)
class Line:
    label: str
    style: str
    points: list[tuple[float, float]]


@dataclass
class Chart:
    key: str
    title: str
    unit: str  # "s", "ratio", "count"
    description: str
    lines: list[Line] = field(default_factory=list)
    thresholds: list[tuple[float, str, str]] = field(default_factory=list)  # (value, label, colour)


def _no_id(metric: str, by: str = "target") -> str:
    """A baseline gauge merged over the migration ids it was exported under."""
    return f"max by (job, instance, {by}) ({metric})"


def chart_specs(t: Thresholds, migration_id_selector: str) -> list[tuple[Chart, list[Query]]]:
    """The charts in page order, each with the queries of its lines."""
    return _lock_and_lag_charts(t, migration_id_selector) + _baseline_charts(t) + _probe_and_connection_charts(t)


def _lock_and_lag_charts(t: Thresholds, m: str) -> list[tuple[Chart, list[Query]]]:
    return [
        (
            Chart(
                "lock_sessions",
                "Sessions waiting for locks",
                "count",
                "Sessions waiting for a heavyweight lock, the roots of lock queues, and the sessions blocked by "
                "the migration's session.",
            ),
            [
                Query("migexport_lock_waiting_sessions", "{target} waiting"),
                Query("migexport_lock_blocking_root_sessions", "{target} root blockers"),
                Query(f"migexport_migration_blocked_sessions{{{m}}}", "{target} blocked by the migration"),
            ],
        ),
        (
            Chart(
                "lock_wait",
                "Longest lock wait",
                "s",
                f"The longest current lock wait; dashed: lock_wait ({fmt(t.lock_wait_seconds)} s), where "
                "MigrationLockWaitHigh fires.",
                thresholds=[(t.lock_wait_seconds, "lock_wait", "red")],
            ),
            [Query("migexport_lock_wait_max_seconds", "{target}")],
        ),
        (
            Chart(
                "replication_lag",
                "Replication lag per standby",
                "s",
                "Seen from the primary (replay_lag) and from each standby (age of the last replayed transaction). "
                f"Dashed: replication_lag_watch ({fmt(t.replication_lag_watch_seconds)} s) and "
                f"replication_lag_rollback ({fmt(t.replication_lag_rollback_seconds)} s).",
                thresholds=[
                    (t.replication_lag_watch_seconds, "watch", "orange"),
                    (t.replication_lag_rollback_seconds, "rollback", "red"),
                ],
            ),
            [
                Query("migexport_replication_lag_seconds", "{target} → {standby}"),
                Query("migexport_standby_replay_lag_seconds", "{target} (standby)"),
            ],
        ),
    ]


def _baseline_charts(t: Thresholds) -> list[tuple[Chart, list[Query]]]:
    """The signals the relative alerts compare with the baseline, with the baseline and the trigger line."""
    n = series_names(t)
    base_err = _no_id("migexport_baseline_error_ratio")
    base_lat = _no_id("migexport_baseline_statement_latency_seconds")
    return [
        (
            Chart(
                "error_ratio",
                "Error ratio vs baseline",
                "ratio",
                f"Rolled-back share of transactions ({n.error_ratio}), the baseline, and the trigger line: "
                f"baseline × {fmt(t.error_rate_increase_ratio)}, at least {fmt(t.error_ratio_floor)}.",
            ),
            [
                Query(n.error_ratio, "{target}"),
                Query(base_err, "{target} baseline", "baseline"),
                Query(error_ratio_trigger(base_err, t), "{target} trigger", "trigger"),
            ],
        ),
        (
            Chart(
                "statement_latency",
                "Statement latency vs baseline",
                "s",
                f"Mean latency of the application's statements ({n.latency}), the baseline, and the trigger "
                f"line: the baseline (at least {fmt(t.latency_floor_seconds)} s) × "
                f"{fmt(t.latency_degradation_ratio)}.",
            ),
            [
                Query(n.latency, "{target}"),
                Query(base_lat, "{target} baseline", "baseline"),
                Query(latency_trigger(base_lat, t), "{target} trigger", "trigger"),
            ],
        ),
    ]


def _probe_and_connection_charts(t: Thresholds) -> list[tuple[Chart, list[Query]]]:
    base_p95 = _no_id('migexport_baseline_probe_latency_seconds{quantile="0.95"}', "target, probe")
    base_conn = _no_id("migexport_baseline_connections")
    n = series_names(t)
    return [
        (
            Chart(
                "probe_p95",
                "Key-query probes: p95",
                "s",
                f"p95 of each probe's successful runs ({n.probe_p95}), its baseline, and the trigger line: the "
                f"baseline (at least {fmt(t.probe_latency_floor_seconds)} s) × {fmt(t.latency_degradation_ratio)}.",
            ),
            [
                Query(n.probe_p95, "{target} {probe} p95"),
                Query(base_p95, "{target} {probe} baseline", "baseline"),
                Query(probe_latency_trigger(base_p95, t), "{target} {probe} trigger", "trigger"),
            ],
        ),
        (
            Chart(
                "connections",
                "Connections vs baseline",
                "count",
                "Client connections (all states), the baseline, and "
                f"connections_utilisation_max {fmt(t.connections_utilisation_max)} of max_connections.",
            ),
            [
                Query("migexport:connections:sum", "{target}"),
                Query(base_conn, "{target} baseline", "baseline"),
                Query(f"migexport_connections_max * {fmt(t.connections_utilisation_max)}", "{target} limit", "limit"),
            ],
        ),
    ]


def _legend(template: str, labels: dict[str, str]) -> str:
    return template.format_map(defaultdict(str, labels)).strip()


def step_for(start: float, end: float) -> float:
    return max(1.0, float(round((end - start) / POINTS)))


def timelines(prom: Prometheus, t: Thresholds, migration: Migration, start: float, end: float) -> list[Chart]:
    step = step_for(start, end)
    charts = []
    for chart, queries in chart_specs(t, f"migration_id={quote(migration.migration_id)}"):
        for q in queries:
            found: list[Series] = prom.query_range(q.expr, start, end, step)
            for s in sorted(found, key=lambda s: sorted(s.labels.items())):
                chart.lines.append(Line(_legend(q.legend, s.labels), q.style, s.points))
        charts.append(chart)
    return charts
