"""`migexport baseline`: sample the targets for a window and freeze what "normal" looked like.

The checklist's rollback triggers are relative ("response times degraded >50%", "error rate
increased >10%"), so they need a baseline taken before the migration. Rolling windows and `offset`
adapt to the very regression they should catch; a frozen baseline does not.

Rates come from counter deltas over the window, never from totals since the last stats reset. The
sampler reuses the exporter's collectors (same SQL, same session safety) on one connection per
target, runs the probes on that same connection, and subtracts its own transactions from the commit
and rollback deltas (exactly on PostgreSQL 15+, where it can force its statistics to be flushed).

The document is written by `baseline_file.write_baseline` and served by `baseline_gauges`.
"""

from __future__ import annotations

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

from migexport.baseline_file import FORMAT, VERSION, BaselineError
from migexport.collectors import connections, replication, size, statements, transactions
from migexport.collectors.base import MARKER, Context, ServerInfo
from migexport.config import Config, Probe
from migexport.metrics import MetricSpec, Sample
from migexport.probes import run_probe
from migexport.targets import SERVER_SQL, SessionSettings, connect

log = logging.getLogger(__name__)


# PostgreSQL 15+. A backend flushes its transaction counts only along with other pending statistics,
# so the statement also reads a catalog row: without it our commits surface seconds later, at random.
FLUSH_SQL = "SELECT pg_stat_force_next_flush() FROM (SELECT 1 FROM pg_catalog.pg_am LIMIT 1) AS touch"
ROWS_SQL = """
SELECT c.reltuples::float8 FROM pg_class c WHERE c.oid = to_regclass(%s)
"""  # to_regclass() takes no lock on the table; reltuples is the planner's estimate


def values_of(samples: list[Sample], spec: MetricSpec) -> dict[tuple[str, ...], float]:
    return {s.label_values: s.value for s in samples if s.spec is spec}


def value_of(samples: list[Sample], spec: MetricSpec) -> float | None:
    found = values_of(samples, spec)
    return found.get((), None)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q * 100) - 1]


@dataclass
class _Counters:
    commits: float
    rollbacks: float
    calls: float | None
    exec_seconds: float | None


@dataclass
class _TargetSampler:
    """Everything measured on one target during the window."""

    name: str
    conn: psycopg.Connection
    server: ServerInfo
    ctx: Context
    collectors: dict[str, Any]
    probes: list[tuple[Probe, list[float], list[bool]]] = field(default_factory=list)
    connection_samples: list[dict[tuple[str, ...], float]] = field(default_factory=list)
    connections_max: float | None = None
    lag_samples: dict[str, list[float]] = field(default_factory=dict)
    standby_lag_samples: list[float] = field(default_factory=list)
    own_commits: int = 0
    own_rollbacks: int = 0
    queries_at_start: int = 0
    start: _Counters | None = None
    end: _Counters | None = None
    missing: list[str] = field(default_factory=list)

    def query_count(self) -> int:
        return self.ctx.queries

    def flush_own_stats(self) -> None:
        """Make the shared counters include every transaction this session has finished."""
        if self.server.version_num >= 150000:
            self.ctx.query(FLUSH_SQL)

    def read_counters(self) -> _Counters:
        tx = self.collectors["transactions"].collect(self.ctx)
        st = self.collectors["statements"].collect(self.ctx)
        available = value_of(st, statements.AVAILABLE) == 1
        return _Counters(
            commits=value_of(tx, transactions.COMMITS) or 0.0,
            rollbacks=value_of(tx, transactions.ROLLBACKS) or 0.0,
            calls=value_of(st, statements.CALLS) if available else None,
            exec_seconds=value_of(st, statements.EXEC_SECONDS) if available else None,
        )

    def sample(self) -> None:
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

    def run_probe(self, probe: Probe, durations: list[float], outcomes: list[bool]) -> None:
        result = run_probe(self.conn, probe)
        # Each probe is one transaction of ours: a commit on success, a rollback on failure.
        if result.ok:
            self.own_commits += 1
        else:
            self.own_rollbacks += 1
        durations.append(result.seconds)
        outcomes.append(result.ok)


def _open_sampler(config: Config, target_name: str, session: SessionSettings) -> _TargetSampler:
    target = next(t for t in config.targets if t.name == target_name)
    conn = connect(target, session)
    version, in_recovery, database = conn.execute(MARKER + SERVER_SQL).fetchone()  # type: ignore[misc]
    server = ServerInfo(version, in_recovery, database)
    collectors = {
        "transactions": transactions.TransactionsCollector(),
        "statements": statements.StatementsCollector(),
        "connections": connections.ConnectionsCollector(),
        "replication": replication.PrimaryReplicationCollector(),
        "standby": replication.StandbyReplicationCollector(),
        "size": size.SizeCollector(),
    }
    return _TargetSampler(target_name, conn, server, Context(target_name, conn, server), collectors)


def capture(
    config: Config,
    duration_seconds: float,
    progress: Callable[[float], None] = lambda fraction: None,
    sample_interval_seconds: float | None = None,
) -> dict[str, Any]:
    """Sample every target for `duration_seconds` and return the baseline document."""
    session = SessionSettings(
        application_name=f"{config.application_name}-baseline",
        lock_timeout_ms=round(config.lock_timeout_seconds * 1000),
        statement_timeout_ms=round(config.statement_timeout_seconds * 1000),
    )
    tick = sample_interval_seconds or min(5.0, max(0.2, duration_seconds / 20))
    samplers: dict[str, _TargetSampler] = {}
    problems: list[str] = []
    try:
        for target in config.targets:
            try:
                samplers[target.name] = _open_sampler(config, target.name, session)
            except psycopg.Error as exc:
                problems.append(f"{target.name}: not reachable, nothing captured ({_first_line(exc)})")
        if not samplers:
            raise BaselineError("no target could be reached: " + "; ".join(problems))
        for probe in config.probes:
            if probe.target in samplers:
                samplers[probe.target].probes.append((probe, [], []))
            else:
                problems.append(f"probe {probe.name}: its target {probe.target} is not reachable")
        # Probes run back to back at the sampling tick (not their serving interval), so that a short
        # window still gives enough runs for a median and a 95th percentile.
        for s in samplers.values():
            s.flush_own_stats()
            s.queries_at_start = s.query_count()
            s.start = s.read_counters()
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            progress(min(1.0, elapsed / duration_seconds))
            if elapsed >= duration_seconds:
                break
            for s in samplers.values():
                s.sample()
                for probe, durations, outcomes in s.probes:
                    s.run_probe(probe, durations, outcomes)
            time.sleep(max(0.0, min(tick, duration_seconds - (time.monotonic() - started))))
        window = time.monotonic() - started
        for s in samplers.values():
            s.flush_own_stats()
            # Each of our autocommit queries since the start read is one committed transaction: the
            # start read itself (it commits after reading) and the flush included, the end read not.
            s.own_commits += s.query_count() - s.queries_at_start
            s.end = s.read_counters()
        doc = _document(config, samplers, window, problems)
    finally:
        for s in samplers.values():
            s.conn.close()
    progress(1.0)
    doc["slis"] = _capture_slis(config, doc["missing"])
    return doc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _document(
    config: Config, samplers: dict[str, _TargetSampler], window: float, problems: list[str]
) -> dict[str, Any]:
    missing = list(problems)
    targets: dict[str, Any] = {}
    probes: dict[str, Any] = {}
    for name, s in samplers.items():
        assert s.start and s.end
        commits = s.end.commits - s.start.commits - s.own_commits
        rollbacks = s.end.rollbacks - s.start.rollbacks - s.own_rollbacks
        if s.server.version_num < 150000:
            missing.append(f"{name}: PostgreSQL < 15, the sampler's own transactions are subtracted approximately")
        total = commits + rollbacks
        if total <= 0:
            missing.append(f"{name}: no transactions in the window: error ratio not captured")
        latency = None
        calls_per_second = None
        if s.start.calls is None or s.end.calls is None:
            missing.append(f"{name}: pg_stat_statements not available: statement latency not captured")
        else:
            calls = s.end.calls - s.start.calls
            calls_per_second = calls / window
            if calls > 0:
                latency = (s.end.exec_seconds - s.start.exec_seconds) / calls  # type: ignore[operator]
            else:
                missing.append(f"{name}: no statements in the window: statement latency not captured")
        states: dict[str, float] = {}
        for sample in s.connection_samples:
            for (state,), n in sample.items():
                states[state] = states.get(state, 0.0) + n / len(s.connection_samples)
        connections_total = sum(states.values()) if states else None
        rows: dict[str, float | None] = {}
        if name == config.migration_target().name:
            for table in config.migration.affected_tables:
                found = s.ctx.query(ROWS_SQL, (table,))
                if not found:
                    missing.append(f"{name}: affected table {table} not found")
                    rows[table] = None
                elif found[0][0] < 0:
                    missing.append(f"{name}: affected table {table} never analyzed: no row estimate")
                    rows[table] = None
                else:
                    rows[table] = found[0][0]
        size_bytes = value_of(s.collectors["size"].collect(s.ctx), size.DATABASE_SIZE)
        targets[name] = {
            "in_recovery": s.server.in_recovery,
            "server_version_num": s.server.version_num,
            "tps": max(0.0, total) / window,
            "commits": commits,
            "rollbacks": rollbacks,
            "error_ratio": rollbacks / total if total > 0 else None,
            "statement_latency_seconds": latency,
            "statement_calls_per_second": calls_per_second,
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
            "database_size_bytes": size_bytes,
            "table_rows_estimate": rows,
        }
        for probe, durations, outcomes in s.probes:
            ok = [d for d, good in zip(durations, outcomes, strict=True) if good]
            if not ok:
                missing.append(f"probe {probe.name}: no successful run: latency not captured")
            probes[probe.name] = {
                "target": probe.target,
                "runs": len(durations),
                "success_ratio": sum(outcomes) / len(outcomes) if outcomes else None,
                "p50_seconds": quantile(ok, 0.50) if ok else None,
                "p95_seconds": quantile(ok, 0.95) if ok else None,
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
    }


def _capture_slis(config: Config, missing: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, query in (("error_ratio", config.slis.error_ratio), ("latency_seconds", config.slis.latency_seconds)):
        if not query:
            continue
        try:
            out[key] = query_prometheus(config.slis.prometheus_url, query)
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


def summary_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What the command prints after capturing: (what, value) pairs."""

    def fmt(v: float | None, unit: str = "", scale: float = 1.0, digits: int = 3) -> str:
        return "not captured" if v is None else f"{v * scale:.{digits}f}{unit}"

    rows = [("window", f"{doc['window_seconds']:.1f}s")]
    for name, t in doc["targets"].items():
        rows += [
            (f"{name} tps", fmt(t["tps"], "/s", digits=2)),
            (f"{name} error ratio", fmt(t["error_ratio"], "%", 100, 2)),
            (f"{name} mean statement latency", fmt(t["statement_latency_seconds"], " ms", 1000)),
            (
                f"{name} connections",
                fmt(t["connections"], f" of {t['connections_max']:.0f}" if t["connections_max"] else "", digits=1),
            ),
            (f"{name} database size", fmt(t["database_size_bytes"], " MB", 1e-6, 1)),
        ]
        for standby, lag in t["replication_lag_seconds"].items():
            rows.append((f"{name} lag of {standby} (max)", fmt(lag["max"], " s")))
        for table, n in t["table_rows_estimate"].items():
            rows.append((f"{name} rows in {table} (estimate)", fmt(n, digits=0)))
    for name, p in doc["probes"].items():
        rows.append(
            (
                f"probe {name} p50 / p95",
                f"{fmt(p['p50_seconds'], ' ms', 1000, 1)} / {fmt(p['p95_seconds'], ' ms', 1000, 1)}",
            )
        )
        rows.append((f"probe {name} success", fmt(p["success_ratio"], "%", 100, 1)))
    for key, v in doc.get("slis", {}).items():
        rows.append((f"sli {key}", fmt(v)))
    return rows
