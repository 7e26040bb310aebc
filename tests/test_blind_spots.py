"""No silent disarm, no false rollback page: the blind spots, end to end.

One real exporter on 127.0.0.1 scraped every second by a real Prometheus that evaluates the generated
rules (`render()` with `for:` of 2 s and a 20 s rate window), and each blind spot induced for real:

1. a probe the exporter's role may not run (a table in a database of this module's own, no GRANT):
   `MigrationProbeBroken`, never `MigrationCriticalQueryFailing`, and its failed runs (rolled back on
   the server, counted in pg_stat_database) move neither the exported rollback counter nor the error
   ratio recorded from it;
2. a baseline captured with `--allow-partial` while one target was unreachable:
   `MigrationBaselineMissing{reason="target"}` for it once it is served;
3. `kill -9` of a real `migexport run -- sleep 60`: `migexport_migration_lost` and `MigrationRunLost`;
4. a state file of random bytes: one log line, `migexport_migration_state_readable 0`,
   `MigrationStateUnreadable`.

The setup (database, baseline capture, exporter, Prometheus) is shared by the module; each test arms
its own migration id, so that its alert is a new one and the time from the condition to the alert
firing in Prometheus is measured from the moment the test induces it (printed; run with -s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from psycopg import sql

from conftest import (
    MONITOR_ROLE,
    PrometheusServer,
    monitor_dsn,
    prometheus_server,
    scrape,
    value,
    wait_for,
)
from migexport import localpg
from migexport.config import Migration, Probe, Thresholds
from migexport.dsn import Target
from migexport.rulegen import render
from migexport.service import Exporter, ServeSettings
from migexport.state import RUNNING, MigrationState, write_state
from test_cli import migexport_argv

THRESHOLDS = Thresholds(alert_for_seconds=2, critical_for_seconds=2, rate_window_seconds=20)
WINDOW = "20s"
CONFIG_ID = "blind-spots"  # the config's id (and the baseline's); each test arms a migration of its own
ALERT_TIMEOUT = 30  # seconds from a condition to its alert: expected 3-5 s (scrape, evaluation, `for: 2s`)

APP, LATE = "app", "late"  # the database with the unreadable table; the target the baseline could not reach
BASELINED, NEW = "broken_baselined", "broken_new"  # failing probes: in the baseline (success 0), and not


@dataclass
class Setup:
    pg: localpg.LocalSetup
    tmp: Path
    db: str
    table: str
    state: Path
    baseline: Path
    capture: subprocess.CompletedProcess
    exporter: Exporter
    prom: PrometheusServer


def closed_port_dsn() -> str:
    return f"host=127.0.0.1 port={localpg.free_port()} dbname=postgres user={MONITOR_ROLE} connect_timeout=2"


def probes(table: str) -> dict[str, Probe]:
    return {
        name: Probe(name=name, sql=f"SELECT count(*) FROM {table}", target=APP, interval_seconds=0.5, timeout_seconds=1)
        for name in (BASELINED, NEW)
    }


def capture_baseline(tmp: Path, app_dsn: str, probe: Probe, out: Path) -> subprocess.CompletedProcess:
    """`migexport baseline --allow-partial` with LATE on a closed port (a config of its own: the exporter
    serves LATE with its real DSN)."""
    config = {
        "targets": {APP: app_dsn, LATE: closed_port_dsn()},
        "baseline_file": str(out),
        "migration": {"id": CONFIG_ID},
        "probes": [
            {"name": probe.name, "target": probe.target, "sql": probe.sql, "interval": "500ms", "timeout": "1s"}
        ],
    }
    path = tmp / "capture.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [*migexport_argv(), "baseline", "-c", str(path), "--duration", "5s", "--allow-partial"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def blind(pg, tmp_path_factory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("blind-spots")
    db, table = f"blind_{uuid.uuid4().hex[:10]}", f"secret_{uuid.uuid4().hex[:10]}"
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    with pg.primary.connect(dbname=db) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(table)))  # no GRANT to the monitor
    state, baseline = tmp / "state.json", tmp / "baseline.json"
    app_dsn = monitor_dsn(pg.primary, db)
    # Before the exporter starts: the capture's own failed probe runs are rollbacks the exporter did not do.
    capture = capture_baseline(tmp, app_dsn, probes(table)[BASELINED], baseline)
    rules = tmp / "rules.yml"
    rules.write_text(render(THRESHOLDS))
    exporter = Exporter(
        ServeSettings(
            targets=[Target(APP, app_dsn), Target(LATE, monitor_dsn(pg.primary))],
            host="127.0.0.1",
            port=0,
            migration=Migration(id=CONFIG_ID, watch_window_seconds=3600),
            state_path=state,
            baseline_path=baseline,
            probes=tuple(probes(table).values()),
        )
    ).start()
    try:
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "migexport", "static_configs": [{"targets": [exporter.url.removeprefix("http://")]}]}
            ],
        }
        with prometheus_server(tmp, yaml.safe_dump(prom_config)) as prom:
            wait_for(
                lambda: len(prom.query("migexport_up == 1")) == 2,
                timeout=30,
                what="prometheus to scrape both targets up",
            )
            yield Setup(pg, tmp, db, table, state, baseline, capture, exporter, prom)
    finally:
        exporter.stop()
        with pg.primary.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))


def arm(s: Setup, migration_id: str) -> float:
    """A migration running now, as `migexport run` records it (this process stands in for `run`)."""
    write_state(
        s.state,
        MigrationState(
            migration_id=migration_id,
            status=RUNNING,
            started_at=time.time(),
            time_budget_seconds=1800,
            watch_window_seconds=3600,
            pid=os.getpid(),  # alive on this host: the run is not lost
            host=socket.gethostname(),
        ),
    )
    return time.monotonic()


def selector(name: str, **labels: str) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in {"alertname": name, **labels}.items()) + "}"


def firing(prom: PrometheusServer, name: str, **labels: str) -> list[dict]:
    return prom.query("ALERTS" + selector(name, alertstate="firing", **labels))


def until_firing(prom: PrometheusServer, induced: float, name: str, **labels: str) -> float:
    """Seconds from `induced` (monotonic) to the alert firing in Prometheus; printed."""
    wait_for(lambda: firing(prom, name, **labels) != [], timeout=ALERT_TIMEOUT, what=f"{name}{labels} to fire")
    elapsed = time.monotonic() - induced
    print(f"\n{name}{labels}: firing {elapsed:.1f}s after the condition was induced")
    return elapsed


def values(prom: PrometheusServer, expr: str) -> list[float]:
    return [float(r["value"][1]) for r in prom.query(expr)]


def server_rollbacks(s: Setup) -> int:
    """pg_stat_database as the superuser sees it: every rollback in the database, the exporter's included."""
    with s.pg.primary.connect() as conn:
        return conn.execute("SELECT xact_rollback FROM pg_stat_database WHERE datname = %s", (s.db,)).fetchone()[0]


def exported_rollbacks(s: Setup) -> float:
    return value(scrape(s.exporter.url), "migexport_xact_rollback_total", target=APP)


def denied_in_log(s: Setup, offset: int) -> int:
    """Failed probe runs the server logged after `offset`: one ERROR line each."""
    with open(s.pg.primary.logfile, "rb") as f:
        f.seek(offset)
        text = f.read().decode("utf-8", "replace")
    return sum(1 for line in text.splitlines() if "ERROR:" in line and f"permission denied for table {s.table}" in line)


def test_a_probe_the_role_may_not_run_warns_and_never_pages_nor_moves_the_error_ratio(blind):
    s, prom = blind, blind.prom
    rollbacks_before, exported_before = server_rollbacks(s), exported_rollbacks(s)
    log_offset = s.pg.primary.logfile.stat().st_size  # after the server count: each run logged later is in it

    induced = arm(s, "broken-probe")
    for probe in (BASELINED, NEW):
        until_firing(prom, induced, "MigrationProbeBroken", target=APP, probe=probe, migration_id="broken-probe")
    # Many failed runs (two probes, every 0.5 s), and the page's `for:` passed well before the end.
    wait_for(lambda: denied_in_log(s, log_offset) >= 20, timeout=30, what="20 failed probe runs in the server log")
    wait_for(lambda: time.monotonic() - induced > THRESHOLDS.critical_for_seconds + 4, timeout=10)

    failed_runs = denied_in_log(s, log_offset)
    # Each run's rollback is published (pg_stat_force_next_flush) right after its ERROR is logged.
    wait_for(
        lambda: server_rollbacks(s) - rollbacks_before >= failed_runs,
        timeout=10,
        what=f"the server to count the {failed_runs} failed runs as rollbacks",
    )
    server_delta, exported_delta = server_rollbacks(s) - rollbacks_before, exported_rollbacks(s) - exported_before
    print(f"failed probe runs: {failed_runs}; server xact_rollback +{server_delta}; exported +{exported_delta:g}")
    assert server_delta >= failed_runs >= 20
    assert exported_delta == 0

    # Never a rollback page for it, at any evaluation since Prometheus started (ALERTS keeps pending too).
    assert prom.query('ALERTS{alertname="MigrationCriticalQueryFailing"}[10m]') == []
    assert prom.query('ALERTS{alertname="MigrationProbeBroken"}[10m]') != []  # the same query sees an alert
    # Both probes still reported broken, still failing, never succeeded.
    assert {r["metric"]["probe"] for r in firing(prom, "MigrationProbeBroken", target=APP)} == {BASELINED, NEW}
    m = scrape(s.exporter.url)
    for probe in (BASELINED, NEW):
        assert value(m, "migexport_probe_success", target=APP, probe=probe) == 0
        assert value(m, "migexport_probe_ever_succeeded", target=APP, probe=probe) == 0

    # The error ratio's recording rules never moved: 0 rollbacks in every 20 s window, no ratio > 0.
    rollbacks = f'migexport:xact_rollbacks:increase{WINDOW}{{target="{APP}"}}'
    assert values(prom, rollbacks) == [0.0]
    assert values(prom, f"max_over_time({rollbacks}[10m])") == [0.0]
    assert values(prom, f'max_over_time(migexport:error_ratio:rate{WINDOW}{{target="{APP}"}}[10m])') in ([], [0.0])

    # The counter is live, not stuck: one rollback that is not the exporter's moves it by exactly one.
    with s.pg.primary.connect(dbname=s.db) as conn:
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        conn.execute("ROLLBACK")
        conn.execute("SELECT pg_stat_force_next_flush()")
    wait_for(lambda: exported_rollbacks(s) - exported_before >= 1, timeout=15, what="a foreign rollback exported")
    time.sleep(2)  # later failed runs add nothing on top of it
    assert exported_rollbacks(s) - exported_before == 1


def test_a_partial_baseline_alerts_for_the_target_it_lacks(blind):
    s, prom = blind, blind.prom
    assert s.capture.returncode == 0, s.capture.stderr
    doc = json.loads(s.baseline.read_text())
    assert set(doc["targets"]) == {APP}, doc["targets"].keys()  # LATE absent, not zero
    assert any(f.startswith(f"target {LATE}: not reachable") for f in doc["failures"]), doc["failures"]
    assert "MISSING" in s.capture.stdout and LATE in s.capture.stdout

    induced = arm(s, "partial-baseline")
    m = scrape(s.exporter.url)
    assert value(m, "migexport_up", target=LATE) == 1  # served with its real DSN
    assert value(m, "migexport_baseline_loaded", migration_id="partial-baseline") == 1
    assert value(m, "migexport_baseline_missing", target=LATE, probe="", value="tps", migration_id="partial-baseline")
    until_firing(
        prom, induced, "MigrationBaselineMissing", reason="target", target=LATE, migration_id="partial-baseline"
    )
    # The target the baseline has is not reported for it.
    assert firing(prom, "MigrationBaselineMissing", reason="target", target=APP) == []


def read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_kill_9_of_run_pages_run_lost(blind):
    s, prom = blind, blind.prom
    s.state.unlink(missing_ok=True)  # no running migration: `run` may start
    argv = [
        *migexport_argv(),
        "run",
        "--id",
        "lost-run",
        "--state-file",
        str(s.state),
        "--log-file",
        str(s.tmp / "migration.log"),
        "--control-dsn",
        s.pg.primary.dsn(),
        "--",
        "sleep",
        "60",
    ]
    with open(s.tmp / "run.stderr", "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    command_pid = None
    try:
        wait_for(lambda: read_state(s.state).get("command_pid"), timeout=20, what="`run` to start its command")
        command_pid = read_state(s.state)["command_pid"]
        m = scrape(s.exporter.url)
        assert value(m, "migexport_migration_in_progress", migration_id="lost-run") == 1
        assert value(m, "migexport_migration_lost", migration_id="lost-run") == 0

        proc.send_signal(signal.SIGKILL)
        induced = time.monotonic()
        proc.wait(timeout=10)
        wait_for(
            lambda: value(scrape(s.exporter.url), "migexport_migration_lost", migration_id="lost-run") == 1,
            timeout=5,
            what="migexport_migration_lost 1",
        )
        print(f"\nmigexport_migration_lost 1 {time.monotonic() - induced:.1f}s after kill -9")
        until_firing(prom, induced, "MigrationRunLost", migration_id="lost-run")
        [alert] = firing(prom, "MigrationRunLost")
        assert alert["metric"]["severity"] == "critical" and alert["metric"]["action"] == "investigate"
        os.killpg(command_pid, 0)  # what the page is about: the command runs on, orphaned, without a time limit
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if command_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(command_pid, signal.SIGKILL)


def test_random_bytes_in_the_state_file_page_state_unreadable(blind, caplog):
    s, prom = blind, blind.prom
    try:
        with caplog.at_level(logging.INFO, logger="migexport"):
            tmp = s.state.with_name(".state.random")
            tmp.write_bytes(os.urandom(512))
            os.replace(tmp, s.state)  # atomically, as any writer would: the reader sees only these bytes
            induced = time.monotonic()
            wait_for(
                lambda: (
                    value(scrape(s.exporter.url), "migexport_migration_state_readable", migration_id=CONFIG_ID) == 0
                ),
                timeout=5,
                what="migexport_migration_state_readable 0",
            )
            until_firing(prom, induced, "MigrationStateUnreadable")
            time.sleep(2)  # more scrapes of the same bytes: still one line
            m = scrape(s.exporter.url)
        lines = [r.getMessage() for r in caplog.records if r.name == "migexport.collectors.migration"]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"migration state: {s.state}: ") and "\n" not in lines[0], lines[0]
        # Never the previous state's values: nothing runs, nothing is lost, nothing is armed.
        assert value(m, "migexport_migration_in_progress", migration_id=CONFIG_ID) == 0
        assert value(m, "migexport_migration_lost", migration_id=CONFIG_ID) == 0
        assert value(m, "migexport_migration_watch_active", migration_id=CONFIG_ID) == 0
    finally:
        s.state.unlink(missing_ok=True)
