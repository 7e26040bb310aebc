"""Statement latency from pg_stat_statements, summed over the watched database.

No per-query labels: per-queryid series have run Prometheus out of memory elsewhere. Three counters
are enough: calls and execution seconds give the mean latency as rate(exec) / rate(calls), compared
between windows by their deltas, and the sum of squared execution times gives its variance, so a rule
can tell a real slowdown from the noise of a window's volume.

Left out, by role (`userid`), never by reading query texts (the text file can be hundreds of MB and the
`query` column reads it): the exporter's own statements (scrapes, probes, the baseline sampler) and
the migration's, when it runs as a role of its own (`migration.role`), so a 10-minute backfill is not
the application's latency. `pg_stat_statements(false)` skips the text file. pg_stat_statements counts
successful statements only; failures show up as rollbacks in the transactions collector.

Entries disappear when the view is full (the least-used are evicted) or reset, so the sums are
exported as counters that only add increases (migexport.own.MonotonicSum).
"""

from __future__ import annotations

import time

import psycopg

from migexport.collectors.base import Collector, Context
from migexport.metrics import COUNTER, MetricSpec, Sample
from migexport.own import MonotonicSum

# regnamespace::text quotes the schema name when it needs quoting, so it can be spliced into SQL.
EXTENSION_SQL = """
SELECT extnamespace::regnamespace::text, extversion
FROM pg_extension WHERE extname = 'pg_stat_statements'
"""
# The roles whose statements are not the application's: ours and the migration's (the parameter). An
# array built once per statement: compared to a subquery, each entry's test is an array lookup rather
# than a subplan rescan (0.2-0.35 ms less per read at 5,000 entries).
EXCLUDED_ROLE_OIDS = "ARRAY(SELECT oid FROM pg_roles WHERE rolname = current_user OR rolname = ANY(%s))"
# Execution times are in milliseconds; stddev is the population standard deviation, so per entry the
# sum of squares is calls * (stddev² + mean²).
TOTALS_SQL_TEMPLATE = """
SELECT coalesce(sum(calls), 0)::float8,
       coalesce(sum({total}), 0)::float8 / 1e3,
       coalesce(sum(calls * ({stddev} * {stddev} + {mean} * {mean})), 0)::float8 / 1e6
FROM {schema}.pg_stat_statements(false)
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND {toplevel} userid <> ALL ({excluded})
"""

EXTENSION_RECHECK_SECONDS = 60.0

AVAILABLE = MetricSpec(
    "migexport_statements_available",
    "1 if pg_stat_statements is installed in the watched database and loaded, else 0 (then the "
    "statement counters are absent).",
)
CALLS = MetricSpec(
    "migexport_statements_calls_total",
    "Statements executed in the watched database, summed over pg_stat_statements (top-level only; the "
    "exporter's role and the migration's role excluded).",
    kind=COUNTER,
)
EXEC_SECONDS = MetricSpec(
    "migexport_statements_exec_seconds_total",
    "Execution time of those statements; rate(this) / rate(calls) is the mean statement latency.",
    kind=COUNTER,
)
EXEC_SECONDS_SQUARED = MetricSpec(
    "migexport_statements_exec_seconds_squared_total",
    "Sum of the squared execution times of those statements (seconds²): with calls and exec seconds, the "
    "variance of the mean latency over a window.",
    kind=COUNTER,
)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def totals_sql(schema: str, version: str) -> str:
    v = _version_tuple(version)
    new_names = v >= (1, 8)  # PostgreSQL 13 renamed total_time to total_exec_time, and so on
    return TOTALS_SQL_TEMPLATE.format(
        schema=schema,
        total="total_exec_time" if new_names else "total_time",
        mean="mean_exec_time" if new_names else "mean_time",
        stddev="stddev_exec_time" if new_names else "stddev_time",
        toplevel="toplevel AND" if v >= (1, 9) else "",
        excluded=EXCLUDED_ROLE_OIDS,
    )


class StatementsCollector(Collector):
    name = "statements"
    # Its cost follows the number of statements (about 0.5 µs each), not the sessions: it runs beside
    # the pass, on a session of its own.
    beside_the_pass = True
    specs = (AVAILABLE, CALLS, EXEC_SECONDS, EXEC_SECONDS_SQUARED)

    def __init__(self, excluded_roles: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.excluded_roles = [r for r in excluded_roles if r]
        self._sums = (MonotonicSum(), MonotonicSum(), MonotonicSum())
        # The totals statement for a connection (None: the extension is not installed), so the
        # extension is looked up once per connection, not once per scrape. A missing one is looked
        # up again after EXTENSION_RECHECK_SECONDS: a CREATE EXTENSION shows without a reconnect.
        self._sql_for: tuple[object, str | None, float] | None = None

    def _totals_sql(self, ctx: Context) -> str | None:
        now = time.monotonic()
        cached = self._sql_for
        if cached is not None and cached[0] is ctx.conn and (cached[1] or now - cached[2] < EXTENSION_RECHECK_SECONDS):
            return cached[1]
        rows = ctx.query(EXTENSION_SQL)
        sql = totals_sql(*rows[0]) if rows else None
        self._sql_for = (ctx.conn, sql, now)
        return sql

    def collect(self, ctx: Context) -> list[Sample]:
        sql = self._totals_sql(ctx)
        if sql is None:
            return [AVAILABLE.sample(0)]
        try:
            # Publishing our transactions with it: the transactions collector reads after it.
            raw = ctx.query_one(sql, (self.excluded_roles,), publish_own=True, prepare=True)
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # Installed but not in shared_preload_libraries: report it, do not fail the scrape.
            return [AVAILABLE.sample(0)]
        except psycopg.errors.UndefinedFunction:
            self._sql_for = None  # dropped (or moved) since we looked: look again next time
            raise
        calls, seconds, squared = (s.update(v) for s, v in zip(self._sums, raw, strict=True))
        return [
            AVAILABLE.sample(1),
            CALLS.sample(calls),
            EXEC_SECONDS.sample(seconds),
            EXEC_SECONDS_SQUARED.sample(squared),
        ]
