"""Data integrity: the user's invariants and the frozen tables' checksums, before and after.

All of it runs in ONE `REPEATABLE READ READ ONLY` transaction (one consistent view of every table; a
read-only transaction also stops an invariant from writing), on `verify.target` (a replica is best:
the checksums read whole tables) as `verify.dsn` (a role with SELECT on those tables; pg_monitor is not
enough), each statement bounded by `verify.statement_timeout` and `lock_timeout` (a query behind a
queued ACCESS EXCLUSIVE gives up rather than lengthening the queue). A query that fails is rolled back
to its savepoint and reported as "cannot check"; the others still run in the same snapshot.

On a replica the reads first wait (up to the statement timeout) until it has replayed the primary's
WAL position of the moment: otherwise a lagging replica would compare the old data with itself.

Frozen-table checksum: per segment of the `key` (ranges fixed at snapshot time: equal widths of
min..max for integer keys, quantiles otherwise; rows outside them fall in the first or last segment),
count(*) and sum(hashtextextended(row(columns)::text, 0)) as numeric: independent of row order and
physical layout (a rewrite or VACUUM FULL does not change it), changed by any insert, delete or update
of those columns.
"""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation
from typing import Any

import psycopg
from psycopg import sql

from migexport.checks.snapshot import error_line
from migexport.config import Config, FrozenTable, Invariant
from migexport.dsn import Target, TargetError, resolve_source, validate_dsn
from migexport.targets import SessionSettings, connect

BEGIN_SQL = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
REPLAYED_SQL = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"
KEY_SQL = """
SELECT format_type(a.atttypid, a.atttypmod), a.atttypid::regtype::text, n.nspname, c.relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.oid = to_regclass(%s)
"""
INTEGER_TYPES = ("smallint", "integer", "bigint")


class IntegrityError(Exception):
    """The integrity session could not be opened; the message is one printable line."""


def integrity_target(config: Config) -> Target:
    """verify.target (default: the migration's target), as verify.dsn when one is given."""
    name = config.verify.target or config.migration_target().name
    target = next(t for t in config.targets if t.name == name)
    if not config.verify.dsn:
        return target
    try:
        dsn = resolve_source(name, config.verify.dsn)
        validate_dsn(name, dsn)
    except TargetError as exc:
        raise IntegrityError(f"verify.dsn: {exc}") from None
    return Target(name, dsn)


def open_session(config: Config) -> psycopg.Connection:
    session = SessionSettings(
        application_name=f"{config.application_name}-verify",
        lock_timeout_ms=max(1, round(config.lock_timeout_seconds * 1000)),
        statement_timeout_ms=max(1, round(config.verify.statement_timeout_seconds * 1000)),
    )
    target = integrity_target(config)
    try:
        return connect(target, session)
    except psycopg.Error as exc:
        raise IntegrityError(f"cannot connect to {target.name} for the integrity checks: {error_line(exc)}") from None


def wait_for_replay(conn: psycopg.Connection, lsn: str | None, timeout: float) -> str:
    """On a standby, wait until it has replayed `lsn`; '' when it has, else why not."""
    if lsn is None or not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
        return ""
    deadline = time.monotonic() + timeout
    while not conn.execute(REPLAYED_SQL, (lsn,)).fetchone()[0]:
        if time.monotonic() > deadline:
            return f"the replica has not replayed the primary's WAL up to {lsn} within {timeout:g}s"
        time.sleep(0.1)
    return ""


def _savepoint(conn: psycopg.Connection, run: Any) -> dict[str, Any]:
    """run(conn) inside a savepoint: its result, or {"error": ...} with the transaction still usable."""
    conn.execute("SAVEPOINT migexport_q")
    try:
        out = run(conn)
    except psycopg.errors.Error as exc:
        if conn.closed or conn.broken:
            return {"error": error_line(exc)}
        conn.execute("ROLLBACK TO SAVEPOINT migexport_q")
        return {"error": error_line(exc)}
    conn.execute("RELEASE SAVEPOINT migexport_q")
    return out


def _invariant(inv: Invariant) -> Any:
    def run(conn: psycopg.Connection) -> dict[str, Any]:
        row = conn.execute(inv.sql).fetchone()  # the user's query, as written
        value = None if row is None or row[0] is None else str(row[0])
        return {"value": value, "rows": row is not None}

    return run


def _thresholds(conn: psycopg.Connection, table: sql.Composable, key: sql.Composable, base: str, n: int) -> list[str]:
    """n-1 increasing boundaries of `key` splitting the table into n segments."""
    if n <= 1:
        return []
    if base in INTEGER_TYPES:  # min and max come from an index when there is one: cheap
        query = sql.SQL("SELECT min({k})::bigint, max({k})::bigint FROM {t}").format(k=key, t=table)
        lo, hi = conn.execute(query).fetchone()
        if lo is None:
            return []
        bounds = sorted({lo + -(-(hi - lo + 1) * i // n) for i in range(1, n)})
        return [str(b) for b in bounds if lo < b <= hi]
    fractions = [i / n for i in range(1, n)]
    query = sql.SQL("SELECT (percentile_disc(%s::float8[]) WITHIN GROUP (ORDER BY {k}))::text[] FROM {t}")
    (values,) = conn.execute(query.format(k=key, t=table), (fractions,)).fetchone()
    return list(dict.fromkeys(v for v in values or [] if v is not None))


def _checksum(frozen: FrozenTable, thresholds: list[str] | None) -> Any:
    """The segments' count and hash sum; `thresholds` from the snapshot, or None to choose them."""

    def run(conn: psycopg.Connection) -> dict[str, Any]:
        row = conn.execute(KEY_SQL, (frozen.key, frozen.table)).fetchone()
        if row is None:
            return {"error": f"table {frozen.table} not found"}
        key_type, base, nspname, relname = row
        if key_type is None:
            return {"error": f"key column {frozen.key!r} not found in {frozen.table}"}
        table, key = sql.Identifier(nspname, relname), sql.Identifier(frozen.key)
        bounds = _thresholds(conn, table, key, base, frozen.segments) if thresholds is None else thresholds
        # format_type() output is PostgreSQL's own spelling of the type: safe to splice in.
        bucket = sql.SQL("width_bucket({k}, %s::text[]::{t}[])").format(k=key, t=sql.SQL(key_type))
        segment = bucket if bounds else sql.SQL("0")
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in frozen.columns)
        query = sql.SQL(
            "SELECT ({seg})::text, count(*), coalesce(sum(hashtextextended(row({cols})::text, 0)::numeric), 0)::text "
            "FROM {t} GROUP BY 1"
        ).format(seg=segment, cols=columns, t=table)
        rows = conn.execute(query, (bounds,) if bounds else None).fetchall()
        return {
            "key": frozen.key,
            "key_type": key_type,
            "columns": list(frozen.columns),
            "thresholds": bounds,
            "segments": {("null" if seg is None else seg): [count, total] for seg, count, total in rows},
        }

    return run


def read_integrity(
    config: Config,
    primary_lsn: str | None,
    invariants: tuple[Invariant, ...],
    frozen_tables: tuple[FrozenTable, ...],
    thresholds: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The invariants' values and frozen tables' checksums, in one snapshot of verify.target.

    `thresholds` (per frozen table, from the snapshot) keeps the segments comparable; None chooses them.
    Raises IntegrityError when the session cannot be opened; a failing query is an {"error"} entry."""
    v = config.verify
    conn = open_session(config)
    try:
        out: dict[str, Any] = {"target": integrity_target(config).name, "invariants": {}, "frozen": {}}
        lag = wait_for_replay(conn, primary_lsn, v.statement_timeout_seconds)
        conn.execute(BEGIN_SQL)
        for inv in invariants:
            out["invariants"][inv.name] = {"error": lag} if lag else _savepoint(conn, _invariant(inv))
        for frozen in frozen_tables:
            given = None if thresholds is None else thresholds.get(frozen.table)
            if lag:
                out["frozen"][frozen.table] = {"error": lag}
            elif thresholds is not None and given is None:
                out["frozen"][frozen.table] = {"error": "not in the snapshot"}
            else:
                out["frozen"][frozen.table] = _savepoint(conn, _checksum(frozen, given))
        conn.execute("COMMIT")
        return out
    except psycopg.OperationalError as exc:
        raise IntegrityError(f"integrity checks on {integrity_target(config).name}: {error_line(exc)}") from None
    finally:
        conn.close()


def as_number(text: str | None) -> Decimal | None:
    try:
        return Decimal(text) if text is not None else None
    except InvalidOperation:
        return None
