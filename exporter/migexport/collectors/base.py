"""What every collector shares: the per-scrape context and the collector interface."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import psycopg

from migexport.metrics import MetricSpec, Sample
from migexport.own import OwnTransactions, SessionLedger

# Every statement the exporter sends starts with this comment. It makes our sessions easy to spot
# in pg_stat_activity and lets the statements collector leave our own queries out of the latency sums.
MARKER = "/* migexport */ "


@dataclass(frozen=True)
class ServerInfo:
    version_num: int
    in_recovery: bool
    database: str
    # Whether the session's role sees other sessions' activity (pg_stat_activity's state, wait events
    # and queries, pg_stat_replication's lags, the WAL receiver): a superuser, or a role with the
    # privileges of pg_read_all_stats (pg_monitor has them). Without, those rows read NULL.
    can_read_all_stats: bool = True


# USAGE, not MEMBER: what counts is having the role's privileges (a NOINHERIT member has not), which is
# what the statistics views check; a superuser has every role's.
CAN_READ_ALL_STATS_SQL = "pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')"


class Context:
    """One collection pass over one target: its connection and what we learned about the server."""

    def __init__(
        self, target: str, conn: psycopg.Connection, server: ServerInfo, ledger: SessionLedger | None = None
    ) -> None:
        self.target = target
        self.conn = conn
        self.server = server
        # The connection's count of our own transactions; None where the caller subtracts them itself
        # (the baseline sampler).
        self.ledger = ledger
        self.queries = 0
        # Set by the locks collector, reused by collectors that need the same wait graph.
        self.lock_graph: Any = None
        self.lock_waiters: list[Any] = []

    def query(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> list[tuple]:
        self.queries += 1
        if self.ledger is not None:
            self.ledger.ending(ok=True)  # an autocommit statement is a transaction of ours
        try:
            with self.conn.cursor() as cur:
                cur.execute(MARKER + sql, params)  # type: ignore[arg-type]
                return cur.fetchall()
        except psycopg.Error:
            if self.ledger is not None:
                self.ledger.failed_instead(broken=self.conn.broken)
            raise

    @property
    def own(self) -> OwnTransactions | None:
        return self.ledger.own if self.ledger is not None else None

    def publish_own_transactions(self) -> None:
        """Make the server's counters include everything this connection did (PostgreSQL 15+)."""
        if self.ledger is not None:
            self.queries += int(self.ledger.can_flush)
            self.ledger.flush(self.conn, MARKER)

    def query_one(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None) -> tuple:
        rows = self.query(sql, params)
        if len(rows) != 1:
            raise RuntimeError(f"expected one row, got {len(rows)}")
        return rows[0]


class Collector(ABC):
    """A signal: SQL at the top of its module, the metrics it yields, and `collect()`.

    Instances belong to one target, so they may keep state between scrapes (caches, clocks).
    """

    name: ClassVar[str]
    specs: ClassVar[tuple[MetricSpec, ...]]
    # Expensive collectors run at most this often and serve their last result in between.
    min_interval_seconds: ClassVar[float] = 0.0
    # True for collectors that read other sessions' activity: for a role that cannot see it
    # (ServerInfo.can_read_all_stats False) they would read low, a calm 0 during a lock queue, so they
    # are not run and report collector_success 0 instead.
    needs_all_stats: ClassVar[bool] = False

    def __init__(self) -> None:
        self._cached: list[Sample] | None = None
        self._cached_at = 0.0

    def applies(self, server: ServerInfo) -> bool:
        return True

    @abstractmethod
    def collect(self, ctx: Context) -> list[Sample]:
        """Query the server and return this signal's samples."""

    def collect_cached(self, ctx: Context) -> list[Sample]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached_at < self.min_interval_seconds:
            return self._cached
        samples = self.collect(ctx)
        if self.min_interval_seconds:
            self._cached, self._cached_at = samples, now
        return samples
