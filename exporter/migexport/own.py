"""The exporter's own transactions, kept out of the counters it exports: watching must not change
what is watched.

PostgreSQL counts every statement the exporter sends in autocommit as a committed transaction, every
failed one (a probe denied access, a collector hitting its lock_timeout) as a rolled-back one, and one
commit for each new connection. Left in, a failing probe raises the error ratio it is meant to judge
and a quiet database's "TPS" is the exporter's own.

Each of the exporter's connections counts its transactions in the target's `OwnTransactions` through a
`SessionLedger`, each one just before it ends, so before the server can publish it. The counters
exported are the server's minus those (`OwnCountsGuard`), which never go backwards: a transaction of
ours counted a moment before the server shows it makes a dip that the guard absorbs. On PostgreSQL 15+
`pg_stat_force_next_flush()` makes a backend publish its counts before it answers, so the server
catches up at once; older servers publish on their own schedule (at most every 500 ms, at a
transaction's end), and the exported counters wait for them.
"""

from __future__ import annotations

import threading
from typing import Any

# PostgreSQL 15+. A backend flushes its transaction counts only along with other pending statistics,
# so the statement also reads a catalog row: without it our commits surface seconds later, at random.
FLUSH_EXPR = "(SELECT pg_stat_force_next_flush() FROM (SELECT 1 FROM pg_catalog.pg_am LIMIT 1) AS touch)::text"
FLUSH_SQL = "SELECT " + FLUSH_EXPR
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
    """One connection's transactions, counted as the exporter's own *before* the server can publish
    them: a scrape that read a probe's rollback in the server's counters before it was counted as ours
    would export it as the application's. Counted early, a transaction of ours is subtracted a moment
    before the server shows it, a dip that `OwnCountsGuard` absorbs without losing anything."""

    def __init__(self, own: OwnTransactions, server_version_num: int) -> None:
        self.own = own
        self.can_flush = server_version_num >= FLUSH_MIN_VERSION
        own.add(COMMITS_PER_CONNECTION, 0)

    def ending(self, ok: bool) -> None:
        """A transaction of ours (an autocommit statement, a probe's COMMIT or ROLLBACK) is about to end."""
        self.own.add(int(ok), int(not ok))

    def failed_instead(self, broken: bool) -> None:
        """A statement counted as a commit failed: a rollback instead, unless the session died with it
        (then the server may count nothing at all, and a lost commit is the smaller error)."""
        self.own.add(-1, 0 if broken else 1)

    def flush(self, conn: Any, marker: str) -> None:
        """Make the server publish this session's counts now (PostgreSQL 15+) rather than within seconds."""
        if not self.can_flush:
            return
        self.ending(ok=True)
        try:
            conn.execute(marker + FLUSH_SQL)
        except Exception:
            self.failed_instead(broken=bool(getattr(conn, "broken", False)))
            raise


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
