"""Heavyweight lock waits: who waits, for how long, on what, and who is at the root of the queue.

The checklist's lock query joins pg_locks on transactionid and misses every session queued behind an
ALTER TABLE (those wait on a relation lock). pg_blocking_pids() sees relation locks, lock-mode
conflicts and the "soft" blocks of a wait queue, so it is the source of truth here. It takes the lock
manager's partition locks while it runs, so it is called only for backends that wait on a lock.

The migration hazard is the queue: an old transaction (the root) holds a lock, the DDL waits for
ACCESS EXCLUSIVE behind it, and every later reader waits behind the DDL. The root is the session to
end; the number of sessions it holds up, transitively, is how bad it is.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from migexport.collectors.base import Collector, Context
from migexport.metrics import MetricSpec, Sample

# Only backends actually waiting on a heavyweight lock: pg_blocking_pids() is evaluated for the
# result rows only, so it never runs for the (many) sessions that are not waiting.
# relation::regclass resolves the name from the catalog cache: it takes no lock on the table.
WAITERS_SQL_TEMPLATE = """
SELECT a.pid,
       l.locktype,
       l.mode,
       CASE
         WHEN l.relation IS NULL THEN NULL
         WHEN l.database IN (0, (SELECT oid FROM pg_database WHERE datname = current_database()))
           THEN l.relation::regclass::text
         ELSE 'oid ' || l.relation
       END,
       {wait_seconds},
       pg_blocking_pids(a.pid)
FROM pg_stat_activity a
JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted
WHERE a.wait_event_type = 'Lock' AND a.pid <> pg_backend_pid()
"""
# PostgreSQL 14 added pg_locks.waitstart; it is NULL for a moment right after a wait begins.
WAIT_SECONDS_SINCE_14 = "coalesce(extract(epoch FROM clock_timestamp() - l.waitstart), 0)::float8"
# Before 14 only the statement's start is known: an upper bound of the wait (said in the HELP text).
WAIT_SECONDS_BEFORE_14 = "coalesce(extract(epoch FROM clock_timestamp() - a.query_start), 0)::float8"

ROOTS_SQL = """
SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), coalesce(state, ''),
       coalesce(extract(epoch FROM clock_timestamp() - xact_start), 0)::float8
FROM pg_stat_activity
WHERE pid = ANY(%s)
"""

TOP_RELATIONS = 10
TOP_ROOTS = 5
OTHER = "(other)"

WAITING = MetricSpec("migexport_lock_waiting_sessions", "Sessions waiting for a heavyweight lock.")
WAIT_MAX = MetricSpec(
    "migexport_lock_wait_max_seconds",
    "Longest current heavyweight lock wait, from pg_locks.waitstart (PostgreSQL 14+; on older servers "
    "the waiting statement's age, an upper bound). 0 when nothing waits.",
)
BY_RELATION = MetricSpec(
    "migexport_lock_waiting_sessions_by_relation",
    f"Sessions waiting for a lock, by relation and requested mode; the top {TOP_RELATIONS} relations, "
    f'the rest summed as relation="{OTHER}". Non-relation locks show their lock type in parentheses.',
    labels=("relation", "mode"),
)
ROOTS = MetricSpec(
    "migexport_lock_blocking_root_sessions",
    "Sessions that block others while not waiting for a lock themselves: the roots of lock queues.",
)
MAX_BLOCKED = MetricSpec(
    "migexport_lock_max_blocked_by_one_session",
    "Largest number of sessions transitively blocked by one root session.",
)
ROOT_BLOCKED = MetricSpec(
    "migexport_lock_root_blocked_sessions",
    f"Sessions transitively blocked by this root session (top {TOP_ROOTS} roots): who to look at first. "
    "pid 0 is a prepared transaction.",
    labels=("pid", "usename", "application_name", "state"),
)
ROOT_XACT_AGE = MetricSpec(
    "migexport_lock_root_transaction_seconds",
    f"Age of the transaction of a root blocking session (top {TOP_ROOTS} roots).",
    labels=("pid", "usename", "application_name", "state"),
)


@dataclass
class LockGraph:
    """Who waits for whom, from pg_blocking_pids(). Edges point from a waiter to its blockers."""

    blockers: dict[int, list[int]] = field(default_factory=dict)

    def waiting(self) -> set[int]:
        return set(self.blockers)

    def roots(self) -> set[int]:
        """Sessions that block someone and wait for nothing."""
        return {b for bs in self.blockers.values() for b in bs} - self.waiting()

    def blocked_by(self, pid: int) -> set[int]:
        """Every session that waits, directly or through others, on `pid`."""
        waiters: dict[int, list[int]] = {}
        for waiter, bs in self.blockers.items():
            for b in bs:
                waiters.setdefault(b, []).append(waiter)
        seen: set[int] = set()
        queue = deque(waiters.get(pid, []))
        while queue:
            w = queue.popleft()
            if w in seen or w == pid:
                continue
            seen.add(w)
            queue.extend(waiters.get(w, []))
        return seen


@dataclass
class Waiter:
    pid: int
    locktype: str
    mode: str
    relation: str | None
    wait_seconds: float
    blockers: list[int]

    @property
    def relation_label(self) -> str:
        if self.relation is not None and self.locktype in ("relation", "extend", "page", "tuple"):
            return self.relation
        return f"({self.locktype})"


class LocksCollector(Collector):
    name = "locks"
    needs_all_stats = True
    specs = (WAITING, WAIT_MAX, BY_RELATION, ROOTS, MAX_BLOCKED, ROOT_BLOCKED, ROOT_XACT_AGE)

    def collect(self, ctx: Context) -> list[Sample]:
        waiters = self.waiters(ctx)
        graph = LockGraph({w.pid: w.blockers for w in waiters})
        # Later collectors (the migration's own session) reuse the graph instead of asking again.
        ctx.lock_graph, ctx.lock_waiters = graph, waiters
        roots = graph.roots()
        blocked_counts = {root: len(graph.blocked_by(root)) for root in roots}

        samples = [
            WAITING.sample(len(waiters)),
            WAIT_MAX.sample(max((w.wait_seconds for w in waiters), default=0.0)),
            ROOTS.sample(len(roots)),
            MAX_BLOCKED.sample(max(blocked_counts.values(), default=0)),
        ]
        samples += self._by_relation(waiters)
        samples += self._top_roots(ctx, blocked_counts)
        return samples

    @staticmethod
    def waiters(ctx: Context) -> list[Waiter]:
        wait_expr = WAIT_SECONDS_SINCE_14 if ctx.server.version_num >= 140000 else WAIT_SECONDS_BEFORE_14
        rows = ctx.query(WAITERS_SQL_TEMPLATE.format(wait_seconds=wait_expr))
        return [Waiter(pid, lt, mode, rel, secs, list(bs or [])) for pid, lt, mode, rel, secs, bs in rows]

    @staticmethod
    def _by_relation(waiters: list[Waiter]) -> list[Sample]:
        per_relation = Counter(w.relation_label for w in waiters)
        top = {rel for rel, _ in per_relation.most_common(TOP_RELATIONS)}
        counts: Counter[tuple[str, str]] = Counter()
        for w in waiters:
            counts[(w.relation_label if w.relation_label in top else OTHER, w.mode)] += 1
        return [BY_RELATION.sample(n, relation=rel, mode=mode) for (rel, mode), n in sorted(counts.items())]

    @staticmethod
    def _top_roots(ctx: Context, blocked_counts: dict[int, int]) -> list[Sample]:
        if not blocked_counts:
            return []
        top = sorted(blocked_counts, key=lambda pid: (-blocked_counts[pid], pid))[:TOP_ROOTS]
        details = {row[0]: row[1:] for row in ctx.query(ROOTS_SQL, ([pid for pid in top if pid],))}
        samples = []
        for pid in top:
            usename, app, state, xact_age = details.get(pid, ("", "", "prepared" if pid == 0 else "", 0.0))
            labels = {"pid": str(pid), "usename": usename, "application_name": app, "state": state}
            samples.append(ROOT_BLOCKED.sample(blocked_counts[pid], **labels))
            samples.append(ROOT_XACT_AGE.sample(xact_age, **labels))
        return samples
