"""The frozen `migexport_baseline_*` gauges `serve` exports from a baseline file.

Read again whenever the file changes; a missing, stale or malformed file is reported as a metric and
one log line, never as a failed scrape, and never by serving the previous file's values as current.

Every gauge is labelled with the migration being watched now (`current_migration_id()`), whatever id
the baseline was captured under: the alerts join the baseline with the live migration on that label,
and a baseline taken under yesterday's id must still arm them (`migexport_baseline_info` shows both).
A value an alert needs that the baseline lacks is not left as a silent hole: it is
`migexport_baseline_missing{target, probe, value} 1`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from migexport.baseline_file import Baseline, BaselineError, read_baseline
from migexport.metrics import MetricSpec, Sample, as_float, clip_label

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
B_CALLS = _bspec(
    "migexport_baseline_statement_calls",
    "Statement calls (pg_stat_statements, top-level, the exporter's own excluded) during the baseline window.",
    "target",
)
B_STDDEV = _bspec(
    "migexport_baseline_statement_latency_stddev_seconds",
    "Standard deviation of the statement latency over the baseline window's calls.",
    "target",
)
B_TRANSACTIONS = _bspec(
    "migexport_baseline_transactions",
    "Transactions (commits + rollbacks, the exporter's own excluded) during the baseline window.",
    "target",
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
    "Probe latency quantile (0.5, 0.95) over the baseline window's successful runs, estimated like the live "
    "one: histogram_quantile() over the probe buckets.",
    "target",
    "probe",
    "quantile",
)
B_PROBE_WINDOW_MAX = _bspec(
    "migexport_baseline_probe_latency_window_max_seconds",
    "Highest p95 of a live-window-sized run of probes at rest: the live p95 above it is beyond the noise.",
    "target",
    "probe",
)
B_PROBE_SUCCESS = _bspec(
    "migexport_baseline_probe_success_ratio",
    "Share of the probe's runs that succeeded during the baseline window.",
    "target",
    "probe",
)
B_SLI = _bspec("migexport_baseline_app_sli", "Application SLI (from Prometheus) at the baseline.", "sli")
B_INFO = _bspec(
    "migexport_baseline_info",
    "1 while a baseline is loaded: baseline_migration_id is the id it was captured under, migration_id the "
    "migration watched now (every baseline gauge carries the latter).",
    "baseline_migration_id",
)
B_MISSING = _bspec(
    "migexport_baseline_missing",
    "1 for each value an alert needs that the loaded baseline lacks (value: tps, error_ratio, "
    "statement_latency, p95): that alert cannot fire for it.",
    "target",
    "probe",
    "value",
)

BASELINE_SPECS = (
    B_LOADED,
    B_INFO,
    B_MISSING,
    B_STALE,
    B_CAPTURED,
    B_WINDOW,
    B_TPS,
    B_ERROR,
    B_LATENCY,
    B_CALLS,
    B_STDDEV,
    B_TRANSACTIONS,
    B_CONNECTIONS,
    B_UTILISATION,
    B_LAG,
    B_SIZE,
    B_ROWS,
    B_PROBE_LATENCY,
    B_PROBE_WINDOW_MAX,
    B_PROBE_SUCCESS,
    B_SLI,
)


# What a target's alerts need from the baseline (value label -> document key).
TARGET_NEEDS = (("tps", "tps"), ("error_ratio", "error_ratio"), ("statement_latency", "statement_latency_seconds"))

# One gauge value without its migration_id, which is added at each scrape (it can change while serving).
_Value = tuple[MetricSpec, float, dict[str, str]]


def _sample(spec: MetricSpec, v: float, labels: dict[str, str]) -> Sample:
    """spec.sample() by a dict: migexport_baseline_missing has a label called `value`, which
    MetricSpec.sample() takes as its own argument."""
    if set(labels) != set(spec.labels):
        raise ValueError(f"{spec.name}: labels {sorted(labels)} do not match {spec.labels}")
    return Sample(spec, tuple(clip_label(labels[n]) for n in spec.labels), as_float(v))


class BaselineSource:
    """Exports a baseline file as gauges; re-reads it when it changes, never crashes on it."""

    specs = BASELINE_SPECS

    def __init__(
        self,
        path: Path,
        current_migration_id: Callable[[], str],
        max_age_seconds: float,
        expected_targets: tuple[str, ...] = (),
        expected_probes: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.path = path
        self.current_migration_id = current_migration_id
        self.max_age_seconds = max_age_seconds
        self.expected_targets = expected_targets
        self.expected_probes = expected_probes  # (target, probe name)
        self._stamp: tuple[int, ...] | None = None
        self._baseline: Baseline | None = None
        self._values: list[_Value] = []
        self._error: str | None = None
        self._reported: str | None = None
        self._ids_reported: tuple[str, str] | None = None

    def _load(self) -> None:
        try:
            st = self.path.stat()
            # Inode and ctime too: an atomic replace of the same size within the mtime granularity is new.
            stamp: tuple[int, ...] | None = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._stamp:
            return
        self._stamp = stamp
        # Cleared first: whatever happens below, the previous file's values are never served as current.
        self._baseline, self._values = None, []
        try:
            baseline = read_baseline(self.path)
            values = self._values_of(baseline) + self._missing_of(baseline)
            self._baseline, self._values, self._error = baseline, values, None
        except BaselineError as exc:
            self._error = str(exc)
        except Exception as exc:  # a bug of ours must not take the scrape down: one line, loaded 0
            self._error = f"{self.path}: cannot use this baseline: {type(exc).__name__}: {exc}"[:500]

    def samples(self) -> list[Sample]:
        self._load()
        current = self.current_migration_id()
        m = {"migration_id": current}
        b = self._baseline
        if b is None:
            self._report(f"baseline not loaded: {self._error}")
            return [B_LOADED.sample(0, **m), B_STALE.sample(0, **m)]
        stale = time.time() - b.captured_at > self.max_age_seconds
        self._report(f"baseline {self.path} is stale (older than {self.max_age_seconds:g}s)" if stale else None)
        self._report_ids(b.migration_id, current)
        return [
            B_LOADED.sample(1, **m),
            B_INFO.sample(1, baseline_migration_id=b.migration_id, **m),
            B_STALE.sample(int(stale), **m),
            B_CAPTURED.sample(b.captured_at, **m),
            B_WINDOW.sample(b.window_seconds, **m),
            *(_sample(spec, v, {**labels, **m}) for spec, v, labels in self._values),
        ]

    def _values_of(self, b: Baseline) -> list[_Value]:
        out: list[_Value] = []

        def add(spec: MetricSpec, v: float | None, **labels: str) -> None:
            if v is not None:  # not captured: absent, so no alert compares against nothing
                out.append((spec, v, labels))

        for target, t in b.targets.items():
            for spec, key in (
                (B_TPS, "tps"),
                (B_ERROR, "error_ratio"),
                (B_LATENCY, "statement_latency_seconds"),
                (B_CALLS, "statement_calls"),
                (B_STDDEV, "statement_latency_stddev_seconds"),
                (B_TRANSACTIONS, "transactions"),
                (B_CONNECTIONS, "connections"),
                (B_UTILISATION, "connection_utilisation"),
                (B_SIZE, "database_size_bytes"),
            ):
                add(spec, t[key], target=target)
            for standby, lag in t["replication_lag_seconds"].items():
                add(B_LAG, lag.get("max"), target=target, standby=standby)
            for table, rows in t["table_rows_estimate"].items():
                add(B_ROWS, rows, target=target, table=table)
        for probe, p in b.probes.items():
            target = p["target"]
            add(B_PROBE_LATENCY, p["p50_seconds"], target=target, probe=probe, quantile="0.5")
            add(B_PROBE_LATENCY, p["p95_seconds"], target=target, probe=probe, quantile="0.95")
            add(B_PROBE_WINDOW_MAX, p["p95_window_max_seconds"], target=target, probe=probe)
            add(B_PROBE_SUCCESS, p["success_ratio"], target=target, probe=probe)
        for sli, v in b.slis.items():
            add(B_SLI, v, sli=sli)
        return out

    def _missing_of(self, b: Baseline) -> list[_Value]:
        """What the configured targets' and probes' alerts need and this baseline does not have."""
        out: list[_Value] = []
        for target in self.expected_targets:
            t = b.targets.get(target, {})
            for value, key in TARGET_NEEDS:
                if t.get(key) is None:
                    out.append((B_MISSING, 1, {"target": target, "probe": "", "value": value}))
        for target, probe in self.expected_probes:
            p = b.probes.get(probe, {})
            # The alert joins on (target, probe): a baseline of the same name on another target is no help.
            if p.get("target") != target or p.get("p95_seconds") is None:
                out.append((B_MISSING, 1, {"target": target, "probe": probe, "value": "p95"}))
        return out

    def _report(self, problem: str | None) -> None:
        if problem != self._reported:
            if problem:
                log.warning("%s", problem)
            elif self._reported:
                log.info("baseline %s loaded", self.path)
        self._reported = problem

    def _report_ids(self, captured: str, current: str) -> None:
        """One warning when the baseline's id and the watched migration's differ, again only after a change."""
        pair = (captured, current) if captured != current else None
        if pair is not None and pair != self._ids_reported:
            log.warning(
                "baseline %s was captured for migration %r, the migration watched now is %r: using it for %r",
                self.path,
                captured,
                current,
                current,
            )
        self._ids_reported = pair
