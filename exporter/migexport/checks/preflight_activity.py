"""Nothing else in flight: "No other deployments in progress", and nothing the migration's DDL would queue behind.

- Another `migexport run` of this config still alive (its state file says running and its process or
  heartbeat lives): two migrations at once is the classic deployment collision.
- Another session changing the schema now (DDL, CREATE INDEX, REINDEX, VACUUM FULL, CLUSTER, TRUNCATE,
  LOCK), anywhere on the server, read from `pg_stat_activity` (active or inside an open transaction:
  an uncommitted ALTER holds its ACCESS EXCLUSIVE until the end). An anti-wraparound autovacuum does
  not give way to a lock request: on an affected table the migration would wait for all of it (FAIL),
  elsewhere it competes for I/O (WARN). Progress views name the table of an autovacuum, a CREATE
  INDEX or a VACUUM FULL/CLUSTER.
- A session holding any lock on an affected table for longer than the migration's `lock_timeout`:
  the migration's DDL would queue behind it, and every later query on the table behind the DDL. The
  hold time is the age of the holder's transaction (the lock is at most that old).
- The oldest open transaction, named: CREATE INDEX CONCURRENTLY and a rewrite's final swap wait for
  every older transaction, and it holds back vacuum.
Every view here is readable in full with pg_read_all_stats (part of pg_monitor); `pg_locks` needs nothing.
"""

from __future__ import annotations

import os
import time

from migexport.checks.preflight_common import Session, fmt_age, who
from migexport.checks.result import CheckResult, Status, cannot_check
from migexport.config import Config
from migexport.state import StateError, read_state, this_machine

# Leading comments and whitespace are skipped; `VACUUM (FULL ...)` and `VACUUM FULL` both count.
DDL_PATTERN = (
    r"^\s*(/\*.*?\*/\s*|--[^\n]*\n\s*)*"
    r"(alter|create|drop|reindex|cluster|truncate|lock|vacuum\s+(full|\([^)]*full))\M"
)
CHANGES_SQL = """
SELECT a.pid, coalesce(a.usename, ''), coalesce(a.application_name, ''), coalesce(a.datname, ''),
       coalesce(a.state, ''), a.backend_type,
       extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, a.query_start))::float8,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), 100),
       coalesce(ci.relid, cl.relid, v.relid) = ANY(%(tables)s::oid[]) AND a.datname = current_database()
FROM pg_stat_activity a
LEFT JOIN pg_stat_progress_create_index ci ON ci.pid = a.pid
LEFT JOIN pg_stat_progress_cluster cl ON cl.pid = a.pid
LEFT JOIN pg_stat_progress_vacuum v ON v.pid = a.pid
WHERE a.pid <> pg_backend_pid()
  AND ((a.backend_type = 'client backend' AND a.state IS DISTINCT FROM 'idle' AND a.query ~* %(ddl)s)
       OR ci.pid IS NOT NULL OR cl.pid IS NOT NULL
       OR (a.backend_type = 'autovacuum worker' AND a.query LIKE '%%(to prevent wraparound)%%'))
ORDER BY 7 DESC NULLS LAST
"""
HOLDERS_SQL = """
SELECT l.relation::int8, l.pid, coalesce(a.usename, ''), coalesce(a.application_name, ''), coalesce(a.state, ''),
       extract(epoch FROM clock_timestamp() - coalesce(a.xact_start, a.query_start))::float8,
       string_agg(DISTINCT l.mode, ', ')
FROM pg_locks l
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'relation' AND l.granted AND l.relation = ANY(%s::oid[])
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.pid IS DISTINCT FROM pg_backend_pid()
GROUP BY 1, 2, 3, 4, 5, 6
ORDER BY 6 DESC NULLS FIRST
"""
OLDEST_SQL = """
SELECT pid, coalesce(usename, ''), coalesce(application_name, ''), coalesce(state, ''),
       extract(epoch FROM clock_timestamp() - xact_start)::float8
FROM pg_stat_activity
WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND backend_type = 'client backend'
ORDER BY xact_start
LIMIT 1
"""

OTHER_RUN, CHANGES, HOLDERS, OLDEST = "other_run", "other_changes", "lock_holders", "oldest_transaction"


def check_other_run(config: Config) -> list[CheckResult]:
    path = config.resolve(config.migration.state_file)
    limit = "no other migexport run alive"
    try:
        state = read_state(path)
    except StateError as exc:
        return [cannot_check(OTHER_RUN, str(exc), "look at the state file: is another migration running?")]
    if state is None or not state.in_progress or state.pid == os.getpid():
        last = "no run recorded" if state is None else f"last run {state.migration_id}: {state.status}"
        return [CheckResult(OTHER_RUN, Status.PASS, last, limit)]
    where = f"{state.migration_id} (pid {state.pid} on {state.host})"
    if state.lost(time.time(), this_machine()):
        return [
            CheckResult(
                OTHER_RUN,
                Status.WARN,
                f"lost: {where} says running but its process is gone",
                limit,
                "a run was killed mid-migration: check what it left (verify) before starting another",
            )
        ]
    return [
        CheckResult(
            OTHER_RUN,
            Status.FAIL,
            f"running: {where}, started {fmt_age(time.time() - state.started_at)} ago",
            limit,
            "another migration is in progress: wait for it to end",
        )
    ]


def check_changes(session: Session) -> list[CheckResult]:
    if (hidden := session.hidden(CHANGES)) is not None:
        return [hidden]
    oids = [oid for oid in session.tables().values() if oid is not None]
    rows = session.ctx.query(CHANGES_SQL, {"tables": oids, "ddl": DDL_PATTERN})
    limit = "no DDL, index build, VACUUM FULL/CLUSTER or anti-wraparound vacuum in flight"
    found, worst = [], Status.PASS
    for pid, user, app, db, state, backend, age, query, on_affected in rows:
        wraparound = backend == "autovacuum worker"
        status = Status.WARN if wraparound and not on_affected else Status.FAIL
        worst = max(worst, status)
        found.append(f"{who(pid, user, app, state)} in {db} for {fmt_age(age)}: {query}")
    if not found:
        return [CheckResult(CHANGES, Status.PASS, "none", limit)]
    advice = (
        "another change is in progress: wait for it (or find out whose it is) before starting"
        if worst is Status.FAIL
        else "an anti-wraparound autovacuum elsewhere: it competes for I/O; consider waiting for it"
    )
    return [CheckResult(CHANGES, worst, "; ".join(found), limit, advice)]


def check_holders(session: Session) -> list[CheckResult]:
    if (hidden := session.hidden(HOLDERS)) is not None:
        return [hidden]
    tables = session.tables()
    names = {oid: name for name, oid in tables.items() if oid is not None}
    max_age = session.config.migration.lock_timeout_seconds
    limit = f"no lock held on an affected table for > {fmt_age(max_age)} (migration.lock_timeout)"
    if not names:
        return [CheckResult(HOLDERS, Status.PASS, "no affected table exists yet", limit)]
    rows = session.ctx.query(HOLDERS_SQL, (list(names),))
    old = [r for r in rows if r[5] is None or r[5] > max_age]
    if not old:
        holders = len({r[1] for r in rows})
        return [CheckResult(HOLDERS, Status.PASS, f"{holders} sessions, all younger" if holders else "none", limit)]
    value = "; ".join(
        f"{who(pid, user, app, state)} holds {modes} on {names.get(rel, rel)} for {fmt_age(age)}"
        for rel, pid, user, app, state, age, modes in old
    )
    return [
        CheckResult(
            HOLDERS,
            Status.FAIL,
            value,
            limit,
            "the migration's DDL would queue behind it (and the application behind the DDL): "
            "end that transaction, or pg_terminate_backend(pid), before starting",
        )
    ]


def check_oldest(session: Session) -> list[CheckResult]:
    if (hidden := session.hidden(OLDEST)) is not None:
        return [hidden]
    rows = session.ctx.query(OLDEST_SQL)
    max_age = session.config.migration.lock_timeout_seconds
    limit = f"<= {fmt_age(max_age)} (migration.lock_timeout)"
    if not rows:
        return [CheckResult(OLDEST, Status.PASS, "no open transaction", limit)]
    pid, user, app, state, age = rows[0]
    value = f"{who(pid, user, app, state)}, open for {fmt_age(age)}"
    if age is not None and age > max_age:
        return [
            CheckResult(
                OLDEST,
                Status.WARN,
                value,
                limit,
                "CREATE INDEX CONCURRENTLY and a table rewrite's swap wait for every older transaction: "
                "find out what it is before starting",
            )
        ]
    return [CheckResult(OLDEST, Status.PASS, value, limit)]
