"""Client connections: how many, in which state, how close to the limit, and the oldest transaction.

Long transactions and idle-in-transaction sessions are what an ALTER TABLE ends up queued behind, so
their ages are published next to the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from migexport.collectors.activity import ActivityPart
from migexport.collectors.base import Collector, Context
from migexport.metrics import MetricSpec, Sample

# Always exported, so a state that drops to zero reads 0 rather than vanishing.
STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)
IDLE_IN_TRANSACTION = ("idle in transaction", "idle in transaction (aborted)")


def _sql_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{value}'" for value in values)


# Client backends only: walsenders and background workers do not use client connection slots.
# Counted in the pass's one scan of the sessions (collectors.activity): a count per known state, any
# other state listed (NULL as 'unknown'), the oldest transaction and the longest idle in transaction.
# `reserved_connections` exists from PostgreSQL 16 on; current_setting(..., true) yields NULL before.
_CLIENT = "backend_type = 'client backend'"
CONNECTIONS_AGGREGATES = (
    *(f"count(*) FILTER (WHERE {_CLIENT} AND state = '{state}') AS connections_{i}" for i, state in enumerate(STATES)),
    f"array_agg(coalesce(state, 'unknown')) FILTER (WHERE {_CLIENT} AND (state IS NULL OR state NOT IN "
    f"({_sql_list(STATES)}))) AS connections_other",
    "max(extract(epoch FROM clock_timestamp() - xact_start))"
    f" FILTER (WHERE {_CLIENT} AND pid <> pg_backend_pid())::float8 AS connections_oldest_xact",
    "max(extract(epoch FROM clock_timestamp() - state_change))"
    f" FILTER (WHERE {_CLIENT} AND state IN ({_sql_list(IDLE_IN_TRANSACTION)}))::float8 AS connections_idle_in_xact",
)
CONNECTIONS_SELECT = f"""SELECT json_build_array(
  json_build_array({", ".join(f"connections_{i}" for i in range(len(STATES)))}),
  connections_other, connections_oldest_xact, connections_idle_in_xact,
  current_setting('max_connections')::int
  - current_setting('superuser_reserved_connections')::int
  - coalesce(current_setting('reserved_connections', true)::int, 0))
FROM a"""
CONNECTIONS_PART = ActivityPart("connections", CONNECTIONS_SELECT, aggregates=CONNECTIONS_AGGREGATES)


@dataclass(frozen=True)
class Connections:
    """The connections part's value: client backends by state, the two ages, the usable slots."""

    by_state: dict[str, int]
    oldest_transaction_seconds: float
    idle_in_transaction_seconds: float
    usable: int

    @classmethod
    def from_part(cls, value: list) -> Connections:
        known, other, oldest, idle, usable = value
        by_state = dict(zip(STATES, known, strict=True))
        for state in other or []:
            by_state[state] = by_state.get(state, 0) + 1
        return cls(by_state, float(oldest or 0), float(idle or 0), usable)

    @property
    def used(self) -> int:
        return sum(self.by_state.values())


def connections(ctx: Context) -> Connections:
    return Connections.from_part(ctx.activity(CONNECTIONS_PART))


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
        now = connections(ctx)
        return [
            *(CONNECTIONS.sample(n, state=state) for state, n in now.by_state.items()),
            CONNECTIONS_MAX.sample(now.usable),
            OLDEST_XACT.sample(now.oldest_transaction_seconds),
            IDLE_IN_XACT_MAX.sample(now.idle_in_transaction_seconds),
        ]
