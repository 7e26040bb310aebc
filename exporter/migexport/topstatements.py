"""Per-statement readings of pg_stat_statements, for the baseline's snapshot and the report's comparison.

The exporter never exports per-statement series (per-queryid labels have run Prometheus out of
memory elsewhere); this module is for documents only: the baseline file and the migration report.

Cost: the view reads the whole query-text file whenever the `query` column is asked for (a filter on
it included), so the counters of every entry are read with `pg_stat_statements(false)`, and the texts
once, at the end, for the few statements that are kept. Both reads run on an observer-safe session
(statement_timeout), and a text read that times out leaves the statements without text, not absent.

Which statements: top-level ones in the watched database (the target's `dbname`), as the statements
collector counts them, with the exporter's own role (`current_user`) and the migration's role left
out by `userid`. Without pg_read_all_stats (pg_monitor), other roles' entries have no queryid: they
cannot be matched and are counted as hidden.

Comparing two readings: the counters only grow, unless pg_stat_statements_reset() ran (the
`stats_reset` of pg_stat_statements_info moves, PostgreSQL 14+) or the entry was evicted and came
back (its calls start again from 0). Either way the later reading holds only what happened since,
which `delta` reports as not comparable.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg

from migexport.collectors.base import Context
from migexport.collectors.statements import EXCLUDED_ROLE_OIDS, EXTENSION_SQL
from migexport.dsn import REDACTED, redact

TOP_STATEMENTS = 50  # statements kept per target in the baseline: enough for the report, a few kB
TEXT_MAX = 2000  # characters of normalised query text kept per statement

# Utility statements are kept as they were typed, constants included (only planned statements are
# normalised to $1): `ALTER ROLE app PASSWORD 'secret'` must not reach a baseline file or a report.
_SQL_PASSWORD = re.compile(
    r"(\bPASSWORD\s+)"  # then a literal: '...', E'...', $$...$$ or $tag$...$tag$, or a bare word
    r"('(?:[^']|'')*'|E'(?:[^'\\]|\\.|'')*'|(\$\w*\$).*?\3|[^\s;]+)",
    re.I | re.S,
)

# (queryid, userid, dbid): what identifies a statement across readings.
Key = tuple[int, int, int]

COUNTERS_SQL = """
SELECT s.queryid, s.userid, s.dbid, s.calls::float8, s.{total}::float8 / 1e3, s.rows::float8,
       pg_get_userbyid(s.userid)
FROM {schema}.pg_stat_statements(false) s
WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND {toplevel} s.userid <> ALL ({excluded})
"""
RESET_SQL = "SELECT extract(epoch FROM stats_reset)::float8 FROM {schema}.pg_stat_statements_info"
# left(): the server trims before sending; 4x leaves room for the whitespace clean_text() folds away.
TEXTS_SQL = """
SELECT s.queryid, s.userid, left(s.query, {chars})
FROM {schema}.pg_stat_statements(true) s
WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND {toplevel} s.queryid = ANY(%s::int8[])
"""


class Unavailable(Exception):
    """pg_stat_statements cannot be read here; one printable line saying why and what to do.
    `failed_query`: a statement of ours failed on the way (a rollback in the server's counters)."""

    def __init__(self, message: str, failed_query: bool = False) -> None:
        super().__init__(message)
        self.failed_query = failed_query


@dataclass(frozen=True)
class Counters:
    calls: float
    total_seconds: float
    rows: float

    def mean_seconds(self) -> float | None:
        return self.total_seconds / self.calls if self.calls > 0 else None

    def minus(self, other: Counters) -> Counters:
        return Counters(self.calls - other.calls, self.total_seconds - other.total_seconds, self.rows - other.rows)


@dataclass
class Reading:
    """The counters of every visible statement of the watched database at one moment."""

    taken_at: float
    database: str
    counters: dict[Key, Counters]
    roles: dict[Key, str]
    stats_reset: float | None  # None before pg_stat_statements 1.9 (PostgreSQL 14)
    hidden: int  # entries of other roles this role may not identify (no pg_read_all_stats)
    schema: str
    version: str


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _toplevel(version: str) -> str:
    return "s.toplevel AND" if _version_tuple(version) >= (1, 9) else ""


def read_counters(ctx: Context, excluded_roles: Iterable[str]) -> Reading:
    """One reading, without query texts. Raises Unavailable when the extension is missing or not loaded."""
    rows = ctx.query(EXTENSION_SQL)
    if not rows:
        raise Unavailable(
            f"pg_stat_statements is not installed in database {ctx.server.database} "
            "(CREATE EXTENSION pg_stat_statements)"
        )
    schema, version = rows[0]
    total = "total_exec_time" if _version_tuple(version) >= (1, 8) else "total_time"
    sql = COUNTERS_SQL.format(schema=schema, total=total, toplevel=_toplevel(version), excluded=EXCLUDED_ROLE_OIDS)
    try:
        found = ctx.query(sql, ([r for r in excluded_roles if r],))
    except psycopg.errors.ObjectNotInPrerequisiteState:
        raise Unavailable(
            "pg_stat_statements is installed but not loaded (add it to shared_preload_libraries)", failed_query=True
        ) from None
    reset = ctx.query(RESET_SQL.format(schema=schema)) if _version_tuple(version) >= (1, 9) else []
    reading = Reading(
        taken_at=time.time(),
        database=ctx.server.database,
        counters={},
        roles={},
        stats_reset=reset[0][0] if reset else None,
        hidden=0,
        schema=schema,
        version=version,
    )
    for queryid, userid, dbid, calls, seconds, n_rows, role in found:
        if queryid is None:  # another role's entry, and we lack pg_read_all_stats
            reading.hidden += 1
            continue
        key = (int(queryid), int(userid), int(dbid))
        reading.counters[key] = Counters(calls, seconds, n_rows)
        reading.roles[key] = role
    return reading


def read_texts(ctx: Context, reading: Reading, keys: Iterable[Key]) -> dict[Key, tuple[str, bool]]:
    """The normalised texts of `keys` (cleaned, and whether they were cut), read in one pass over the file."""
    by_id = {(k[0], k[1]): k for k in keys}
    if not by_id:
        return {}
    sql = TEXTS_SQL.format(schema=reading.schema, chars=4 * TEXT_MAX, toplevel=_toplevel(reading.version))
    out: dict[Key, tuple[str, bool]] = {}
    for queryid, userid, text in ctx.query(sql, (sorted({q for q, _ in by_id}),)):
        key = by_id.get((queryid, userid))
        if key is not None and text is not None:
            out[key] = clean_text(text)
    return out


def clean_text(text: str | bytes) -> tuple[str, bool]:
    """One printable line of at most TEXT_MAX characters, and whether it was cut.

    Passwords are redacted (PASSWORD '...' of a utility statement, password= of a DSN in a literal).
    Whitespace runs become one space (a statement's text fits a table row and a Markdown cell),
    control characters and lone surrogates become U+FFFD (the baseline reader accepts printable text only).
    """
    if isinstance(text, bytes):  # a SQL_ASCII database hands over bytes
        text = text.decode("utf-8", "replace")
    text = text.encode("utf-8", "replace").decode("utf-8") if _has_surrogates(text) else text
    text = redact(_SQL_PASSWORD.sub(lambda m: m.group(1) + f"'{REDACTED}'", text))  # and DSNs (dblink, ...)
    line = "".join(ch if ch.isprintable() else "\ufffd" for ch in " ".join(text.split()))
    if len(line) > TEXT_MAX:
        return line[: TEXT_MAX - 1] + "…", True
    return line, False


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def delta(before: Counters | None, after: Counters, reset_between: bool) -> tuple[Counters, bool]:
    """What happened between two readings of one statement, and whether the readings were comparable.

    Not comparable (a reset, or an entry evicted and back: counters lower than before, or no earlier
    reading): the later counters, which cover only the time since the entry started counting again.
    """
    if before is None or reset_between or after.calls < before.calls or after.total_seconds < before.total_seconds:
        return after, False
    return after.minus(before), True


def reset_between(earlier: float | None, later: float | None) -> bool:
    """pg_stat_statements_reset() ran between two readings (as far as the server's records go)."""
    return earlier is not None and later is not None and later > earlier


def window_entries(start: Reading | None, end: Reading, limit: int) -> list[tuple[Key, Counters, Counters | None]]:
    """The `limit` statements a baseline keeps: (key, counters at the end, counters of the window).

    First those that ran in the window, by their time in it; then, to fill the rest, those that did
    not, by their time since they started counting (their mean is the cumulative one). The window's
    counters are None when there is no start reading to subtract.
    """
    reset = start is not None and reset_between(start.stats_reset, end.stats_reset)
    active: list[tuple[Key, Counters, Counters | None]] = []
    idle: list[tuple[Key, Counters, Counters | None]] = []
    for key, after in end.counters.items():
        # An entry absent at the start, or counting again after a reset, was created in the window:
        # all of its counts are the window's.
        window = delta(start.counters.get(key), after, reset)[0] if start is not None else None
        (active if window is not None and window.calls > 0 else idle).append((key, after, window))
    active.sort(key=lambda e: (-e[2].total_seconds, e[0]))  # type: ignore[union-attr]
    idle.sort(key=lambda e: (-e[1].total_seconds, e[0]))
    return (active + idle)[: max(0, limit)]


def snapshot_doc(
    start: Reading | None, end: Reading, texts: dict[Key, tuple[str, bool]], limit: int
) -> dict[str, object]:
    """The baseline file's `top_statements.<target>` object (see baseline_file.StatementSnapshot)."""
    entries = []
    for key, after, window in window_entries(start, end, limit):
        ran = window is not None and window.calls > 0
        text, cut = texts.get(key, (None, False))
        entries.append(
            {
                "queryid": str(key[0]),  # a signed 64-bit integer: exact as text, not as a JSON number
                "userid": key[1],
                "dbid": key[2],
                "role": end.roles[key],
                "calls": window.calls if window else None,
                "total_exec_seconds": window.total_seconds if window else None,
                "rows": window.rows if window else None,
                "mean_exec_seconds": (window if ran else after).mean_seconds(),  # type: ignore[union-attr]
                "mean_source": "window" if ran else "cumulative",
                "cumulative_calls": after.calls,
                "cumulative_total_exec_seconds": after.total_seconds,
                "cumulative_rows": after.rows,
                "query": text,
                "query_truncated": cut,
            }
        )
    return {
        "database": end.database,
        "window_start_at": start.taken_at if start else None,
        "captured_at": end.taken_at,
        "stats_reset": end.stats_reset,
        "limit": limit,
        "hidden_statements": end.hidden,
        "statements": entries,
    }
