"""The configuration file (`migexport.yml`): targets, the migration, thresholds, probes, apps, SLIs.

Every number the alert rules use lives in `Thresholds`, with the checklist's values as defaults, so
rules and dashboards are rendered from one place. Validation collects every problem, each as one
line naming its key (`thresholds.replication_lag_rollback: must be ...`); unknown keys are errors,
because a misspelt threshold silently falling back to its default is how alerts end up wrong.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from migexport.dsn import TARGET_NAME, Target, TargetError, resolve_source, validate_dsn
from migexport.paths import coinciding, known_files
from migexport.units import (
    DAY,
    PG_TIMEOUT_MAX_SECONDS,
    PG_TIMEOUT_MIN_SECONDS,
    PROMETHEUS_MAX_DURATION_SECONDS,
    parse_duration,
    parse_listen,
    show,
)

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


# A migration's time budget and watch window: longer than a month is a typo, not a plan (and stays far
# below what timers and Prometheus ranges can hold).
MAX_RUN_SECONDS = 31 * 86400.0


class ConfigError(ValueError):
    """One or more problems in a config file; `problems` holds one printable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Thresholds:
    """Every number the alert rules use. Defaults come from the production migration checklist."""

    # "Consider rollback if: response times degraded >50%": latency > baseline x this.
    latency_degradation_ratio: float = 1.5
    # "Error rate increased >10%": error ratio > baseline x this ...
    error_rate_increase_ratio: float = 1.1
    # ... and above this absolute ratio, so that 10 % more of almost nothing cannot page.
    error_ratio_floor: float = 0.01
    # Baseline latency below this is raised to it before comparing (a 0.1 ms baseline x 1.5 is noise).
    latency_floor_seconds: float = 0.001
    # The same for a probe's p95, which is timed by the client: scheduling on a busy host (and Python's
    # thread switching in the exporter) moves a probe's timing by milliseconds, whatever the query does.
    probe_latency_floor_seconds: float = 0.005
    # "Replication lag >10 minutes": consider rollback.
    replication_lag_rollback_seconds: float = 600.0
    # "Replication lag < threshold" while monitoring: watch.
    replication_lag_watch_seconds: float = 30.0
    # "Lock wait time < threshold".
    lock_wait_seconds: float = 10.0
    # The migration's session blocks others for longer than this.
    blocking_seconds: float = 30.0
    # "Connection count stable": further than this fraction from the baseline ...
    connections_change_ratio: float = 0.5
    # ... where a baseline below this many connections counts as this many (one extra session on a
    # quiet database is not "unstable") ...
    connections_floor: float = 10.0
    # ... or above this share of max_connections.
    connections_utilisation_max: float = 0.9
    # Success criteria: "Error rate change < 1%", "Response time change < 10%".
    success_error_rate_change_max: float = 0.01
    success_latency_change_max: float = 0.10
    # How long a condition must hold before a warning fires ...
    alert_for_seconds: float = 120.0
    # ... and before an immediate-rollback page (health check or key query failing) fires.
    critical_for_seconds: float = 60.0
    # How old a baseline may be before it is reported stale.
    baseline_max_age_seconds: float = 86400.0
    # The window every live rate and quantile is taken over (PromQL range). 5m suits a 30-minute
    # migration: long enough for a stable value, short enough to see a change within minutes.
    rate_window_seconds: float = 300.0
    # A relative trigger fires only when the change is this many standard deviations beyond the noise
    # of the window's volume (a two-proportion z-test for errors, a z-test of means for latency).
    significance_sigmas: float = 3.0
    # ... and only with at least this many transactions / statement calls / probe runs in the window.
    error_min_transactions: float = 200.0
    latency_min_calls: float = 200.0
    probe_min_runs: float = 10.0


DURATION_FIELDS = {
    "latency_floor_seconds",
    "probe_latency_floor_seconds",
    "replication_lag_rollback_seconds",
    "replication_lag_watch_seconds",
    "lock_wait_seconds",
    "blocking_seconds",
    "alert_for_seconds",
    "critical_for_seconds",
    "baseline_max_age_seconds",
    "rate_window_seconds",
}


@dataclass(frozen=True)
class Migration:
    id: str = "migration"
    target: str = ""  # the target the migration runs against; default: the first target
    affected_tables: tuple[str, ...] = ()
    time_budget_seconds: float = 1800.0  # "timeout 30m"
    watch_window_seconds: float = 3600.0  # "Short-Term (First Hour)"
    session_application_name: str = "migration"  # how to recognise the migration's database session
    log_file: str = "migration.log"
    state_file: str = "migexport-state.json"
    # The database role the migration runs as (recommended: one of its own). Its statements stay out
    # of the application's latency sums, and `run` recognises its sessions by it as well.
    role: str = ""
    # How `run` reaches the server to cancel the migration's statements at its time limit or on a
    # signal: a DSN source (libpq string, env:VAR, file:PATH). Empty: the libpq environment (PG*
    # variables) the migration command itself gets.
    control_dsn: str = ""
    # The migration's own SQL files: linted by `preflight` with squawk when given.
    sql_files: tuple[str, ...] = ()
    # How to undo it ("Rollback script ready"): a file (checked to exist and be readable) or a
    # command (its program checked to exist). Preflight warns when neither is set.
    rollback_file: str = ""
    rollback_command: str = ""
    # The lock_timeout the migration sets for itself: preflight fails when a session has held a lock on
    # an affected table for longer, because the migration's DDL would queue behind it for that long.
    lock_timeout_seconds: float = 5.0
    # Where `run` (or `migexport snapshot`) records the affected tables before the command, and where
    # preflight and verify write their last results (both read by `serve`).
    snapshot_file: str = "migexport-snapshot.json"
    checks_file: str = "migexport-checks.json"


@dataclass(frozen=True)
class Preflight:
    """The go / no-go checks' limits (`migexport preflight`)."""

    # Backup recency: a command printing the last successful backup's end time (ISO 8601 or Unix
    # seconds), or a pgBackRest stanza read with `pgbackrest --output=json --stanza=S info`.
    backup_command: str = ""
    pgbackrest_stanza: str = ""
    backup_max_age_seconds: float = 86400.0
    # How long a backup command may run.
    command_timeout_seconds: float = 60.0
    # WAL segments waiting to be archived (`.ready` files); GitLab pauses migrations above 42.
    archive_ready_max: float = 42.0
    # Current transaction rate over the baseline's: above this is not "traffic at acceptable level".
    traffic_max_ratio: float = 1.5
    # The standbys (their application_name on the migration target) that must be streaming; empty:
    # every standby among the targets must be, and at least as many as there are standby targets.
    standbys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Invariant:
    """A read-only query whose result must hold after the migration (`expect`): `equal` (the same
    value before and after), `zero`, or `at_most` `value`."""

    name: str
    sql: str
    expect: str = "equal"
    value: float = 0.0


@dataclass(frozen=True)
class FrozenTable:
    """A table nothing may change during the migration: an order-independent checksum of `columns`
    (count and summed hashes), segmented by ranges of `key`, compared before and after."""

    table: str
    columns: tuple[str, ...]
    key: str = "id"
    segments: int = 16


@dataclass(frozen=True)
class Verify:
    """`migexport verify`: where integrity queries run, what the schema may change, what must hold."""

    # Where the integrity queries (invariants, checksums) run; a replica is recommended. Default: the
    # migration's target. Schema checks always read the migration's target.
    target: str = ""
    # A DSN source (libpq string, env:VAR, file:PATH) for a verification role with SELECT on the
    # tables; empty: the target's DSN.
    dsn: str = ""
    # statement_timeout of each integrity query.
    statement_timeout_seconds: float = 30.0
    # Per affected table, the schema changes the migration is meant to make:
    # {table: {columns|indexes|constraints: {added|dropped|changed: [names]}}}. Any other change of a
    # table listed here fails verify; tables not listed only report their changes.
    expect: dict[str, dict[str, dict[str, tuple[str, ...]]]] = field(default_factory=dict)
    invariants: tuple[Invariant, ...] = ()
    frozen_tables: tuple[FrozenTable, ...] = ()


@dataclass(frozen=True)
class Probe:
    name: str
    sql: str
    target: str
    interval_seconds: float = 15.0
    timeout_seconds: float = 2.0


@dataclass(frozen=True)
class App:
    name: str
    url: str
    interval_seconds: float = 15.0
    timeout_seconds: float = 2.0


@dataclass(frozen=True)
class Slis:
    prometheus_url: str = ""
    error_ratio: str = ""
    latency_seconds: str = ""


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...]
    listen: str = ":9745"
    scrape_timeout_seconds: float = 5.0
    statement_timeout_seconds: float = 2.0
    lock_timeout_seconds: float = 0.1
    application_name: str = "migexport"
    baseline_file: str = "baseline.json"
    # TLS and basic auth on /metrics (exporter-toolkit format, see web_config.py); "": plain HTTP, open.
    web_config_file: str = ""
    migration: Migration = field(default_factory=Migration)
    thresholds: Thresholds = field(default_factory=Thresholds)
    probes: tuple[Probe, ...] = ()
    apps: tuple[App, ...] = ()
    slis: Slis = field(default_factory=Slis)
    preflight: Preflight = field(default_factory=Preflight)
    verify: Verify = field(default_factory=Verify)
    path: Path | None = None

    def migration_target(self) -> Target:
        wanted = self.migration.target or self.targets[0].name
        return next(t for t in self.targets if t.name == wanted)

    def resolve(self, relative: str) -> Path:
        """Paths in the file are relative to the file's directory."""
        p = Path(relative)
        if p.is_absolute() or self.path is None:
            return p
        return self.path.parent / p


class _Reader:
    """Walks the parsed YAML, recording each problem with the dotted key it belongs to."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        # One printable line, however long or odd the key or value the file holds.
        line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in f"{key}: {message}")
        self.problems.append(line if len(line) <= 300 else line[:297] + "...")

    def mapping(self, value: Any, key: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(key, f"must be a mapping, got {type(value).__name__}")
            return {}
        for unknown in sorted(set(map(str, value)) - allowed):
            self.problem(f"{key}.{unknown}" if key else unknown, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return {str(k): v for k, v in value.items() if str(k) in allowed}

    def duration(
        self,
        value: Any,
        key: str,
        default: float,
        positive: bool = True,
        minimum: float = 0.0,
        maximum: float = PROMETHEUS_MAX_DURATION_SECONDS,
    ) -> float:
        """Finite, at most `maximum` (Prometheus' longest by default), and a positive value below
        `minimum` refused rather than rounded to 0 (a timeout of 0 is no timeout)."""
        if value is None:
            return default
        try:
            seconds = parse_duration(value, maximum=maximum, minimum=minimum)
        except (ValueError, TypeError) as exc:
            self.problem(key, str(exc))
            return default
        if positive and seconds <= 0:
            self.problem(key, f"must be greater than 0, got {show(value)}")
            return default
        return seconds

    def timeout(self, value: Any, key: str, default: float, maximum: float = PG_TIMEOUT_MAX_SECONDS) -> float:
        """A timeout: from 1ms (PostgreSQL's unit; below it would be 0, i.e. none) to `maximum`."""
        return self.duration(value, key, default, minimum=PG_TIMEOUT_MIN_SECONDS, maximum=maximum)

    def number(self, value: Any, key: str, default: float, minimum: float = 0.0, maximum: float = 1e12) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, f"must be a number, got {show(value)}")
            return default
        if isinstance(value, int) and abs(value) > maximum:  # before float(): 10**400 overflows it
            self.problem(key, f"must be at most {maximum:g}, got {show(value)}")
            return default
        if not math.isfinite(value):
            self.problem(key, f"must be a finite number, got {show(value)}")
            return default
        if value < minimum:
            self.problem(key, f"must be >= {minimum:g}, got {show(value)}")
        if value > maximum:
            self.problem(key, f"must be at most {maximum:g}, got {show(value)}")
            return default
        return float(value)

    def string(self, value: Any, key: str, default: str, required: bool = False) -> str:
        if value is None:
            if required:
                self.problem(key, "is required")
            return default
        if not isinstance(value, str) or (required and not value.strip()):
            self.problem(key, f"must be a non-empty string, got {value!r}")
            return default
        return value

    def name(self, value: Any, key: str) -> str:
        text = self.string(value, key, "", required=True)
        if text and not NAME.match(text):
            self.problem(key, f"{text!r}: use letters, digits, '_', '.', '-' (starting with a letter)")
        return text

    def items(self, value: Any, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(key, f"must be a list, got {type(value).__name__}")
            return []
        return value

    def strings(self, value: Any, key: str) -> list[str]:
        out: list[str] = []
        for i, item in enumerate(self.items(value, key)):
            if not isinstance(item, str) or not item.strip():
                self.problem(f"{key}[{i}]", f"must be a non-empty string, got {item!r}")
            else:
                out.append(item)
        return out


TOP_KEYS = {
    "targets",
    "listen",
    "scrape_timeout",
    "statement_timeout",
    "lock_timeout",
    "application_name",
    "baseline_file",
    "web_config_file",
    "migration",
    "thresholds",
    "probes",
    "apps",
    "slis",
    "preflight",
    "verify",
}


def _targets(r: _Reader, raw: Any, environ: dict[str, str] | os._Environ[str]) -> list[Target]:
    targets: list[Target] = []
    if raw is None or raw == {}:
        r.problem("targets", "at least one target is required")
        return targets
    if not isinstance(raw, dict):
        r.problem("targets", "must be a mapping of NAME: {dsn: ...} or NAME: {dsn_env: VAR} or NAME: {dsn_file: PATH}")
        return targets
    for name, spec in raw.items():
        key = f"targets.{name}"
        if not isinstance(name, str) or not TARGET_NAME.match(name):
            r.problem(key, "target names use letters, digits, '_', '.', '-' (starting with a letter)")
            continue
        if isinstance(spec, str):
            spec = {"dsn": spec}
        entry = r.mapping(spec, key, {"dsn", "dsn_env", "dsn_file"})
        given = [k for k in ("dsn", "dsn_env", "dsn_file") if entry.get(k)]
        if len(given) != 1:
            r.problem(key, "give exactly one of dsn, dsn_env, dsn_file")
            continue
        kind = given[0]
        value = str(entry[kind])
        source = {"dsn": value, "dsn_env": f"env:{value}", "dsn_file": f"file:{value}"}[kind]
        try:
            dsn = resolve_source(name, source, environ)
            validate_dsn(name, dsn)
            targets.append(Target(name, dsn))
        except TargetError as exc:
            r.problem(f"{key}.{kind}", str(exc).removeprefix(f"target {name!r}: "))
    return targets


def _thresholds(r: _Reader, raw: Any) -> Thresholds:
    names = {f.name.removesuffix("_seconds") if f.name in DURATION_FIELDS else f.name: f for f in fields(Thresholds)}
    entry = r.mapping(raw, "thresholds", set(names))
    values: dict[str, float] = {}
    for key, f in names.items():
        default = f.default
        if f.name in DURATION_FIELDS:
            # At least 1ms: the rules render durations in milliseconds at the finest.
            values[f.name] = r.duration(entry.get(key), f"thresholds.{key}", default, minimum=0.001)  # type: ignore[arg-type]
        else:
            values[f.name] = r.number(entry.get(key), f"thresholds.{key}", default)  # type: ignore[arg-type]
    for ratio in ("latency_degradation_ratio", "error_rate_increase_ratio"):
        if ratio in entry and values[ratio] < 1:
            r.problem(f"thresholds.{ratio}", f"must be >= 1 (a factor over the baseline), got {entry[ratio]!r}")
    for count in ("error_min_transactions", "latency_min_calls", "probe_min_runs"):
        if count in entry and values[count] < 1:
            r.problem(f"thresholds.{count}", f"must be at least 1, got {entry[count]!r}")
    if "significance_sigmas" in entry and values["significance_sigmas"] <= 0:
        r.problem("thresholds.significance_sigmas", f"must be greater than 0, got {entry['significance_sigmas']!r}")
    for share in ("connections_utilisation_max", "error_ratio_floor"):
        if share in entry and values[share] > 1:
            r.problem(f"thresholds.{share}", f"must be a fraction between 0 and 1, got {entry[share]!r}")
    return Thresholds(**values)


def _migration(r: _Reader, raw: Any, target_names: list[str]) -> Migration:
    keys = {
        "id",
        "target",
        "affected_tables",
        "time_budget",
        "watch_window",
        "session_application_name",
        "log_file",
        "state_file",
        "role",
        "control_dsn",
        "sql_files",
        "rollback_file",
        "rollback_command",
        "lock_timeout",
        "snapshot_file",
        "checks_file",
    }
    entry = r.mapping(raw, "migration", keys)
    d = Migration()
    target = r.string(entry.get("target"), "migration.target", "")
    if target and target_names and target not in target_names:
        r.problem("migration.target", f"{target!r} is not one of the targets ({', '.join(target_names)})")
    tables = r.items(entry.get("affected_tables"), "migration.affected_tables")
    for i, table in enumerate(tables):
        if not isinstance(table, str) or not table.strip():
            r.problem(f"migration.affected_tables[{i}]", f"must be a table name, got {table!r}")
    mig_id = r.string(entry.get("id"), "migration.id", d.id)
    if not NAME.match(mig_id):
        r.problem("migration.id", f"{mig_id!r}: use letters, digits, '_', '.', '-' (starting with a letter)")
    return Migration(
        id=mig_id,
        target=target,
        affected_tables=tuple(t for t in tables if isinstance(t, str)),
        time_budget_seconds=r.duration(
            entry.get("time_budget"), "migration.time_budget", d.time_budget_seconds, maximum=MAX_RUN_SECONDS
        ),
        watch_window_seconds=r.duration(
            entry.get("watch_window"), "migration.watch_window", d.watch_window_seconds, maximum=MAX_RUN_SECONDS
        ),
        session_application_name=r.string(
            entry.get("session_application_name"), "migration.session_application_name", d.session_application_name
        ),
        log_file=r.string(entry.get("log_file"), "migration.log_file", d.log_file),
        state_file=r.string(entry.get("state_file"), "migration.state_file", d.state_file),
        role=r.string(entry.get("role"), "migration.role", d.role),
        control_dsn=r.string(entry.get("control_dsn"), "migration.control_dsn", d.control_dsn),
        sql_files=tuple(r.strings(entry.get("sql_files"), "migration.sql_files")),
        rollback_file=r.string(entry.get("rollback_file"), "migration.rollback_file", d.rollback_file),
        rollback_command=r.string(entry.get("rollback_command"), "migration.rollback_command", d.rollback_command),
        lock_timeout_seconds=r.timeout(entry.get("lock_timeout"), "migration.lock_timeout", d.lock_timeout_seconds),
        snapshot_file=r.string(entry.get("snapshot_file"), "migration.snapshot_file", d.snapshot_file),
        checks_file=r.string(entry.get("checks_file"), "migration.checks_file", d.checks_file),
    )


def _probes(r: _Reader, raw: Any, target_names: list[str]) -> list[Probe]:
    probes: list[Probe] = []
    seen: set[str] = set()
    for i, item in enumerate(r.items(raw, "probes")):
        key = f"probes[{i}]"
        entry = r.mapping(item, key, {"name", "sql", "target", "interval", "timeout"})
        name = r.name(entry.get("name"), f"{key}.name")
        sql = r.string(entry.get("sql"), f"{key}.sql", "", required=True)
        target = r.string(entry.get("target"), f"{key}.target", target_names[0] if target_names else "")
        if target_names and target not in target_names:
            r.problem(f"{key}.target", f"{target!r} is not one of the targets ({', '.join(target_names)})")
        if name in seen:
            r.problem(f"{key}.name", f"{name!r} is used twice")
        seen.add(name)
        probes.append(
            Probe(
                name=name,
                sql=sql,
                target=target,
                interval_seconds=r.timeout(entry.get("interval"), f"{key}.interval", 15.0, maximum=DAY),
                timeout_seconds=r.timeout(entry.get("timeout"), f"{key}.timeout", 2.0, maximum=3600.0),
            )
        )
    return probes


def _apps(r: _Reader, raw: Any) -> list[App]:
    apps: list[App] = []
    seen: set[str] = set()
    for i, item in enumerate(r.items(raw, "apps")):
        key = f"apps[{i}]"
        entry = r.mapping(item, key, {"name", "url", "interval", "timeout"})
        name = r.name(entry.get("name"), f"{key}.name")
        url = r.string(entry.get("url"), f"{key}.url", "", required=True)
        if url and not re.match(r"^https?://", url):
            r.problem(f"{key}.url", f"must start with http:// or https://, got {url!r}")
        if name in seen:
            r.problem(f"{key}.name", f"{name!r} is used twice")
        seen.add(name)
        apps.append(
            App(
                name=name,
                url=url,
                interval_seconds=r.timeout(entry.get("interval"), f"{key}.interval", 15.0, maximum=DAY),
                timeout_seconds=r.timeout(entry.get("timeout"), f"{key}.timeout", 2.0, maximum=3600.0),
            )
        )
    return apps


def _slis(r: _Reader, raw: Any) -> Slis:
    entry = r.mapping(raw, "slis", {"prometheus_url", "error_ratio", "latency_seconds"})
    slis = Slis(
        prometheus_url=r.string(entry.get("prometheus_url"), "slis.prometheus_url", ""),
        error_ratio=r.string(entry.get("error_ratio"), "slis.error_ratio", ""),
        latency_seconds=r.string(entry.get("latency_seconds"), "slis.latency_seconds", ""),
    )
    if (slis.error_ratio or slis.latency_seconds) and not slis.prometheus_url:
        r.problem("slis.prometheus_url", "is required when an SLI query is given")
    return slis


def _preflight(r: _Reader, raw: Any) -> Preflight:
    keys = {
        "backup_command",
        "pgbackrest_stanza",
        "backup_max_age",
        "command_timeout",
        "archive_ready_max",
        "traffic_max_ratio",
        "standbys",
    }
    entry = r.mapping(raw, "preflight", keys)
    d = Preflight()
    p = Preflight(
        backup_command=r.string(entry.get("backup_command"), "preflight.backup_command", ""),
        pgbackrest_stanza=r.string(entry.get("pgbackrest_stanza"), "preflight.pgbackrest_stanza", ""),
        backup_max_age_seconds=r.duration(
            entry.get("backup_max_age"), "preflight.backup_max_age", d.backup_max_age_seconds
        ),
        command_timeout_seconds=r.timeout(
            entry.get("command_timeout"), "preflight.command_timeout", d.command_timeout_seconds, maximum=DAY
        ),
        archive_ready_max=r.number(entry.get("archive_ready_max"), "preflight.archive_ready_max", d.archive_ready_max),
        traffic_max_ratio=r.number(entry.get("traffic_max_ratio"), "preflight.traffic_max_ratio", d.traffic_max_ratio),
        standbys=tuple(r.strings(entry.get("standbys"), "preflight.standbys")),
    )
    if p.backup_command and p.pgbackrest_stanza:
        r.problem("preflight", "give backup_command or pgbackrest_stanza, not both")
    if "traffic_max_ratio" in entry and p.traffic_max_ratio < 1:
        r.problem(
            "preflight.traffic_max_ratio", f"must be >= 1 (a factor over the baseline), got {p.traffic_max_ratio!r}"
        )
    return p


EXPECT_KINDS = ("columns", "indexes", "constraints")
EXPECT_CHANGES = ("added", "dropped", "changed")
INVARIANT_EXPECTS = ("equal", "zero", "at_most")


def _expect(r: _Reader, raw: Any) -> dict[str, dict[str, dict[str, tuple[str, ...]]]]:
    out: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {}
    if raw is None:
        return out
    if not isinstance(raw, dict):
        r.problem(
            "verify.expect",
            f"must be a mapping of TABLE: {{columns: ..., indexes: ..., constraints: ...}}, got {type(raw).__name__}",
        )
        return out
    for table, spec in raw.items():
        key = f"verify.expect.{table}"
        kinds = r.mapping(spec, key, set(EXPECT_KINDS))
        out[str(table)] = {
            kind: {change: tuple(r.strings(changes.get(change), f"{key}.{kind}.{change}")) for change in EXPECT_CHANGES}
            for kind in EXPECT_KINDS
            for changes in [r.mapping(kinds.get(kind), f"{key}.{kind}", set(EXPECT_CHANGES))]
        }
    return out


def _invariants(r: _Reader, raw: Any) -> list[Invariant]:
    out: list[Invariant] = []
    seen: set[str] = set()
    for i, item in enumerate(r.items(raw, "verify.invariants")):
        key = f"verify.invariants[{i}]"
        entry = r.mapping(item, key, {"name", "sql", "expect", "value"})
        name = r.name(entry.get("name"), f"{key}.name")
        if name in seen:
            r.problem(f"{key}.name", f"{name!r} is used twice")
        seen.add(name)
        expect = r.string(entry.get("expect"), f"{key}.expect", "equal")
        if expect not in INVARIANT_EXPECTS:
            r.problem(f"{key}.expect", f"must be one of {', '.join(INVARIANT_EXPECTS)}, got {expect!r}")
        if expect == "at_most" and "value" not in entry:
            r.problem(f"{key}.value", "is required with expect: at_most")
        out.append(
            Invariant(
                name=name,
                sql=r.string(entry.get("sql"), f"{key}.sql", "", required=True),
                expect=expect,
                value=r.number(entry.get("value"), f"{key}.value", 0.0),
            )
        )
    return out


def _frozen_tables(r: _Reader, raw: Any) -> list[FrozenTable]:
    out: list[FrozenTable] = []
    for i, item in enumerate(r.items(raw, "verify.frozen_tables")):
        key = f"verify.frozen_tables[{i}]"
        entry = r.mapping(item, key, {"table", "columns", "key", "segments"})
        columns = r.strings(entry.get("columns"), f"{key}.columns")
        if not columns:
            r.problem(f"{key}.columns", "list the columns to checksum (at least one)")
        segments = r.number(entry.get("segments"), f"{key}.segments", 16, minimum=1)
        if segments != int(segments) or segments > 1024:
            r.problem(f"{key}.segments", f"must be a whole number from 1 to 1024, got {entry.get('segments')!r}")
        out.append(
            FrozenTable(
                table=r.string(entry.get("table"), f"{key}.table", "", required=True),
                columns=tuple(columns),
                key=r.string(entry.get("key"), f"{key}.key", "id"),
                segments=int(min(max(segments, 1), 1024)),
            )
        )
    return out


def _verify(r: _Reader, raw: Any, target_names: list[str]) -> Verify:
    keys = {"target", "dsn", "statement_timeout", "expect", "invariants", "frozen_tables"}
    entry = r.mapping(raw, "verify", keys)
    target = r.string(entry.get("target"), "verify.target", "")
    if target and target_names and target not in target_names:
        r.problem("verify.target", f"{target!r} is not one of the targets ({', '.join(target_names)})")
    return Verify(
        target=target,
        dsn=r.string(entry.get("dsn"), "verify.dsn", ""),
        statement_timeout_seconds=r.timeout(
            entry.get("statement_timeout"), "verify.statement_timeout", Verify.statement_timeout_seconds
        ),
        expect=_expect(r, entry.get("expect")),
        invariants=tuple(_invariants(r, entry.get("invariants"))),
        frozen_tables=tuple(_frozen_tables(r, entry.get("frozen_tables"))),
    )


def parse_config(
    data: Any, path: Path | None = None, environ: dict[str, str] | os._Environ[str] = os.environ
) -> Config:
    r = _Reader()
    top = r.mapping(data, "", TOP_KEYS) if data is not None else {}
    if data is None:
        r.problem("targets", "at least one target is required (the file is empty)")
    targets = _targets(r, top.get("targets"), environ) if data is not None else []
    names = [t.name for t in targets]
    listen = r.string(top.get("listen"), "listen", ":9745")
    try:
        parse_listen(listen)
    except ValueError as exc:
        r.problem("listen", str(exc))
    config = Config(
        targets=tuple(targets),
        listen=listen,
        scrape_timeout_seconds=r.timeout(top.get("scrape_timeout"), "scrape_timeout", 5.0, maximum=3600.0),
        statement_timeout_seconds=r.timeout(top.get("statement_timeout"), "statement_timeout", 2.0),
        lock_timeout_seconds=r.timeout(top.get("lock_timeout"), "lock_timeout", 0.1),
        application_name=r.string(top.get("application_name"), "application_name", "migexport"),
        baseline_file=r.string(top.get("baseline_file"), "baseline_file", "baseline.json"),
        web_config_file=r.string(top.get("web_config_file"), "web_config_file", ""),
        migration=_migration(r, top.get("migration"), names),
        thresholds=_thresholds(r, top.get("thresholds")),
        probes=tuple(_probes(r, top.get("probes"), names)),
        apps=tuple(_apps(r, top.get("apps"))),
        slis=_slis(r, top.get("slis")),
        preflight=_preflight(r, top.get("preflight")),
        verify=_verify(r, top.get("verify"), names),
        path=path,
    )
    if not r.problems:  # state_file == baseline_file, or log_file == this file: run would destroy one
        r.problems += coinciding(known_files(config))
    if r.problems:
        raise ConfigError(r.problems)
    return config


# Bounds checked before anything is built from the file: a config is a few kilobytes, a few levels deep.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_DEPTH = 50
MAX_NODES = 100_000  # values once aliases are expanded: a "billion laughs" stops here, not in memory


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (the second would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # unhashable: the base class says so
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"duplicate key {show(key)}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _check_shape(text: str) -> str | None:
    """Depth and alias expansion, from the event stream and the node graph, before constructing."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1 if event.start_mark else 0
                return f"nested more than {MAX_DEPTH} levels deep (at line {line})"
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many values `node` stands for with every alias expanded (shared nodes counted each time)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise ValueError("an alias refers to its own anchor (a recursive structure)")
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, sizes, open_)
        if size > MAX_NODES:
            break
    open_.discard(key)
    sizes[key] = size
    return size


def parse_yaml(data: bytes, what: str = "file") -> Any:
    """YAML from a file a person wrote: bounded in size, depth and alias expansion before anything is
    built; duplicate keys and non-UTF-8 refused. Raises ConfigError with one line."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a {what}"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text (byte {exc.start})"]) from None
    try:
        shape = _check_shape(text)
        if shape:
            raise ConfigError([shape])
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            if _expanded_size(node, {}, set()) > MAX_NODES:
                raise ConfigError([f"more than {MAX_NODES} values once its aliases are expanded"])
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except ConfigError:
        raise
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"not valid YAML{where}: {problem}"]) from None
    except (ValueError, OverflowError, RecursionError) as exc:  # a value YAML reads but Python cannot hold
        message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ConfigError([f"not valid YAML: {message}"]) from None


def load_config(path: str | Path, environ: dict[str, str] | os._Environ[str] = os.environ) -> Config:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = parse_yaml(data, "migexport config")
        return parse_config(data, path, environ)
    except ConfigError as exc:
        raise ConfigError([f"{path}: {p}" for p in exc.problems]) from None


EXAMPLE_CONFIG = """\
# migexport.yml: what migexport watches during a migration, and the numbers its alerts use.
# Durations: 100ms, 5s, 30m, 1h. Unknown keys are errors. Paths are relative to this file.

# The databases to watch: the primary and each standby, one exporter for all of them.
# Give each exactly one of dsn (libpq string or URI), dsn_env (an environment variable that
# holds the DSN) or dsn_file (a file that holds it, e.g. a Kubernetes secret). Keep passwords out
# of this file: use dsn_env, dsn_file, or libpq's PGPASSFILE.
targets:
  primary:
    dsn_env: MIGEXPORT_PRIMARY_DSN
  # replica1:
  #   dsn: "host=db2 dbname=app user=migexport"

listen: ":9745"
scrape_timeout: 5s          # a scrape returns by then even if a database hangs
statement_timeout: 2s       # of the exporter's own sessions
lock_timeout: 100ms         # of the exporter's own sessions: it never queues behind DDL
application_name: migexport
baseline_file: baseline.json
# web_config_file: web.yml  # TLS and basic auth on /metrics (the Prometheus exporters' web config format)

migration:
  id: add-orders-status            # label on every migration metric and alert
  target: primary                  # where the migration runs (default: the first target)
  affected_tables: [orders]        # their row estimates go into the baseline
  time_budget: 30m                 # "timeout 30m": killed after this, alerts after it
  watch_window: 1h                 # alerts stay armed this long after the end ("first hour")
  session_application_name: migration   # set PGAPPNAME=migration for the migration's connection
  role: ""                         # the migration's own database role (recommended): its statements
                                   # stay out of the application's latency sums
  control_dsn: ""                  # how 'run' cancels the migration's statements at its time limit;
                                   # empty: the migration's own libpq environment (PG* variables)
  log_file: migration.log
  state_file: migexport-state.json # shared by 'migexport run' and 'migexport serve'
  sql_files: []                    # the migration's SQL, linted by 'preflight' (squawk)
  rollback_file: ""                # "rollback script ready": a file ...
  rollback_command: ""             # ... or a command that undoes the migration
  lock_timeout: 5s                 # the lock_timeout the migration sets: preflight fails on older lock holders
  snapshot_file: migexport-snapshot.json  # the affected tables before the command ('verify' compares)
  checks_file: migexport-checks.json      # the last preflight and verify results ('serve' exports them)

# 'migexport preflight': go / no-go before starting.
preflight:
  backup_command: ""               # prints the last backup's end time (ISO 8601 or Unix seconds), or
  pgbackrest_stanza: ""            # ... read it from 'pgbackrest --output=json --stanza=S info'
  backup_max_age: 24h              # "recent backup confirmed"
  archive_ready_max: 42            # WAL segments waiting to be archived
  traffic_max_ratio: 1.5           # "traffic at acceptable level": transaction rate vs the baseline
  standbys: []                     # application_names that must be streaming (default: the standby targets)

# 'migexport verify': after the migration (run does it unless --no-verify).
verify:
  target: ""                       # where integrity queries run (a replica is best; default: migration.target)
  dsn: ""                          # a verification role with SELECT on the tables (default: the target's DSN)
  statement_timeout: 30s
  expect: {}                       # per table, the changes the migration is meant to make, e.g.
  #  orders: {columns: {added: [note]}, indexes: {added: [orders_note_idx]}}
  invariants: []                   # read-only queries that must hold: expect equal (before = after), zero, at_most
  #  - name: no_null_status
  #    sql: "SELECT count(*) FROM orders WHERE status IS NULL"
  #    expect: zero
  frozen_tables: []                # tables nothing may change: checksum before and after
  #  - table: invoices_2023
  #    columns: [id, amount, customer]
  #    key: id
  #    segments: 16

# Every number the alert rules use. The defaults are the checklist's.
thresholds:
  latency_degradation_ratio: 1.5   # response times degraded >50%: consider rollback
  error_rate_increase_ratio: 1.1   # error rate increased >10%: consider rollback ...
  error_ratio_floor: 0.01          # ... and above 1 % of transactions
  latency_floor: 1ms               # a smaller baseline latency is raised to this first
  probe_latency_floor: 5ms         # ... and a smaller probe p95 to this (client-side timing jitter)
  replication_lag_rollback: 10m    # replication lag >10 minutes: consider rollback
  replication_lag_watch: 30s       # replication lag < threshold while it runs
  lock_wait: 10s                   # lock wait time < threshold
  blocking: 30s                    # the migration blocks other sessions for longer than this
  connections_change_ratio: 0.5    # connection count further than 50 % from the baseline ...
  connections_floor: 10            # ... a smaller baseline counting as 10 connections ...
  connections_utilisation_max: 0.9 # ... or above 90 % of max_connections
  success_error_rate_change_max: 0.01  # success criteria: error rate change < 1 %
  success_latency_change_max: 0.10     # success criteria: response time change < 10 %
  alert_for: 2m                    # how long a condition must hold before a warning fires
  critical_for: 1m                 # ... and before an immediate-rollback page fires
  baseline_max_age: 24h            # an older baseline is reported stale
  rate_window: 5m                  # every live rate and quantile is taken over this window
  significance_sigmas: 3           # error/latency triggers need a change beyond this many sigmas of noise ...
  error_min_transactions: 200      # ... and at least this many transactions in the window,
  latency_min_calls: 200           # ... statement calls,
  probe_min_runs: 10               # ... or probe runs

# Key business queries, run read-only with their own timeout ("key business queries performing well").
probes:
  - name: recent_orders
    target: primary
    sql: "SELECT count(*) FROM orders WHERE created_at > now() - interval '1 hour'"
    interval: 15s
    timeout: 2s

# Application health checks ("application health checks passing"); must answer 2xx in time.
apps: []
#  - name: web
#    url: http://web:8080/healthz
#    interval: 15s
#    timeout: 2s

# Optional application SLIs, captured into the baseline from your Prometheus.
slis: {}
#  prometheus_url: http://prometheus:9090
#  error_ratio: 'sum(rate(http_requests_total{code=~"5.."}[5m])) / sum(rate(http_requests_total[5m]))'
#  latency_seconds: 'histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket[5m])))'
"""
