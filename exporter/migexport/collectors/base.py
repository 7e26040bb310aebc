"""What every collector shares: the per-scrape context and the collector interface."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import psycopg

from migexport.collectors.activity import ActivityPart, ActivityUnavailable, read, unique_parts
from migexport.metrics import MetricSpec, Sample
from migexport.own import FLUSH_EXPR, OwnTransactions, SessionLedger

# Every statement the exporter sends starts with this comment. It makes our sessions easy to spot
# in pg_stat_activity and lets the statements collector leave our own queries out of the latency sums.
MARKER = "/* migexport */ "


class PreparedStatements:
    """Which of the statements a scrape repeats are prepared on one connection (see Context.query).

    The pass's statement is ~5 kB of SQL: parsing, analysing and planning it took 0.8-0.9 ms a scrape,
    more than reading 400 sessions. Prepared at its first run, a scrape only binds and executes it.
    When a preparing run fails (a timeout, a cancel at the scrape's deadline), psycopg forgets the
    statement while the server may keep it, and the next run prepares it again under a new name. So a
    statement whose prepared runs failed PREPARE_ATTEMPTS times runs unprepared on that connection from
    then on: a failing server leaves a bounded number of statements in our session, never one a scrape."""

    PREPARE_ATTEMPTS = 3

    def __init__(self) -> None:
        self._failures: dict[str, int] = {}

    def wanted(self, text: str) -> bool:
        return self._failures.get(text, 0) < self.PREPARE_ATTEMPTS

    def failed(self, text: str) -> None:
        self._failures[text] = self._failures.get(text, 0) + 1


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
    """One collection pass over one target: its connection and what we learned about the server.

    A Context kept across passes (the baseline sampler's) starts each one with `new_pass()`.
    """

    def __init__(
        self,
        target: str,
        conn: psycopg.Connection,
        server: ServerInfo,
        ledger: SessionLedger | None = None,
        activity_parts: Sequence[ActivityPart] = (),
        prepared: PreparedStatements | None = None,
    ) -> None:
        self.target = target
        self.conn = conn
        self.server = server
        # The connection's count of our own transactions; None where the caller subtracts them itself
        # (the baseline sampler).
        self.ledger = ledger
        # The connection's prepared statements; None: nothing is prepared on it.
        self.prepared = prepared
        self.queries = 0
        # The parts of this pass's one read of pg_stat_activity (see collectors.activity), and what
        # collectors derived from it (the lock graph), so a second collector does not derive it again.
        self.activity_parts = unique_parts(activity_parts)
        self._activity: dict[str, Any] = {}
        self.activity_error: str | None = None  # why this pass's activity read failed
        self.derived: dict[str, Any] = {}
        # Set when this pass's first statement already made the server publish our transactions.
        self.own_published = False

    def new_pass(self) -> None:
        self._activity.clear()
        self.activity_error = None
        self.derived.clear()
        self.own_published = False

    def activity(self, part: ActivityPart) -> Any:
        """`part`'s value in this pass: every registered part is read by the first call, in one statement."""
        if self.activity_error is not None:
            raise ActivityUnavailable(self.activity_error)
        if part.name not in self._activity:
            wanted = [p for p in self.activity_parts if p.name not in self._activity]
            if part.name not in {p.name for p in wanted}:
                wanted.append(part)
            self.preload(read(self, wanted)[1])
        return self._activity[part.name]

    def preload(self, values: dict[str, Any]) -> None:
        self._activity.update(values)

    def query(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
        publish_own: bool = False,
        prepare: bool = False,
    ) -> list[tuple]:
        """Rows of one autocommit statement. `publish_own`: the statement also makes the server publish
        our transactions so far, its own included, as it ends (PostgreSQL 15+; at most its rows).
        `prepare`: a statement every scrape sends, prepared on the connection where it has
        PreparedStatements."""
        self.queries += 1
        self.own_published = False  # this statement's own commit is not published yet
        flush = publish_own and self.ledger is not None and self.ledger.can_flush
        if self.ledger is not None:
            self.ledger.ending(ok=True)  # an autocommit statement is a transaction of ours
        text = MARKER + (f"SELECT q.*, {FLUSH_EXPR} FROM ({sql}) AS q" if flush else sql)
        use_prepared = prepare and self.prepared is not None and self.prepared.wanted(text)
        try:
            with self.conn.cursor() as cur:
                if use_prepared:
                    # In a pipeline the preparation (Parse) shares the statement's Sync: one transaction,
                    # as counted above. Alone, psycopg would sync after it, a commit the ledger misses.
                    with self.conn.pipeline():
                        cur.execute(text, params, prepare=True)  # type: ignore[arg-type]
                else:
                    cur.execute(text, params, prepare=False)  # type: ignore[arg-type]
                rows = cur.fetchall()
        except psycopg.Error:
            if self.ledger is not None:
                self.ledger.failed_instead(broken=self.conn.broken)
            if use_prepared and self.prepared is not None:
                self.prepared.failed(text)
            raise
        self.own_published = flush and bool(rows)
        return [row[:-1] for row in rows] if flush else rows

    @property
    def own(self) -> OwnTransactions | None:
        return self.ledger.own if self.ledger is not None else None

    def publish_own_transactions(self) -> None:
        """Make the server's counters include everything this connection did (PostgreSQL 15+)."""
        if self.ledger is not None and not self.own_published:
            self.queries += int(self.ledger.can_flush)
            self.ledger.flush(self.conn, MARKER)

    def query_one(
        self,
        sql: str,
        params: Sequence[Any] | dict[str, Any] | None = None,
        publish_own: bool = False,
        prepare: bool = False,
    ) -> tuple:
        rows = self.query(sql, params, publish_own, prepare)
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
    # True for a collector whose queries cost the same whatever the sessions do (pg_stat_statements'
    # sums): the exporter runs it on a second session while the pass reads the sessions and locks.
    beside_the_pass: ClassVar[bool] = False
    # True for a collector that reads the server's transaction counters and subtracts our own: it runs
    # once every statement of ours in the pass has been published (see own.py).
    reads_own_transactions: ClassVar[bool] = False

    def __init__(self) -> None:
        self._cached: list[Sample] | None = None
        self._cached_at = 0.0

    def applies(self, server: ServerInfo) -> bool:
        return True

    def activity_parts(self, version_num: int) -> tuple[ActivityPart, ...]:
        """What this collector reads from the pass's one pg_stat_activity read (see collectors.activity)."""
        return ()

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
