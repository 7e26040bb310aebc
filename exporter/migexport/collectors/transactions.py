"""Commits, rollbacks and deadlocks of the watched database: the checklist's error rate.

Read in autocommit, so each scrape sees fresh cumulative statistics rather than a per-transaction
cached copy. The exporter's own transactions (its read-only queries, its probes, failed or not, and
one commit per connection it opens) are subtracted (see migexport.own): a failing probe moves neither
the rollback counter nor the error ratio, and a quiet database reads 0 TPS, not the exporter's.
"""

from __future__ import annotations

from migexport.collectors.base import Collector, Context
from migexport.metrics import COUNTER, MetricSpec, Sample
from migexport.own import OwnCountsGuard

DATABASE_STATS_SQL = """
SELECT xact_commit, xact_rollback, deadlocks, extract(epoch FROM stats_reset)::float8
FROM pg_stat_database
WHERE datname = current_database()
"""

COMMITS = MetricSpec(
    "migexport_xact_commit_total",
    "Transactions committed in the watched database (pg_stat_database.xact_commit), the exporter's own "
    "excluded (exactly on PostgreSQL 15+).",
    kind=COUNTER,
)
ROLLBACKS = MetricSpec(
    "migexport_xact_rollback_total",
    "Transactions rolled back in the watched database (pg_stat_database.xact_rollback), the exporter's own "
    "(e.g. failing probes) excluded.",
    kind=COUNTER,
)
DEADLOCKS = MetricSpec("migexport_deadlocks_total", "Deadlocks detected in the watched database.", kind=COUNTER)
STATS_RESET = MetricSpec(
    "migexport_stats_reset_timestamp_seconds",
    "When the database's cumulative statistics were last reset (NaN if never): counters restart then.",
)


class TransactionsCollector(Collector):
    name = "transactions"
    reads_own_transactions = True
    specs = (COMMITS, ROLLBACKS, DEADLOCKS, STATS_RESET)

    def __init__(self) -> None:
        super().__init__()
        self._guard = OwnCountsGuard()

    def collect(self, ctx: Context) -> list[Sample]:
        # First publish this connection's own transactions, so that what we subtract is in what we read.
        ctx.publish_own_transactions()
        commits, rollbacks, deadlocks, reset = ctx.query_one(DATABASE_STATS_SQL, prepare=True)
        if ctx.own is not None:
            # Totals read after the server's counters: a probe's count published in between is
            # subtracted a moment early, which the guard absorbs.
            commits, rollbacks = self._guard.update(commits, rollbacks, ctx.own.totals())
        return [
            COMMITS.sample(commits),
            ROLLBACKS.sample(rollbacks),
            DEADLOCKS.sample(deadlocks),
            STATS_RESET.sample(reset),
        ]
