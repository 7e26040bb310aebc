"""Client connections: how many, in which state, how close to the limit, and the oldest transaction.

Long transactions and idle-in-transaction sessions are what an ALTER TABLE ends up queued behind, so
their ages are published next to the counts.
"""

from __future__ import annotations

from migexport.collectors.activity import ActivityPart
from migexport.collectors.base import Collector, Context
from migexport.metrics import MetricSpec, Sample

# Client backends only: walsenders and background workers do not use client connection slots.
# Counted in SQL over the pass's one activity read: [[state, count, oldest xact age, longest idle in
# transaction], ...] and the usable limit. `reserved_connections` exists from PostgreSQL 16 on;
# current_setting(..., true) yields NULL before.
CONNECTIONS_SELECT = """json_build_array(
  (SELECT json_agg(json_build_array(state, n, xact_age, idle_age)) FROM (
     SELECT coalesce(state, 'unknown') AS state, count(*) AS n,
            max(extract(epoch FROM clock_timestamp() - xact_start)) FILTER (WHERE pid <> pg_backend_pid())::float8
              AS xact_age,
            max(extract(epoch FROM clock_timestamp() - state_change))
              FILTER (WHERE state IN ('idle in transaction', 'idle in transaction (aborted)'))::float8 AS idle_age
     FROM a
     WHERE backend_type = 'client backend'
     GROUP BY 1) AS by_state),
  current_setting('max_connections')::int
  - current_setting('superuser_reserved_connections')::int
  - coalesce(current_setting('reserved_connections', true)::int, 0)
)"""
CONNECTIONS_PART = ActivityPart("connections", CONNECTIONS_SELECT)

# Always exported, so a state that drops to zero reads 0 rather than vanishing.
STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)

CONNECTIONS = MetricSpec(
    "migexport_connections",
    "Client connections by pg_stat_activity state (the exporter's collecting session included, active; "
    "its second session, which reads the statement sums at that moment, left out).",
    labels=("state",),
)
CONNECTIONS_MAX = MetricSpec(
    "migexport_connections_max",
    "Connections usable by ordinary clients: max_connections minus the reserved slots.",
)
OLDEST_XACT = MetricSpec(
    "migexport_oldest_transaction_seconds",
    "Age of the oldest open transaction of a client backend (0 when none is open).",
)
IDLE_IN_XACT_MAX = MetricSpec(
    "migexport_idle_in_transaction_max_seconds",
    "Longest time a session has been idle in transaction (0 when none is).",
)


class ConnectionsCollector(Collector):
    name = "connections"
    needs_all_stats = True
    specs = (CONNECTIONS, CONNECTIONS_MAX, OLDEST_XACT, IDLE_IN_XACT_MAX)

    def activity_parts(self, version_num: int) -> tuple[ActivityPart, ...]:
        return (CONNECTIONS_PART,)

    def collect(self, ctx: Context) -> list[Sample]:
        counts = dict.fromkeys(STATES, 0)
        oldest = idle_in_xact = 0.0
        by_state, usable = ctx.activity(CONNECTIONS_PART)
        for state, count, xact_age, idle_age in by_state or []:
            counts[state] = counts.get(state, 0) + count
            oldest = max(oldest, float(xact_age or 0))
            idle_in_xact = max(idle_in_xact, float(idle_age or 0))
        return [
            *(CONNECTIONS.sample(n, state=state) for state, n in counts.items()),
            CONNECTIONS_MAX.sample(usable),
            OLDEST_XACT.sample(oldest),
            IDLE_IN_XACT_MAX.sample(idle_in_xact),
        ]
