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

import functools
from collections import Counter, deque
from dataclasses import dataclass, field

from migexport.collectors.activity import ActivityPart
from migexport.collectors.base import Collector, Context
from migexport.metrics import MetricSpec, Sample

# The pass's one scan of the sessions (collectors.activity) lists the pids that wait on a lock (and,
# before PostgreSQL 14, since when their statement runs) and our own database's oid.
_WAITS_ON_A_LOCK = "wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
LOCKS_AGGREGATES = (
    f"array_agg(pid) FILTER (WHERE {_WAITS_ON_A_LOCK}) AS locks_waiting",
    "min(datid) FILTER (WHERE pid = pg_backend_pid()) AS locks_own_datid",
)
# Aggregated with the same filter as locks_waiting, in the same scan: the two arrays line up.
WAITING_SINCE_AGGREGATE = f"array_agg(query_start) FILTER (WHERE {_WAITS_ON_A_LOCK}) AS locks_waiting_since"
# The waiters, with the lock they wait for. pg_locks and pg_blocking_pids() are read only when the scan
# found a Lock wait (the CASE below): both take the lock manager's partition locks, and
# pg_blocking_pids() runs once per waiter, never for the (many) sessions that are not waiting. The label
# is the relation for relation-level locks (relation::regclass resolves the name from the catalog
# cache: it takes no lock on the table), else the lock type in parentheses.
WAITERS_CTE_TEMPLATE = """w AS MATERIALIZED (
  SELECT l.pid, l.mode,
         CASE
           WHEN l.relation IS NULL OR l.locktype NOT IN ('relation', 'extend', 'page', 'tuple')
             THEN '(' || l.locktype || ')'
           WHEN l.database IN (0, (SELECT locks_own_datid FROM a))
             THEN l.relation::regclass::text
           ELSE 'oid ' || l.relation
         END AS label,
         {wait_seconds} AS wait_seconds,
         pg_blocking_pids(l.pid) AS blockers
  FROM pg_locks l JOIN {waiting} ON waiting.pid = l.pid
  WHERE NOT l.granted
)"""
# PostgreSQL 14 added pg_locks.waitstart; it is NULL for a moment right after a wait begins.
WAITING_SINCE_14 = "unnest((SELECT locks_waiting FROM a)) AS waiting(pid)"
WAIT_SECONDS_SINCE_14 = "coalesce(extract(epoch FROM clock_timestamp() - l.waitstart), 0)::float8"
# Before 14 only the statement's start is known: an upper bound of the wait (said in the HELP text).
WAITING_BEFORE_14 = (
    "unnest((SELECT locks_waiting FROM a), (SELECT locks_waiting_since FROM a)) AS waiting(pid, query_start)"
)
WAIT_SECONDS_BEFORE_14 = "coalesce(extract(epoch FROM clock_timestamp() - waiting.query_start), 0)::float8"
# [waiters, counts, roots], NULL when nothing waits: each waiter as [pid, wait seconds, blockers]; the
# waiters counted by label and mode in SQL; each session that blocks others without waiting itself (a
# root) as [pid, usename, application_name, state, transaction age], looked up by pid in the pass's
# snapshot (a root gone since, or a prepared transaction's pid 0, has no row and no details).
LOCKS_SELECT = """CASE WHEN (SELECT locks_waiting FROM a) IS NOT NULL
THEN json_build_array(
  (SELECT json_agg(json_build_array(pid, wait_seconds, blockers)) FROM w),
  (SELECT json_agg(json_build_array(label, mode, n)) FROM (SELECT label, mode, count(*) AS n FROM w GROUP BY 1, 2) c),
  (SELECT json_agg(json_build_array(r.pid, coalesce(pg_get_userbyid(s.usesysid)::text, ''),
                                    coalesce(s.application_name, ''),
                                    coalesce(s.state, ''),
                                    coalesce(extract(epoch FROM clock_timestamp() - s.xact_start), 0)::float8))
   FROM (SELECT unnest(w.blockers) FROM w EXCEPT SELECT w.pid FROM w) AS r(pid)
   CROSS JOIN LATERAL pg_stat_get_activity(r.pid) AS s)
) END"""


@functools.cache  # one part per server version, built once
def locks_part(version_num: int) -> ActivityPart:
    if version_num >= 140000:
        waiters = WAITERS_CTE_TEMPLATE.format(waiting=WAITING_SINCE_14, wait_seconds=WAIT_SECONDS_SINCE_14)
        return ActivityPart("locks", LOCKS_SELECT, (waiters,), aggregates=LOCKS_AGGREGATES)
    waiters = WAITERS_CTE_TEMPLATE.format(waiting=WAITING_BEFORE_14, wait_seconds=WAIT_SECONDS_BEFORE_14)
    return ActivityPart("locks", LOCKS_SELECT, (waiters,), aggregates=(*LOCKS_AGGREGATES, WAITING_SINCE_AGGREGATE))


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

    @functools.cached_property
    def _waiters_of(self) -> dict[int, list[int]]:
        """The reverse edges: who waits directly on each session (built once per graph)."""
        waiters: dict[int, list[int]] = {}
        for waiter, bs in self.blockers.items():
            for b in bs:
                waiters.setdefault(b, []).append(waiter)
        return waiters

    def blocked_by(self, pid: int) -> set[int]:
        """Every session that waits, directly or through others, on `pid`."""
        waiters = self._waiters_of
        seen: set[int] = set()
        queue = deque(waiters.get(pid, []))
        while queue:
            w = queue.popleft()
            if w in seen or w == pid:
                continue
            seen.add(w)
            queue.extend(waiters.get(w, []))
        return seen

    def blocked_counts(self, pids: set[int]) -> dict[int, int]:
        """For each of `pids`, how many sessions it blocks transitively."""
        return {pid: len(self.blocked_by(pid)) for pid in pids}


@dataclass
class Waiter:
    pid: int
    wait_seconds: float
    blockers: list[int]


@dataclass
class LockSnapshot:
    """The pass's lock waits: the waiters, their graph, the waiters counted by relation (or lock type)
    and requested mode, and who the roots are (pid -> labels, transaction age)."""

    waiters: list[Waiter]
    graph: LockGraph
    by_relation: dict[tuple[str, str], int]
    root_details: dict[int, tuple[str, str, str, float]]


def lock_snapshot(ctx: Context) -> LockSnapshot:
    """Derived once per pass from the pass's activity read, for every collector that needs it."""
    if "locks" not in ctx.derived:
        value = ctx.activity(locks_part(ctx.server.version_num))
        rows, counts, roots = value if value is not None else (None, None, None)
        waiters = [Waiter(pid, secs, list(bs or [])) for pid, secs, bs in rows or []]
        ctx.derived["locks"] = LockSnapshot(
            waiters,
            LockGraph({w.pid: w.blockers for w in waiters}),
            {(label, mode): n for label, mode, n in counts or []},
            {pid: (usename, app, state, age) for pid, usename, app, state, age in roots or []},
        )
    return ctx.derived["locks"]


class LocksCollector(Collector):
    name = "locks"
    needs_all_stats = True
    specs = (WAITING, WAIT_MAX, BY_RELATION, ROOTS, MAX_BLOCKED, ROOT_BLOCKED, ROOT_XACT_AGE)

    def activity_parts(self, version_num: int) -> tuple[ActivityPart, ...]:
        return (locks_part(version_num),)

    def collect(self, ctx: Context) -> list[Sample]:
        snap = lock_snapshot(ctx)
        waiters, graph = snap.waiters, snap.graph
        roots = graph.roots()
        blocked_counts = graph.blocked_counts(roots)
        samples = [
            WAITING.sample(len(waiters)),
            WAIT_MAX.sample(max((w.wait_seconds for w in waiters), default=0.0)),
            ROOTS.sample(len(roots)),
            MAX_BLOCKED.sample(max(blocked_counts.values(), default=0)),
        ]
        samples += self._by_relation(snap.by_relation)
        samples += self._top_roots(snap.root_details, blocked_counts)
        return samples

    @staticmethod
    def _by_relation(by_label: dict[tuple[str, str], int]) -> list[Sample]:
        """The top relations by waiters, the rest summed as OTHER: the label's values stay bounded."""
        per_relation: Counter[str] = Counter()
        for (label, _mode), n in by_label.items():
            per_relation[label] += n
        top = {rel for rel, _ in per_relation.most_common(TOP_RELATIONS)}
        counts: Counter[tuple[str, str]] = Counter()
        for (label, mode), n in by_label.items():
            counts[(label if label in top else OTHER, mode)] += n
        return [BY_RELATION.sample(n, relation=rel, mode=mode) for (rel, mode), n in sorted(counts.items())]

    @staticmethod
    def _top_roots(details: dict[int, tuple[str, str, str, float]], blocked_counts: dict[int, int]) -> list[Sample]:
        top = sorted(blocked_counts, key=lambda pid: (-blocked_counts[pid], pid))[:TOP_ROOTS]
        samples = []
        for pid in top:
            # pid 0 is a prepared transaction; a root gone since the read has no details either.
            usename, app, state, xact_age = details.get(pid, ("", "", "prepared" if pid == 0 else "", 0.0))
            labels = {"pid": str(pid), "usename": usename, "application_name": app, "state": state}
            samples.append(ROOT_BLOCKED.sample(blocked_counts[pid], **labels))
            samples.append(ROOT_XACT_AGE.sample(xact_age, **labels))
        return samples
