"""Connections, transactions (error rate), deadlocks, statement latency and size, from real sessions."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from conftest import BACKGROUND_COMMITS, monitor_dsn, scrape, series, value, wait_for
from migexport.config import Migration
from migexport.dsn import Target


@pytest.fixture(scope="module")
def app_db(pg) -> str:
    """A database of its own, so that other tests' traffic does not move these counters."""
    with pg.primary.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS activity_app")
        conn.execute("CREATE DATABASE activity_app")
    with pg.primary.connect(dbname="activity_app") as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, amount int)")
        conn.execute("INSERT INTO orders (amount) SELECT g FROM generate_series(1, 10) g")
    return "activity_app"


def run_transactions(pg, dbname: str, commits: int, rollbacks: int) -> None:
    """On one connection, closed at the end: a closing backend flushes its statistics."""
    with psycopg.connect(pg.primary.dsn(dbname=dbname)) as conn:
        for i in range(commits + rollbacks):
            conn.execute("INSERT INTO orders (amount) VALUES (%s)", (i,))
            if i < rollbacks:
                conn.rollback()
            else:
                conn.commit()


def test_rolled_back_share_moves_the_counters_by_exactly_that(pg, app_db, start_exporter):
    exporter = start_exporter(Target("app", monitor_dsn(pg.primary, app_db)))
    before = scrape(exporter.url)
    run_transactions(pg, app_db, commits=30, rollbacks=10)
    # A backend flushes its statistics as it exits, which may be just after the client hung up.
    wait_for(
        lambda: (
            value(scrape(exporter.url), "migexport_xact_rollback_total", target="app")
            - value(before, "migexport_xact_rollback_total", target="app")
            >= 10
        ),
        what="rollbacks to be flushed",
    )
    time.sleep(0.5)
    after = scrape(exporter.url)

    def delta(name: str) -> float:
        return value(after, name, target="app") - value(before, name, target="app")

    assert delta("migexport_xact_rollback_total") == 10
    # PostgreSQL also counts one commit for the connection's start-up. The exporter's own queries
    # (three a scrape: the pass's read, the database's counters, the statement sums) are subtracted;
    # autovacuum may add its own.
    assert delta("migexport_queries_total") >= 6
    assert 31 <= delta("migexport_xact_commit_total") <= 31 + BACKGROUND_COMMITS


def test_scrapes_do_not_count_as_transactions(pg, app_db, start_exporter):
    exporter = start_exporter(Target("app", monitor_dsn(pg.primary, app_db)))
    before = scrape(exporter.url)
    for _ in range(30):
        scrape(exporter.url)
    after = scrape(exporter.url)
    own = value(after, "migexport_queries_total", target="app") - value(before, "migexport_queries_total", target="app")
    commits = value(after, "migexport_xact_commit_total", target="app") - value(
        before, "migexport_xact_commit_total", target="app"
    )
    assert own >= 3 * 31  # what PostgreSQL counted as commits of ours: three statements a scrape
    assert commits <= BACKGROUND_COMMITS  # autovacuum only
    assert value(after, "migexport_xact_rollback_total", target="app") == value(
        before, "migexport_xact_rollback_total", target="app"
    )


def test_a_real_deadlock_is_counted(pg, app_db, start_exporter):
    exporter = start_exporter(Target("app", monitor_dsn(pg.primary, app_db)))
    before = value(scrape(exporter.url), "migexport_deadlocks_total", target="app")
    a = psycopg.connect(pg.primary.dsn(dbname=app_db), autocommit=True)
    b = psycopg.connect(pg.primary.dsn(dbname=app_db), autocommit=True)
    errors: list[Exception] = []
    try:
        a.execute("BEGIN")
        b.execute("BEGIN")
        a.execute("UPDATE orders SET amount = amount WHERE id = 1")
        b.execute("UPDATE orders SET amount = amount WHERE id = 2")

        def cross(conn, row: int) -> None:
            try:
                conn.execute("UPDATE orders SET amount = amount WHERE id = %s", (row,))
            except psycopg.errors.DeadlockDetected as exc:
                errors.append(exc)

        threads = [threading.Thread(target=cross, args=(a, 2)), threading.Thread(target=cross, args=(b, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        assert len(errors) == 1, "PostgreSQL should have broken exactly one side of the deadlock"
    finally:
        for conn in (a, b):
            conn.execute("ROLLBACK")
            conn.close()
    # Deadlock counts are flushed by the backends that saw them; both closed above.
    wait_for(
        lambda: value(scrape(exporter.url), "migexport_deadlocks_total", target="app") == before + 1,
        what="deadlocks_total to grow by 1",
    )


def test_statement_latency_counts_workload_and_excludes_the_exporter(pg, app_db, start_exporter):
    exporter = start_exporter(Target("app", monitor_dsn(pg.primary, app_db)))
    scrape(exporter.url)  # the exporter's own statements now exist in pg_stat_statements
    before = scrape(exporter.url)
    for _ in range(20):
        scrape(exporter.url)
    idle = scrape(exporter.url)
    assert value(idle, "migexport_statements_available", target="app") == 1
    # 21 scrapes of ~10 statements each, and not one of them counted.
    assert value(idle, "migexport_statements_calls_total", target="app") == value(
        before, "migexport_statements_calls_total", target="app"
    )

    with psycopg.connect(pg.primary.dsn(dbname=app_db), autocommit=True) as conn:
        for _ in range(5):
            conn.execute("SELECT pg_sleep(0.1)")
    after = scrape(exporter.url)
    calls = value(after, "migexport_statements_calls_total", target="app") - value(
        idle, "migexport_statements_calls_total", target="app"
    )
    seconds = value(after, "migexport_statements_exec_seconds_total", target="app") - value(
        idle, "migexport_statements_exec_seconds_total", target="app"
    )
    assert calls == 5
    assert 0.5 <= seconds < 1.5  # mean latency = seconds / calls ~ 0.1 s
    squared = value(after, "migexport_statements_exec_seconds_squared_total", target="app") - value(
        idle, "migexport_statements_exec_seconds_squared_total", target="app"
    )
    assert 0.05 <= squared < 0.1  # five times (0.1 s)²: the variance of the mean is about 0


def test_a_backfill_by_the_migration_role_stays_out_of_the_latency_sums(pg, app_db, start_exporter):
    """A 20 s backfill run as the migration's own role moves neither calls nor execution time."""
    with pg.primary.connect(dbname=app_db) as conn:
        conn.execute("DROP ROLE IF EXISTS app_migration")
        conn.execute("CREATE ROLE app_migration LOGIN")
        conn.execute("GRANT SELECT, UPDATE ON orders TO app_migration")
    exporter = start_exporter(
        Target("app", monitor_dsn(pg.primary, app_db)),
        migration=Migration(id="backfill", role="app_migration"),
    )
    before = scrape(exporter.url)
    started = time.monotonic()
    with psycopg.connect(pg.primary.dsn(dbname=app_db, user="app_migration"), autocommit=True) as conn:
        # Ten rows at 2 s each: a 20 s UPDATE, one statement, as a slow backfill batch would be.
        conn.execute("UPDATE orders SET amount = amount + 1 WHERE id <= 10 AND pg_sleep(2) IS NOT NULL")
    assert time.monotonic() - started >= 20
    with psycopg.connect(pg.primary.dsn(dbname=app_db), autocommit=True) as app:
        app.execute("SELECT count(*) FROM orders")
    after = scrape(exporter.url)

    def delta(name: str) -> float:
        return value(after, name, target="app") - value(before, name, target="app")

    assert delta("migexport_statements_calls_total") == 1  # the application's SELECT only
    assert delta("migexport_statements_exec_seconds_total") < 1.0


def test_missing_pg_stat_statements_is_reported_not_fatal(pg, start_exporter):
    with pg.primary.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS no_pgss")
        conn.execute("CREATE DATABASE no_pgss")
    exporter = start_exporter(Target("bare", monitor_dsn(pg.primary, "no_pgss")))
    metrics = scrape(exporter.url)
    assert value(metrics, "migexport_up", target="bare") == 1
    assert value(metrics, "migexport_statements_available", target="bare") == 0
    assert value(metrics, "migexport_collector_success", target="bare", collector="statements") == 1
    assert not series(metrics, "migexport_statements_calls_total")


def test_connection_states_and_transaction_ages(pg, app_db, start_exporter):
    exporter = start_exporter(Target("app", monitor_dsn(pg.primary, app_db)))
    before = scrape(exporter.url)
    idle_in_xact = [pg.primary.connect(dbname=app_db) for _ in range(3)]
    idle = [pg.primary.connect(dbname=app_db) for _ in range(2)]
    try:
        for conn in idle_in_xact:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        for conn in idle:
            conn.execute("SELECT 1")
        time.sleep(1.5)
        after = scrape(exporter.url)

        def delta(state: str) -> float:
            return value(after, "migexport_connections", target="app", state=state) - value(
                before, "migexport_connections", target="app", state=state
            )

        assert delta("idle in transaction") == 3
        assert delta("idle") == 2
        assert value(after, "migexport_idle_in_transaction_max_seconds", target="app") >= 1.5
        assert value(after, "migexport_oldest_transaction_seconds", target="app") >= 1.5
        # max_connections 100 minus 3 superuser_reserved_connections
        assert value(after, "migexport_connections_max", target="app") == 97
    finally:
        for conn in idle_in_xact + idle:
            conn.close()
    # Backends end a moment after their clients hang up.
    wait_for(
        lambda: value(scrape(exporter.url), "migexport_idle_in_transaction_max_seconds", target="app") == 0,
        what="idle-in-transaction age back to 0 once those sessions are gone",
    )


def test_database_size(pg, app_db, start_exporter):
    exporter = start_exporter(Target("app", monitor_dsn(pg.primary, app_db)))
    size = value(scrape(exporter.url), "migexport_database_size_bytes", target="app")
    with pg.primary.connect(dbname=app_db) as conn:
        actual = conn.execute("SELECT pg_database_size('activity_app')").fetchone()[0]
    assert size == pytest.approx(actual, rel=0.05)
