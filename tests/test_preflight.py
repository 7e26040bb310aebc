"""`migexport preflight` against real clusters: each acceptance case of the go / no-go table.

The shared `pg` primary has no WAL archiving; a small cluster of this module's own (`archiving`) has
it, with an archive command switched between one that fails and one that copies. Every database
check connects as the pg_monitor role the README recommends, which proves that role is enough.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import MONITOR_ROLE, ddl_lock_queue, monitor_dsn, wait_for
from migexport import localpg
from migexport.checks.preflight import run_preflight
from migexport.checks.preflight_activity import check_other_run
from migexport.checks.preflight_backup import check_backup
from migexport.checks.preflight_rollback import check_rollback
from migexport.checks.result import CheckResult, Report, Status, read_checks
from migexport.config import load_config
from migexport.state import RUNNING, MigrationState, this_machine, write_state
from test_cli import run_cli

WINDOW = 0.5  # the traffic window of library calls: short, the tests measure no traffic but one


@pytest.fixture(scope="module")
def archiving() -> Iterator[localpg.LocalCluster]:
    """A primary of our own with archive_mode on (it needs a restart, so not the shared one)."""
    base = localpg.make_base_dir("migexport-preflight-")
    archive = base / "archive"
    archive.mkdir()
    if os.geteuid() == 0:
        shutil.chown(archive, user=localpg.SUPERUSER)
    cluster = localpg.init_primary(
        base, "archiving", settings={"archive_mode": "on", "archive_command": "'false'", "max_wal_size": "'64MB'"}
    )
    try:
        with cluster.connect() as conn:
            conn.execute(f"CREATE ROLE {MONITOR_ROLE} LOGIN IN ROLE pg_monitor")
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO orders SELECT g, 'x' FROM generate_series(1, 1000) g")
            conn.execute("ANALYZE orders")
        yield cluster
    finally:
        if cluster.is_running():
            cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


def set_archive_command(cluster: localpg.LocalCluster, command: str) -> tuple[int, int]:
    """Switch the archive command, make a segment to archive, and return the archiver's counts before."""
    with cluster.connect() as conn:
        conn.execute(f"ALTER SYSTEM SET archive_command = '{command}'")
        conn.execute("SELECT pg_reload_conf()")
        before = conn.execute("SELECT archived_count, failed_count FROM pg_stat_archiver").fetchone()
        conn.execute("INSERT INTO orders VALUES (-1, 'wal') ON CONFLICT (id) DO UPDATE SET note = 'again'")
        conn.execute("SELECT pg_switch_wal()")
    return before


def archiver_counts(cluster: localpg.LocalCluster) -> tuple[int, int, bool]:
    """archived_count, failed_count, and whether the archiver is failing now."""
    with cluster.connect() as conn:
        return conn.execute(
            "SELECT archived_count, failed_count, "
            "coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) FROM pg_stat_archiver"
        ).fetchone()


def write_config(tmp: Path, targets: dict[str, str], **sections: Any) -> Path:
    doc = {
        "targets": {name: {"dsn": dsn} for name, dsn in targets.items()},
        "baseline_file": "baseline.json",
        **sections,
    }
    doc.setdefault("migration", {})
    doc["migration"] = {"id": "m1", "state_file": "state.json", "checks_file": "checks.json", **doc["migration"]}
    path = tmp / "migexport.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def write_baseline(tmp: Path, tps: dict[str, float], captured_at: float | None = None) -> Path:
    """A baseline covering these targets (and no probes)."""
    target = {"tps": 0.0, "error_ratio": 0.001, "statement_latency_seconds": 0.002}
    doc = {
        "format": "migexport-baseline",
        "version": 2,
        "migration_id": "m1",
        "captured_at": time.time() if captured_at is None else captured_at,
        "window_seconds": 300.0,
        "targets": {name: {**target, "tps": rate} for name, rate in tps.items()},
        "probes": {},
    }
    path = tmp / "baseline.json"
    path.write_text(json.dumps(doc))
    return path


def rows(report: Report) -> dict[str, CheckResult]:
    """The first row of each check (table_size has one per table: see `sizes`)."""
    out: dict[str, CheckResult] = {}
    for c in report.checks:
        out.setdefault(c.check, c)
    return out


def preflight(config_path: Path, **kw: Any) -> Report:
    return run_preflight(load_config(config_path), fast=True, traffic_window_seconds=WINDOW, **kw)


def test_no_archiving_is_pitr_fail_and_exit_1(pg, tmp_path):
    # --fast leaves out the backup command and the lint, whatever they would say.
    (tmp_path / "m.sql").write_text("CREATE INDEX orders_note ON orders (note);\n")
    config = write_config(
        tmp_path,
        {"primary": monitor_dsn(pg.primary)},
        migration={"sql_files": ["m.sql"]},
        preflight={"backup_command": "exit 1"},
    )
    write_baseline(tmp_path, {"primary": 100.0})
    proc = run_cli("preflight", "-c", str(config), "--format", "json", "--fast", timeout=60)
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    by = {c["check"]: c for c in report["checks"]}
    assert by["pitr"]["status"] == "FAIL"
    assert "archive_mode off" in by["pitr"]["value"]
    assert by["archiver"]["status"] == "WARN"
    assert report["ok"] is False
    assert "backup" not in by and "sql_lint" not in by
    # The checks file serve exports holds the same report.
    saved = read_checks(tmp_path / "checks.json")["preflight"]
    assert saved["ok"] is False and saved["checks"] == report["checks"]


def test_squawk_findings_appear_in_the_full_preflight(pg, tmp_path):
    """Without --fast the migration file is linted: CREATE INDEX without CONCURRENTLY is a finding at its
    line, the missing lock_timeout a FAIL; the table names the rule, the file and the line."""
    sql = tmp_path / "m.sql"
    sql.write_text("-- the report's index\nCREATE INDEX orders_note ON orders (note);\n")
    config = write_config(tmp_path, {"primary": monitor_dsn(pg.primary)}, migration={"sql_files": ["m.sql"]})
    write_baseline(tmp_path, {"primary": 100.0})
    proc = run_cli("preflight", "-c", str(config), timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lint = [line for line in proc.stdout.splitlines() if "sql_lint" in line]
    assert any(line.startswith("WARN") and f"require-concurrent-index-creation at {sql}:2" in line for line in lint), (
        proc.stdout
    )
    assert any(line.startswith("FAIL") and "require-lock-timeout" in line for line in lint), proc.stdout


def test_failing_archive_command_is_archiver_fail(archiving, tmp_path):
    before = set_archive_command(archiving, "false")
    wait_for(lambda: archiver_counts(archiving)[1] > before[1], timeout=30, what="the archive command to fail")
    by = rows(preflight(write_config(tmp_path, {"primary": monitor_dsn(archiving)})))
    assert by["pitr"].status is Status.PASS, by["pitr"]
    assert by["archiver"].status is Status.FAIL, by["archiver"]
    assert "failing" in by["archiver"].value


def test_healthy_setup_is_go_exit_0(archiving, tmp_path):
    archive = archiving.datadir.parent / "archive"
    before = set_archive_command(archiving, f"cp %p {archive}/%f")
    wait_for(
        lambda: archiver_counts(archiving)[0] > before[0] and not archiver_counts(archiving)[2],
        timeout=90,
        what="the archiver to succeed",
    )
    (tmp_path / "rollback.sql").write_text("DROP INDEX CONCURRENTLY IF EXISTS orders_note_idx;\n")
    (tmp_path / "migration.sql").write_text(
        "SET lock_timeout = '1s';\nSET statement_timeout = '60s';\n"
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_note_idx ON orders (note);\n"
    )
    config = write_config(
        tmp_path,
        {"primary": monitor_dsn(archiving)},
        migration={"affected_tables": ["orders"], "rollback_file": "rollback.sql", "sql_files": ["migration.sql"]},
        preflight={"backup_command": "date -Iseconds", "backup_max_age": "1h"},
    )
    write_baseline(tmp_path, {"primary": 100.0})
    proc = run_cli("preflight", "-c", str(config), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GO: nothing failed" in proc.stdout
    saved = read_checks(tmp_path / "checks.json")["preflight"]
    by = {c["check"]: c for c in saved["checks"]}
    for name in (
        "pitr",
        "archiver",
        "archive_backlog",
        "backup",
        "baseline",
        "replication",
        "traffic",
        "rollback",
        "sql_lint",
    ):
        assert by[name]["status"] == "PASS", by[name]
    assert by["table_size"]["table"] == "orders" and "~1,000 rows" in by["table_size"]["value"]
    # pg_monitor was enough for every check.
    assert not [c for c in saved["checks"] if c["value"].startswith("cannot check")], saved["checks"]


def test_idle_in_transaction_lock_holder_fails_naming_its_pid(pg, tmp_path):
    with pg.primary.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS pf_held; CREATE TABLE pf_held (id int)")
    holder = pg.primary.connect(application_name="pf-holder")
    pid = holder.info.backend_pid
    try:
        holder.execute("BEGIN")
        holder.execute("SELECT count(*) FROM pf_held")
        time.sleep(1.2)  # older than the migration's lock_timeout below
        config = write_config(
            tmp_path,
            {"primary": monitor_dsn(pg.primary)},
            migration={"affected_tables": ["pf_held"], "lock_timeout": "1s"},
        )
        by = rows(preflight(config))
    finally:
        holder.close()
    assert by["lock_holders"].status is Status.FAIL, by["lock_holders"]
    assert f"pid {pid}" in by["lock_holders"].value
    assert "pf-holder" in by["lock_holders"].value and "idle in transaction" in by["lock_holders"].value
    assert by["oldest_transaction"].status is Status.WARN and f"pid {pid}" in by["oldest_transaction"].value


def test_inactive_slot_warns_and_streaming_standby_passes(pg, tmp_path):
    with pg.primary.connect() as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'pf_idle_slot'"
        )
        conn.execute("SELECT pg_create_physical_replication_slot('pf_idle_slot')")
    try:
        targets = {"primary": monitor_dsn(pg.primary), "replica1": monitor_dsn(pg.replicas[0])}
        write_baseline(tmp_path, {"primary": 100.0, "replica1": 0.5})
        by = rows(preflight(write_config(tmp_path, targets)))
    finally:
        with pg.primary.connect() as conn:
            conn.execute("SELECT pg_drop_replication_slot('pf_idle_slot')")
    assert by["replication_slots"].status is Status.WARN, by["replication_slots"]
    assert "pf_idle_slot" in by["replication_slots"].value
    assert by["replication"].status is Status.PASS, by["replication"]
    assert "1 of 1 expected streaming (replica1" in by["replication"].value


def test_missing_standby_fails(pg, tmp_path):
    config = write_config(tmp_path, {"primary": monitor_dsn(pg.primary)}, preflight={"standbys": ["replica1", "dr1"]})
    by = rows(preflight(config))
    assert by["replication"].status is Status.FAIL and "dr1 not streaming" in by["replication"].value


def test_baseline_missing_a_target_fails(pg, tmp_path):
    targets = {"primary": monitor_dsn(pg.primary), "replica1": monitor_dsn(pg.replicas[0])}
    write_baseline(tmp_path, {"primary": 100.0})
    by = rows(preflight(write_config(tmp_path, targets)))
    assert by["baseline"].status is Status.FAIL and "missing target replica1" in by["baseline"].value
    write_baseline(tmp_path, {"primary": 100.0, "replica1": 0.0}, captured_at=time.time() - 2 * 86400)
    by = rows(preflight(write_config(tmp_path, targets)))
    assert by["baseline"].status is Status.FAIL and by["baseline"].value.startswith("stale")
    (tmp_path / "baseline.json").unlink()
    by = rows(preflight(write_config(tmp_path, targets)))
    assert by["baseline"].status is Status.FAIL and "no such baseline file" in by["baseline"].value
    assert by["traffic"].status is Status.WARN


def test_traffic_above_the_baseline_fails(pg, tmp_path):
    config = write_config(tmp_path, {"primary": monitor_dsn(pg.primary)}, preflight={"traffic_max_ratio": 2})
    write_baseline(tmp_path, {"primary": 1.0})
    stop = threading.Event()

    def load() -> None:
        with pg.primary.connect() as conn:
            while not stop.is_set():
                conn.execute("SELECT 1")

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        time.sleep(0.2)
        busy = rows(run_preflight(load_config(config), fast=True, traffic_window_seconds=1.0))["traffic"]
    finally:
        stop.set()
        worker.join(timeout=10)
    assert busy.status is Status.FAIL, busy
    # Quiet, its own statements left out: well under the limit.
    quiet = rows(run_preflight(load_config(config), fast=True, traffic_window_seconds=1.0))["traffic"]
    assert quiet.status is Status.PASS, quiet


def test_never_waits_behind_a_queued_access_exclusive(pg, tmp_path):
    config = write_config(
        tmp_path,
        {"primary": monitor_dsn(pg.primary)},
        migration={"affected_tables": ["pf_queue"], "lock_timeout": "1s"},
    )
    with ddl_lock_queue(pg.primary, "pf_queue", alter_app="pf-other-deploy") as queue:
        time.sleep(1.2)  # the root's transaction is now older than the lock_timeout
        alter_pid = queue.alter.pid
        started = time.monotonic()
        report = preflight(config)
        elapsed = time.monotonic() - started
        with pg.primary.connect() as conn:
            waiting = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'").fetchone()[0]
    assert elapsed < 15, f"preflight took {elapsed:.1f}s behind the lock queue"
    assert waiting == 1 + len(queue.readers)  # preflight never joined the queue
    by = rows(report)
    # Read from pg_class, not behind the queue (the new table has no statistics yet: WARN "never analyzed").
    assert by["table_size"].table == "pf_queue" and "never analyzed" in by["table_size"].value, by["table_size"]
    assert by["other_changes"].status is Status.FAIL and f"pid {alter_pid}" in by["other_changes"].value
    assert by["lock_holders"].status is Status.FAIL and f"pid {queue.root_pid}" in by["lock_holders"].value
    assert not report.ok


def test_another_live_run_fails_a_lost_one_warns(tmp_path):
    config = load_config(write_config(tmp_path, {"primary": "host=127.0.0.1 port=1"}))
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        here = this_machine()
        state = MigrationState(
            "other",
            RUNNING,
            time.time() - 60,
            1800,
            3600,
            pid=sleeper.pid,
            host=here.host,
            boot_id=here.boot_id,
            pid_namespace=here.pid_namespace,
            heartbeat_at=time.time(),
        )
        write_state(tmp_path / "state.json", state)
        (running,) = check_other_run(config)
        assert running.status is Status.FAIL and f"pid {sleeper.pid}" in running.value
    finally:
        sleeper.kill()
        sleeper.wait()
    (lost,) = check_other_run(config)
    assert lost.status is Status.WARN and lost.value.startswith("lost")


def _backup(tmp_path: Path, **preflight: Any) -> CheckResult:
    (result,) = check_backup(load_config(write_config(tmp_path, {"p": "host=x"}, preflight=preflight)))
    return result


def test_backup_sources(tmp_path):
    assert _backup(tmp_path).value.startswith("unknown")
    assert _backup(tmp_path, backup_command="date +%s").status is Status.PASS
    old = _backup(tmp_path, backup_command="echo 2020-01-01T00:00:00+00:00")
    assert old.status is Status.FAIL and "take a full backup" in old.advice
    failed = _backup(tmp_path, backup_command="echo no repo >&2; exit 3")
    assert failed.status is Status.FAIL and "exit 3: no repo" in failed.value
    assert _backup(tmp_path, backup_command="echo soon").value.startswith("cannot check")
    slow = _backup(tmp_path, backup_command="sleep 20", command_timeout="500ms")
    assert slow.status is Status.WARN and "did not finish" in slow.value
    # pgBackRest's documented JSON, from a stand-in on PATH.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    info = [{"status": {"code": 0, "message": "ok"}, "backup": [{"timestamp": {"start": 1, "stop": time.time() - 60}}]}]
    fake = bindir / "pgbackrest"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(info)}\nEOF\n")
    fake.chmod(0o755)
    os.environ["PATH"], saved = f"{bindir}:{os.environ['PATH']}", os.environ["PATH"]
    try:
        ok = _backup(tmp_path, pgbackrest_stanza="main")
        info[0]["status"] = {"code": 2, "message": "no valid backups"}
        fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(info)}\nEOF\n")
        bad = _backup(tmp_path, pgbackrest_stanza="main")
    finally:
        os.environ["PATH"] = saved
    assert ok.status is Status.PASS and "pgbackrest stanza main" in ok.value, ok
    assert bad.status is Status.FAIL and "no valid backups" in bad.value, bad


def test_rollback_ready(tmp_path):
    def check(**migration: Any) -> CheckResult:
        return check_rollback(load_config(write_config(tmp_path, {"p": "host=x"}, migration=migration)))[0]

    assert check().status is Status.WARN
    assert check(rollback_file="nope.sql").status is Status.FAIL
    (tmp_path / "down.sql").write_text("DROP INDEX x;\n")
    assert check(rollback_file="down.sql").status is Status.PASS
    assert check(rollback_command="psql -f down.sql").status is Status.PASS
    assert check(rollback_command="no-such-tool --down").status is Status.FAIL


def test_unreachable_target_is_no_go_and_bad_input_exit_2(tmp_path):
    config = write_config(tmp_path, {"primary": f"host=127.0.0.1 port={localpg.free_port()} password=s3cr3t"})
    proc = run_cli("preflight", "-c", str(config), "--fast", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "connect" in proc.stdout and "s3cr3t" not in proc.stdout + proc.stderr
    for args in ((), ("-c", str(tmp_path / "missing.yml"))):
        bad = run_cli("preflight", *args)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "Traceback" not in bad.stderr


def test_uncommitted_ddl_elsewhere_is_another_change_a_finished_one_is_not(pg, tmp_path):
    config = write_config(tmp_path, {"primary": monitor_dsn(pg.primary)})
    with pg.primary.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS pf_elsewhere; CREATE TABLE pf_elsewhere (id int)")
    done = pg.primary.connect(application_name="pf-done")
    open_ddl = pg.primary.connect(application_name="pf-open-ddl")
    try:
        done.execute("/* deploy 41 */ ALTER TABLE pf_elsewhere ADD COLUMN a int")  # committed: idle now
        open_ddl.execute("BEGIN")
        open_ddl.execute("ALTER TABLE pf_elsewhere ADD COLUMN b int")  # holds ACCESS EXCLUSIVE until the end
        by = rows(preflight(config))
    finally:
        open_ddl.close()
        done.close()
    changes = by["other_changes"]
    assert changes.status is Status.FAIL and "pf-open-ddl" in changes.value, changes
    assert "idle in transaction" in changes.value and "pf-done" not in changes.value


def test_without_pg_monitor_the_checks_say_cannot_check_and_name_the_grant(pg, tmp_path):
    with pg.primary.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS pf_plain")
        conn.execute("CREATE ROLE pf_plain LOGIN")
    try:
        config = write_config(tmp_path, {"primary": pg.primary.dsn(user="pf_plain")})
        write_baseline(tmp_path, {"primary": 100.0})
        by = rows(preflight(config))
    finally:
        with pg.primary.connect() as conn:
            conn.execute("DROP ROLE pf_plain")
    for name in ("archive_backlog", "replication", "other_changes", "lock_holders", "oldest_transaction"):
        assert by[name].status is Status.WARN and by[name].value.startswith("cannot check"), by[name]
        assert by[name].advice == "GRANT pg_monitor TO pf_plain", by[name]
