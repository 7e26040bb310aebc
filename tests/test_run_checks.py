"""`migexport run -c FILE` with the checks around the command (issue 10), end to end.

The test clusters do not archive WAL, so the fast preflight says no-go (PITR): `run` refuses to start
the command (exit 1, the table in its log) and starts it with `--skip-preflight`. Before the command
`run` records the affected tables; after a command that succeeded it verifies: a clean ADD COLUMN passes
(exit 0), a migration that deletes rows of a declared-frozen table fails (exit 3), and then, through the
real stack (`serve` exporting the checks file, Prometheus with the rendered rules),
MigrationDataIntegrityFailed fires for that migration and the success criteria's data-integrity row
reads FAIL. With `--report`, `run` waits for the watch window to close and writes the report.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from conftest import PrometheusServer, monitor_dsn, prometheus_server, running, wait_for
from migexport import localpg
from migexport.checks.result import read_checks
from migexport.run import REPORT_MARGIN_SECONDS
from test_cli import migexport_argv

DATABASE = "migexport_runchecks"
ORDERS = "rc_orders"
LEDGER = "rc_ledger"  # declared frozen: nothing may change it during the migration


@dataclass
class Setup:
    tmp: Path
    cfg: Path
    env: dict[str, str]
    psql: list[str]

    def run(self, migration_id: str, *args: str, sql: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*migexport_argv(), "run", "-c", str(self.cfg), "--id", migration_id, *args, "--", *self.psql, "-c", sql],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def state(self) -> dict:
        return json.loads((self.tmp / "state.json").read_text())


def _psql() -> list[str]:
    for candidate in (localpg.find_bindir() / "psql", Path("/usr/lib/postgresql/15/bin/psql")):
        if candidate.exists():
            return [str(candidate), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    pytest.fail("psql is needed for this test: apt-get install -y postgresql-client", pytrace=False)


@pytest.fixture(scope="module")
def setup(pg, tmp_path_factory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("run-checks")
    with pg.primary.connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    with pg.primary.connect(dbname=DATABASE) as conn:
        conn.execute(f"CREATE TABLE {ORDERS} (id bigserial PRIMARY KEY, amount int NOT NULL)")
        conn.execute(f"INSERT INTO {ORDERS} (amount) SELECT g % 100 + 1 FROM generate_series(1, 2000) g")
        conn.execute(f"CREATE TABLE {LEDGER} (id bigint PRIMARY KEY, amount int NOT NULL)")
        conn.execute(f"INSERT INTO {LEDGER} SELECT g, g * 7 FROM generate_series(1, 5000) g")
    port = localpg.free_port()
    config = {
        "targets": {"primary": {"dsn": monitor_dsn(pg.primary, DATABASE)}},
        "listen": f"127.0.0.1:{port}",
        "migration": {
            "id": "from-config",
            "affected_tables": [ORDERS, LEDGER],
            "time_budget": "1m",
            "watch_window": "10m",
            "state_file": "state.json",
            "log_file": "migration.log",
        },
        "thresholds": {"alert_for": "1s", "critical_for": "1s"},
        "verify": {
            # The monitoring role reads statistics, not tables: the integrity checks use a role that may.
            "dsn": pg.primary.dsn(dbname=DATABASE),
            "invariants": [
                {"name": "orders_unchanged", "sql": f"SELECT count(*) FROM {ORDERS}", "expect": "equal"},
            ],
            "frozen_tables": [{"table": LEDGER, "columns": ["id", "amount"], "key": "id", "segments": 4}],
        },
    }
    cfg = tmp / "migexport.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {
        **os.environ,
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg.primary.port),
        "PGUSER": "postgres",
        "PGDATABASE": DATABASE,
        "PGAPPNAME": "migration",
    }
    yield Setup(tmp, cfg, env, _psql())
    with pg.primary.connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def test_a_no_go_refuses_to_start_the_command_and_says_why(setup: Setup, pg):
    proc = setup.run("refused", sql=f"ALTER TABLE {ORDERS} ADD COLUMN refused_note text")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no-go" in proc.stderr and "pitr" in proc.stderr and "--skip-preflight" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    log = (setup.tmp / "migration.log").read_text()
    assert "Preflight at" in log and "FAIL" in log and "the command was not started" in log
    assert "Migration started" not in log
    with pg.primary.connect(dbname=DATABASE) as conn:
        columns = conn.execute(
            "SELECT count(*) FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'refused_note'", (ORDERS,)
        ).fetchone()[0]
    assert columns == 0, "the command must not have run"
    assert not (setup.tmp / "state.json").exists(), "a refused run publishes no migration"
    preflight = read_checks(setup.tmp / "migexport-checks.json")["preflight"]
    assert preflight["ok"] is False and preflight["migration_id"] == "refused"
    assert any(c["check"] == "pitr" and c["status"] == "FAIL" for c in preflight["checks"])


def test_with_skip_preflight_a_clean_migration_runs_and_verifies(setup: Setup):
    proc = setup.run("clean", "--skip-preflight", sql=f"ALTER TABLE {ORDERS} ADD COLUMN note text DEFAULT 'x'")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = setup.state()
    assert state["status"] == "succeeded" and state["preflight"] is None
    assert state["user"] == getpass.getuser()  # who ran it, for the report
    assert state["verify"]["result"] == "passed", state["verify"]
    assert state["verify"]["integrity"] == "2/2"
    log = (setup.tmp / "migration.log").read_text()
    assert "snapshot: " in log and "Verify at" in log
    verify = read_checks(setup.tmp / "migexport-checks.json")["verify"]
    assert verify["migration_id"] == "clean" and verify["ok"] is True
    assert verify["integrity"] == {"passed": 2, "total": 2}
    # The snapshot it compared with is this run's, taken before the command.
    snapshot = json.loads((setup.tmp / "migexport-snapshot.json").read_text())
    assert snapshot["migration_id"] == "clean"
    assert "note" not in json.dumps(snapshot["tables"]), "the snapshot must be from before the ADD COLUMN"


def _wait_query(prom: PrometheusServer, expr: str, what: str) -> list[dict]:
    found: list[dict] = []

    def check() -> bool:
        found[:] = prom.query(expr)
        return bool(found)

    wait_for(check, timeout=30, what=what)
    return found


def test_deleting_rows_of_a_frozen_table_fails_verify_pages_and_fails_the_integrity_row(setup: Setup, tmp_path: Path):
    proc = setup.run("frozen", "--skip-preflight", sql=f"DELETE FROM {LEDGER} WHERE id % 100 = 0")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "verify: FAILED" in proc.stderr and LEDGER in proc.stderr
    state = setup.state()
    assert state["status"] == "succeeded" and state["exit_code"] == 0  # the command's own result
    assert state["verify"]["result"] == "failed" and state["verify"]["integrity"] == "1/2"
    rules = tmp_path / "rules.yml"
    rendered = subprocess.run(
        [*migexport_argv(), "rules", "-c", str(setup.cfg), "-o", str(rules)], capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    cfg = yaml.safe_load(setup.cfg.read_text())
    url = f"http://{cfg['listen']}"
    prom_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "migexport", "static_configs": [{"targets": [cfg["listen"]]}]}],
    }
    serve = [*migexport_argv(), "serve", "-c", str(setup.cfg)]
    with (
        running(serve, tmp_path / "serve.log", url + "/", "migexport serve"),
        prometheus_server(tmp_path, yaml.safe_dump(prom_config)) as prom,
    ):
        ratio = _wait_query(prom, 'migexport_data_integrity_ratio{migration_id="frozen"}', "the integrity ratio")
        assert float(ratio[0]["value"][1]) == 0.5
        alert = _wait_query(
            prom,
            'ALERTS{alertname="MigrationDataIntegrityFailed", alertstate="firing", migration_id="frozen"}',
            "MigrationDataIntegrityFailed firing",
        )
        assert alert[0]["metric"]["severity"] == "critical" and alert[0]["metric"]["action"] == "rollback"
        row = _wait_query(
            prom,
            'migexport:success_criterion:passed{criterion="data_integrity", migration_id="frozen"}',
            "the data-integrity row",
        )
        assert float(row[0]["value"][1]) == 0
        actual = prom.query('migexport:success_criterion:actual{criterion="data_integrity", migration_id="frozen"}')
        assert float(actual[0]["value"][1]) == 0.5


def test_run_report_waits_for_the_watch_window_then_writes_the_page_and_the_summary(setup: Setup, tmp_path: Path):
    cfg = yaml.safe_load(setup.cfg.read_text())
    url = f"http://{cfg['listen']}"
    rules = tmp_path / "rules.yml"
    rendered = subprocess.run(
        [*migexport_argv(), "rules", "-c", str(setup.cfg), "-o", str(rules)], capture_output=True, text=True
    )
    assert rendered.returncode == 0, rendered.stderr
    prom_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "migexport", "static_configs": [{"targets": [cfg["listen"]]}]}],
    }
    serve = [*migexport_argv(), "serve", "-c", str(setup.cfg)]
    with (
        running(serve, tmp_path / "serve.log", url + "/", "migexport serve"),
        prometheus_server(tmp_path, yaml.safe_dump(prom_config)) as prom,
    ):
        wait_for(lambda: prom.query("migexport_up == 1") != [], timeout=30, what="a scrape")
        started = time.time()
        proc = setup.run(
            "reported",
            "--skip-preflight",
            "--watch-window",
            "3s",
            "--report",
            "--prometheus-url",
            prom.url,
            sql=f"ALTER TABLE {ORDERS} ADD COLUMN reported_note text",
        )
        waited = time.time() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # It waited for the window (3 s) and the evaluation margin before asking Prometheus.
    assert waited >= 3 + REPORT_MARGIN_SECONDS, waited
    line = next(x for x in proc.stdout.splitlines() if x.startswith("report: /"))
    paths = [Path(p) for p in line.removeprefix("report: ").split(", ")]
    assert [p.suffix for p in paths] == [".html", ".md"], line
    for path in paths:
        assert path.parent == setup.tmp and path.name.startswith("migexport-report-reported-"), path
    markdown = paths[1].read_text()
    assert "Migration duration" in markdown and "reported" in markdown
    assert "<svg" in paths[0].read_text()
    assert line in (setup.tmp / "migration.log").read_text()
