"""What got slower: the statements whose mean time rose the most since the baseline's snapshot.

The baseline keeps, per target, the statements that took the most time in its window, with the mean
of the window and the pg_stat_statements counters at its end (baseline_file.StatementSnapshot). Here a
fresh reading of the same counters is taken on each target, and each statement of the snapshot is
matched by (target, queryid, userid, dbid):

- mean now = Δtotal / Δcalls between the baseline's end and now: the statement's own mean over the
  interval (migration included), never the cumulative mean, which a long history would flatten;
- when the counters are not comparable (pg_stat_statements_reset() ran, seen in `stats_reset`, or the
  entry's calls went down: it was evicted and came back), the mean since it started counting again,
  flagged `since_reset`;
- a statement is slower when its mean now exceeds max(baseline mean, latency_floor) × the checklist's
  ratio (thresholds.latency_degradation_ratio, "response times degraded >50%"): the rule
  MigrationLatencyDegraded applies to the sum, so a 0.02 ms statement at 0.05 ms is not listed.

Statements absent from the snapshot that are now among the top by time since the baseline (by the
interval's time for known ones, by their whole count for the others) are listed as new: their mean
before is unknown (new since the baseline, or below its top N then).

Texts appear here and in the report only; they are never labels. The exporter's role (the session's
`current_user`) and `migration.role` are left out, as the statements collector does. Every problem
(no snapshot in the baseline, extension missing, no privilege, a target down) is a note, not an error.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from migexport.baseline_file import Baseline, BaselineStatement, StatementSnapshot
from migexport.collectors.base import MARKER, Context, ServerInfo
from migexport.config import Config
from migexport.dsn import Target, redact
from migexport.targets import SERVER_SQL, SessionSettings, connect
from migexport.topstatements import Counters, Key, Reading, Unavailable, delta, read_counters, read_texts, reset_between

NO_SNAPSHOT = "no statement snapshot in the baseline (captured by an older migexport, or with --top-statements 0)"


@dataclass(frozen=True)
class SlowerStatement:
    target: str
    queryid: int
    role: str
    calls_baseline: float | None  # in the baseline window
    calls_since: float  # since the baseline's end (since the reset when mean_now_source is "since_reset")
    mean_baseline_seconds: float
    baseline_mean_source: str  # "window", or "cumulative" when it did not run in the baseline window
    mean_now_seconds: float
    mean_now_source: str  # "since_baseline", or "since_reset" when the counters were not comparable
    ratio: float
    query: str | None
    query_truncated: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "queryid": str(self.queryid)}  # 64-bit: exact as text in JSON


@dataclass(frozen=True)
class NewStatement:
    target: str
    queryid: int
    role: str
    calls: float  # since the baseline, or in its whole count (it was not in the snapshot)
    total_exec_seconds: float
    mean_seconds: float | None
    query: str | None
    query_truncated: bool

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "queryid": str(self.queryid)}


@dataclass
class SlowerResult:
    baseline_captured_at: float | None
    taken_at: float
    min_ratio: float
    latency_floor_seconds: float
    slower: list[SlowerStatement] = field(default_factory=list)
    new: list[NewStatement] = field(default_factory=list)
    compared: dict[str, int] = field(default_factory=dict)  # per target: statements with calls on both sides
    notes: list[str] = field(default_factory=list)

    @property
    def available(self) -> bool:
        """At least one statement was compared (an empty `slower` then means: nothing got slower)."""
        return any(n > 0 for n in self.compared.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "baseline_captured_at": self.baseline_captured_at,
            "taken_at": self.taken_at,
            "min_ratio": self.min_ratio,
            "latency_floor_seconds": self.latency_floor_seconds,
            "compared": dict(self.compared),
            "slower": [s.to_dict() for s in self.slower],
            "new": [s.to_dict() for s in self.new],
            "notes": list(self.notes),
        }


def slower_statements(
    config: Config,
    baseline: Baseline,
    *,
    limit: int = 10,
    min_ratio: float | None = None,
    latency_floor_seconds: float | None = None,
) -> SlowerResult:
    """Compare a fresh reading of every target's pg_stat_statements with the baseline's snapshot.

    At most `limit` slower statements (highest ratio first) and `limit` new ones (most time first).
    Never raises for the databases' sake: each problem is one line in `notes`.
    """
    result = SlowerResult(
        baseline_captured_at=baseline.captured_at,
        taken_at=time.time(),
        min_ratio=config.thresholds.latency_degradation_ratio if min_ratio is None else min_ratio,
        latency_floor_seconds=(
            config.thresholds.latency_floor_seconds if latency_floor_seconds is None else latency_floor_seconds
        ),
    )
    if baseline.top_statements is None:
        result.notes.append(NO_SNAPSHOT)
        return result
    session = SessionSettings(
        application_name=f"{config.application_name}-report",
        lock_timeout_ms=round(config.lock_timeout_seconds * 1000),
        statement_timeout_ms=round(config.statement_timeout_seconds * 1000),
    )
    for target in config.targets:
        snap = baseline.top_statements.get(target.name)
        if snap is None:
            result.notes.append(f"{target.name}: no statement snapshot in the baseline for this target")
            continue
        try:
            _compare_target(config, target, session, snap, result)
        except Unavailable as exc:
            result.notes.append(f"{target.name}: {exc}")
        except psycopg.Error as exc:
            result.notes.append(f"{target.name}: statements not compared: {_first_line(exc)}")
    for name in sorted(set(baseline.top_statements) - {t.name for t in config.targets}):
        result.notes.append(f"{name}: in the baseline's statement snapshot but not in the config: not compared")
    result.slower.sort(key=lambda s: (-s.ratio, -(s.mean_now_seconds - s.mean_baseline_seconds) * s.calls_since))
    result.new.sort(key=lambda s: -s.total_exec_seconds)
    del result.slower[limit:], result.new[limit:]
    return result


def _compare_target(
    config: Config, target: Target, session: SessionSettings, snap: StatementSnapshot, result: SlowerResult
) -> None:
    with connect(target, session) as conn:
        version, in_recovery, database = conn.execute(MARKER + SERVER_SQL).fetchone()  # type: ignore[misc]
        ctx = Context(target.name, conn, ServerInfo(version, in_recovery, database))
        reading = read_counters(ctx, (config.migration.role,))
        reset = reset_between(snap.stats_reset, reading.stats_reset)
        if reset:
            result.notes.append(
                f"{target.name}: pg_stat_statements was reset since the baseline: means now are since the reset"
            )
        if reading.hidden:
            result.notes.append(
                f"{target.name}: {reading.hidden} statements of other roles not identifiable: the role needs "
                "pg_read_all_stats (pg_monitor)"
            )
        if reading.database != snap.database:
            result.notes.append(f"{target.name}: the baseline watched database {snap.database}, now {database}")
        since = _since_baseline(target.name, snap, reading, reset, result)
        new = _new_statements(target.name, snap, reading, since)
        if new:
            texts = _texts(ctx, reading, list(new), target.name, result)
            result.new.extend(_with_text(s, texts.get(k)) for k, s in new.items())


def _since_baseline(
    target: str, snap: StatementSnapshot, reading: Reading, reset: bool, result: SlowerResult
) -> dict[Key, Counters]:
    """Each snapshot statement's counters since the baseline; the slower ones go into `result`."""
    since: dict[Key, Counters] = {}
    compared, gone = 0, 0
    for st in snap.statements:
        now = reading.counters.get(st.key)
        if now is None:
            gone += st.mean_source == "window"
            continue
        at_end = Counters(st.cumulative_calls, st.cumulative_total_exec_seconds, st.cumulative_rows)
        d, comparable = delta(at_end, now, reset)
        since[st.key] = d
        mean_now, mean_before = d.mean_seconds(), st.mean_exec_seconds
        if mean_now is None or not mean_before:
            continue
        compared += 1
        if mean_now > max(mean_before, result.latency_floor_seconds) * result.min_ratio:
            result.slower.append(_slower(target, st, d, mean_now, comparable))
    result.compared[target] = compared
    if gone:
        result.notes.append(
            f"{target}: {gone} statements that ran in the baseline window are not in pg_stat_statements now "
            "(reset, evicted, or their table was dropped and re-created, which gives them a new queryid)"
        )
    return since


def _slower(target: str, st: BaselineStatement, d: Counters, mean_now: float, comparable: bool) -> SlowerStatement:
    assert st.mean_exec_seconds
    return SlowerStatement(
        target=target,
        queryid=st.queryid,
        role=st.role,
        calls_baseline=st.calls,
        calls_since=d.calls,
        mean_baseline_seconds=st.mean_exec_seconds,
        baseline_mean_source=st.mean_source,
        mean_now_seconds=mean_now,
        mean_now_source="since_baseline" if comparable else "since_reset",
        ratio=mean_now / st.mean_exec_seconds,
        query=st.query,
        query_truncated=st.query_truncated,
    )


def _new_statements(
    target: str, snap: StatementSnapshot, reading: Reading, since: dict[Key, Counters]
) -> dict[Key, NewStatement]:
    """Statements outside the snapshot that rank among the top `snap.limit` by time since the baseline."""
    known = {st.key for st in snap.statements}
    timed = {**{k: c for k, c in reading.counters.items() if k not in known}, **since}
    top = sorted(timed, key=lambda k: (-timed[k].total_seconds, k))[: snap.limit]
    return {
        k: NewStatement(
            target=target,
            queryid=k[0],
            role=reading.roles[k],
            calls=timed[k].calls,
            total_exec_seconds=timed[k].total_seconds,
            mean_seconds=timed[k].mean_seconds(),
            query=None,
            query_truncated=False,
        )
        for k in top
        if k not in known and timed[k].calls > 0
    }


def _texts(
    ctx: Context, reading: Reading, keys: list[Key], target: str, result: SlowerResult
) -> dict[Key, tuple[str, bool]]:
    try:
        return read_texts(ctx, reading, keys)
    except psycopg.Error as exc:  # a huge text file can outlast statement_timeout: keep the numbers
        result.notes.append(f"{target}: texts of new statements not read: {_first_line(exc)}")
        return {}


def _with_text(s: NewStatement, text: tuple[str, bool] | None) -> NewStatement:
    if text is None:
        return s
    return NewStatement(**{**asdict(s), "query": text[0], "query_truncated": text[1]})


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__)
