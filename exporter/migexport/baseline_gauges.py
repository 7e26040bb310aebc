"""The frozen `migexport_baseline_*` gauges `serve` exports from a baseline file.

Read again whenever the file changes; a missing, stale or malformed file is reported as a metric and
one log line, never as a failed scrape.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from migexport.baseline_file import Baseline, BaselineError, read_baseline
from migexport.metrics import MetricSpec, Sample

log = logging.getLogger(__name__)


def _bspec(name: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, help_text, labels=(*labels, "migration_id"), per_target=False)


B_LOADED = _bspec(
    "migexport_baseline_loaded", "1 if a valid baseline file is loaded, 0 if it is missing or malformed (see the log)."
)
B_STALE = _bspec("migexport_baseline_stale", "1 if the loaded baseline is older than thresholds.baseline_max_age.")
B_CAPTURED = _bspec("migexport_baseline_captured_timestamp_seconds", "When the baseline window ended (Unix time).")
B_WINDOW = _bspec("migexport_baseline_window_seconds", "Length of the baseline's sampling window.")
B_TPS = _bspec("migexport_baseline_tps", "Transactions per second during the baseline window.", "target")
B_ERROR = _bspec(
    "migexport_baseline_error_ratio", "Rolled-back share of transactions during the baseline window.", "target"
)
B_LATENCY = _bspec(
    "migexport_baseline_statement_latency_seconds",
    "Mean statement latency (pg_stat_statements deltas) during the baseline window.",
    "target",
)
B_CONNECTIONS = _bspec(
    "migexport_baseline_connections", "Mean number of client connections during the baseline window.", "target"
)
B_UTILISATION = _bspec(
    "migexport_baseline_connection_utilisation",
    "Mean connections / usable max_connections during the baseline window.",
    "target",
)
B_LAG = _bspec(
    "migexport_baseline_replication_lag_seconds",
    "Highest replication lag of the standby seen from the primary during the baseline window.",
    "target",
    "standby",
)
B_SIZE = _bspec("migexport_baseline_database_size_bytes", "Database size at the baseline.", "target")
B_ROWS = _bspec(
    "migexport_baseline_table_rows_estimate",
    "Planner row estimate (pg_class.reltuples) of an affected table at the baseline.",
    "target",
    "table",
)
B_PROBE_LATENCY = _bspec(
    "migexport_baseline_probe_latency_seconds",
    "Probe latency quantile (0.5, 0.95) over the baseline window's successful runs.",
    "target",
    "probe",
    "quantile",
)
B_PROBE_SUCCESS = _bspec(
    "migexport_baseline_probe_success_ratio",
    "Share of the probe's runs that succeeded during the baseline window.",
    "target",
    "probe",
)
B_SLI = _bspec("migexport_baseline_app_sli", "Application SLI (from Prometheus) at the baseline.", "sli")

BASELINE_SPECS = (
    B_LOADED,
    B_STALE,
    B_CAPTURED,
    B_WINDOW,
    B_TPS,
    B_ERROR,
    B_LATENCY,
    B_CONNECTIONS,
    B_UTILISATION,
    B_LAG,
    B_SIZE,
    B_ROWS,
    B_PROBE_LATENCY,
    B_PROBE_SUCCESS,
    B_SLI,
)


class BaselineSource:
    """Exports a baseline file as gauges; re-reads it when it changes, never crashes on it."""

    specs = BASELINE_SPECS

    def __init__(self, path: Path, migration_id: str, max_age_seconds: float) -> None:
        self.path = path
        self.migration_id = migration_id
        self.max_age_seconds = max_age_seconds
        self._stamp: tuple[float, int] | None = None
        self._baseline: Baseline | None = None
        self._values: list[Sample] = []
        self._error: str | None = None
        self._reported: str | None = None

    def _load(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            baseline = read_baseline(self.path)
            # Built here, not per scrape: read_baseline() does not check every field (database_size_bytes,
            # table_rows_estimate, slis), and a value that is no number must not fail every scrape.
            values = self._values_of(baseline)
            self._baseline, self._values, self._error = baseline, values, None
        except (ValueError, TypeError, AttributeError) as exc:  # BaselineError is a ValueError
            error = str(exc) if isinstance(exc, BaselineError) else f"{self.path}: malformed baseline: {exc}"
            self._baseline, self._values, self._error = None, [], error
        if self._baseline is not None and self._baseline.migration_id != self.migration_id:
            log.warning(
                "baseline %s was captured for migration %r, this is %r: using it anyway",
                self.path,
                self._baseline.migration_id,
                self.migration_id,
            )

    def samples(self) -> list[Sample]:
        self._load()
        m = {"migration_id": self.migration_id}
        b = self._baseline
        if b is None:
            self._report(f"baseline not loaded: {self._error}")
            return [B_LOADED.sample(0, **m), B_STALE.sample(0, **m)]
        stale = time.time() - b.captured_at > self.max_age_seconds
        self._report(f"baseline {self.path} is stale (older than {self.max_age_seconds:g}s)" if stale else None)
        return [
            B_LOADED.sample(1, **m),
            B_STALE.sample(int(stale), **m),
            B_CAPTURED.sample(b.captured_at, **m),
            B_WINDOW.sample(b.window_seconds, **m),
            *self._values,
        ]

    def _values_of(self, b: Baseline) -> list[Sample]:
        m = {"migration_id": self.migration_id}
        out: list[Sample] = []

        def add(spec: MetricSpec, v: Any, **labels: str) -> None:
            if v is not None:  # not captured: absent, so no alert compares against nothing
                out.append(spec.sample(v, **labels, **m))

        for target, t in b.targets.items():
            add(B_TPS, t.get("tps"), target=target)
            add(B_ERROR, t.get("error_ratio"), target=target)
            add(B_LATENCY, t.get("statement_latency_seconds"), target=target)
            add(B_CONNECTIONS, t.get("connections"), target=target)
            add(B_UTILISATION, t.get("connection_utilisation"), target=target)
            add(B_SIZE, t.get("database_size_bytes"), target=target)
            for standby, lag in (t.get("replication_lag_seconds") or {}).items():
                add(B_LAG, lag.get("max"), target=target, standby=standby)
            for table, rows in (t.get("table_rows_estimate") or {}).items():
                add(B_ROWS, rows, target=target, table=table)
        for probe, p in b.probes.items():
            target = str(p.get("target", ""))
            add(B_PROBE_LATENCY, p.get("p50_seconds"), target=target, probe=probe, quantile="0.5")
            add(B_PROBE_LATENCY, p.get("p95_seconds"), target=target, probe=probe, quantile="0.95")
            add(B_PROBE_SUCCESS, p.get("success_ratio"), target=target, probe=probe)
        for sli, v in b.slis.items():
            add(B_SLI, v, sli=sli)
        return out

    def _report(self, problem: str | None) -> None:
        if problem != self._reported:
            if problem:
                log.warning("%s", problem)
            elif self._reported:
                log.info("baseline %s loaded", self.path)
        self._reported = problem
