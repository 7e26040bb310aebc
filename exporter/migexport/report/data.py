"""Everything the report shows, gathered once: the migration, its window, the success criteria as
Prometheus evaluates them, the timelines, the alerts that fired, the checks, the run log's tail and the
statements that got slower.

The criteria are the instant values of the recording rules `migexport:success_criterion:*` exactly as
Prometheus returns them (the value strings are kept), so the page and the Migration dashboard never
disagree. The charts query the same series as the dashboard's panels, with the same recording-rule names.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migexport import __version__
from migexport.baseline_file import BaselineError, read_baseline
from migexport.checks.result import ChecksFileError, read_checks
from migexport.config import Config
from migexport.dsn import redact
from migexport.report.logtail import log_tail
from migexport.report.prometheus import Prometheus, ReportError, Sample, Series, quote
from migexport.report.timelines import Chart, timelines
from migexport.state import StateError, read_state, this_machine
from migexport.success import ACTUAL, CRITERIA, PASSED, TARGET

# How far back `--id` looks for a migration in Prometheus' history (its default retention).
HISTORY_LOOKBACK = "15d"
# Without a baseline time, the charts start this long before the migration.
DEFAULT_LEAD_SECONDS = 900.0


@dataclass(frozen=True)
class Migration:
    migration_id: str
    status: str  # succeeded, failed, timed_out, running, lost
    started_at: float
    ended_at: float | None
    exit_code: int | None
    time_budget_seconds: float | None
    watch_window_seconds: float
    source: str  # "state file PATH" or "Prometheus history"
    host: str | None = None
    user: str | None = None
    command: str | None = None
    summaries: dict[str, Any] = field(default_factory=dict)  # run's preflight/verify/server_cancel summaries

    @property
    def duration(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    baseline_at: float | None  # when the baseline's sampling started, if known
    criteria_at: float  # when the criteria were evaluated
    baseline_end: float | None = None  # when it ended (the baseline's captured_at)


@dataclass(frozen=True)
class CriterionRow:
    criterion: str
    instance: str  # job/instance when more than one exporter answers, else ""
    target: Sample | None
    actual: Sample | None
    passed: Sample | None

    @property
    def result(self) -> str:
        if self.passed is None:
            return "NO DATA"
        return "PASS" if self.passed.value == 1 else "FAIL"


@dataclass(frozen=True)
class FiredAlert:
    name: str
    action: str
    severity: str
    labels: dict[str, str]
    start: float
    end: float
    ongoing: bool  # still firing at the end of the window


@dataclass
class ReportData:
    migration: Migration
    window: Window
    prometheus_url: str
    criteria: list[CriterionRow]
    charts: list[Chart]
    alerts: list[FiredAlert]
    checks: dict[str, dict[str, Any]]  # kind -> report of this migration
    checks_note: str
    log_lines: list[str]
    log_note: str
    slower: dict[str, Any] | None
    slower_note: str
    generated_at: float = field(default_factory=time.time)
    version: str = __version__


def gather(config: Config, prom: Prometheus, migration_id: str | None = None) -> ReportData:
    now = time.time()
    migration = find_migration(config, prom, migration_id, now)
    window = find_window(config, prom, migration, now)
    require_data(prom, migration, window)
    criteria, criteria_at = criteria_rows(prom, migration.migration_id, window)
    window = Window(window.start, window.end, window.baseline_at, criteria_at, window.baseline_end)
    checks, checks_note = checks_of(config, migration.migration_id)
    lines, log_note = log_tail(config.resolve(config.migration.log_file), migration.migration_id)
    slower, slower_note = slower_statements(config)
    return ReportData(
        migration=migration,
        window=window,
        prometheus_url=redact(prom.url),
        criteria=criteria,
        charts=timelines(prom, config.thresholds, migration, window.start, window.end),
        alerts=fired_alerts(prom, migration.migration_id, window),
        checks=checks,
        checks_note=checks_note,
        log_lines=lines,
        log_note=log_note,
        slower=slower,
        slower_note=slower_note,
    )


# -- the migration ---------------------------------------------------------------------------------


def find_migration(config: Config, prom: Prometheus, migration_id: str | None, now: float) -> Migration:
    """The state file's migration (when it is the one asked for), else the one Prometheus remembers."""
    path = config.resolve(config.migration.state_file)
    try:
        state = read_state(path)
    except StateError as exc:
        if migration_id is None:
            raise ReportError(str(exc)) from None
        state = None
    if state is not None and migration_id in (None, state.migration_id):
        status = state.status
        if state.lost(now, this_machine()):
            status = "lost"
        return Migration(
            migration_id=state.migration_id,
            status=status,
            started_at=state.started_at,
            ended_at=state.ended_at,
            exit_code=state.exit_code,
            time_budget_seconds=state.time_budget_seconds,
            watch_window_seconds=state.watch_window_seconds,
            source=f"state file {path}",
            host=state.host,
            user=state.user or _owner(path),
            command=_command_from_log(config, state.migration_id),
            summaries={k: v for k in ("preflight", "verify", "server_cancel") if (v := getattr(state, k))},
        )
    if migration_id is None:
        raise ReportError(f"{path}: no migration recorded yet (run 'migexport run' first, or give --id ID)")
    return _from_history(config, prom, migration_id, now)


def _owner(path: Path) -> str | None:
    """Who wrote the state file: for a state written before `run` recorded its user."""
    try:
        import pwd

        return pwd.getpwuid(path.stat().st_uid).pw_name
    except (ImportError, KeyError, OSError):
        return None


def _command_from_log(config: Config, migration_id: str) -> str | None:
    """`run` logs "migration ID: COMMAND (time limit Ns)" when it starts the command."""
    from migexport.report.logtail import command_line

    return command_line(config.resolve(config.migration.log_file), migration_id)


def _from_history(config: Config, prom: Prometheus, migration_id: str, now: float) -> Migration:
    sel = f"{{migration_id={quote(migration_id)}}}"

    def last(metric: str, fn: str = "last_over_time") -> float | None:
        found = prom.query(f"max({fn}({metric}{sel}[{HISTORY_LOOKBACK}]))", at=now)
        return found[0].value if found and math.isfinite(found[0].value) else None

    started = last("migexport_migration_start_timestamp_seconds")
    if started is None:
        raise ReportError(
            f"Prometheus at {redact(prom.url)} has no migration {migration_id!r} in the last {HISTORY_LOOKBACK} "
            "(migexport_migration_start_timestamp_seconds)"
        )
    ended = last("migexport_migration_end_timestamp_seconds")
    exit_code = last("migexport_migration_exit_code")
    if ended is None:
        status = "running" if last("migexport_migration_in_progress") == 1 else "lost"
    elif last("migexport_migration_timed_out", "max_over_time") == 1:
        status = "timed_out"
    else:
        status = "failed" if last("migexport_migration_failed", "max_over_time") == 1 else "succeeded"
    return Migration(
        migration_id=migration_id,
        status=status,
        started_at=started,
        ended_at=ended,
        exit_code=None if exit_code is None else int(exit_code),
        time_budget_seconds=last("migexport_migration_time_budget_seconds"),
        watch_window_seconds=_watch_window(prom, sel, started, ended, now, config.migration.watch_window_seconds),
        source="Prometheus history",
        command=_command_from_log(config, migration_id),
    )


def _watch_window(prom: Prometheus, sel: str, started: float, ended: float | None, now: float, default: float) -> float:
    """The watch window `run` was given, read back from when the alerts' arming switch went off: after the
    last scrape that read 1 and by the first that read 0; within that, the config's own value, else the
    roundest number of seconds (watch windows are written as 30s, 10m, 1h)."""
    if ended is None:
        return default
    span = math.ceil(now - started) + 60
    points = sorted(
        p for s in prom.raw_samples(f"migexport_migration_watch_active{sel}[{span}s]", at=now) for p in s.points
    )
    armed = [t for t, v in points if v == 1 and t >= ended]
    if not armed:
        return default
    after = [t for t, v in points if v == 0 and t > armed[-1]]
    low, high = armed[-1] - ended, (after[0] if after else now) - ended
    if not after:  # still armed, or no longer exported (another migration took over)
        return max(low, min(default, high))
    if low < default <= high:
        return default
    return _roundest(low, high)


def _roundest(low: float, high: float) -> float:
    """The whole number of seconds in (low, high] divisible by the largest of 3600, 60, 10, 5, 1."""
    for unit in (3600, 60, 10, 5, 1):
        candidate = math.floor(low / unit + 1) * unit
        if candidate <= high:
            return float(candidate)
    return high


# -- the window ------------------------------------------------------------------------------------


def find_window(config: Config, prom: Prometheus, migration: Migration, now: float) -> Window:
    """From the baseline's sampling to the end of the watch window (clipped to now)."""
    end = now if migration.ended_at is None else min(now, migration.ended_at + migration.watch_window_seconds)
    sampled = _baseline_sampling(config, prom, migration)
    if sampled is None:
        return Window(migration.started_at - DEFAULT_LEAD_SECONDS, end, None, end)
    return Window(min(sampled[0], migration.started_at), end, sampled[0], end, sampled[1])


def _baseline_sampling(config: Config, prom: Prometheus, migration: Migration) -> tuple[float, float] | None:
    """When the baseline in use was sampled (start, end): the baseline file if it predates the migration,
    else the baseline Prometheus saw during it."""
    try:
        baseline = read_baseline(config.resolve(config.baseline_file))
        if baseline.captured_at <= migration.started_at:
            return baseline.captured_at - baseline.window_seconds, baseline.captured_at
    except BaselineError:
        pass
    at = migration.ended_at or migration.started_at
    sel = f"{{migration_id={quote(migration.migration_id)}}}"
    captured = prom.query(
        f"max(last_over_time(migexport_baseline_captured_timestamp_seconds{sel}[{HISTORY_LOOKBACK}]))", at=at + 60
    )
    windows = prom.query(f"max(last_over_time(migexport_baseline_window_seconds{sel}[{HISTORY_LOOKBACK}]))", at=at + 60)
    if captured and math.isfinite(captured[0].value):
        return captured[0].value - (windows[0].value if windows else 0.0), captured[0].value
    return None


def require_data(prom: Prometheus, migration: Migration, window: Window) -> None:
    """No report without data: an empty page would read as 'nothing happened'."""
    span = max(1, math.ceil(window.end - window.start))
    sel = f"{{migration_id={quote(migration.migration_id)}}}"
    expr = f"count(count_over_time(migexport_migration_start_timestamp_seconds{sel}[{span}s]))"
    if not prom.query(expr, at=window.end):
        raise ReportError(
            f"Prometheus at {redact(prom.url)} has no data for migration {migration.migration_id!r} between "
            f"{stamp(window.start)} and {stamp(window.end)} (does it scrape 'migexport serve'? retention?)"
        )


def stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


# -- the success criteria --------------------------------------------------------------------------


def criteria_rows(prom: Prometheus, migration_id: str, window: Window) -> tuple[list[CriterionRow], float]:
    """The three recording rules at their last evaluation up to the end of the window (or now).

    At the timestamp of a stored evaluation rather than at the window's end itself: an instant query there
    would take whatever evaluation is newest at the time of asking, and an evaluation stored a moment later
    would change it. This way the page and anyone asking Prometheus afterwards read the same values; and
    when the exporter has moved on to another migration, the last values this one had are found too.
    """
    span = max(1, math.ceil(window.end - window.start))
    seen = prom.raw_samples(f"{PASSED}{{migration_id={quote(migration_id)}}}[{span}s]", at=window.end)
    seen += prom.raw_samples(f"{TARGET}{{migration_id={quote(migration_id)}}}[{span}s]", at=window.end)
    times = [t for s in seen for t, _ in s.points]
    if not times:
        return [], window.end
    at = max(times)
    return _criteria_at(prom, migration_id, at), at


def _criteria_at(prom: Prometheus, migration_id: str, at: float) -> list[CriterionRow]:
    sel = f"{{migration_id={quote(migration_id)}}}"
    found: dict[tuple[str, str], dict[str, Sample]] = {}
    for which, name in (("target", TARGET), ("actual", ACTUAL), ("passed", PASSED)):
        for sample in prom.query(name + sel, at=at):
            key = (
                sample.labels.get("criterion", ""),
                f"{sample.labels.get('job', '')}/{sample.labels.get('instance', '')}",
            )
            found.setdefault(key, {})[which] = sample
    instances = {inst for _, inst in found}
    order = {c: i for i, c in enumerate(CRITERIA)}
    return [
        CriterionRow(c, inst if len(instances) > 1 else "", v.get("target"), v.get("actual"), v.get("passed"))
        for (c, inst), v in sorted(found.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0]))
    ]


# -- alerts ----------------------------------------------------------------------------------------

HIDDEN_LABELS = {"alertname", "alertstate", "action", "severity", "job", "instance", "migration_id", "__name__"}


def fired_alerts(prom: Prometheus, migration_id: str, window: Window) -> list[FiredAlert]:
    """Every firing episode from ALERTS' stored samples: consecutive evaluations form one episode."""
    span = max(1, math.ceil(window.end - window.start))
    series: list[Series] = []
    for sel in (f"migration_id={quote(migration_id)}", 'migration_id=""'):
        series += prom.raw_samples(f'ALERTS{{alertstate="firing", {sel}}}[{span}s]', at=window.end)
    gap = _episode_gap(series)
    out: list[FiredAlert] = []
    for s in series:
        times = sorted(t for t, _ in s.points)
        for first, last in _episodes(times, gap):
            out.append(
                FiredAlert(
                    name=s.labels.get("alertname", ""),
                    action=s.labels.get("action", ""),
                    severity=s.labels.get("severity", ""),
                    labels={k: v for k, v in sorted(s.labels.items()) if k not in HIDDEN_LABELS and v},
                    start=first,
                    end=last,
                    ongoing=window.end - last < gap,
                )
            )
    return sorted(out, key=lambda a: (a.start, a.name))


def _episode_gap(series: list[Series]) -> float:
    """A pause longer than a few evaluation intervals ends an episode (the interval read from the samples)."""
    steps = sorted(b - a for s in series for (a, _), (b, _) in zip(s.points, s.points[1:], strict=False) if b > a)
    return max(2.5 * steps[len(steps) // 2], 1.0) if steps else 60.0


def _episodes(times: list[float], gap: float) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for t in times:
        if out and t - out[-1][1] <= gap:
            out[-1] = (out[-1][0], t)
        else:
            out.append((t, t))
    return out


# -- checks and slower statements --------------------------------------------------------------------


def checks_of(config: Config, migration_id: str) -> tuple[dict[str, dict[str, Any]], str]:
    path = config.resolve(config.migration.checks_file)
    try:
        reports = read_checks(path)
    except ChecksFileError as exc:
        return {}, str(exc)
    mine = {k: _normalised(r) for k, r in reports.items() if r.get("migration_id") in (migration_id, "")}
    others = [f"{k} of migration {r.get('migration_id')!r}" for k, r in reports.items() if k not in mine]
    if not reports:
        return {}, f"{path}: no preflight or verify recorded"
    note = f"{path}: the last recorded is the {', '.join(others)}" if others else ""
    return mine, note


def _normalised(report: dict[str, Any]) -> dict[str, Any]:
    """A report of the checks file with every field the page shows, as text (read_checks checks the file's
    envelope, not each row: a file edited by hand must not break the page)."""
    fields = ("check", "table", "status", "value", "limit", "advice")
    checks = [c for c in report.get("checks") or [] if isinstance(c, dict)]
    integrity = report.get("integrity")
    at = report.get("at")
    return {
        "at": float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None,
        "ok": report.get("ok") is True,
        "checks": [{f: redact(str(c.get(f) or "")) for f in fields} for c in checks],
        "integrity": integrity if isinstance(integrity, dict) and {"passed", "total"} <= set(integrity) else None,
    }


def slower_statements(config: Config) -> tuple[dict[str, Any] | None, str]:
    """'What got slower' from report/slower.py (pg_stat_statements now against the baseline's snapshot)."""
    try:
        from migexport.report import slower  # type: ignore[attr-defined]
    except ImportError:
        return None, "not available in this version (report/slower.py is missing)"
    try:
        baseline = read_baseline(config.resolve(config.baseline_file))
    except BaselineError as exc:
        return None, f"no baseline to compare with: {exc}"
    try:
        return slower.slower_statements(config, baseline, limit=10).to_dict(), ""
    except Exception as exc:  # a broken comparison is a note on the page, not a lost report
        return (
            None,
            f"could not compare statements: {redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__}",
        )
