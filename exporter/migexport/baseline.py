"""`migexport baseline`: sample the targets for a window and freeze what "normal" looked like.

The checklist's rollback triggers are relative ("response times degraded >50%", "error rate
increased >10%"), so they need a baseline taken before the migration. Rolling windows and `offset`
adapt to the very regression they should catch; a frozen baseline does not.

Rates come from counter deltas over the window, never from totals since the last stats reset. The
sampler reuses the exporter's collectors (same SQL, same session safety) on one connection per
target, runs the probes on that same connection, and subtracts its own transactions from the commit
and rollback deltas (exactly on PostgreSQL 15+, where it can force its statistics to be flushed).

Every value is the estimator the live side uses, so that a migration compares like with like:
- probe p50/p95: PromQL's histogram_quantile() over the probe buckets of the successful runs (the
  buckets are kept in the document), and the noise ceiling: the highest such p95 over every run of
  consecutive probes as long as the live rate window holds (thresholds.rate_window / the probe's interval);
- statements: calls, mean and standard deviation of latency over the window, from the deltas of the
  pg_stat_statements sums (calls, time, squared time), so a rule can weigh a change against its noise;
- transactions: commits + rollbacks in the window (the error ratio's n), our own excluded;
- top statements (for the report's "what got slower", never a metric): per target, the statements of
  pg_stat_statements that took the most time in the window (read at its start and end, see
  topstatements.window_entries), each with its calls, mean (the window's delta; the cumulative mean,
  flagged, for one that did not run in it), the counters at the end for a later comparison, and its
  normalised text.

A baseline with holes disarms the alerts that need the missing values, silently. So an unreachable
target or a probe that never succeeds fails the capture (BaselineIncomplete: nothing is written),
and every target and probe is tried once before the window, so that a missing GRANT fails in
seconds. `allow_partial` writes what was captured and lists the rest under "failures". A standby
without transactions, pg_stat_statements not installed, an unanalyzed table are notes ("missing").

The document is written by `baseline_file.write_baseline` and served by `baseline_gauges`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import statistics
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from migexport.baseline_file import FORMAT, MAX_BASELINE_BYTES, VERSION, BaselineError
from migexport.collectors import connections, replication, size, statements, transactions
from migexport.collectors.base import MARKER, Context, ServerInfo
from migexport.config import Config, Probe, Thresholds
from migexport.exporter_histograms import ExporterHistograms
from migexport.metrics import MetricSpec, Sample
from migexport.own import FLUSH_MIN_VERSION, FLUSH_SQL
from migexport.probes import (
    PROBE_BUCKETS,
    ProbeResult,
    bucket_index,
    cumulative_buckets,
    fix_hint,
    probe_quantile,
    run_probe,
)
from migexport.targets import SERVER_SQL, SessionSettings, connect
from migexport.topstatements import (
    TOP_STATEMENTS,
    Key,
    Reading,
    Unavailable,
    read_counters,
    read_texts,
    snapshot_doc,
    window_entries,
)

log = logging.getLogger(__name__)


ROWS_SQL = """
SELECT c.reltuples::float8 FROM pg_class c WHERE c.oid = to_regclass(%s)
"""  # to_regclass() takes no lock on the table; reltuples is the planner's estimate


def values_of(samples: list[Sample], spec: MetricSpec) -> dict[tuple[str, ...], float]:
    return {s.label_values: s.value for s in samples if s.spec is spec}


def value_of(samples: list[Sample], spec: MetricSpec | None) -> float | None:
    found = values_of(samples, spec)
    return found.get((), None)


def runs_per_window(thresholds: Thresholds, probe: Probe) -> int:
    """How many runs of the probe the live rate window holds (at least 2: one run has no spread)."""
    return max(2, int(thresholds.rate_window_seconds / probe.interval_seconds))


def window_p95_max(durations: list[float], window_runs: int) -> float | None:
    """The highest p95 (histogram_quantile() over PROBE_BUCKETS) of any `window_runs` consecutive runs.

    The live p95 is taken over a rate window holding that many runs, so this is how high it reads at
    rest by chance alone; with fewer runs than that, the p95 of all of them.
    """
    if not durations:
        return None
    k = min(window_runs, len(durations))
    index = [bucket_index(d) for d in durations]
    counts = [0] * (len(PROBE_BUCKETS) + 1)
    for i in index[:k]:
        counts[i] += 1
    best = _p95_of(counts)
    for j in range(k, len(index)):  # slide by one run: add the newest, drop the oldest
        counts[index[j]] += 1
        counts[index[j - k]] -= 1
        best = max(best, _p95_of(counts))
    return best


def _p95_of(counts: list[int]) -> float:
    return probe_quantile(0.95, list(itertools.accumulate(counts))) or 0.0


@dataclass
class _ProbeRuns:
    """One probe's runs in the window: durations of the successful ones, in order, and the last failure."""

    probe: Probe
    durations: list[float] = field(default_factory=list)
    runs: int = 0
    failure: ProbeResult | None = None
    role: str = ""  # the role the session logged in as: the one a GRANT must name
    preflight_failed: bool = False


@dataclass
class _Counters:
    commits: float
    rollbacks: float
    calls: float | None
    exec_seconds: float | None
    exec_seconds_squared: float | None


@dataclass
class _TargetSampler:
    """Everything measured on one target during the window."""

    name: str
    conn: psycopg.Connection
    server: ServerInfo
    ctx: Context
    collectors: dict[str, Any]
    probes: list[_ProbeRuns] = field(default_factory=list)
    connection_samples: list[dict[tuple[str, ...], float]] = field(default_factory=list)
    connections_max: float | None = None
    lag_samples: dict[str, list[float]] = field(default_factory=dict)
    standby_lag_samples: list[float] = field(default_factory=list)
    own_commits: int = 0
    own_rollbacks: int = 0
    queries_at_start: int = 0
    start: _Counters | None = None
    end: _Counters | None = None
    excluded_roles: tuple[str, ...] = ()
    top_start: Reading | None = None
    top_end: Reading | None = None
    top_problem: str | None = None
    failed_queries: int = 0  # ours in the window that failed: rollbacks, not commits

    def query_count(self) -> int:
        return self.ctx.queries

    def flush_own_stats(self) -> None:
        """Make the shared counters include every transaction this session has finished."""
        if self.server.version_num >= FLUSH_MIN_VERSION:
            self.ctx.query(FLUSH_SQL)

    def read_counters(self) -> _Counters:
        tx = self.collectors["transactions"].collect(self.ctx)
        st = self.collectors["statements"].collect(self.ctx)
        available = value_of(st, statements.AVAILABLE) == 1
        # The sum of squared execution times comes with newer collectors; without it: no stddev.
        squared = getattr(statements, "EXEC_SECONDS_SQUARED", None)
        return _Counters(
            commits=value_of(tx, transactions.COMMITS) or 0.0,
            rollbacks=value_of(tx, transactions.ROLLBACKS) or 0.0,
            calls=value_of(st, statements.CALLS) if available else None,
            exec_seconds=value_of(st, statements.EXEC_SECONDS) if available else None,
            exec_seconds_squared=value_of(st, squared) if available and squared is not None else None,
        )

    def read_top(self, at_start: bool) -> Reading | None:
        """Per-statement counters, or None and a note why not; never fails the capture."""
        try:
            return read_counters(self.ctx, self.excluded_roles)
        except Unavailable as exc:
            self.failed_queries += int(at_start and exc.failed_query)
            self.top_problem = str(exc)
        except psycopg.Error as exc:
            self.failed_queries += int(at_start)
            self.top_problem = f"reading pg_stat_statements failed: {_first_line(exc)}"
        return None

    def top_statements(self, limit: int, missing: list[str]) -> dict[str, Any] | None:
        """The window's top statements with their texts (read now, once, for these only)."""
        if self.top_end is None:
            missing.append(f"{self.name}: no statement snapshot: {self.top_problem or 'not taken'}")
            return None
        if self.top_start is None:
            missing.append(f"{self.name}: statement snapshot without a start reading: cumulative means only")
        texts: dict[Key, tuple[str, bool]] = {}
        try:
            kept = window_entries(self.top_start, self.top_end, limit)
            texts = read_texts(self.ctx, self.top_end, [key for key, _, _ in kept])
        except psycopg.Error as exc:  # a huge text file can outlast statement_timeout: keep the numbers
            missing.append(f"{self.name}: statement texts not captured: {_first_line(exc)}")
        if self.top_end.hidden:
            missing.append(
                f"{self.name}: {self.top_end.hidden} statements of other roles not identifiable: the role needs "
                "pg_read_all_stats (pg_monitor) for the statement snapshot"
            )
        return snapshot_doc(self.top_start, self.top_end, texts, limit)

    def sample(self) -> None:
        self.ctx.new_pass()
        conns = self.collectors["connections"].collect(self.ctx)
        self.connection_samples.append({k: v for k, v in values_of(conns, connections.CONNECTIONS).items()})
        self.connections_max = value_of(conns, connections.CONNECTIONS_MAX)
        if self.server.in_recovery:
            lag = value_of(self.collectors["standby"].collect(self.ctx), replication.STANDBY_LAG_SECONDS)
            if lag is not None and not math.isnan(lag):
                self.standby_lag_samples.append(lag)
        else:
            rep = self.collectors["replication"].collect(self.ctx)
            for (standby,), lag in values_of(rep, replication.LAG_SECONDS).items():
                if not math.isnan(lag):
                    self.lag_samples.setdefault(standby, []).append(lag)

    def run_probe(self, runs: _ProbeRuns) -> None:
        result = run_probe(self.conn, runs.probe)
        # Each probe is one transaction of ours: a commit on success, a rollback on failure.
        runs.runs += 1
        if result.ok:
            self.own_commits += 1
            runs.durations.append(result.seconds)
        else:
            self.own_rollbacks += 1
            runs.failure = result


def _open_sampler(config: Config, target_name: str, session: SessionSettings) -> _TargetSampler:
    target = next(t for t in config.targets if t.name == target_name)
    conn = connect(target, session)
    try:
        version, in_recovery, database = conn.execute(MARKER + SERVER_SQL).fetchone()  # type: ignore[misc]
    except psycopg.Error:
        conn.close()
        raise
    server = ServerInfo(version, in_recovery, database)
    collectors = {
        "transactions": transactions.TransactionsCollector(),
        "statements": statements.StatementsCollector((config.migration.role,)),
        "connections": connections.ConnectionsCollector(),
        "replication": replication.PrimaryReplicationCollector(),
        "standby": replication.StandbyReplicationCollector(),
        "size": size.SizeCollector(),
    }
    # The session collectors of one tick share one read of pg_stat_activity (see sample()).
    parts = [part for c in collectors.values() for part in c.activity_parts(version)]
    return _TargetSampler(
        target_name,
        conn,
        server,
        Context(target_name, conn, server, activity_parts=parts),
        collectors,
        excluded_roles=(config.migration.role,),
    )


class BaselineIncomplete(BaselineError):
    """Targets not reached or probes that never succeeded: the baseline would have holes that disarm
    alerts. `problems` holds one printable line each, with the fix where one is known."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _probe_problem(runs: _ProbeRuns, what: str) -> str:
    failure = runs.failure or ProbeResult(False, 0.0, "no run")
    hint = fix_hint(failure, runs.role)
    return f"probe {runs.probe.name} on {runs.probe.target}: {what}: {failure.error}" + (f" ({hint})" if hint else "")


def _preflight(config: Config, session: SessionSettings, samplers: dict[str, _TargetSampler]) -> list[str]:
    """Reach every target and run every probe once, before the window: a missing GRANT fails in
    seconds, not after five minutes of sampling. These runs are not part of the baseline (the first
    run of a query on a new session pays for catalog and plan caches). Returns what is unreachable;
    probes that failed are marked (see _probe_failures)."""
    failures: list[str] = []
    for target in config.targets:
        try:
            samplers[target.name] = _open_sampler(config, target.name, session)
        except psycopg.Error as exc:
            failures.append(
                f"target {target.name}: not reachable: {_first_line(exc)} "
                "(fix: check its DSN, that the server is up and that pg_hba.conf admits the role)"
            )
    for probe in config.probes:
        s = samplers.get(probe.target)
        if s is None:
            failures.append(f"probe {probe.name} on {probe.target}: not run, its target is not reachable")
            continue
        runs = _ProbeRuns(probe, role=s.conn.info.user)
        s.probes.append(runs)
        result = run_probe(s.conn, probe)
        if not result.ok:
            runs.failure, runs.preflight_failed = result, True
    return failures


def _probe_failures(samplers: dict[str, _TargetSampler], after_window: bool) -> list[str]:
    """Probes that failed before the window, and, after it, those without a successful run in it
    (one that failed before the window but succeeded in it is no hole)."""
    out: list[str] = []
    for s in samplers.values():
        for runs in s.probes:
            if runs.durations:
                continue
            if runs.preflight_failed:
                out.append(_probe_problem(runs, "failed"))
            elif after_window:
                out.append(_probe_problem(runs, "no successful run in the window"))
    return out


def capture(
    config: Config,
    duration_seconds: float,
    progress: Callable[[float], None] = lambda fraction: None,
    sample_interval_seconds: float | None = None,
    allow_partial: bool = False,
    exporter_url: str | None = None,
    top_statements: int = TOP_STATEMENTS,
) -> dict[str, Any]:
    """Sample every target for `duration_seconds` and return the baseline document.

    Raises BaselineIncomplete, before the window when it can, if a target is not reachable or a probe
    never succeeds, unless `allow_partial` (then the document lists them under "failures"). With the
    URL of the exporter that will watch the migration, probe latency comes from its histograms.
    `top_statements` bounds the per-target statement snapshot (0: none).
    """
    session = SessionSettings(
        application_name=f"{config.application_name}-baseline",
        lock_timeout_ms=round(config.lock_timeout_seconds * 1000),
        statement_timeout_ms=round(config.statement_timeout_seconds * 1000),
    )
    tick = sample_interval_seconds or min(5.0, max(0.2, duration_seconds / 20))
    samplers: dict[str, _TargetSampler] = {}
    try:
        unreachable = _preflight(config, session, samplers)
        failures = unreachable + _probe_failures(samplers, after_window=False)
        if not samplers or (failures and not allow_partial):
            raise BaselineIncomplete(failures)
        histograms = ExporterHistograms(exporter_url) if exporter_url else None
        try:
            window = _sample(samplers, duration_seconds, tick, progress, histograms, top_statements > 0)
        except psycopg.Error as exc:
            raise BaselineIncomplete([f"sampling failed: {_first_line(exc)}"]) from None
        failures = unreachable + _probe_failures(samplers, after_window=True)
        if failures and not allow_partial:
            raise BaselineIncomplete(failures)
        doc = _document(config, samplers, window, failures, histograms)
        if top_statements > 0:
            snapshots = {name: s.top_statements(top_statements, doc["missing"]) for name, s in samplers.items()}
            doc["top_statements"] = {name: snap for name, snap in snapshots.items() if snap is not None}
            _fit_statements(doc)
    finally:
        for s in samplers.values():
            s.conn.close()
    progress(1.0)
    doc["slis"] = _capture_slis(config, doc["missing"])
    return doc


def _fit_statements(doc: dict[str, Any], budget: int = MAX_BASELINE_BYTES // 2) -> None:
    """Keep the file well under what readers accept: a file `serve` refuses disarms every alert,
    so the statement snapshot (the only part that grows with a setting) gives way, least time first."""
    size = len(json.dumps(doc, indent=2))
    if size <= budget:
        return
    snaps = doc["top_statements"].values()
    cap = max(len(snap["statements"]) for snap in snaps)
    while size > budget and cap > 0:
        cap = cap * 3 // 4  # the longest lists give way first; each is ranked, so its tail goes
        for snap in snaps:
            del snap["statements"][cap:]
        size = len(json.dumps(doc, indent=2))
    doc["missing"].append(f"statement snapshot cut to {cap} statements per target to keep the file small")


def _sample(
    samplers: dict[str, _TargetSampler],
    duration_seconds: float,
    tick: float,
    progress: Callable[[float], None],
    histograms: ExporterHistograms | None = None,
    top: bool = False,
) -> float:
    """The window itself; returns its length in seconds. The exporter's histograms, when given, are
    read at the start, at every tick and at the end; with `top`, the per-statement counters too."""
    # Probes run back to back at the sampling tick (not their serving interval), so that a short
    # window still gives enough runs for a median and a 95th percentile.
    for s in samplers.values():
        s.flush_own_stats()
        s.queries_at_start = s.query_count()
        s.start = s.read_counters()
        if top:
            s.top_start = s.read_top(at_start=True)
    if histograms is not None:
        histograms.take()
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        progress(min(1.0, elapsed / duration_seconds))
        if elapsed >= duration_seconds:
            break
        for s in samplers.values():
            s.sample()
            for runs in s.probes:
                s.run_probe(runs)
        if histograms is not None and histograms.snapshots:
            histograms.take()
        time.sleep(max(0.0, min(tick, duration_seconds - (time.monotonic() - started))))
    window = time.monotonic() - started
    for s in samplers.values():
        s.flush_own_stats()
        # Each of our autocommit queries since the start read is one committed transaction: the
        # start read itself (it commits after reading) and the flush included, the end read not.
        s.own_commits += s.query_count() - s.queries_at_start - s.failed_queries
        s.own_rollbacks += s.failed_queries
        s.end = s.read_counters()
        if top:
            s.top_end = s.read_top(at_start=False)
    if histograms is not None and histograms.snapshots:
        histograms.take()
    return window


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _document(
    config: Config,
    samplers: dict[str, _TargetSampler],
    window: float,
    failures: list[str],
    histograms: ExporterHistograms | None = None,
) -> dict[str, Any]:
    missing: list[str] = []
    targets = {name: _target_doc(config, s, window, missing, histograms) for name, s in samplers.items()}
    if histograms is not None and not histograms.snapshots:
        missing.append(
            f"exporter at {histograms.url} not readable ({histograms.error}): probe latency and transactions "
            "measured by the baseline command itself; start 'migexport serve' first so that both sides are "
            "measured alike"
        )
    probes = {
        runs.probe.name: _probe_doc(config.thresholds, runs, missing, histograms)
        for s in samplers.values()
        for runs in s.probes
    }
    return {
        "format": FORMAT,
        "version": VERSION,
        "migration_id": config.migration.id,
        "captured_at": time.time(),
        "window_seconds": window,
        "targets": targets,
        "probes": probes,
        "missing": missing,
        "failures": failures,
    }


def _statements(s: _TargetSampler, window: float, missing: list[str]) -> dict[str, float | None]:
    """Calls, mean and standard deviation of statement latency over the window (pg_stat_statements deltas)."""
    assert s.start and s.end
    out: dict[str, float | None] = dict.fromkeys(
        (
            "statement_calls",
            "statement_calls_per_second",
            "statement_latency_seconds",
            "statement_latency_stddev_seconds",
        )
    )
    if s.start.calls is None or s.end.calls is None:
        missing.append(f"{s.name}: pg_stat_statements not available: statement latency not captured")
        return out
    calls = max(0.0, s.end.calls - s.start.calls)
    out.update(statement_calls=calls, statement_calls_per_second=calls / window)
    if calls <= 0:
        missing.append(f"{s.name}: no statements in the window: statement latency not captured")
        return out
    mean = (s.end.exec_seconds - s.start.exec_seconds) / calls  # type: ignore[operator]
    out["statement_latency_seconds"] = max(0.0, mean)
    if s.start.exec_seconds_squared is None or s.end.exec_seconds_squared is None:
        missing.append(f"{s.name}: no sum of squared execution times: statement latency stddev not captured")
        return out
    # Population variance of all calls: E[x²] - mean². Rounding can take it a hair below 0.
    mean_square = (s.end.exec_seconds_squared - s.start.exec_seconds_squared) / calls
    out["statement_latency_stddev_seconds"] = math.sqrt(max(0.0, mean_square - mean * mean))
    return out


def _rows(config: Config, s: _TargetSampler, missing: list[str]) -> dict[str, float | None]:
    rows: dict[str, float | None] = {}
    if s.name != config.migration_target().name:
        return rows
    for table in config.migration.affected_tables:
        found = s.ctx.query(ROWS_SQL, (table,))
        if not found:
            missing.append(f"{s.name}: affected table {table} not found")
            rows[table] = None
        elif found[0][0] < 0:
            missing.append(f"{s.name}: affected table {table} never analyzed: no row estimate")
            rows[table] = None
        else:
            rows[table] = found[0][0]
    return rows


def _transactions(s: _TargetSampler, histograms: ExporterHistograms | None) -> tuple[float, float]:
    """The window's commits and rollbacks without anything of ours. With the exporter running, from
    the counters it exports (its own transactions left out, as in the live error ratio), less this
    sampler's, which it counts as anyone's; otherwise the server's, less this sampler's."""
    assert s.start and s.end
    served = histograms.xacts(s.name) if histograms is not None else None
    if served is not None:
        return max(0.0, served[0] - s.own_commits), max(0.0, served[1] - s.own_rollbacks)
    return (
        max(0.0, s.end.commits - s.start.commits - s.own_commits),
        max(0.0, s.end.rollbacks - s.start.rollbacks - s.own_rollbacks),
    )


def _target_doc(
    config: Config, s: _TargetSampler, window: float, missing: list[str], histograms: ExporterHistograms | None = None
) -> dict[str, Any]:
    assert s.start and s.end
    name = s.name
    commits, rollbacks = _transactions(s, histograms)
    if s.server.version_num < 150000:
        missing.append(f"{name}: PostgreSQL < 15, the sampler's own transactions are subtracted approximately")
    total = commits + rollbacks
    if total <= 0:
        missing.append(f"{name}: no transactions in the window: error ratio not captured")
    states: dict[str, float] = {}
    for sample in s.connection_samples:
        for (state,), n in sample.items():
            states[state] = states.get(state, 0.0) + n / len(s.connection_samples)
    connections_total = sum(states.values()) if states else None
    return {
        "in_recovery": s.server.in_recovery,
        "server_version_num": s.server.version_num,
        "tps": total / window,
        "commits": commits,
        "rollbacks": rollbacks,
        "transactions": total,
        "error_ratio": rollbacks / total if total > 0 else None,
        **_statements(s, window, missing),
        "connections_by_state": states,
        "connections": connections_total,
        "connections_max": s.connections_max,
        "connection_utilisation": (
            connections_total / s.connections_max if connections_total is not None and s.connections_max else None
        ),
        "replication_lag_seconds": {
            standby: {"mean": statistics.fmean(v), "max": max(v)} for standby, v in s.lag_samples.items()
        },
        "standby_replay_lag_seconds": (
            {"mean": statistics.fmean(s.standby_lag_samples), "max": max(s.standby_lag_samples)}
            if s.standby_lag_samples
            else None
        ),
        "database_size_bytes": value_of(s.collectors["size"].collect(s.ctx), size.DATABASE_SIZE),
        "table_rows_estimate": _rows(config, s, missing),
    }


def _probe_doc(
    thresholds: Thresholds, runs: _ProbeRuns, missing: list[str], histograms: ExporterHistograms | None = None
) -> dict[str, Any]:
    """Latency as the live side estimates it: histogram_quantile() over the successful runs' buckets,
    those the exporter timed when it is running (see exporter_histograms), else this command's own."""
    probe, ok = runs.probe, runs.durations
    k = runs_per_window(thresholds, probe)
    doc: dict[str, Any] = {
        "target": probe.target,
        "interval_seconds": probe.interval_seconds,
        "runs": runs.runs,
        "successful_runs": len(ok),
        "success_ratio": len(ok) / runs.runs if runs.runs else None,
        "window_runs": k,
    }
    from_exporter = None
    if histograms is not None and histograms.snapshots:
        from_exporter = histograms.latency((probe.target, probe.name), thresholds.rate_window_seconds)
        if from_exporter is None:
            missing.append(
                f"probe {probe.name}: the exporter at {histograms.url} did not run it during the window: "
                "its latency is measured by the baseline command itself"
            )
    if from_exporter is not None:
        counts, timed_runs = from_exporter["cumulative_counts"], from_exporter["runs"]
        doc.update(
            latency_source="exporter",
            p50_seconds=from_exporter["p50_seconds"],
            p95_seconds=from_exporter["p95_seconds"],
            p95_window_max_seconds=from_exporter["p95_window_max_seconds"],
        )
    else:
        counts, timed_runs = cumulative_buckets(ok), len(ok)
        doc.update(
            latency_source="baseline",
            p50_seconds=probe_quantile(0.50, counts),
            p95_seconds=probe_quantile(0.95, counts),
            p95_window_max_seconds=window_p95_max(ok, k),
        )
    doc["latency_runs"] = timed_runs
    doc["latency_buckets"] = {"upper_bounds_seconds": list(PROBE_BUCKETS), "cumulative_counts": counts}
    if 0 < timed_runs < thresholds.probe_min_runs:
        missing.append(
            f"probe {probe.name}: only {timed_runs:g} timed runs (thresholds.probe_min_runs is "
            f"{thresholds.probe_min_runs:g}): a longer --duration gives a steadier p95"
        )
    return doc


def _capture_slis(config: Config, missing: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, query in (("error_ratio", config.slis.error_ratio), ("latency_seconds", config.slis.latency_seconds)):
        if not query:
            continue
        try:
            value = query_prometheus(config.slis.prometheus_url, query)
            # NaN (a ratio over no requests) or a negative value would make a file no reader accepts.
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"query returned {value}, not a non-negative number")
            out[key] = value
        except (OSError, ValueError) as exc:
            out[key] = None
            missing.append(f"sli {key}: {exc}")
    return out


def query_prometheus(base_url: str, query: str, timeout: float = 10.0) -> float:
    """An instant query that must return exactly one sample."""
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body = json.load(resp)
    result = body.get("data", {}).get("result", [])
    if body.get("status") != "success" or len(result) != 1:
        raise ValueError(f"query returned {len(result)} samples, expected 1")
    return float(result[0]["value"][1])


def _fmt(v: float | None, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
    return "not captured" if v is None else f"{v * scale:.{digits}f}{unit}"


def _target_rows(name: str, t: dict[str, Any]) -> list[tuple[str, str]]:
    of_max = f" of {t['connections_max']:.0f}" if t["connections_max"] else ""
    rows = [
        (f"{name} tps", _fmt(t["tps"], "/s", digits=2)),
        (f"{name} transactions", _fmt(t.get("transactions"), digits=0)),
        (f"{name} error ratio", _fmt(t["error_ratio"], "%", 100, 2)),
        (f"{name} statement calls", _fmt(t.get("statement_calls"), digits=0)),
        (f"{name} mean statement latency", _fmt(t["statement_latency_seconds"], " ms", 1000)),
        (f"{name} statement latency stddev", _fmt(t.get("statement_latency_stddev_seconds"), " ms", 1000)),
        (f"{name} connections", _fmt(t["connections"], of_max, digits=1)),
        (f"{name} database size", _fmt(t["database_size_bytes"], " MB", 1e-6, 1)),
    ]
    for standby, lag in t["replication_lag_seconds"].items():
        rows.append((f"{name} lag of {standby} (max)", _fmt(lag.get("max"), " s")))
    for table, n in t["table_rows_estimate"].items():
        rows.append((f"{name} rows in {table} (estimate)", _fmt(n, digits=0)))
    return rows


def summary_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What the command prints after capturing (and show-baseline): (what, value) pairs."""
    rows = [("window", f"{doc['window_seconds']:.1f}s")]
    for name, t in doc["targets"].items():
        rows += _target_rows(name, t)
    for name, p in doc["probes"].items():
        p50, p95 = _fmt(p["p50_seconds"], " ms", 1000, 2), _fmt(p["p95_seconds"], " ms", 1000, 2)
        window = p.get("window_runs")
        rows += [
            (f"probe {name} p50 / p95", f"{p50} / {p95}"),
            (
                f"probe {name} highest p95 of {window:.0f} runs" if window else f"probe {name} highest windowed p95",
                _fmt(p.get("p95_window_max_seconds"), " ms", 1000, 2),
            ),
            (
                f"probe {name} success",
                _fmt(p["success_ratio"], "%", 100, 1) + (f" of {p['runs']:.0f} runs" if p["runs"] else ""),
            ),
        ]
    for key, v in (doc.get("slis") or {}).items():
        rows.append((f"sli {key}", _fmt(v)))
    for name, snap in (doc.get("top_statements") or {}).items():
        ran = sum(1 for e in snap["statements"] if e["mean_source"] == "window")
        rows.append((f"{name} top statements", f"{len(snap['statements'])} kept, {ran} ran in the window"))
    return rows
