"""`migexport snapshot` and `migexport verify` against the real primary + replica.

Every test migrates its own tables in this module's own database (verify_app). The schema reads log in
as the pg_monitor role (enough for them); the integrity reads as `verify_checker`, a role with SELECT
only: the least privilege the README documents.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from conftest import ddl_lock_queue, monitor_dsn, run_blocking, server_version_num, wait_for
from migexport.checks.result import Report, Status, read_checks
from migexport.checks.snapshot import read_snapshot, take_snapshot, write_snapshot
from migexport.checks.verify import run_verify
from migexport.config import Config, load_config
from test_cli import run_cli

DB = "verify_app"
CHECKER = "verify_checker"


@pytest.fixture(scope="module")
def app(pg):
    """The module's database, its pg_stat_statements, and the SELECT-only verification role."""
    with pg.primary.connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB}")
        conn.execute(f"CREATE DATABASE {DB}")
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (CHECKER,)).fetchone()
        if not exists:
            conn.execute(f"CREATE ROLE {CHECKER} LOGIN CONNECTION LIMIT 5")
        conn.execute(f"GRANT CONNECT ON DATABASE {DB} TO {CHECKER}")
    with pg.primary.connect(dbname=DB) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute(f"GRANT USAGE ON SCHEMA public TO {CHECKER}")
        conn.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {CHECKER}")
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    with pg.replicas[0].connect() as replica:  # the role and database exist there too before any test
        wait_for(lambda: replica.execute("SELECT pg_last_wal_replay_lsn() >= %s", (lsn,)).fetchone()[0], what="replay")
    return pg


def sql(pg, *statements: str, db: str = DB) -> None:
    with pg.primary.connect(dbname=db) as conn:
        conn.autocommit = True
        for statement in statements:
            conn.execute(statement)


def write_config(tmp_path: Path, pg, tables: list[str], verify: dict | None = None, db: str = DB) -> Config:
    doc = {
        "targets": {
            "primary": {"dsn": monitor_dsn(pg.primary, db)},
            "replica1": {"dsn": monitor_dsn(pg.replicas[0], db)},
        },
        "migration": {"id": "m-verify", "target": "primary", "affected_tables": tables},
        "verify": {"dsn": pg.primary.dsn(dbname=db, user=CHECKER), **(verify or {})},
    }
    path = tmp_path / "migexport.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(path)


def snapshot(config: Config) -> dict:
    doc = take_snapshot(config)
    write_snapshot(config, doc)
    return doc


def verify(config: Config) -> Report:
    return run_verify(config, read_snapshot(config))


def row(report: Report, check: str, table: str = ""):
    found = [c for c in report.checks if c.check == check and c.table == table]
    assert found, f"no {check} ({table}) row in {[(c.check, c.table) for c in report.checks]}"
    return found[0]


def statuses(report: Report) -> dict[tuple[str, str], str]:
    return {(c.check, c.table): c.status.name for c in report.checks}


def test_failed_create_index_concurrently_leaves_an_invalid_index_and_verify_exits_1(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS cic",
        "CREATE TABLE cic (id int PRIMARY KEY, v int)",
        "INSERT INTO cic SELECT g, g % 10 FROM generate_series(1, 100) g",
    )
    config = write_config(tmp_path, app, ["cic"], {"expect": {"cic": {"indexes": {"added": ["cic_v"]}}}})
    done = run_cli("snapshot", "-c", str(config.path))
    assert done.returncode == 0, done.stderr
    assert "1 of 1 tables" in done.stdout
    with pytest.raises(psycopg.errors.UniqueViolation):  # duplicate keys: the build fails half-way
        sql(app, "CREATE UNIQUE INDEX CONCURRENTLY cic_v ON cic (v)")

    done = run_cli("verify", "-c", str(config.path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cic_v INVALID" in done.stdout and "DROP INDEX CONCURRENTLY" in done.stdout
    assert "FAILED: index_validity" in done.stdout
    saved = read_checks(config.resolve(config.migration.checks_file))["verify"]
    assert saved["ok"] is False and saved["migration_id"] == "m-verify"
    rows = {(c["check"], c["table"]): c["status"] for c in saved["checks"]}
    assert rows[("index_validity", "cic")] == "FAIL"
    assert rows[("schema_changes", "cic")] == "PASS"  # the index was declared: it is there, but invalid

    done = run_cli("verify", "-c", str(config.path), "--format", "json")
    assert done.returncode == 1
    doc = json.loads(done.stdout)
    assert doc["kind"] == "verify" and doc["ok"] is False
    assert {"check": "index_validity", "table": "cic", "status": "FAIL"}.items() <= next(
        c for c in doc["checks"] if c["check"] == "index_validity"
    ).items()


def test_not_valid_constraint_is_reported(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS nv",
        "CREATE TABLE nv (id int PRIMARY KEY, qty int)",
        "INSERT INTO nv SELECT g, g FROM generate_series(1, 50) g",
    )
    config = write_config(tmp_path, app, ["nv"])
    snapshot(config)
    sql(app, "ALTER TABLE nv ADD CONSTRAINT nv_qty_positive CHECK (qty > 0) NOT VALID")
    report = verify(config)
    nv = row(report, "constraint_validation", "nv")
    assert nv.status is Status.WARN and "nv_qty_positive" in nv.value
    assert "VALIDATE CONSTRAINT" in nv.advice
    assert "constraints added: nv_qty_positive" in row(report, "schema_changes", "nv").value
    sql(app, "ALTER TABLE nv VALIDATE CONSTRAINT nv_qty_positive")
    assert row(verify(config), "constraint_validation", "nv").status is Status.PASS


def test_alter_column_type_is_a_rewrite_and_statistics_are_then_stale(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS rw",
        "CREATE TABLE rw (id int PRIMARY KEY, n int)",
        "INSERT INTO rw SELECT g, g FROM generate_series(1, 200) g",
        "ANALYZE rw",
    )
    config = write_config(tmp_path, app, ["rw"])
    doc = snapshot(config)
    sql(app, "ALTER TABLE rw ALTER COLUMN n TYPE bigint")
    report = verify(config)
    rewrite = row(report, "table_rewrite", "rw")
    assert rewrite.value.startswith("rewritten: relfilenode ")
    assert str(doc["tables"]["rw"]["relfilenode"]) in rewrite.value
    stats = row(report, "planner_statistics", "rw")
    assert stats.status is Status.WARN and "run ANALYZE rw" in stats.advice
    assert "columns changed: n" in row(report, "schema_changes", "rw").value
    sql(app, "ANALYZE rw")
    assert row(verify(config), "planner_statistics", "rw").status is Status.PASS


def test_add_column_with_a_constant_default_is_no_rewrite(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS nr",
        "CREATE TABLE nr (id int PRIMARY KEY)",
        "INSERT INTO nr SELECT generate_series(1, 200)",
    )
    config = write_config(tmp_path, app, ["nr"])
    snapshot(config)
    sql(app, "ALTER TABLE nr ADD COLUMN flag int NOT NULL DEFAULT 5")
    report = verify(config)
    assert row(report, "table_rewrite", "nr").value.startswith("not rewritten")
    assert row(report, "planner_statistics", "nr").status is Status.PASS
    assert "columns added: flag" in row(report, "schema_changes", "nr").value
    assert report.ok


def test_deleting_rows_of_a_frozen_table_fails_integrity(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS ledger",
        "CREATE TABLE ledger (id bigint PRIMARY KEY, amount numeric, note text)",
        "INSERT INTO ledger SELECT g, g * 1.5, 'n' || g FROM generate_series(1, 2000) g",
    )
    frozen = {"table": "ledger", "columns": ["id", "amount", "note"], "key": "id", "segments": 4}
    invariant = {"name": "ledger_total", "sql": "SELECT sum(amount) FROM ledger", "expect": "equal"}
    config = write_config(tmp_path, app, ["ledger"], {"frozen_tables": [frozen], "invariants": [invariant]})
    doc = snapshot(config)
    assert doc["integrity"]["frozen"]["ledger"]["thresholds"] == ["501", "1001", "1501"]
    untouched = verify(config)
    assert untouched.integrity_passed == untouched.integrity_total == 2
    assert row(untouched, "frozen_checksum", "ledger").value == "2000 rows in 4 segments unchanged"

    sql(app, "DELETE FROM ledger WHERE id BETWEEN 600 AND 609", "UPDATE ledger SET note = 'x' WHERE id = 1700")
    done = run_cli("verify", "-c", str(config.path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "data integrity 0/2" in done.stdout
    saved = read_checks(config.resolve(config.migration.checks_file))["verify"]
    assert saved["integrity"] == {"passed": 0, "total": 2}
    checks = {(c["check"], c["table"]): c for c in saved["checks"]}
    checksum = checks[("frozen_checksum", "ledger")]
    assert checksum["status"] == "FAIL"
    assert "501 <= key < 1001: 500 -> 490 rows" in checksum["value"]
    assert "key >= 1501: 500 rows, contents changed" in checksum["value"]
    assert checks[("invariant", "ledger_total")]["status"] == "FAIL"


def test_without_a_snapshot_a_violated_zero_invariant_fails_and_the_skipped_checks_are_named(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS backfill",
        "CREATE TABLE backfill (id int PRIMARY KEY)",
        "INSERT INTO backfill SELECT generate_series(1, 50)",
        "ALTER TABLE backfill ADD COLUMN status text",  # the migration; its backfill never ran
    )
    invariants = [
        {"name": "no_null_status", "sql": "SELECT count(*) FROM backfill WHERE status IS NULL", "expect": "zero"},
        {"name": "bounded", "sql": "SELECT count(*) FROM backfill", "expect": "at_most", "value": 100},
        {"name": "row_count", "sql": "SELECT count(*) FROM backfill", "expect": "equal"},
    ]
    config = write_config(tmp_path, app, ["backfill"], {"invariants": invariants})
    assert read_snapshot(config) is None
    done = run_cli("verify", "-c", str(config.path), "--format", "json")
    assert done.returncode == 1, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    checks = {(c["check"], c["table"]): c for c in doc["checks"]}
    skipped = checks[("snapshot", "")]
    assert skipped["status"] == "WARN" and "invariant row_count" in skipped["value"]
    assert "schema_changes" in skipped["value"] and "migexport snapshot" in skipped["advice"]
    assert checks[("invariant", "no_null_status")]["status"] == "FAIL"
    assert checks[("invariant", "no_null_status")]["value"] == "50"
    assert checks[("invariant", "bounded")]["status"] == "PASS"
    assert ("invariant", "row_count") not in checks
    assert checks[("index_validity", "backfill")]["status"] == "PASS"
    assert doc["integrity"] == {"passed": 1, "total": 2}


def test_a_clean_migration_while_the_application_writes_passes(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS orders, invoices_2023",
        "CREATE TABLE orders (id bigserial PRIMARY KEY, amount int NOT NULL)",
        "INSERT INTO orders (amount) SELECT g FROM generate_series(1, 500) g",
        "CREATE TABLE invoices_2023 (id int PRIMARY KEY, total numeric)",
        "INSERT INTO invoices_2023 SELECT g, g * 2 FROM generate_series(1, 300) g",
    )
    config = write_config(
        tmp_path,
        app,
        ["orders"],
        {
            "expect": {"orders": {"columns": {"added": ["note"]}, "indexes": {"added": ["orders_note_idx"]}}},
            "frozen_tables": [{"table": "invoices_2023", "columns": ["id", "total"], "segments": 3}],
            "invariants": [
                {"name": "closed_total", "sql": "SELECT sum(total) FROM invoices_2023", "expect": "equal"},
                {"name": "no_negative", "sql": "SELECT count(*) FROM orders WHERE amount < 0", "expect": "zero"},
            ],
        },
    )
    stop, writes = threading.Event(), [0]

    def application() -> None:
        with app.primary.connect(dbname=DB, application_name="test-app") as conn:
            conn.autocommit = True
            while not stop.is_set():
                conn.execute("INSERT INTO orders (amount) VALUES (7)")
                writes[0] += 1
                time.sleep(0.005)

    writer = threading.Thread(target=application, daemon=True)
    writer.start()
    try:
        wait_for(lambda: writes[0] > 20, what="the application to write")
        snapshot(config)
        at_snapshot = writes[0]
        sql(
            app,
            "SET lock_timeout = '5s'",
            "ALTER TABLE orders ADD COLUMN note text",
            "CREATE INDEX CONCURRENTLY orders_note_idx ON orders (note)",
        )
        report = verify(config)
        assert writes[0] > at_snapshot  # the application kept writing through it
    finally:
        stop.set()
        writer.join(timeout=10)
    assert [(c.check, c.table, c.value) for c in report.checks if c.status is not Status.PASS] == []
    assert report.integrity_passed == report.integrity_total == 3
    assert "columns added: note; indexes added: orders_note_idx" in row(report, "schema_changes", "orders").value


def test_an_unexpected_change_of_a_table_with_an_expectation_fails(app, tmp_path):
    sql(app, "DROP TABLE IF EXISTS accounts", "CREATE TABLE accounts (id int PRIMARY KEY, name text DEFAULT 'x')")
    expect = {"accounts": {"columns": {"added": ["email"]}, "indexes": {"added": ["accounts_email_idx"]}}}
    config = write_config(tmp_path, app, ["accounts"], {"expect": expect})
    snapshot(config)
    sql(app, "ALTER TABLE accounts ADD COLUMN email text", "ALTER TABLE accounts ALTER COLUMN name SET NOT NULL")
    report = verify(config)
    schema = row(report, "schema_changes", "accounts")
    assert schema.status is Status.FAIL
    assert "unexpected columns changed: name (NOT NULL added)" in schema.value
    assert "expected but not done: indexes added: accounts_email_idx" in schema.value
    assert not report.ok


def test_set_not_null_is_a_column_change_on_every_version(app, tmp_path):
    """PostgreSQL 18 stores each NOT NULL as a constraint (`<table>_<column>_not_null`) too: declared as
    the column's change, SET NOT NULL passes on every version, and 18's NOT VALID NOT NULL is still WARN."""
    sql(app, "DROP TABLE IF EXISTS nn", "CREATE TABLE nn (id int PRIMARY KEY, a int, b int)")
    version = server_version_num(app.primary)
    expect = {"nn": {"columns": {"changed": ["a", "b"] if version >= 180000 else ["a"]}}}
    config = write_config(tmp_path, app, ["nn"], {"expect": expect})
    snapshot(config)
    sql(app, "ALTER TABLE nn ALTER COLUMN a SET NOT NULL")
    if version >= 180000:
        sql(app, "ALTER TABLE nn ADD CONSTRAINT nn_b_nn NOT NULL b NOT VALID")
    report = verify(config)
    schema = row(report, "schema_changes", "nn")
    assert schema.status is Status.PASS, schema.value
    assert "columns changed: a" in schema.value and "constraints" not in schema.value
    validation = row(report, "constraint_validation", "nn")
    if version >= 180000:
        assert validation.status is Status.WARN and validation.value == "NOT VALID: nn_b_nn"
        sql(app, "ALTER TABLE nn VALIDATE CONSTRAINT nn_b_nn")
        assert row(verify(config), "constraint_validation", "nn").status is Status.PASS
    else:
        assert validation.status is Status.PASS


class InApp:
    """The primary as ddl_lock_queue sees it, but connecting to this module's database."""

    def __init__(self, pg) -> None:
        self.primary = pg.primary

    def connect(self, **kwargs) -> psycopg.Connection:
        return self.primary.connect(dbname=DB, **kwargs)


def test_snapshot_and_verify_never_wait_behind_a_queued_access_exclusive(app, tmp_path):
    # A table whose definitions need deparsing (CHECK, default, expression and partial index): the
    # pg_get_*def functions would lock it. Its own queue: an old reader, then an ALTER waiting.
    sql(
        app,
        "DROP TABLE IF EXISTS guarded",
        "CREATE TABLE guarded (id int PRIMARY KEY, n int DEFAULT 1 CHECK (n > 0))",
        "CREATE INDEX guarded_expr ON guarded ((n + 1)) WHERE n > 0",
    )
    invariant = {"name": "queued_rows", "sql": "SELECT count(*) FROM vq_table", "expect": "at_most", "value": 1000}
    config = write_config(tmp_path, app, ["guarded", "vq_table"], {"invariants": [invariant]})
    root = app.primary.connect(dbname=DB, application_name="test-old-reader")
    root.execute("BEGIN")
    root.execute("SELECT count(*) FROM guarded")
    alter = run_blocking(InApp(app), "ALTER TABLE guarded ADD COLUMN extra int", app="test-alter")
    try:
        with ddl_lock_queue(InApp(app), "vq_table", alter_app="test-alter-vq", readers=2) as queue:
            started = time.monotonic()
            doc = snapshot(config)
            report = verify(config)
            elapsed = time.monotonic() - started
            assert queue.alter.thread.is_alive() and alter.thread.is_alive()  # both still queued
    finally:
        root.execute("ROLLBACK")
        root.close()
        alter.thread.join(timeout=10)
        alter.conn.close()
    assert elapsed < 20, f"snapshot + verify took {elapsed:.1f}s behind the lock queues"
    guarded = doc["tables"]["guarded"]
    assert guarded["indexes"]["guarded_expr"]["definition"].startswith("(not read")
    assert guarded["indexes"]["guarded_expr"]["valid"] is True
    assert guarded["constraints"]["guarded_n_check"]["definition"].startswith("(not read")
    assert doc["tables"]["vq_table"]["found"] is True
    assert statuses(report)[("index_validity", "guarded")] == "PASS"
    assert row(report, "schema_changes", "guarded").value == "no change"
    blocked = row(report, "invariant", "queued_rows")  # it reads the queued table: gives up at lock_timeout
    assert blocked.status is Status.WARN and "lock timeout" in blocked.value
    assert report.integrity_total == 0
    # Without the queue the definitions are read, and they did not "change" meanwhile.
    after = take_snapshot(config)["tables"]["guarded"]
    assert after["indexes"]["guarded_expr"]["definition"].startswith("CREATE INDEX guarded_expr")
    assert after["columns"]["extra"]["type"] == "integer"


def statements_calls(cluster, pattern: str) -> int:
    with cluster.connect() as conn:
        return conn.execute(
            "SELECT coalesce(sum(s.calls), 0) FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = %s AND s.query LIKE %s",
            (DB, pattern),
        ).fetchone()[0]


def test_integrity_queries_run_on_the_replica_after_it_replayed_the_migration(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS archive",
        "CREATE TABLE archive (id int PRIMARY KEY, v text)",
        "INSERT INTO archive SELECT g, md5(g::text) FROM generate_series(1, 400) g",
    )
    replica = app.replicas[0]
    verify_section = {
        "target": "replica1",
        "dsn": replica.dsn(dbname=DB, user=CHECKER),
        "frozen_tables": [{"table": "archive", "columns": ["id", "v"], "segments": 2}],
        "invariants": [{"name": "archive_rows", "sql": "SELECT count(*) FROM archive", "expect": "equal"}],
    }
    config = write_config(tmp_path, app, ["archive"], verify_section)
    checksums = "%hashtextextended%"
    on_primary = statements_calls(app.primary, checksums)
    on_replica = statements_calls(replica, checksums)
    snapshot(config)
    sql(app, "DELETE FROM archive WHERE id = 7")
    report = verify(config)  # at once: it waits for the replica to replay the DELETE first
    assert row(report, "frozen_checksum", "archive").status is Status.FAIL
    assert row(report, "invariant", "archive_rows").value == "before 400, after 399"
    assert report.integrity_passed == 0 and report.integrity_total == 2
    assert statements_calls(replica, checksums) >= on_replica + 2  # snapshot and verify
    assert statements_calls(app.primary, checksums) == on_primary


def test_bad_input_is_one_line_exit_2_and_no_password(app, tmp_path):
    sql(app, "DROP TABLE IF EXISTS bi", "CREATE TABLE bi (id int PRIMARY KEY)")
    invariant = {"name": "rows", "sql": "SELECT count(*) FROM bi", "expect": "at_most", "value": 10}
    config = write_config(tmp_path, app, ["bi"], {"invariants": [invariant]})
    other = {**config.migration.__dict__, "id": "another-migration"}
    write_snapshot(config, {**take_snapshot(config), "migration_id": other["id"]})

    refused = run_cli("snapshot", "-c", str(config.path))  # another migration's snapshot stays
    assert refused.returncode == 2 and "use --force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
    foreign = run_cli("verify", "-c", str(config.path))
    assert foreign.returncode == 2 and "another-migration" in foreign.stderr and "Traceback" not in foreign.stderr
    assert run_cli("snapshot", "-c", str(config.path), "--force").returncode == 0
    assert read_snapshot(config)["migration_id"] == "m-verify"

    config.resolve(config.migration.snapshot_file).write_text('{"format": "migexport-snapshot", "vers')
    damaged = run_cli("verify", "-c", str(config.path))
    assert damaged.returncode == 2 and "not a migexport snapshot" in damaged.stderr
    assert len(damaged.stderr.strip().splitlines()) == 1
    assert run_cli("verify").returncode == 2  # no config

    # An unreachable verification role: its rows say "cannot check", the password appears nowhere.
    secret = "s3cret-pw"
    wrong = {"dsn": f"host=127.0.0.1 port=1 user=x password={secret}", "invariants": [invariant]}
    unreachable = write_config(tmp_path, app, ["bi"], wrong)
    config.resolve(config.migration.snapshot_file).unlink()
    done = run_cli("verify", "-c", str(unreachable.path))
    assert secret not in done.stdout + done.stderr
    assert "cannot check: cannot connect to primary for the integrity checks" in done.stdout
    assert "data integrity 0/0" in done.stdout
    assert done.returncode == 0, done.stdout + done.stderr  # nothing failed; nothing counted either
    assert secret not in config.resolve(config.migration.checks_file).read_text()

    # The migration target down: snapshot exits 1, verify exits 1 "not verified", both in one line.
    (tmp_path / "down").mkdir()
    down = write_config(tmp_path / "down", app, ["bi"])
    down.path.write_text(down.path.read_text().replace(f"port={app.primary.port} ", "port=1 ", 1))
    failed = run_cli("snapshot", "-c", str(down.path))
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    assert "cannot read the affected tables on primary" in failed.stderr
    failed = run_cli("verify", "-c", str(down.path))
    assert failed.returncode == 1 and "schema_read" in failed.stdout and "NOT VERIFIED" in failed.stdout


def test_frozen_checksum_of_a_text_key_uses_quantiles_and_a_reindex_leftover_is_flagged(app, tmp_path):
    sql(
        app,
        "DROP TABLE IF EXISTS codes",
        "CREATE TABLE codes (code text PRIMARY KEY, label text)",
        "INSERT INTO codes SELECT 'c' || lpad(g::text, 4, '0'), 'l' || g FROM generate_series(1, 300) g",
    )
    frozen = {"table": "codes", "columns": ["code", "label"], "key": "code", "segments": 3}
    config = write_config(tmp_path, app, ["codes"], {"frozen_tables": [frozen]})
    doc = snapshot(config)
    assert doc["integrity"]["frozen"]["codes"]["thresholds"] == ["c0100", "c0200"]
    # What a failed REINDEX CONCURRENTLY leaves behind, by its name.
    sql(app, "UPDATE codes SET label = 'changed' WHERE code = 'c0150'", "CREATE INDEX codes_pkey_ccnew ON codes (code)")
    report = verify(config)
    checksum = row(report, "frozen_checksum", "codes")
    assert checksum.status is Status.FAIL and checksum.value == "c0100 <= key < c0200: 100 rows, contents changed"
    leftover = row(report, "index_validity", "codes")
    assert leftover.status is Status.FAIL and "codes_pkey_ccnew (REINDEX CONCURRENTLY leftover)" in leftover.value
