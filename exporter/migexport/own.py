"""The exporter's own transactions, kept out of the counters it exports: watching must not change
what is watched.

PostgreSQL counts every statement the exporter sends in autocommit as a committed transaction, every
failed one (a probe denied access, a collector hitting its lock_timeout) as a rolled-back one, and one
commit for each new connection. Left in, a failing probe raises the error ratio it is meant to judge
and a quiet database's "TPS" is the exporter's own.

Each of the exporter's connections keeps a `SessionLedger` of what it did since its statistics were
last flushed. On PostgreSQL 15+ `pg_stat_force_next_flush()` makes a backend publish its counts
before it answers, so after the flush statement returns, the ledger's counts are known to be in
`pg_stat_database` and move to the target's `OwnTransactions`. The counters exported are the server's
minus those (`OwnCountsGuard`). Older servers publish on their own schedule (at most every 500 ms, at
a transaction's end): there the subtraction is approximate for a moment and the guard keeps the
exported counters from going backwards.
"""

from __future__ import annotations

import threading
from typing import Any

# PostgreSQL 15+. A backend flushes its transaction counts only along with other pending statistics,
# so the statement also reads a catalog row: without it our commits surface seconds later, at random.
FLUSH_SQL = "SELECT pg_stat_force_next_flush() FROM (SELECT 1 FROM pg_catalog.pg_am LIMIT 1) AS touch"
FLUSH_MIN_VERSION = 150000
# Measured on PostgreSQL 15: a new connection adds one commit to xact_commit before its first statement.
COMMITS_PER_CONNECTION = 1


class OwnTransactions:
    """Per target: the exporter's transactions (scrapes and probes) known to be in the server's counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commits = 0
        self._rollbacks = 0

    def add(self, commits: int, rollbacks: int) -> None:
        with self._lock:
            self._commits += commits
            self._rollbacks += rollbacks

    def totals(self) -> tuple[int, int]:
        with self._lock:
            return self._commits, self._rollbacks


class SessionLedger:
    """One connection's transactions that the server may not have published yet."""

    def __init__(self, own: OwnTransactions, server_version_num: int) -> None:
        self.own = own
        self.can_flush = server_version_num >= FLUSH_MIN_VERSION
        self.commits = COMMITS_PER_CONNECTION
        self.rollbacks = 0

    def record(self, ok: bool) -> None:
        """One autocommit statement or one explicit transaction ended."""
        if ok:
            self.commits += 1
        else:
            self.rollbacks += 1

    def flush(self, conn: Any, marker: str) -> None:
        """Publish this session's counts to the server, then count them as ours.

        The flush statement's own commit is published by the same flush (it is counted at its
        transaction's end, before the backend reports and answers), so it is included.
        """
        if self.can_flush:
            try:
                conn.execute(marker + FLUSH_SQL)
            except Exception:
                self.rollbacks += 1  # a failed statement is a rolled-back transaction, published later
                raise
            self.commits += 1
        self.own.add(self.commits, self.rollbacks)
        self.commits = self.rollbacks = 0


class OwnCountsGuard:
    """Server counters minus the exporter's own, as counters that never go backwards.

    A fall of the server's counters (stats reset, crash recovery) starts a new epoch: our earlier
    transactions are no longer in them, so they stop being subtracted, and the exported counter
    restarts too (Prometheus' rate() reads that as a reset).
    """

    def __init__(self) -> None:
        self._last_raw: tuple[float, float] | None = None
        self._own_base = (0, 0)
        self._out: tuple[float, float] | None = None

    def update(self, commits: float, rollbacks: float, own: tuple[int, int]) -> tuple[float, float]:
        if self._last_raw is not None and (commits < self._last_raw[0] or rollbacks < self._last_raw[1]):
            self._own_base, self._out = own, None
        self._last_raw = (commits, rollbacks)
        value = (
            max(0.0, commits - (own[0] - self._own_base[0])),
            max(0.0, rollbacks - (own[1] - self._own_base[1])),
        )
        if self._out is not None:
            # Before 15, a count of ours may be subtracted a moment before the server shows it.
            value = (max(value[0], self._out[0]), max(value[1], self._out[1]))
        self._out = value
        return value


class MonotonicSum:
    """A sum over rows that can disappear (pg_stat_statements evicts its least-used entries when full,
    and a reset empties it) as a counter: only the increases are added, a fall adds nothing."""

    def __init__(self) -> None:
        self._last: float | None = None
        self.total = 0.0

    def update(self, raw: float) -> float:
        if self._last is None:
            self.total = raw
        elif raw > self._last:
            self.total += raw - self._last
        self._last = raw
        return self.total
