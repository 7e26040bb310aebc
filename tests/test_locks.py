"""Lock waits from a real DDL lock queue: an old reader, an ALTER TABLE behind it, readers behind that."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from conftest import (
    DdlQueue,
    Metrics,
    ddl_lock_queue,
    join_and_close,
    monitor_dsn,
    run_blocking,
    scrape,
    series,
    server_version_num,
    value,
    wait_for,
)
from migexport.collectors.activity import read as read_activity
from migexport.collectors.base import Context, ServerInfo
from migexport.collectors.locks import locks_part
from migexport.dsn import Target
from migexport.targets import SessionSettings, connect

# The checklist's lock query: it joins on transactionid and so misses relation-lock queues.
CHECKLIST_LOCK_QUERY = """
SELECT blocked.pid FROM pg_stat_activity blocked
JOIN pg_locks blocked_locks ON blocked.pid = blocked_locks.pid
JOIN pg_locks blocking_locks ON blocked_locks.transactionid = blocking_locks.transactionid
JOIN pg_stat_activity blocking ON blocking_locks.pid = blocking.pid
WHERE NOT blocked_locks.granted
"""


@pytest.fixture
def ddl_queue(pg) -> Iterator[DdlQueue]:
    """Open transaction reading lock_t; ALTER TABLE waiting behind it; 3 readers queued behind the ALTER."""
    with ddl_lock_queue(pg.primary, "lock_t", alter_app="test-migration") as queue:
        yield queue


def test_ddl_lock_queue_is_seen_whole(pg, ddl_queue, start_exporter):
    exporter = start_exporter(Target("primary", monitor_dsn(pg.primary)))

    first = scrape(exporter.url)
    assert value(first, "migexport_lock_waiting_sessions", target="primary") == 4
    assert value(first, "migexport_lock_blocking_root_sessions", target="primary") == 1
    assert value(first, "migexport_lock_max_blocked_by_one_session", target="primary") == 4
    by_relation = {
        (dict(labels)["relation"], dict(labels)["mode"]): v
        for labels, v in series(first, "migexport_lock_waiting_sessions_by_relation").items()
    }
    assert by_relation == {("lock_t", "AccessExclusiveLock"): 1, ("lock_t", "AccessShareLock"): 3}

    # The root is the old reader: idle in transaction, blocking all four.
    roots = series(first, "migexport_lock_root_blocked_sessions")
    assert list(roots.values()) == [4]
    root_labels = dict(next(iter(roots)))
    assert root_labels["pid"] == str(ddl_queue.root_pid)
    assert root_labels["application_name"] == "test-old-reader"
    assert root_labels["state"] == "idle in transaction"

    wait1 = value(first, "migexport_lock_wait_max_seconds", target="primary")
    assert wait1 > 0
    time.sleep(1.0)
    second = scrape(exporter.url)
    assert value(second, "migexport_lock_wait_max_seconds", target="primary") >= wait1 + 0.9


def test_a_row_lock_queue_is_labelled_by_lock_type_and_table(pg, start_exporter):
    """Two sessions queued on one row: the first waits for the holder's transaction (a transactionid
    lock, labelled by its type), the second for the row's tuple lock (labelled by its table) held by the
    first. One root, blocking both through the chain."""
    with pg.primary.connect() as setup:
        setup.execute("DROP TABLE IF EXISTS row_t")
        setup.execute("CREATE TABLE row_t (id int PRIMARY KEY, n int)")
        setup.execute("INSERT INTO row_t VALUES (1, 0)")
    exporter = start_exporter(Target("primary", monitor_dsn(pg.primary)))
    holder = pg.primary.connect(application_name="test-row-holder")
    holder.execute("BEGIN")
    holder.execute("UPDATE row_t SET n = n + 1 WHERE id = 1")
    first = run_blocking(pg.primary, "UPDATE row_t SET n = n + 1 WHERE id = 1", app="test-row-1")
    blocked = [first]
    try:
        wait_for(lambda: waiting_on_lock(pg) == 1, what="the first update to wait")
        blocked.append(run_blocking(pg.primary, "UPDATE row_t SET n = n + 1 WHERE id = 1", app="test-row-2"))
        wait_for(lambda: waiting_on_lock(pg) == 2, what="the second update to wait")
        metrics = scrape(exporter.url)
        by_relation = {
            (dict(labels)["relation"], dict(labels)["mode"]): v
            for labels, v in series(metrics, "migexport_lock_waiting_sessions_by_relation").items()
        }
        assert by_relation == {("(transactionid)", "ShareLock"): 1, ("row_t", "ExclusiveLock"): 1}
        assert value(metrics, "migexport_lock_blocking_root_sessions", target="primary") == 1
        assert value(metrics, "migexport_lock_max_blocked_by_one_session", target="primary") == 2
        (root,) = series(metrics, "migexport_lock_root_blocked_sessions")
        assert dict(root)["application_name"] == "test-row-holder"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        join_and_close(blocked)


def test_the_statement_for_servers_before_14_reads_the_same_queue(pg, ddl_queue):
    """No server older than 14 runs here, so its statement (waits measured from the waiting statement's
    start, since pg_locks.waitstart is missing) runs on this one: the same waiters, blockers, counts and
    root as the 14+ statement, and waits no shorter (the statement began before its wait did)."""
    version = server_version_num(pg.primary)
    assert version >= 140000
    with connect(Target("primary", monitor_dsn(pg.primary)), SessionSettings()) as conn:
        ctx = Context("primary", conn, ServerInfo(version, False, "postgres"))
        _, now = read_activity(ctx, [locks_part(version)])
        _, old = read_activity(ctx, [locks_part(130000)])
    waiters_now, counts_now, roots_now = now["locks"]
    waiters_old, counts_old, roots_old = old["locks"]
    assert sorted((pid, blockers) for pid, _, blockers in waiters_old) == sorted(
        (pid, blockers) for pid, _, blockers in waiters_now
    )
    assert len(waiters_old) == 4
    assert sorted(map(tuple, counts_old)) == sorted(map(tuple, counts_now))
    assert (
        [r[:4] for r in roots_old]
        == [r[:4] for r in roots_now]
        == [[ddl_queue.root_pid, "postgres", "test-old-reader", "idle in transaction"]]
    )
    wait_now = {pid: wait for pid, wait, _ in waiters_now}
    assert all(wait >= wait_now[pid] for pid, wait, _ in waiters_old)


def waiting_on_lock(pg) -> int:
    with pg.primary.connect() as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]


def test_checklist_query_misses_the_queue_that_the_exporter_sees(pg, ddl_queue):
    """Why pg_blocking_pids(): the transactionid join of the checklist finds none of the 4 waiters."""
    with pg.primary.connect() as conn:
        assert conn.execute(CHECKLIST_LOCK_QUERY).fetchall() == []


def test_scrapes_during_the_queue_are_fast_and_never_wait_or_block(pg, ddl_queue, start_exporter):
    exporter = start_exporter(Target("primary", monitor_dsn(pg.primary)))
    observations: list[tuple] = []
    stop = threading.Event()

    def watch_exporter_sessions() -> None:
        # Sample, as superuser, whether any exporter session waits for a lock or blocks someone.
        with pg.primary.connect() as conn:
            while not stop.is_set():
                observations.extend(
                    conn.execute(
                        """
                        SELECT e.pid, e.wait_event_type,
                               EXISTS (SELECT 1 FROM pg_stat_activity w
                                       WHERE e.pid = ANY(pg_blocking_pids(w.pid)))
                        FROM pg_stat_activity e WHERE e.application_name = 'migexport'
                        """
                    ).fetchall()
                )
                time.sleep(0.01)

    watcher = threading.Thread(target=watch_exporter_sessions, daemon=True)
    watcher.start()
    try:
        for _ in range(10):
            started = time.monotonic()
            metrics = scrape(exporter.url)
            elapsed = time.monotonic() - started
            assert elapsed < 1.0, f"scrape took {elapsed:.2f}s during the lock queue"
            assert value(metrics, "migexport_up", target="primary") == 1
            assert value(metrics, "migexport_lock_waiting_sessions", target="primary") == 4
            assert all(v == 1 for v in series(metrics, "migexport_collector_success").values()), series(
                metrics, "migexport_collector_success"
            )
    finally:
        stop.set()
        watcher.join(timeout=5)
    assert observations, "the exporter's session was never seen"
    assert all(wait_type != "Lock" and not blocking for _pid, wait_type, blocking in observations)
    # Two sessions per target: the pass's and the one beside it for the statement sums; never more.
    assert len({pid for pid, _, _ in observations}) == 2, "two connections per target"


def test_exporter_reads_through_an_exclusive_table_lock(pg, start_exporter):
    """No collector touches user tables: a granted ACCESS EXCLUSIVE lock on one changes nothing."""
    with pg.primary.connect() as setup:
        setup.execute("CREATE TABLE IF NOT EXISTS locked_t (id int)")
    holder = pg.primary.connect(application_name="test-ddl-holder")
    holder.execute("BEGIN")
    holder.execute("LOCK TABLE locked_t IN ACCESS EXCLUSIVE MODE")
    try:
        exporter = start_exporter(Target("primary", monitor_dsn(pg.primary)))
        metrics = scrape(exporter.url)
        assert value(metrics, "migexport_up", target="primary") == 1
        assert all(v == 1 for v in series(metrics, "migexport_collector_success").values())
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_lock_timeout_keeps_the_exporter_out_of_a_catalog_lock_queue(pg, start_exporter):
    """With pg_database locked exclusively, collectors reading it give up after lock_timeout instead of
    queueing; the scrape completes and reports which collectors failed. The pass's read of sessions and
    locks touches no catalog table (pg_stat_get_activity(), pg_locks), so the lock figures still come."""
    exporter = start_exporter(Target("primary", monitor_dsn(pg.primary)))
    scrape(exporter.url)  # connect first: a new connection itself needs pg_database
    metrics, elapsed, exporter_waits = scrape_with_catalog_locked(pg, exporter.url, "pg_database")
    assert value(metrics, "migexport_up", target="primary") == 1
    assert value(metrics, "migexport_collector_success", target="primary", collector="locks") == 1
    assert value(metrics, "migexport_collector_success", target="primary", collector="connections") == 1
    # pg_stat_database and the statement sums read pg_database.
    assert value(metrics, "migexport_collector_success", target="primary", collector="transactions") == 0
    # Each failed collector waited one lock_timeout (100 ms), not the statement_timeout (2 s).
    assert elapsed < 2.0
    assert exporter_waits == 0
    assert value(scrape(exporter.url), "migexport_collector_success", target="primary", collector="locks") == 1


def scrape_with_catalog_locked(pg, url: str, catalog: str) -> tuple[Metrics, float, int]:
    """One scrape while another session holds `catalog` ACCESS EXCLUSIVE: the page, how long it took, and
    how many of the exporter's sessions waited on a lock right after it (the lock released on return)."""
    holder = pg.primary.connect(application_name="test-catalog-locker")
    holder.execute("BEGIN")
    holder.execute(f"LOCK TABLE {catalog} IN ACCESS EXCLUSIVE MODE")
    try:
        started = time.monotonic()
        metrics = scrape(url)
        return metrics, time.monotonic() - started, lock_waits_of_exporter(holder)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_failed_activity_read_fails_its_collectors_not_the_target(pg, start_exporter):
    """Sessions and locks come from one statement per pass. When it fails while the server answers
    (naming a waiter's table the exporter has not seen yet needs pg_class, which another session holds
    exclusively: lock_timeout gives up), the target stays up, the collectors that derive from that read
    report 0 with the reason, the others still run, and the next pass reads the queue whole again."""
    exporter = start_exporter(Target("primary", monitor_dsn(pg.primary)))
    scrape(exporter.url)  # connected: the queue's table, made next, is not in the session's caches
    with ddl_lock_queue(pg.primary, "fresh_lock_t", alter_app="test-migration"):
        metrics, elapsed, _ = scrape_with_catalog_locked(pg, exporter.url, "pg_class")
        assert value(metrics, "migexport_up", target="primary") == 1
        for collector in ("locks", "connections", "replication"):
            assert value(metrics, "migexport_collector_success", target="primary", collector=collector) == 0
        assert value(metrics, "migexport_collector_success", target="primary", collector="transactions") == 1
        assert "migexport_lock_waiting_sessions" not in {name for name, _ in metrics}
        assert elapsed < 2.0  # one lock_timeout (100 ms), not the statement_timeout
        after = scrape(exporter.url)
        assert value(after, "migexport_collector_success", target="primary", collector="locks") == 1
        assert value(after, "migexport_lock_waiting_sessions", target="primary") == 4


def lock_waits_of_exporter(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migexport' AND wait_event_type = 'Lock'"
    ).fetchone()[0]


def test_exporter_session_settings(pg, start_exporter):
    """The exporter's own session: its application_name, read-only, short timeouts."""
    exporter = start_exporter(Target("primary", monitor_dsn(pg.primary)))
    scrape(exporter.url)
    worker = exporter.collector.workers[0]
    conn, _ = worker._main.connection()
    settings = dict(
        conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('application_name', 'lock_timeout', 'statement_timeout', 'default_transaction_read_only')"
        ).fetchall()
    )
    assert settings == {
        "application_name": "migexport",
        "lock_timeout": "100",
        "statement_timeout": "2000",
        "default_transaction_read_only": "on",
    }
