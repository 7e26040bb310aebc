"""One read of pg_stat_activity per collection pass, shared by every collector that derives from it.

Each pass over pg_stat_activity builds a row per backend, and at 2,000 sessions that costs about
2 ms of database time whatever the query asks of it (most of it is the function's row building;
pg_stat_replication is built on the same function). Collectors that need sessions (connections,
locks, the migration's sessions, the standbys) therefore do not query it themselves: each declares
an `ActivityPart`, and a pass sends every part in one statement.

The sessions are scanned once, and only to aggregate: each part names the aggregates it needs
(counts by state, the pids that wait on a lock, the migration's pids), all computed in that one
scan into the one-row CTE `a`. Nothing per session is kept or sorted, so the read costs little more
than the function itself. A part that needs a few sessions' details (a lock queue's roots, the
standbys' walsenders) looks them up by pid with `pg_stat_get_activity(pid)`: PostgreSQL copies the
backends' status once per transaction, so those lookups read the same snapshot as the scan, and the
parts of a pass are one consistent read (the lock graph, the roots' details and the migration's
sessions describe the same instant). Parts come back as JSON values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from migexport.collectors.base import Context

# MATERIALIZED: however many parts read `a`, the scan runs once. The function rather than the
# pg_stat_activity view: the view joins pg_database and pg_authid, and a session holding a lock on
# either would fail (after lock_timeout) every collector of the pass; the parts that need a role's
# name look it up with pg_get_userbyid() for the few rows they return.
# `not_counted`: the exporter's second session (see targets.TargetWorker), busy or idle at this very
# moment by chance: counted, it would make the connection states flicker by one.
# It is sent as an array literal in text: psycopg types a list by its values (int2[] for small pids,
# int4[] for larger ones, unknown when empty), and a prepared statement is prepared per parameter types:
# one text then stands for one prepared statement, whatever the pids.
ACTIVITY_CTE_TEMPLATE = """a AS MATERIALIZED (
  SELECT {aggregates}
  FROM pg_stat_get_activity(NULL)
  WHERE pid <> ALL(%(not_counted)s::int[])
)"""


@dataclass(frozen=True)
class ActivityPart:
    """A collector's share of the pass's statement.

    `aggregates` are `<aggregate> AS <column>` items over the sessions' rows, computed in the pass's
    one scan (columns named after the part, to stay unique); `select` is one SQL expression (a JSON
    value, or NULL) that may read those columns from the one-row `a` (`(SELECT column FROM a)`), the
    part's own `ctes` and `pg_stat_get_activity(pid)`; `params` are named parameters either uses
    (`%(name)s`), named after the part.
    """

    name: str
    select: str
    ctes: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    aggregates: tuple[str, ...] = ()


def statement(
    parts: Sequence[ActivityPart], head: Sequence[str] = (), not_counted: Sequence[int] = ()
) -> tuple[str, dict[str, Any]]:
    """One statement: the `head` columns first (plain values), then one JSON column per part."""
    aggregates = list(dict.fromkeys(agg for part in parts for agg in part.aggregates))
    ctes: list[str] = []
    params: dict[str, Any] = {}
    if aggregates:
        ctes.append(ACTIVITY_CTE_TEMPLATE.format(aggregates=",\n         ".join(aggregates)))
        params["not_counted"] = "{" + ",".join(str(int(pid)) for pid in not_counted) + "}"
    for part in parts:
        ctes += [cte for cte in part.ctes if cte not in ctes]
        params.update(part.params)
    columns = [*head, *(f"({part.select})::text" for part in parts)]
    with_clause = "WITH " + ",\n".join(ctes) + "\n" if ctes else ""
    return with_clause + "SELECT " + ",\n       ".join(columns), params


def read(
    ctx: Context, parts: Sequence[ActivityPart], head: Sequence[str] = (), not_counted: Sequence[int] = ()
) -> tuple[tuple, dict[str, Any]]:
    """Run the pass's statement: the head's values, and each part's value by name (None for NULL)."""
    sql, params = statement(parts, head, not_counted)
    row = ctx.query_one(sql, params or None, prepare=True)
    values = row[len(head) :]
    decoded = {part.name: None if text is None else json.loads(text) for part, text in zip(parts, values, strict=True)}
    return tuple(row[: len(head)]), decoded


class ActivityUnavailable(RuntimeError):
    """The pass's activity read failed (say, a lock_timeout on a catalog) while the server answered:
    every collector that derives from it fails with this, the others run."""


def unique_parts(parts: Sequence[ActivityPart]) -> list[ActivityPart]:
    seen: dict[str, ActivityPart] = {}
    for part in parts:
        seen.setdefault(part.name, part)
    return list(seen.values())
