"""`migexport preflight`: the go / no-go table before a migration, one row per check.

Each row encodes a line of the production migration checklist (see the README's table): PITR and
backups, the baseline, replication, traffic, nothing else in flight, headroom, rollback readiness and
the migration SQL's lint. Only a FAIL is a no-go; a check that cannot run (a missing privilege, a
timeout) is a WARN saying why. All database checks share one observer-safe session to the migration's
target (see preflight_common): none of them can wait behind a queued ACCESS EXCLUSIVE.

`fast=True` (what `migexport run` does before the command) leaves out what runs external programs:
the backup tool and squawk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import psycopg

from migexport.baseline_file import Baseline, BaselineError, read_baseline
from migexport.checks import (
    preflight_activity,
    preflight_backup,
    preflight_baseline,
    preflight_headroom,
    preflight_pitr,
    preflight_replication,
    preflight_rollback,
    preflight_traffic,
)
from migexport.checks.preflight_common import Session, error_line, guarded, open_session
from migexport.checks.result import CheckResult, Report, Status
from migexport.config import Config
from migexport.dsn import password_of

log = logging.getLogger(__name__)

# How long the transaction rate is measured (overlapping the other checks).
TRAFFIC_WINDOW_SECONDS = 3.0

CONNECT = "connect"
LINT = "sql_lint"
# The order of the rows: the checklist's order (recovery first, the migration's own files last).
ORDER = (
    CONNECT,
    "pitr",
    "archiver",
    "archive_backlog",
    "backup",
    "baseline",
    "replication",
    "replication_slots",
    "traffic",
    "other_run",
    "other_changes",
    "lock_holders",
    "oldest_transaction",
    "connections",
    "table_size",
    "rollback",
    LINT,
)

# (the rows it yields, the check), run on the migration target's session in this order.
DATABASE_CHECKS: tuple[tuple[tuple[str, ...], Callable[[Session], list[CheckResult]]], ...] = (
    (("pitr",), preflight_pitr.check_pitr),
    (("archiver",), preflight_pitr.check_archiver),
    (("archive_backlog",), preflight_pitr.check_backlog),
    (("replication",), preflight_replication.check_standbys),
    (("replication_slots",), preflight_replication.check_slots),
    (("other_changes",), preflight_activity.check_changes),
    (("lock_holders",), preflight_activity.check_holders),
    (("oldest_transaction",), preflight_activity.check_oldest),
    (("connections",), preflight_headroom.check_connections),
    (("table_size",), preflight_headroom.check_sizes),
)


def load_baseline(config: Config, given: Baseline | Path | None = None) -> tuple[Baseline | None, str | None]:
    """The baseline (given, or the config's baseline_file) and, when there is none, why."""
    if isinstance(given, Baseline):
        return given, None
    try:
        return read_baseline(given or config.resolve(config.baseline_file)), None
    except BaselineError as exc:
        return None, str(exc)


def run_preflight(
    config: Config,
    *,
    fast: bool = False,
    baseline: Baseline | Path | None = None,
    traffic_window_seconds: float = TRAFFIC_WINDOW_SECONDS,
) -> Report:
    """Every check's result, in ORDER; `report.ok` is go."""
    loaded, baseline_error = load_baseline(config, baseline)
    checks = [
        *preflight_baseline.check_baseline(config, loaded, baseline_error),
        *preflight_activity.check_other_run(config),
        *preflight_rollback.check_rollback(config),
    ]
    checks += _database_checks(config, loaded, traffic_window_seconds, fast)
    if not fast:
        checks += _lint(config)
    checks.sort(key=lambda c: ORDER.index(c.check) if c.check in ORDER else len(ORDER))
    return Report("preflight", checks, migration_id=config.migration.id)


def _database_checks(config: Config, baseline: Baseline | None, window: float, fast: bool) -> list[CheckResult]:
    """The checks on the migration's target; the backup command runs inside the traffic window."""
    target = config.migration_target()
    try:
        session = open_session(config)
    except psycopg.Error as exc:
        reason = error_line(exc, password_of(target.dsn) or "")
        out = [CheckResult(CONNECT, Status.FAIL, f"{target.name}: {reason}", "reachable", "check the target's DSN")]
        return out + ([] if fast else preflight_backup.check_backup(config))
    try:
        started: list[preflight_traffic.Reading] = []

        def open_window(s: Session) -> list[CheckResult]:
            started.append(preflight_traffic.read(s))
            return []

        # The traffic window opens first and closes last, so the other checks run inside it.
        checks = guarded(("traffic",), session, open_window)
        for names, check in DATABASE_CHECKS:
            checks += guarded(names, session, check)
        if not fast:
            checks += preflight_backup.check_backup(config)
        if started:
            tps = baseline.targets.get(target.name, {}).get("tps") if baseline else None
            checks += guarded(("traffic",), session, lambda s: preflight_traffic.finish(s, started[0], window, tps))
        return checks
    finally:
        session.close()


def _lint(config: Config) -> list[CheckResult]:
    files = [config.resolve(f) for f in config.migration.sql_files]
    if not files:
        return []
    try:
        from migexport.checks.lint import lint  # optional: squawk is an extra (migexport[lint])
    except ImportError as exc:
        return [CheckResult(LINT, Status.WARN, f"cannot check: {exc}", "", "install migexport[lint]")]
    return lint(files, timeout=config.preflight.command_timeout_seconds)
