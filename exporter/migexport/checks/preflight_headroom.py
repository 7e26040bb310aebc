"""Headroom: room for the migration's own connections, and how big each affected table is.

Connection utilisation is the alerts' (client backends over the slots ordinary clients may use); above
`thresholds.connections_utilisation_max` the migration, its retries and a rollback may not get a
connection. Sizes come from `pg_class.relpages` (as of the last VACUUM, ANALYZE or index build) times
the block size, summed over a partitioned table's partitions: `pg_relation_size()` and its kin take a
lock on the table and would wait behind a queued ACCESS EXCLUSIVE. They are for the user to judge a
rewrite (it writes the table and its indexes again, and as much WAL): always PASS, WARN when the table
was never analyzed (no estimate) or does not exist yet.
"""

from __future__ import annotations

from migexport.checks.preflight_common import Session, fmt_bytes
from migexport.checks.result import CheckResult, Status
from migexport.collectors.connections import connections

# A recursive walk of pg_inherits rather than pg_partition_tree(), which locks the partitions.
SIZES_SQL = """
WITH RECURSIVE tree(root, rel) AS (
    SELECT oid, oid FROM pg_class WHERE oid = ANY(%s::oid[])
  UNION ALL
    SELECT tree.root, i.inhrelid FROM pg_inherits i JOIN tree ON i.inhparent = tree.rel
)
SELECT tree.root::int8,
       sum(c.relpages)::float8 * current_setting('block_size')::float8,
       sum(coalesce(t.relpages, 0))::float8 * current_setting('block_size')::float8,
       sum(coalesce(ix.pages, 0))::float8 * current_setting('block_size')::float8,
       sum(coalesce(ix.n, 0))::int,
       sum(greatest(c.reltuples, 0))::float8,
       bool_or(c.reltuples < 0 AND c.relkind <> 'p')
FROM tree
JOIN pg_class c ON c.oid = tree.rel
LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
LEFT JOIN LATERAL (
    SELECT sum(i.relpages) AS pages, count(*) AS n
    FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
    WHERE x.indrelid = c.oid
) ix ON true
GROUP BY tree.root
"""

CONNECTIONS, SIZE = "connections", "table_size"


def check_connections(session: Session) -> list[CheckResult]:
    # The connections collector's own read: client backends by state, and the usable slots.
    now = connections(session.ctx)
    used, usable = now.used, now.usable
    share_max = session.config.thresholds.connections_utilisation_max
    share = used / usable if usable > 0 else 1.0
    value = f"{used} of {usable} ({share:.0%})"
    limit = f"<= {share_max:.0%} of the usable connections"
    if share > share_max:
        return [
            CheckResult(
                CONNECTIONS,
                Status.FAIL,
                value,
                limit,
                "too close to max_connections: the migration, its retries or a rollback may not get a connection",
            )
        ]
    return [CheckResult(CONNECTIONS, Status.PASS, value, limit)]


def check_sizes(session: Session) -> list[CheckResult]:
    tables = session.tables()
    found = [oid for oid in tables.values() if oid is not None]
    sizes = {row[0]: row[1:] for row in session.ctx.query(SIZES_SQL, (found,))} if found else {}
    out: list[CheckResult] = []
    for name, oid in tables.items():
        if oid is None or oid not in sizes:
            out.append(
                CheckResult(SIZE, Status.WARN, "not found", "", "not on the migration's target (yet?)", table=name)
            )
            continue
        heap, toast, index, n_index, rows, never = sizes[oid]
        value = (
            f"table {fmt_bytes(heap)} (+ TOAST {fmt_bytes(toast)}), {n_index} indexes {fmt_bytes(index)}, "
            f"~{rows:,.0f} rows"
        )
        if never:
            out.append(
                CheckResult(SIZE, Status.WARN, f"{value}: never analyzed", "", "run ANALYZE for an estimate", name)
            )
        else:
            out.append(CheckResult(SIZE, Status.PASS, value, "from pg_class: judge the cost of a rewrite", "", name))
    return out
