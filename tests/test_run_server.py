"""`migexport run` ends the migration's work on the server too: at its time limit and on SIGTERM the
migration's sessions are terminated before the end is recorded, so an ALTER TABLE queued behind an
open reader does not stay in the lock queue and commit later. When it cannot, it says so."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from conftest import MONITOR_ROLE, monitor_dsn, require_binary, wait_for
from migexport import localpg
from test_cli import migexport_argv

ALTER = "ALTER TABLE {table} ADD COLUMN c int"


def pg_env(cluster: localpg.LocalCluster, app: str | None = "migration", **more: str) -> dict[str, str]:
    """The libpq environment a migration tool gets: PG* variables pointing at the test primary."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGHOST": "127.0.0.1", "PGPORT": str(cluster.port), "PGUSER": "postgres", "PGDATABASE": "postgres"})
    env.update(more)
    if app:
        env["PGAPPNAME"] = app
    return env


def run_argv(tmp_path: Path, *command: str, limit: str = "5s", extra: tuple[str, ...] = ()) -> list[str]:
    return [
        *migexport_argv(),
        "run",
        "--id",
        "m1",
        "--time-limit",
        limit,
        "--log-file",
        str(tmp_path / "migration.log"),
        "--state-file",
        str(tmp_path / "state.json"),
        *extra,
        "--",
        *command,
    ]


def run(tmp_path: Path, *command: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        run_argv(tmp_path, *command, **kw), env=env, capture_output=True, text=True, timeout=90, check=False
    )


def sessions(cluster: localpg.LocalCluster, app: str = "migration") -> list[tuple]:
    with cluster.connect() as conn:
        return conn.execute(
            "SELECT pid, state, wait_event_type FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall()


def has_column(cluster: localpg.LocalCluster, table: str, column: str) -> bool:
    with cluster.connect() as conn:
        return (
            conn.execute(
                "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s AND NOT attisdropped",
                (table, column),
            ).fetchone()[0]
            == 1
        )


@contextlib.contextmanager
def open_reader(cluster: localpg.LocalCluster, table: str, owner: str = "postgres") -> Iterator[psycopg.Connection]:
    """A fresh table and an open transaction that has read it: an ALTER TABLE on it must wait."""
    with cluster.connect() as setup:
        setup.execute(f"DROP TABLE IF EXISTS {table}")
        setup.execute(f"CREATE TABLE {table} (id int)")
        setup.execute(f"ALTER TABLE {table} OWNER TO {owner}")
    reader = cluster.connect(application_name="test-old-reader")
    reader.execute("BEGIN")
    reader.execute(f"SELECT count(*) FROM {table}")
    try:
        yield reader
    finally:
        with contextlib.suppress(psycopg.Error):
            reader.execute("ROLLBACK")
        reader.close()


def state_of(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state.json").read_text())


def test_time_limit_ends_the_queued_alter_on_the_server(pg, tmp_path):
    psql = require_binary("psql", "postgresql-client")
    with open_reader(pg.primary, "run_srv_t") as reader:
        proc = run(tmp_path, psql, "-X", "-c", ALTER.format(table="run_srv_t"), env=pg_env(pg.primary))
        ended = time.time()
        assert proc.returncode == 124, proc.stderr
        # Right after `run` returns: nothing of the migration runs or waits on the server.
        assert sessions(pg.primary) == []
        reader.execute("SELECT 1")  # the reader, another application's session, was left alone
        state = state_of(tmp_path)
        assert state["status"] == "timed_out"
        assert state["server_cancel"]["reason"] == "time limit"
        assert state["server_cancel"]["terminated"] == 1
        assert state["server_cancel"]["remaining"] == 0 and state["server_cancel"]["error"] is None
        log = (tmp_path / "migration.log").read_text()
        assert log.index("server: ended 1 session(s)") < log.index("timed out, exit code 124")
    # The reader is gone: a queued ALTER would now get its lock and commit. It must not.
    time.sleep(0.5)
    assert not has_column(pg.primary, "run_srv_t", "c")
    print(f"\nfrom the time limit to `run`'s exit (no migration session left): {ended - state['started_at'] - 5:.2f}s")


def test_sigterm_ends_the_queued_alter_on_the_server(pg, tmp_path):
    psql = require_binary("psql", "postgresql-client")
    with open_reader(pg.primary, "run_srv_term") as reader:
        proc = subprocess.Popen(
            run_argv(tmp_path, psql, "-X", "-c", ALTER.format(table="run_srv_term"), limit="60s"),
            env=pg_env(pg.primary),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: [s[2] for s in sessions(pg.primary)] == ["Lock"], what="the ALTER to wait for its lock")
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 128 + signal.SIGTERM, err  # psql's own status: killed by the signal
        assert sessions(pg.primary) == []
        reader.execute("SELECT 1")
        state = state_of(tmp_path)
        assert state["status"] == "failed"
        assert state["server_cancel"] == {
            "reason": "SIGTERM",
            "via": state["server_cancel"]["via"],
            "terminated": 1,
            "remaining": 0,
            "error": None,
        }
    time.sleep(0.5)
    assert not has_column(pg.primary, "run_srv_term", "c")


def test_control_connection_that_fails_is_reported_not_hidden(pg, tmp_path):
    closed = f"host=127.0.0.1 port={localpg.free_port()} user=postgres password=hunter2 dbname=postgres"
    proc = run(tmp_path, "sleep", "30", limit="2s", env=pg_env(pg.primary), extra=("--control-dsn", closed))
    assert proc.returncode == 124
    cancel = state_of(tmp_path)["server_cancel"]
    assert cancel["error"].startswith("cannot connect via control DSN") and cancel["terminated"] == 0
    assert cancel["remaining"] is None  # unknown, not "0"
    log = (tmp_path / "migration.log").read_text()
    assert "ending the migration's sessions on the server failed (time limit): cannot connect" in log
    assert "ending the migration's sessions on the server failed" in proc.stderr
    assert "warning: cannot check lock_timeout" in proc.stderr  # said once at the start, then carried on
    for text in (proc.stderr, proc.stdout, log, (tmp_path / "state.json").read_text()):
        assert "hunter2" not in text


def test_a_missing_privilege_is_reported_and_the_session_is_left_visible(pg, tmp_path):
    """The control role may read pg_stat_activity (pg_monitor) but not signal the migration's backend
    (a superuser's here): the state says so and counts it as remaining, instead of pretending."""
    psql = require_binary("psql", "postgresql-client")
    env = pg_env(pg.primary, MIGEXPORT_CONTROL=monitor_dsn(pg.primary))
    with open_reader(pg.primary, "run_srv_perm"):
        proc = run(
            tmp_path,
            psql,
            "-X",
            "-c",
            ALTER.format(table="run_srv_perm"),
            env=env,
            extra=("--control-dsn", "env:MIGEXPORT_CONTROL"),
        )
        try:
            assert proc.returncode == 124
            cancel = state_of(tmp_path)["server_cancel"]
            assert cancel["terminated"] == 0 and cancel["remaining"] == 1
            assert "not allowed to terminate backend" in cancel["error"] and MONITOR_ROLE in cancel["error"]
            assert "pg_signal_backend" in cancel["error"]
            assert "look for application_name 'migration' in pg_stat_activity" in proc.stderr
        finally:
            with pg.primary.connect() as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'migration'"
                )
            wait_for(lambda: sessions(pg.primary) == [], what="the leftover ALTER to end")


def test_role_finds_the_migrations_sessions_whatever_their_application_name(pg, tmp_path):
    """migration.role from the config: a session of that role is the migration's even without
    PGAPPNAME; a session of another role is not touched."""
    psql = require_binary("psql", "postgresql-client")
    with pg.primary.connect() as admin:
        if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = 'run_mig_owner'").fetchone():
            admin.execute("CREATE ROLE run_mig_owner LOGIN")
    config = tmp_path / "migexport.yml"
    config.write_text(
        f"targets:\n  primary: {{dsn: '{monitor_dsn(pg.primary)}'}}\n"
        "migration:\n  id: m1\n  role: run_mig_owner\n  control_dsn: env:MIGEXPORT_CONTROL\n"
    )
    bystander = pg.primary.connect(application_name="psql")
    env = pg_env(pg.primary, app=None, PGUSER="run_mig_owner", MIGEXPORT_CONTROL=pg.primary.dsn())
    try:
        with open_reader(pg.primary, "run_srv_role", owner="run_mig_owner"):
            alter = ALTER.format(table="run_srv_role")
            # The preflight (no WAL archiving here: a no-go) and verify have tests of their own.
            extra = ("-c", str(config), "--skip-preflight", "--no-verify")
            proc = run(tmp_path, psql, "-X", "-c", alter, env=env, extra=extra)
            assert proc.returncode == 124, proc.stderr
            assert state_of(tmp_path)["server_cancel"]["terminated"] == 1
            bystander.execute("SELECT 1")  # same application_name as the migration's psql, other role
        assert not has_column(pg.primary, "run_srv_role", "c")
    finally:
        bystander.close()


def test_no_lock_timeout_is_warned_about_before_the_command(pg, tmp_path):
    proc = run(tmp_path, "true", env=pg_env(pg.primary))
    assert proc.returncode == 0
    warning = [line for line in proc.stderr.splitlines() if "lock_timeout is 0" in line]
    assert len(warning) == 1 and "ALTER ROLE postgres SET lock_timeout = '5s'" in warning[0]
    assert "lock_timeout is 0" in (tmp_path / "migration.log").read_text()

    # The migration's own environment sets one: no warning.
    proc = run(tmp_path, "true", env=pg_env(pg.primary, PGOPTIONS="-c lock_timeout=5s"))
    assert proc.returncode == 0 and "lock_timeout" not in proc.stderr


def test_an_unusable_control_dsn_stops_before_the_command(tmp_path):
    marker = tmp_path / "ran"
    env = {k: v for k, v in os.environ.items() if k != "MIGEXPORT_NO_SUCH_VAR"}
    proc = run(tmp_path, "touch", str(marker), env=env, extra=("--control-dsn", "env:MIGEXPORT_NO_SUCH_VAR"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "MIGEXPORT_NO_SUCH_VAR is not set" in proc.stderr
    assert not marker.exists() and not (tmp_path / "state.json").exists()


def end_migration_sessions(cluster: localpg.LocalCluster) -> None:
    with cluster.connect() as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'migration'")


@pytest.fixture(autouse=True)
def _no_leftover_migration_sessions(pg):
    """A failing test must not leave a queued ALTER behind for the next one."""
    yield
    end_migration_sessions(pg.primary)


def test_a_control_session_lost_during_the_run_is_reopened_at_the_time_limit(pg, tmp_path):
    """The session `run` keeps from the start may be gone by the time limit (idle_session_timeout, a
    DBA, a restart): it reconnects and still ends the migration's sessions."""
    psql = require_binary("psql", "postgresql-client")
    with open_reader(pg.primary, "run_srv_reopen"):
        proc = subprocess.Popen(
            run_argv(tmp_path, psql, "-X", "-c", ALTER.format(table="run_srv_reopen"), limit="8s"),
            env=pg_env(pg.primary),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: [s[2] for s in sessions(pg.primary)] == ["Lock"], what="the ALTER to wait for its lock")
            control = sessions(pg.primary, app="migexport-run")
            assert len(control) == 1  # kept open since the start
            with pg.primary.connect() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (control[0][0],))
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 124, err
        assert sessions(pg.primary) == []
        cancel = state_of(tmp_path)["server_cancel"]
        assert cancel["terminated"] == 1 and cancel["remaining"] == 0 and cancel["error"] is None
    assert not has_column(pg.primary, "run_srv_reopen", "c")
