"""Statement latency from pg_stat_statements, summed over the watched database.

No per-query labels: per-queryid series have run Prometheus out of memory elsewhere. Two counters,
calls and execution seconds, are enough for mean latency as rate(exec) / rate(calls), compared
between windows by their deltas. The exporter's own statements all start with the MARKER comment and
are left out, so watching does not change what is watched. pg_stat_statements counts successful
statements only; failures show up as rollbacks in the transactions collector.
"""

from __future__ import annotations

import psycopg

from migexport.collectors.base import MARKER, Collector, Context
from migexport.metrics import COUNTER, MetricSpec, Sample

# regnamespace::text quotes the schema name when it needs quoting, so it can be spliced into SQL.
EXTENSION_SQL = """
SELECT extnamespace::regnamespace::text, extversion
FROM pg_extension WHERE extname = 'pg_stat_statements'
"""
TOTALS_SQL_TEMPLATE = """
SELECT coalesce(sum(calls), 0)::float8, coalesce(sum({exec_time_ms}), 0)::float8 / 1000
FROM {schema}.pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND {toplevel} query NOT LIKE %s
"""

AVAILABLE = MetricSpec(
    "migexport_statements_available",
    "1 if pg_stat_statements is installed in the watched database and loaded, else 0 (then the "
    "statement counters are absent).",
)
CALLS = MetricSpec(
    "migexport_statements_calls_total",
    "Statements executed in the watched database, summed over pg_stat_statements (top-level only; the "
    "exporter's own excluded).",
    kind=COUNTER,
)
EXEC_SECONDS = MetricSpec(
    "migexport_statements_exec_seconds_total",
    "Execution time of those statements; rate(this) / rate(calls) is the mean statement latency.",
    kind=COUNTER,
)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


class StatementsCollector(Collector):
    name = "statements"
    specs = (AVAILABLE, CALLS, EXEC_SECONDS)

    def collect(self, ctx: Context) -> list[Sample]:
        rows = ctx.query(EXTENSION_SQL)
        if not rows:
            return [AVAILABLE.sample(0)]
        schema, version = rows[0]
        v = _version_tuple(version)
        sql = TOTALS_SQL_TEMPLATE.format(
            schema=schema,
            exec_time_ms="total_exec_time" if v >= (1, 8) else "total_time",
            toplevel="toplevel AND" if v >= (1, 9) else "",
        )
        try:
            calls, seconds = ctx.query_one(sql, (MARKER.strip() + "%",))
        except psycopg.errors.ObjectNotInPrerequisiteState:
            # Installed but not in shared_preload_libraries: report it, do not fail the scrape.
            return [AVAILABLE.sample(0)]
        return [AVAILABLE.sample(1), CALLS.sample(calls), EXEC_SECONDS.sample(seconds)]
