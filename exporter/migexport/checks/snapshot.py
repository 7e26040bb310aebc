"""The affected tables before the migration: `migexport snapshot` (and `run`, before its command).

What is recorded, per affected table (and per table with a `verify.expect`): its columns (type, NOT
NULL, default), indexes (definition, valid, ready), constraints (definition, validated), relfilenode,
row estimate and last ANALYZE times; plus the integrity values `verify` compares: the invariants'
results and the frozen tables' checksums (see verify_integrity.py).

Lock safety. Everything here runs while a migration may be about to queue an ACCESS EXCLUSIVE, so the
schema is read only from pg_class / pg_index / pg_constraint / pg_attribute / pg_attrdef (which take no
table lock), with names resolved by to_regclass() (no lock), on an observer session with
`lock_timeout` set. Never information_schema, pg_indexes, \\d or a size function: they wait.

The deparsing functions (pg_get_indexdef, pg_get_constraintdef, pg_get_expr) DO take AccessShareLock
on the table when the object has an expression (CHECK, expression or partial index, a default):
measured on PG 15, they wait behind a queued ACCESS EXCLUSIVE. So changes are detected from
lock-free fingerprints (the catalog's own node trees, parse locations stripped), and the readable
definitions are only fetched, for display, when no ACCESS EXCLUSIVE is granted or queued on the table
(and even then under `lock_timeout`); otherwise they read "(not read: ...)".

The file (`migration.snapshot_file`, JSON, written atomically):

    {"format": "migexport-snapshot", "version": 1, "migration_id": "m1", "taken_at": 1764000000.0,
     "target": "primary", "server_time": 1764000000.0,
     "tables": {"orders": {"found": true, "oid": 16384, "name": "public.orders", "relkind": "r",
                "relfilenode": 16384, "reltuples": 1000.0, "last_analyze": 1763990000.0 | null,
                "columns": {"id": {"type": "integer", "not_null": true, "kind": "identity:a",
                                   "default": null, "fingerprint": "..."}},
                "indexes": {"orders_pkey": {"definition": "CREATE UNIQUE INDEX ...", "valid": true,
                                            "ready": true, "fingerprint": "..."}},
                "constraints": {"orders_pkey": {"definition": "PRIMARY KEY (id)", "type": "p",
                                                "validated": true, "fingerprint": "..."}}},
                "missing": {"found": false}},
     "integrity_error": "..." (instead of "integrity", when its session could not be opened),
     "integrity": {"target": "replica1",
                   "invariants": {"closed_total": {"value": "12345"} | {"error": "..."}},
                   "frozen": {"invoices_2023": {"key": "id", "key_type": "integer",
                                                "columns": ["id", "amount"],
                                                "thresholds": ["1000", "2000"],
                                                "segments": {"0": [1000, "-12345..."]}} | {"error": "..."}}}}
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import psycopg

from migexport import strictjson
from migexport.config import Config, FrozenTable, Invariant
from migexport.dsn import redact
from migexport.state import write_atomic
from migexport.targets import SessionSettings, connect

FORMAT = "migexport-snapshot"
VERSION = 1

# A node tree's parse locations differ between two identical definitions typed differently.
_STRIP = r"regexp_replace(coalesce({}::text, ''), ' :location -?[0-9]+', '', 'g')"

TABLE_SQL = """
SELECT c.oid, n.nspname, c.relname, c.relkind::text, c.relfilenode::bigint, c.reltuples::float8,
       extract(epoch FROM greatest(pg_stat_get_last_analyze_time(c.oid),
                                   pg_stat_get_last_autoanalyze_time(c.oid)))::float8
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid = to_regclass(%s)
"""

COLUMNS_SQL = f"""
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       concat_ws(' ', 'generated:' || nullif(a.attgenerated::text, ''),
                 'identity:' || nullif(a.attidentity::text, '')),
       {_STRIP.format("d.adbin")}
FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

INDEXES_SQL = f"""
SELECT c.relname, i.indisvalid, i.indisready,
       concat_ws(' ', am.amname, CASE WHEN i.indisunique THEN 'unique' END,
                 CASE WHEN i.indisprimary THEN 'primary' END,
                 (SELECT string_agg(coalesce(a.attname, '(expr)'), ',' ORDER BY k.n)
                  FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                  LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum),
                 'key:' || i.indnkeyatts, 'ops:' || i.indclass::text, 'opt:' || i.indoption::text,
                 'coll:' || i.indcollation::text, {_STRIP.format("i.indexprs")}, {_STRIP.format("i.indpred")})
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
WHERE i.indrelid = %s
ORDER BY c.relname
"""

CONSTRAINTS_SQL = f"""
SELECT con.conname, con.contype::text, con.convalidated,
       concat_ws(' ', con.contype::text, 'deferrable:' || con.condeferrable, 'deferred:' || con.condeferred,
                 (SELECT string_agg(a.attname, ',' ORDER BY k.n)
                  FROM unnest(con.conkey) WITH ORDINALITY AS k(attnum, n)
                  JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum),
                 'ref:' || nullif(con.confrelid, 0)::regclass::text, 'refkey:' || con.confkey::text,
                 con.confupdtype::text, con.confdeltype::text, con.confmatchtype::text,
                 {_STRIP.format("con.conbin")})
FROM pg_constraint con
WHERE con.conrelid = %s
ORDER BY con.conname
"""

# Display only; these deparse and may lock the table (see the module's docstring).
DEFINITIONS_SQL = """
SELECT 'columns', a.attname, pg_get_expr(d.adbin, d.adrelid)
FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
WHERE d.adrelid = %(oid)s AND NOT a.attisdropped
UNION ALL
SELECT 'indexes', c.relname, pg_get_indexdef(i.indexrelid)
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = %(oid)s
UNION ALL
SELECT 'constraints', conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = %(oid)s
"""

# Relations with an ACCESS EXCLUSIVE granted or waiting (the PGW guard: checking `granted` only hangs).
EXCLUSIVE_SQL = """
SELECT DISTINCT relation::bigint FROM pg_locks
WHERE locktype = 'relation' AND mode = 'AccessExclusiveLock' AND relation = ANY(%s::oid[])
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""

SERVER_SQL = "SELECT extract(epoch FROM now())::float8, pg_is_in_recovery()"


class SnapshotError(ValueError):
    """The snapshot file cannot be used, or cannot be taken; the message is one printable line."""


def error_line(exc: BaseException) -> str:
    """A database error as one line, without a password."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return redact(text)


def schema_session(config: Config) -> SessionSettings:
    """The exporter's own safety settings: every catalog read gives up after lock_timeout."""
    return SessionSettings(
        application_name=f"{config.application_name}-verify",
        lock_timeout_ms=max(1, round(config.lock_timeout_seconds * 1000)),
        statement_timeout_ms=max(1, round(config.statement_timeout_seconds * 1000)),
    )


def schema_tables(config: Config) -> list[str]:
    """The affected tables, then any other table the expectations name."""
    tables = list(config.migration.affected_tables)
    return tables + [t for t in config.verify.expect if t not in tables]


def _definitions(conn: psycopg.Connection, oid: int, locked: bool) -> tuple[dict[tuple[str, str], str], str]:
    """Readable definitions by (kind, name), or none and why not."""
    if locked:
        return {}, "(not read: ACCESS EXCLUSIVE lock on the table)"
    try:
        rows = conn.execute(DEFINITIONS_SQL, {"oid": oid}).fetchall()
    except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
        # Lost the race with a DDL that queued after the pg_locks check: lock_timeout let us go.
        return {}, "(not read: lock_timeout)"
    return {(kind, name): text for kind, name, text in rows}, ""


def read_table(conn: psycopg.Connection, name: str, exclusive: set[int] | None = None) -> dict[str, Any]:
    """One table's shape now, read lock-free (see the module's docstring)."""
    try:
        row = conn.execute(TABLE_SQL, (name,)).fetchone()
    except (psycopg.errors.SyntaxError, psycopg.errors.FeatureNotSupported, psycopg.errors.InvalidName) as exc:
        return {"found": False, "error": error_line(exc)}  # e.g. a.b.c.d: to_regclass() raises on PG < 16
    if row is None:
        return {"found": False}
    oid, nspname, relname, relkind, relfilenode, reltuples, last_analyze = row
    defs, missing = _definitions(conn, oid, oid in (exclusive or set()))
    columns = {}
    for col, typ, notnull, kind, fp in conn.execute(COLUMNS_SQL, (oid,)).fetchall():
        # No default at all (an empty fingerprint): nothing was left unread.
        default = defs.get(("columns", col), missing) if fp else None
        columns[col] = {"type": typ, "not_null": notnull, "kind": kind, "default": default or None, "fingerprint": fp}
    indexes = {
        idx: {"definition": defs.get(("indexes", idx), missing), "valid": valid, "ready": ready, "fingerprint": fp}
        for idx, valid, ready, fp in conn.execute(INDEXES_SQL, (oid,)).fetchall()
    }
    constraints = {
        con: {
            "definition": defs.get(("constraints", con), missing),
            "type": contype,
            "validated": validated,
            "fingerprint": fp,
        }
        for con, contype, validated, fp in conn.execute(CONSTRAINTS_SQL, (oid,)).fetchall()
    }
    return {
        "found": True,
        "oid": oid,
        "name": f"{nspname}.{relname}",
        "relkind": relkind,
        "relfilenode": relfilenode,
        "reltuples": reltuples,
        "last_analyze": last_analyze,
        "columns": columns,
        "indexes": indexes,
        "constraints": constraints,
    }


def read_schema(conn: psycopg.Connection, tables: list[str]) -> dict[str, dict[str, Any]]:
    """Every table's shape; ACCESS EXCLUSIVE-locked tables without their readable definitions."""
    oids = []
    for name in tables:
        try:
            found = conn.execute("SELECT to_regclass(%s)::oid::bigint", (name,)).fetchone()
        except psycopg.errors.Error:
            continue  # read_table says why
        if found and found[0] is not None:
            oids.append(found[0])
    exclusive = {r[0] for r in conn.execute(EXCLUSIVE_SQL, (oids,)).fetchall()} if oids else set()
    return {name: read_table(conn, name, exclusive) for name in tables}


def server_now(conn: psycopg.Connection) -> tuple[float, bool]:
    """The server's clock (ANALYZE times are compared with it) and whether it is a standby."""
    now, in_recovery = conn.execute(SERVER_SQL).fetchone()
    return now, in_recovery


def primary_lsn(conn: psycopg.Connection, integrity_on_other_target: bool) -> str | None:
    """The primary's WAL position now, for a replica that runs the integrity reads to catch up to.

    The insert position, not pg_current_wal_lsn() (the write position): with synchronous_commit off a
    commit returns before its WAL is written, and the replica would be waited for up to an older point."""
    if not integrity_on_other_target or conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
        return None
    return conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]


def read_now(
    config: Config,
    invariants: tuple[Invariant, ...],
    frozen: tuple[FrozenTable, ...],
    thresholds: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """The affected tables' schema from the migration target, then the given invariants' values and
    frozen tables' checksums (if any) from verify.target. Raises SnapshotError when the migration
    target cannot be read; integrity problems are recorded ("integrity_error", per-entry "error")."""
    from migexport.checks.verify_integrity import IntegrityError, integrity_target, read_integrity

    target = config.migration_target()
    try:
        with connect(target, schema_session(config)) as conn:
            now, _ = server_now(conn)
            tables = read_schema(conn, schema_tables(config))
            lsn = primary_lsn(conn, integrity_target(config).name != target.name)
    except IntegrityError as exc:
        raise SnapshotError(str(exc)) from None
    except psycopg.Error as exc:
        raise SnapshotError(f"cannot read the affected tables on {target.name}: {error_line(exc)}") from None
    doc: dict[str, Any] = {"target": target.name, "server_time": now, "tables": tables}
    if invariants or frozen:
        try:
            doc["integrity"] = read_integrity(config, lsn, invariants, frozen, thresholds)
        except IntegrityError as exc:
            doc["integrity_error"] = str(exc)
    return doc


def take_snapshot(config: Config) -> dict[str, Any]:
    """The snapshot document (see the module's docstring); raises SnapshotError."""
    doc = {"format": FORMAT, "version": VERSION, "migration_id": config.migration.id, "taken_at": time.time()}
    return {**doc, **read_now(config, config.verify.invariants, config.verify.frozen_tables)}


def snapshot_path(config: Config) -> Path:
    return config.resolve(config.migration.snapshot_file)


def write_snapshot(config: Config, doc: dict[str, Any], force: bool = False) -> Path:
    """Write `doc` atomically; refuse to replace another migration's snapshot unless `force`."""
    path = snapshot_path(config)
    if not force:
        try:
            old = _load(path)
        except SnapshotError:
            old = None  # damaged or not ours: nothing worth keeping
        if old is not None and old.get("migration_id") != doc["migration_id"]:
            raise SnapshotError(
                f"{path} holds the snapshot of migration {old.get('migration_id')!r}, not "
                f"{doc['migration_id']!r}; use --force to replace it"
            )
    try:
        write_atomic(path, json.dumps(doc, indent=2) + "\n")
    except OSError as exc:
        raise SnapshotError(f"cannot write {path}: {exc.strerror}") from None
    return path


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = strictjson.read_bytes(path)  # bounded: a huge file is refused, not read
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = strictjson.loads(data)
    except strictjson.JsonRefused as exc:
        raise SnapshotError(f"{path}: not a migexport snapshot: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise SnapshotError(f"{path}: not a migexport snapshot (format {FORMAT} version {VERSION})")
    if not isinstance(doc.get("tables"), dict) or not isinstance(doc.get("migration_id"), str):
        raise SnapshotError(f"{path}: not a migexport snapshot: no tables or migration_id")
    return doc


def read_snapshot(config: Config) -> dict[str, Any] | None:
    """The snapshot of this migration, None when there is none; SnapshotError when it is unusable or
    of another migration (comparing with it would report someone else's changes)."""
    path = snapshot_path(config)
    doc = _load(path)
    if doc is not None and doc["migration_id"] != config.migration.id:
        raise SnapshotError(
            f"{path} is the snapshot of migration {doc['migration_id']!r}, not {config.migration.id!r}: "
            "take a new one ('migexport snapshot') before the migration"
        )
    return doc
