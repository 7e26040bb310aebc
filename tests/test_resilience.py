"""The exporter survives its databases: down at start, restarted, its session killed, its backend hung.

Each test stops or freezes servers, so it gets a throwaway cluster of its own instead of the session
pair; the hung-backend test also watches the session primary as the healthy neighbour.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

from conftest import Metrics, monitor_dsn, scrape, series, value, wait_for
from migexport import localpg
from migexport.dsn import Target
from migexport.service import Exporter

PREFIX = "migexport-test-"
EXPORTER_SESSIONS_SQL = "SELECT pid FROM pg_stat_activity WHERE application_name = 'migexport' ORDER BY pid"


def up(m: Metrics, target: str) -> float:
    return value(m, "migexport_up", target=target)


def exporter_pids(cluster: localpg.LocalCluster) -> list[int]:
    """Backend pids of the exporter's sessions, seen as superuser through a fresh connection."""
    with cluster.connect() as conn:
        return [pid for (pid,) in conn.execute(EXPORTER_SESSIONS_SQL).fetchall()]


def session_pids(exporter: Exporter, target: str) -> tuple[int, int]:
    """The backend pids of a target's two sessions: the pass's, and the one beside it (statement sums)."""
    (worker,) = [w for w in exporter.collector.workers if w.name == target]
    return worker._main.conn.info.backend_pid, worker._second.conn.info.backend_pid


def test_database_down_at_start_then_up(start_exporter):
    with localpg.local_setup(replicas=0, prefix=PREFIX) as setup:
        setup.primary.stop()
        exporter = start_exporter(Target("db", setup.primary.dsn()))

        m = scrape(exporter.url)  # raises unless HTTP 200
        assert up(m, "db") == 0
        assert not series(m, "migexport_connections_max"), "no server facts for a target that is down"
        assert value(m, "migexport_connection_attempts_total", target="db") >= 1

        setup.primary.start()
        m = scrape(exporter.url)  # raises unless HTTP 200
        assert up(m, "db") == 1
        assert value(m, "migexport_connections_max", target="db") > 0
        assert value(m, "migexport_in_recovery", target="db") == 0


def test_primary_restart_while_exporter_runs(start_exporter):
    with localpg.local_setup(replicas=0, prefix=PREFIX) as setup:
        exporter = start_exporter(Target("db", setup.primary.dsn()))
        m = scrape(exporter.url)
        assert up(m, "db") == 1
        attempts_before = value(m, "migexport_connection_attempts_total", target="db")

        setup.primary.stop()
        m = scrape(exporter.url)  # raises unless HTTP 200
        assert up(m, "db") == 0
        # Still down on the following scrape: the reconnect is refused, not hung.
        m = scrape(exporter.url)  # raises unless HTTP 200
        assert up(m, "db") == 0

        setup.primary.start()
        m = scrape(exporter.url)
        assert up(m, "db") == 1
        assert value(m, "migexport_connections_max", target="db") > 0
        assert value(m, "migexport_connection_attempts_total", target="db") > attempts_before
        assert len(exporter_pids(setup.primary)) == 2  # the pass's session and the one beside it


def test_terminated_session_voids_one_pass_then_reconnects(start_exporter):
    with localpg.local_setup(replicas=0, prefix=PREFIX) as setup:
        exporter = start_exporter(Target("db", setup.primary.dsn()))
        m = scrape(exporter.url)
        assert up(m, "db") == 1
        attempts_before = value(m, "migexport_connection_attempts_total", target="db")
        old_pid, beside_pid = session_pids(exporter, "db")

        with setup.primary.connect() as conn:
            # With a timeout, pg_terminate_backend waits until the backend is gone.
            (gone,) = conn.execute("SELECT pg_terminate_backend(%s, 10000)", (old_pid,)).fetchone()  # type: ignore[misc]
        assert gone is True
        assert exporter_pids(setup.primary) == [beside_pid]

        # psycopg learns that the session is gone only when the pass sends its first statement:
        # that pass is void (up 0, no server samples) and drops the connection...
        m = scrape(exporter.url)  # raises unless HTTP 200
        assert up(m, "db") == 0
        assert not series(m, "migexport_connections_max")
        # ...and the next one opens a new session.
        m = scrape(exporter.url)
        assert up(m, "db") == 1
        assert value(m, "migexport_connection_attempts_total", target="db") == attempts_before + 1
        new_pid, same_beside_pid = session_pids(exporter, "db")
        assert new_pid != old_pid and same_beside_pid == beside_pid
        assert sorted(exporter_pids(setup.primary)) == sorted([new_pid, beside_pid])

        # The second session terminated: its collector (the statement sums) fails for one pass while
        # the target stays up, then it reconnects.
        with setup.primary.connect() as conn:
            conn.execute("SELECT pg_terminate_backend(%s, 10000)", (beside_pid,))
        m = scrape(exporter.url)
        assert up(m, "db") == 1
        assert value(m, "migexport_collector_success", target="db", collector="statements") == 0
        assert value(m, "migexport_collector_success", target="db", collector="locks") == 1
        m = scrape(exporter.url)
        assert value(m, "migexport_collector_success", target="db", collector="statements") == 1
        assert value(m, "migexport_connection_attempts_total", target="db") == attempts_before + 2


def test_hung_backend_does_not_hang_the_scrape(pg, start_exporter):
    with localpg.local_setup(replicas=0, prefix=PREFIX) as setup:
        exporter = start_exporter(
            Target("hung", setup.primary.dsn()),
            Target("healthy", monitor_dsn(pg.primary)),
            scrape_timeout=1.0,
        )
        url = exporter.url

        # Statements per collection pass, measured at rest (after the first pass, which also warms
        # the collectors that cache their result).
        queries = []
        for _ in range(3):
            m = scrape(url)
            assert up(m, "hung") == 1
            assert up(m, "healthy") == 1
            queries.append(value(m, "migexport_queries_total", target="hung"))
        per_pass = queries[2] - queries[1]
        assert per_pass > 0
        before = queries[2]

        pid, beside_pid = session_pids(exporter, "hung")
        os.kill(pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                results = list(pool.map(lambda _: scrape(url), range(8)))  # each raises unless HTTP 200
            for m in results:
                assert up(m, "hung") == 0
                assert up(m, "healthy") == 1
            # The stuck pass holds its session; no scrape opened another.
            assert sorted(exporter_pids(setup.primary)) == sorted([pid, beside_pid])
        finally:
            os.kill(pid, signal.SIGCONT)

        # Single flight: the 8 scrapes shared one pass instead of each sending its own statements.
        # After the stuck pass, one more completed scrape may add one more pass.
        m = scrape(url)
        grown = value(m, "migexport_queries_total", target="hung") - before
        assert grown <= 2 * per_pass, (grown, per_pass)

        wait_for(lambda: up(scrape(url), "hung") == 1, timeout=10, what="the resumed target to be up")
        assert up(scrape(url), "healthy") == 1
        assert len(exporter_pids(setup.primary)) == 2


def test_a_hung_second_session_fails_its_collector_not_the_target(start_exporter):
    """The statement sums are read on a second session while the pass runs. Its backend frozen, every
    scrape still answers in time with the target up and the pass's collectors working; only the
    statement sums report 0, and they come back when the backend does."""
    with localpg.local_setup(replicas=0, prefix=PREFIX) as setup:
        exporter = start_exporter(Target("db", setup.primary.dsn()), scrape_timeout=1.0)
        assert up(scrape(exporter.url), "db") == 1
        _, beside_pid = session_pids(exporter, "db")
        os.kill(beside_pid, signal.SIGSTOP)
        try:
            for _ in range(3):
                m = scrape(exporter.url)
                assert up(m, "db") == 1
                assert value(m, "migexport_collector_success", target="db", collector="statements") == 0
                assert value(m, "migexport_collector_success", target="db", collector="transactions") == 1
                assert value(m, "migexport_collector_success", target="db", collector="connections") == 1
        finally:
            os.kill(beside_pid, signal.SIGCONT)
        wait_for(
            lambda: (
                value(scrape(exporter.url), "migexport_collector_success", target="db", collector="statements") == 1
            ),
            timeout=10,
            what="the statement sums to come back",
        )
