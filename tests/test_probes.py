"""Key business query probes and application health checks, run against the session's real primary.

Each test starts an exporter with probes (or apps) of its own and reads what it exports: durations of
successful runs as a histogram, success, whether a probe ever succeeded (and the GRANT a probe on an
unreadable table needs), the per-probe statement timeout, READ ONLY transactions, probe statements
kept out of the statement counters, one connection per target for all its probes, and application
health flipping with a real HTTP server.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
from prometheus_client.utils import floatToGoString
from psycopg import sql

from conftest import (
    BACKGROUND_COMMITS,
    MONITOR_ROLE,
    Metrics,
    monitor_dsn,
    scrape,
    series,
    server_version_num,
    value,
    wait_for,
)
from migexport.config import App, Probe
from migexport.dsn import Target
from migexport.probes import PROBE_BUCKETS
from migexport.service import Exporter


@pytest.fixture
def serve(tmp_path: Path, start_exporter) -> Callable[..., Exporter]:
    """An exporter with probes and apps, its state file in the test's directory."""
    return lambda *targets, **more: start_exporter(*targets, state_path=tmp_path / "state.json", **more)


@pytest.fixture
def fresh_db(pg) -> Iterator[str]:
    """A database of this test's own (with pg_stat_statements), dropped at the end."""
    name = f"probes_{uuid.uuid4().hex[:10]}"
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with pg.primary.connect(dbname=name) as conn:
            conn.execute("CREATE EXTENSION pg_stat_statements")
        yield name
    finally:
        with pg.primary.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def probe_runs(m: Metrics, target: str, probe: str) -> float:
    return series(m, "migexport_probe_duration_seconds_count").get(
        frozenset({("target", target), ("probe", probe)}), 0.0
    )


def wait_for_runs(exporter: Exporter, target: str, probe: str, runs: int, timeout: float = 10) -> Metrics:
    """Scrape until the probe has run at least `runs` times; return that scrape."""
    seen: list[Metrics] = []

    def enough() -> bool:
        seen.append(scrape(exporter.url))
        return probe_runs(seen[-1], target, probe) >= runs

    wait_for(enough, timeout=timeout, what=f"{runs} runs of probe {probe} on {target}")
    return seen[-1]


def mean_duration(m: Metrics, target: str, probe: str) -> float:
    total = value(m, "migexport_probe_duration_seconds_sum", target=target, probe=probe)
    return total / value(m, "migexport_probe_duration_seconds_count", target=target, probe=probe)


# -- durations, success, failure, timeout ---------------------------------------------------------------
def test_a_probe_is_timed_into_a_histogram_and_succeeds(pg, serve):
    probe = Probe("nap", "SELECT pg_sleep(0.05)", "primary", interval_seconds=0.2, timeout_seconds=2)
    exporter = serve(Target("primary", monitor_dsn(pg.primary)), probes=(probe,))
    m = wait_for_runs(exporter, "primary", "nap", 5)

    assert value(m, "migexport_probe_success", target="primary", probe="nap") == 1
    assert value(m, "migexport_probe_ever_succeeded", target="primary", probe="nap") == 1
    assert 0.04 <= mean_duration(m, "primary", "nap") <= 0.5
    runs = value(m, "migexport_probe_duration_seconds_count", target="primary", probe="nap")
    bucket = "migexport_probe_duration_seconds_bucket"
    # The exposed buckets are PROBE_BUCKETS, the ones the baseline's p95 is computed over.
    les = {dict(labels)["le"] for labels in series(m, bucket) if ("probe", "nap") in labels}
    assert les == {floatToGoString(b) for b in PROBE_BUCKETS} | {"+Inf"}
    assert value(m, bucket, target="primary", probe="nap", le="0.04") == 0  # each run sleeps 50 ms
    assert value(m, bucket, target="primary", probe="nap", le="0.1") > 0
    assert value(m, bucket, target="primary", probe="nap", le="+Inf") == runs


def failure_logged(caplog, what: str) -> logging.LogRecord | None:
    return next((r for r in caplog.records if r.getMessage().startswith(f"{what} failed")), None)


def test_failing_and_timing_out_probes_report_failure(pg, serve, caplog):
    caplog.set_level(logging.WARNING, logger="migexport")
    # Two targets on the same server so each probe has its own thread: the slow one never delays the other.
    broken = Probe("divide", "SELECT 1/0", "primary", interval_seconds=0.2, timeout_seconds=2)
    slow = Probe("slow", "SELECT pg_sleep(2)", "slowdb", interval_seconds=0.2, timeout_seconds=0.2)
    started = time.time()
    exporter = serve(
        Target("primary", monitor_dsn(pg.primary)),
        Target("slowdb", monitor_dsn(pg.primary)),
        probes=(broken, slow),
    )
    wait_for(lambda: failure_logged(caplog, "probe divide on primary") is not None, what="divide to fail")
    wait_for(lambda: failure_logged(caplog, "probe slow on slowdb") is not None, what="slow to fail")
    time.sleep(1)  # several more failed runs of each
    m = scrape(exporter.url)

    assert value(m, "migexport_probe_success", target="primary", probe="divide") == 0
    assert value(m, "migexport_probe_success", target="slowdb", probe="slow") == 0
    # The probe's own 0.2 s statement timeout cancelled pg_sleep(2) (the session default is 2 s).
    timed_out = failure_logged(caplog, "probe slow on slowdb")
    assert "statement timeout" in timed_out.getMessage()
    assert timed_out.created - started < 1.5
    # Failed runs are not latencies: the histogram holds successful runs only, like the baseline's.
    assert probe_runs(m, "primary", "divide") == 0
    assert probe_runs(m, "slowdb", "slow") == 0


def test_a_probe_on_a_table_the_role_may_not_read_says_which_grant_is_missing(pg, fresh_db, serve, caplog):
    caplog.set_level(logging.INFO, logger="migexport")
    with pg.primary.connect(dbname=fresh_db) as conn:
        conn.execute("CREATE TABLE secret_orders (id int)")
        conn.execute("INSERT INTO secret_orders VALUES (1)")
    probe = Probe("secret", "SELECT count(*) FROM secret_orders", "app", interval_seconds=0.1, timeout_seconds=2)
    exporter = serve(Target("app", monitor_dsn(pg.primary, fresh_db)), probes=(probe,))

    def ever(m: Metrics) -> float:
        return value(m, "migexport_probe_ever_succeeded", target="app", probe="secret")

    assert ever(scrape(exporter.url)) == 0  # present from the start
    wait_for(lambda: failure_logged(caplog, "probe secret on app") is not None, what="the probe to fail")
    time.sleep(0.5)  # more failed runs: still one line
    failures = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe secret on app failed")]
    assert len(failures) == 1, failures
    assert "permission denied for table secret_orders" in failures[0]
    assert "has not succeeded since the exporter started" in failures[0]
    assert f"fix: GRANT SELECT ON secret_orders TO {MONITOR_ROLE}" in failures[0]
    m = scrape(exporter.url)
    assert ever(m) == 0 and probe_runs(m, "app", "secret") == 0

    # The fix the line names works: the probe succeeds, and its successful runs are timed.
    with pg.primary.connect(dbname=fresh_db) as conn:
        conn.execute(sql.SQL("GRANT SELECT ON secret_orders TO {}").format(sql.Identifier(MONITOR_ROLE)))
    wait_for(lambda: ever(scrape(exporter.url)) == 1, what="the probe to succeed after the GRANT")
    m = wait_for_runs(exporter, "app", "secret", 3)
    assert value(m, "migexport_probe_success", target="app", probe="secret") == 1

    # Broken again: no longer "never succeeded", and the failed runs stay out of the histogram.
    with pg.primary.connect(dbname=fresh_db) as conn:
        conn.execute(sql.SQL("REVOKE SELECT ON secret_orders FROM {}").format(sql.Identifier(MONITOR_ROLE)))
    wait_for(
        lambda: value(scrape(exporter.url), "migexport_probe_success", target="app", probe="secret") == 0,
        what="the probe to fail after the REVOKE",
    )
    counted = probe_runs(scrape(exporter.url), "app", "secret")
    time.sleep(1)  # ~10 failed runs
    m = scrape(exporter.url)
    assert probe_runs(m, "app", "secret") == counted
    assert ever(m) == 1
    again = [r.getMessage() for r in caplog.records if r.getMessage().startswith("probe secret on app failed")]
    assert len(again) == 2 and "has not succeeded" not in again[1], again


def test_probes_run_read_only_even_where_the_role_may_write(pg, fresh_db, serve, caplog):
    caplog.set_level(logging.WARNING, logger="migexport")
    with pg.primary.connect(dbname=fresh_db) as conn:
        conn.execute("CREATE TABLE probe_target (i int)")
        # The role may create and insert here: only the READ ONLY transaction can stop the probes.
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(MONITOR_ROLE)))
        conn.execute(sql.SQL("GRANT INSERT ON probe_target TO {}").format(sql.Identifier(MONITOR_ROLE)))
    probes = (
        Probe("create", "CREATE TABLE probe_write_attempt (i int)", "app", interval_seconds=0.2),
        Probe("insert", "INSERT INTO probe_target VALUES (1)", "app", interval_seconds=0.2),
    )
    exporter = serve(Target("app", monitor_dsn(pg.primary, fresh_db)), probes=probes)
    for name in ("create", "insert"):
        wait_for(lambda name=name: failure_logged(caplog, f"probe {name} on app") is not None, what=f"{name} to fail")
    time.sleep(0.6)  # a few more failed runs of each
    m = scrape(exporter.url)

    assert value(m, "migexport_probe_success", target="app", probe="create") == 0
    assert value(m, "migexport_probe_success", target="app", probe="insert") == 0
    with pg.primary.connect(dbname=fresh_db) as conn:
        assert conn.execute("SELECT to_regclass('probe_write_attempt')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM probe_target").fetchone()[0] == 0
    failures = [r.getMessage() for r in caplog.records if "probe" in r.getMessage() and "failed" in r.getMessage()]
    assert len(failures) == 2, failures  # one line per failing probe, however many runs
    assert all("read-only transaction" in line for line in failures), failures


# -- what probes cost the watched database ----------------------------------------------------------------
def test_probe_statements_stay_out_of_the_statement_counters(pg, fresh_db, serve):
    probe = Probe("orders", "SELECT count(*) FROM pg_class", "app", interval_seconds=0.1, timeout_seconds=2)
    exporter = serve(Target("app", monitor_dsn(pg.primary, fresh_db)), probes=(probe,))
    warm = wait_for_runs(exporter, "app", "orders", 2)
    assert value(warm, "migexport_statements_available", target="app") == 1
    calls = value(warm, "migexport_statements_calls_total", target="app")
    runs = probe_runs(warm, "app", "orders")

    readings = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        m = scrape(exporter.url)
        readings.append(value(m, "migexport_statements_calls_total", target="app"))
        time.sleep(0.2)
    last = scrape(exporter.url)

    # The probe did run meanwhile (4 statements a run), and none of it was counted.
    assert probe_runs(last, "app", "orders") - runs >= 10
    assert value(last, "migexport_probe_success", target="app", probe="orders") == 1
    assert set(readings) == {calls}
    assert value(last, "migexport_statements_calls_total", target="app") == calls
    # Cross-check on the server: pg_stat_statements did record the probe, as the monitor role; with the
    # marker before PostgreSQL 18, whose pg_stat_statements keeps a statement's text from its first token on.
    marker = "/* migexport */ " if server_version_num(pg.primary) < 180000 else ""
    with pg.primary.connect(dbname=fresh_db) as conn:
        marked = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND userid = %s::regrole AND query LIKE %s",
            (MONITOR_ROLE, marker + "SELECT count(*) FROM pg_class%"),
        ).fetchone()[0]
    assert marked >= 10


def test_a_failing_probe_does_not_move_the_error_ratio_it_watches(pg, fresh_db, serve, caplog):
    caplog.set_level(logging.WARNING, logger="migexport")
    with pg.primary.connect(dbname=fresh_db) as conn:
        conn.execute("CREATE TABLE secret_orders (id int)")  # the monitor role may not read it
    probes = (
        Probe("secret", "SELECT count(*) FROM secret_orders", "app", interval_seconds=0.1),
        Probe("fine", "SELECT 1", "app", interval_seconds=0.1),
    )
    exporter = serve(Target("app", monitor_dsn(pg.primary, fresh_db)), probes=probes)
    wait_for(lambda: failure_logged(caplog, "probe secret on app") is not None, what="the probe to fail")
    before = scrape(exporter.url)

    def server_rollbacks() -> int:
        with pg.primary.connect() as conn:
            return conn.execute(
                "SELECT xact_rollback FROM pg_stat_database WHERE datname = %s", (fresh_db,)
            ).fetchone()[0]

    at_start = server_rollbacks()
    wait_for(lambda: server_rollbacks() >= at_start + 10, what="10 rolled-back probe runs on the server")
    after = scrape(exporter.url)

    def delta(name: str) -> float:
        return value(after, name, target="app") - value(before, name, target="app")

    # The server counted every failed run as a rollback; the exporter's counters leave its own out.
    assert delta("migexport_xact_rollback_total") == 0
    assert delta("migexport_xact_commit_total") <= BACKGROUND_COMMITS  # autovacuum, not the successful probe's runs


def test_all_probes_of_a_target_share_one_connection(pg, fresh_db, serve):
    probes = tuple(
        Probe(f"p{i}", f"SELECT {i}, pg_sleep(0.01)", "app", interval_seconds=0.1, timeout_seconds=1) for i in range(3)
    )
    exporter = serve(Target("app", monitor_dsn(pg.primary, fresh_db)), probes=probes)
    for p in probes:
        wait_for_runs(exporter, "app", p.name, 3)

    def ours(conn: psycopg.Connection) -> int:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'migexport'",
            (fresh_db,),
        ).fetchone()[0]

    counts = []
    with pg.primary.connect() as conn:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            scrape(exporter.url)  # the scrape connection is in use too
            counts.append(ours(conn))
            time.sleep(0.05)
    m = scrape(exporter.url)
    for p in probes:
        assert value(m, "migexport_probe_success", target="app", probe=p.name) == 1
    # Two for scraping (the pass's and the statement sums' beside it), one shared by the three probes.
    assert max(counts) <= 3, counts
    assert counts[-1] == 3, counts


# -- application health checks ------------------------------------------------------------------------------
class _Health:
    def __init__(self) -> None:
        self.healthy = threading.Event()
        self.healthy.set()
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status = 200 if self.path == "/healthz" and health.healthy.is_set() else 503
                body = b"ok\n" if status == 200 else b"unavailable\n"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/healthz"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def health_server() -> Iterator[_Health]:
    server = _Health()
    try:
        yield server
    finally:
        server.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def app_up(exporter: Exporter, app: str) -> float:
    return value(scrape(exporter.url), "migexport_app_health_up", app=app)


def test_app_health_follows_the_health_endpoint(pg, serve, health_server):
    apps = (
        App(name="web", url=health_server.url, interval_seconds=0.2, timeout_seconds=1),
        App(name="gone", url=f"http://127.0.0.1:{closed_port()}/healthz", interval_seconds=0.2, timeout_seconds=1),
    )
    exporter = serve(Target("primary", monitor_dsn(pg.primary)), apps=apps)

    wait_for(lambda: app_up(exporter, "web") == 1, timeout=5, what="web to be up")
    health_server.healthy.clear()
    wait_for(lambda: app_up(exporter, "web") == 0, timeout=5, what="web to be down on HTTP 503")
    health_server.healthy.set()
    wait_for(lambda: app_up(exporter, "web") == 1, timeout=5, what="web to be up again")

    # Nothing listens on the other port: checked (a duration was recorded) and down.
    checked = "migexport_app_health_duration_seconds"
    wait_for(lambda: (checked, frozenset({("app", "gone")})) in scrape(exporter.url), timeout=5, what="gone checked")
    m = scrape(exporter.url)
    assert value(m, "migexport_app_health_up", app="gone") == 0
    assert value(m, "migexport_app_health_up", app="web") == 1
