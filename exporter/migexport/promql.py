"""PromQL building blocks shared by the rules (and, later, the dashboards): joins, arming, numbers,
durations, and the names of the recording rules, which carry the configured rate window."""

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
