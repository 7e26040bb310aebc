"""What the preflight checks share: the observer-safe session and turning a database error into a WARN.

Every query runs on one session to the migration's target, opened with the exporter's safety settings
(read-only, autocommit, short lock_timeout and statement_timeout, its own application_name): a check
that would wait behind a queued ACCESS EXCLUSIVE hits its lock_timeout and says "cannot check" instead
of joining the queue. A check that lacks a privilege says which grant it needs (pg_monitor is enough
for every check here); it never makes the report a no-go by itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import errors

from migexport.checks.result import CheckResult, cannot_check
from migexport.collectors.base import MARKER, Context, ServerInfo
from migexport.config import Config
from migexport.dsn import password_of, redact
from migexport.own import OwnTransactions, SessionLedger
from migexport.targets import SERVER_SQL, SessionSettings, connect

log = logging.getLogger(__name__)

GRANT = "GRANT pg_monitor TO {user}"

ALL_STATS_SQL = "SELECT pg_has_role('pg_read_all_stats', 'USAGE')"
# to_regclass() looks the name up without locking the table (a ::regclass cast neither, but it raises
# for a table that does not exist yet, which a migration may be about to create).
TABLES_SQL = """
SELECT name, to_regclass(name)::oid FROM unnest(%s::text[]) WITH ORDINALITY AS u(name, i) ORDER BY i
"""


@dataclass
class Session:
    """The preflight's one connection to the migration's target."""

    ctx: Context
    config: Config
    user: str
    _tables: dict[str, int | None] | None = None
    _all_stats: bool | None = None

    @property
    def server(self) -> ServerInfo:
        return self.ctx.server

    def tables(self) -> dict[str, int | None]:
        """The affected tables' oids (None: not found), looked up once."""
        if self._tables is None:
            names = list(self.config.migration.affected_tables)
            self._tables = {name: oid for name, oid in self.ctx.query(TABLES_SQL, (names,))} if names else {}
        return self._tables

    def hidden(self, name: str) -> CheckResult | None:
        """A WARN for a check that must see other roles' sessions, when this role cannot.

        Without pg_read_all_stats, pg_stat_activity hides the query, state and times of other roles'
        sessions: a DDL would go unseen and a lock holder's age unknown, so the check says it cannot
        check rather than pass (superusers have the role's privileges too)."""
        if self._all_stats is None:
            (self._all_stats,) = self.ctx.query_one(ALL_STATS_SQL)
        if self._all_stats:
            return None
        return cannot_check(name, "other roles' sessions are hidden from this role", GRANT.format(user=self.user))

    def close(self) -> None:
        try:
            self.ctx.conn.close()
        except Exception:
            log.debug("closing the preflight session failed")


def session_settings(config: Config) -> SessionSettings:
    return SessionSettings(
        application_name=f"{config.application_name}-preflight",
        lock_timeout_ms=max(1, round(config.lock_timeout_seconds * 1000)),
        statement_timeout_ms=max(1, round(config.statement_timeout_seconds * 1000)),
    )


def open_session(config: Config) -> Session:
    """Connect to the migration's target; psycopg.Error (redact before printing) when it cannot."""
    target = config.migration_target()
    conn = connect(target, session_settings(config))
    try:
        version, in_recovery, database = conn.execute(MARKER + SERVER_SQL).fetchone()  # type: ignore[misc]
        server = ServerInfo(version, in_recovery, database)
        # Our own statements are counted as the application's transactions too: the traffic check
        # subtracts them, as the exporter does.
        ledger = SessionLedger(OwnTransactions(), version)
        return Session(Context(target.name, conn, server, ledger), config, conn.info.user)
    except BaseException:
        conn.close()
        raise


def error_line(exc: BaseException, secret: str = "") -> str:
    """The first line of a database error, passwords removed."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return redact(text, (secret,))[:300]


def guarded(
    names: tuple[str, ...], session: Session, check: Callable[[Session], list[CheckResult]]
) -> list[CheckResult]:
    """Run a check; a missing privilege, a timeout or another database error is a WARN for each of its names."""
    try:
        return check(session)
    except errors.InsufficientPrivilege as exc:
        reason, advice = f"permission denied ({error_line(exc)})", GRANT.format(user=session.user)
    except errors.LockNotAvailable:
        reason = f"a catalog lock was not granted within lock_timeout ({session.config.lock_timeout_seconds:g}s)"
        advice = "a lock queue on the catalogs: see the lock_holders and other_changes rows, try again"
    except errors.QueryCanceled:
        reason = f"query timed out (statement_timeout {session.config.statement_timeout_seconds:g}s)"
        advice = "the server is slow to answer: raise statement_timeout in the config or try again"
    except psycopg.Error as exc:
        secret = password_of(session.config.migration_target().dsn) or ""
        reason, advice = error_line(exc, secret), ""
    except Exception as exc:  # a bug of ours in one check must not hide the others' results
        log.exception("preflight check %s failed", names[0])
        reason, advice = f"internal error: {type(exc).__name__}: {error_line(exc)}", "please report it"
    return [cannot_check(name, reason, advice) for name in names]


def fmt_age(seconds: float | None) -> str:
    """12s, 3m20s, 2h05m, 3d04h."""
    if seconds is None:
        return "unknown"
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s" if s < 10 else f"{s:.0f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_bytes(n: float) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"


def who(pid: int | None, user: str, application: str, state: str = "") -> str:
    """How a session is named in a result: pid, user, application (and state)."""
    if pid is None:
        return "a prepared transaction (pg_prepared_xacts)"
    parts = [f"user {user or '?'}", f"application {application!r}"]
    if state:
        parts.append(state)
    return f"pid {pid} ({', '.join(parts)})"
