"""Commits, rollbacks and deadlocks of the watched database: the checklist's error rate.

Read in autocommit, so each scrape sees fresh cumulative statistics rather than a per-transaction
cached copy. The exporter's own read-only queries are transactions too and count as commits (one per
query, a handful per scrape); it never rolls back on its own, so rollbacks are the application's.
"""

from __future__ import annotations

from migexport.collectors.base import Collector, Context
from migexport.metrics import COUNTER, MetricSpec, Sample

DATABASE_STATS_SQL = """
SELECT xact_commit, xact_rollback, deadlocks, extract(epoch FROM stats_reset)::float8
FROM pg_stat_database
WHERE datname = current_database()
"""

COMMITS = MetricSpec(
    "migexport_xact_commit_total",
    "Transactions committed in the watched database (pg_stat_database.xact_commit).",
    kind=COUNTER,
)
ROLLBACKS = MetricSpec(
    "migexport_xact_rollback_total",
    "Transactions rolled back in the watched database (pg_stat_database.xact_rollback).",
    kind=COUNTER,
)
DEADLOCKS = MetricSpec("migexport_deadlocks_total", "Deadlocks detected in the watched database.", kind=COUNTER)
STATS_RESET = MetricSpec(
    "migexport_stats_reset_timestamp_seconds",
    "When the database's cumulative statistics were last reset (NaN if never): counters restart then.",
)


class TransactionsCollector(Collector):
    name = "transactions"
    specs = (COMMITS, ROLLBACKS, DEADLOCKS, STATS_RESET)

    def collect(self, ctx: Context) -> list[Sample]:
        commits, rollbacks, deadlocks, reset = ctx.query_one(DATABASE_STATS_SQL)
        return [
            COMMITS.sample(commits),
            ROLLBACKS.sample(rollbacks),
            DEADLOCKS.sample(deadlocks),
            STATS_RESET.sample(reset),
        ]
