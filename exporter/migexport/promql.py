"""PromQL building blocks shared by the rules, the dashboards and the report: joins, arming, numbers,
durations, the names of the recording rules (which carry the configured rate window), and the trigger
lines the relative alerts compare a live value with, spelt once so that a line drawn on a dashboard or a
report is where the alert fires."""

from __future__ import annotations

from dataclasses import dataclass

from migexport.config import Thresholds

JOIN = "job, instance"
WATCHING = "migexport_migration_watch_active == 1"


def armed(expr: str) -> str:
    """Arm a per-target condition with the watch window, taking the migration_id from it."""
    return f"(\n  {expr}\n) * on({JOIN}) group_left(migration_id) ({WATCHING})"


def armed_same_migration(expr: str) -> str:
    """Arm a condition whose series already carry migration_id."""
    return f"(\n  {expr}\n) and on({JOIN}, migration_id) ({WATCHING})"


def fmt(value: float) -> str:
    """A number as PromQL and YAML both read it, without float noise."""
    return f"{value:g}"


def duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True)
class Series:
    """Names of the recording rules, which carry the rate window they are taken over (`rate5m`)."""

    window: str

    def __getattr__(self, name: str) -> str:
        names = {
            "xact_rate": "migexport:xact_rate:rate",
            "xacts": "migexport:xacts:increase",
            "rollbacks": "migexport:xact_rollbacks:increase",
            "error_ratio": "migexport:error_ratio:rate",
            "error_pooled": "migexport:error_ratio_pooled:rate",
            "error_z": "migexport:error_ratio:zscore_rate",
            "calls": "migexport:statement_calls:increase",
            "latency": "migexport:statement_latency_seconds:rate",
            "latency_stddev": "migexport:statement_latency_stddev_seconds:rate",
            "latency_z": "migexport:statement_latency_seconds:zscore_rate",
            "probe_p95": "migexport:probe_latency_seconds:p95_rate",
            "probe_runs": "migexport:probe_runs:increase",
        }
        if name not in names:
            raise AttributeError(name)
        return names[name] + self.window


def series_names(t: Thresholds) -> Series:
    return Series(duration(t.rate_window_seconds))


def with_baseline(live: str, op: str, baseline: str, on: str = "target") -> str:
    """`live OP baseline`, the baseline's migration_id carried over to the result."""
    return f"{live} {op} on({JOIN}, {on}) group_left(migration_id) ({baseline})"


# The triggers of the relative alerts, over a baseline expression: the caller's (a gauge, with whatever
# matchers or merging over migration ids it needs). The alerts compare the live series with these, and
# the dashboards and the report draw them as the "trigger" lines.
def error_ratio_trigger(baseline: str, t: Thresholds) -> str:
    """MigrationErrorRateIncreased: the baseline × error_rate_increase_ratio, at least error_ratio_floor."""
    return f"clamp_min({baseline} * {fmt(t.error_rate_increase_ratio)}, {fmt(t.error_ratio_floor)})"


def latency_trigger(baseline: str, t: Thresholds) -> str:
    """MigrationLatencyDegraded (statements): the baseline, at least latency_floor, × latency_degradation_ratio."""
    return f"clamp_min({baseline}, {fmt(t.latency_floor_seconds)}) * {fmt(t.latency_degradation_ratio)}"


def probe_latency_trigger(baseline: str, t: Thresholds) -> str:
    """MigrationLatencyDegraded (probes): the baseline p95, at least probe_latency_floor, × the same ratio."""
    return f"clamp_min({baseline}, {fmt(t.probe_latency_floor_seconds)}) * {fmt(t.latency_degradation_ratio)}"


def connections_scale(baseline: str, t: Thresholds) -> str:
    """What MigrationConnectionsUnstable measures a change of connections against: the baseline, at least
    connections_floor. The alert fires beyond connections_change_ratio of it, either way."""
    return f"clamp_min({baseline}, {fmt(t.connections_floor)})"


def connections_band(baseline: str, t: Thresholds) -> str:
    """How far from the baseline connections may go, either way, before MigrationConnectionsUnstable fires."""
    return f"{connections_scale(baseline, t)} * {fmt(t.connections_change_ratio)}"
