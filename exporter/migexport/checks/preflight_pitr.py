"""Point-in-time recovery: "Point-in-time recovery enabled" is a setting, an archiver that works, and no backlog.

A base backup alone restores to the moment it ended; undoing a migration that went wrong an hour in
needs the WAL since then, so the server must archive it (`wal_level` replica or logical,
`archive_mode` on, an `archive_command` or `archive_library`). A set command that fails is as bad as
none: `pg_stat_archiver` is failing when its last failure is newer than its last success (an old
`last_archived_time` alone is no failure: an idle primary with `archive_timeout = 0` archives nothing).
Segments waiting to be archived (`.ready` files, listed by `pg_ls_archive_statusdir()`, which
pg_monitor may call) are recovery points not yet safe; a migration writes WAL fast and grows the
backlog. `archive_command` is readable with pg_read_all_settings (part of pg_monitor).
"""

from __future__ import annotations

from migexport.checks.preflight_common import Session, fmt_age
from migexport.checks.result import CheckResult, Status

# current_setting(..., true): archive_library exists from PostgreSQL 15 on (NULL before).
SETTINGS_SQL = """
SELECT current_setting('wal_level'), current_setting('archive_mode'),
       current_setting('archive_command'), coalesce(current_setting('archive_library', true), '')
"""
ARCHIVER_SQL = """
SELECT coalesce(last_archived_wal, ''), coalesce(last_failed_wal, ''),
       extract(epoch FROM clock_timestamp() - last_archived_time)::float8,
       extract(epoch FROM clock_timestamp() - last_failed_time)::float8,
       failed_count
FROM pg_stat_archiver
"""
READY_SQL = """
SELECT count(*), extract(epoch FROM clock_timestamp() - min(modification))::float8
FROM pg_ls_archive_statusdir()
WHERE name LIKE '%.ready'
"""

PITR, ARCHIVER, BACKLOG = "pitr", "archiver", "archive_backlog"
NAMES = (PITR, ARCHIVER, BACKLOG)


def archiving_set(mode: str, command: str, library: str) -> bool:
    return mode in ("on", "always") and (command.strip() not in ("", "(disabled)") or bool(library.strip()))


def check_pitr(session: Session) -> list[CheckResult]:
    """wal_level, archive_mode and an archive command or library."""
    wal_level, mode, command, library = session.ctx.query_one(SETTINGS_SQL)
    archiving = archiving_set(mode, command, library)
    how = f"archive_library {library}" if library else ("archive_command set" if archiving else "no archive command")
    value = f"wal_level {wal_level}, archive_mode {mode}, {how}"
    limit = "wal_level >= replica, archive_mode on, an archive command or library"
    if wal_level == "minimal" or not archiving:
        pitr = CheckResult(
            PITR,
            Status.FAIL,
            value,
            limit,
            "without WAL archiving you can restore only to the last base backup: set wal_level = replica, "
            "archive_mode = on (restart) and archive_command/archive_library (e.g. pgbackrest archive-push)",
        )
    else:
        pitr = CheckResult(PITR, Status.PASS, value, limit)
    return [pitr]


def check_archiver(session: Session) -> list[CheckResult]:
    """Failing when the last failure is newer than the last success."""
    _, mode, command, library = session.ctx.query_one(SETTINGS_SQL)
    return [_archiver(session, archiving_set(mode, command, library))]


def check_backlog(session: Session) -> list[CheckResult]:
    """.ready segments against preflight.archive_ready_max."""
    return [_backlog(session)]


def _archiver(session: Session, archiving: bool) -> CheckResult:
    last_ok, last_bad, ok_age, bad_age, failures = session.ctx.query_one(ARCHIVER_SQL)
    limit = "last failure older than last success"
    if not archiving:
        return CheckResult(ARCHIVER, Status.WARN, "not archiving (see pitr)", limit, "enable WAL archiving first")
    success = f"last archived {last_ok} {fmt_age(ok_age)} ago" if last_ok else "nothing archived yet"
    if bad_age is not None and (ok_age is None or bad_age < ok_age):
        return CheckResult(
            ARCHIVER,
            Status.FAIL,
            f"failing: {last_bad} failed {fmt_age(bad_age)} ago ({failures} failures); {success}",
            limit,
            "the archive command fails: WAL is not archived and piles up in pg_wal; see the server log "
            "for the command's error and fix it before migrating",
        )
    return CheckResult(ARCHIVER, Status.PASS, success, limit)


def _backlog(session: Session) -> CheckResult:
    count, oldest = session.ctx.query_one(READY_SQL)
    limit_n = session.config.preflight.archive_ready_max
    value = f"{count} segments waiting" + (f", oldest {fmt_age(oldest)}" if count else "")
    limit = f"<= {limit_n:g} .ready segments"
    if count > limit_n:
        return CheckResult(
            BACKLOG,
            Status.FAIL,
            value,
            limit,
            "archiving lags behind: the migration's WAL would wait unarchived (no PITR for it); "
            "let the archiver catch up first",
        )
    return CheckResult(BACKLOG, Status.PASS, value, limit)
