"""The checks file as gauges: a real exporter (its target the session's primary) serves the last preflight
and verify written by `write_report`, read back from /metrics: every check's 1/0/-1, the timestamps, the
integrity ratio (only when integrity checks ran), each report under its own migration id, several results
of one check as its worst; no file = no series; a broken file = readable 0, one log line, no series, and
recovery without a restart; `migexport serve` reads the config's checks_file and `--checks-file`."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import Metrics, monitor_dsn, prometheus_server, scrape, series, value, wait_for
from migexport.checks.result import CheckResult, Report, Status, write_report
from migexport.config import Migration, Thresholds
from migexport.dsn import Target
from migexport.rulegen import render as render_rules
from migexport.service import Exporter
from migexport.state import RUNNING, MigrationState, write_state
from test_cli import Serve

MIGRATION = "m1"
AT = 1764000000.0


def preflight(migration_id: str = MIGRATION) -> Report:
    return Report(
        "preflight",
        [
            CheckResult("pitr", Status.PASS, "archive_mode on", "on"),
            CheckResult("backup_recency", Status.WARN, "cannot check: no backup source configured"),
            CheckResult("lock_holders", Status.FAIL, "pid 4242 idle in transaction 2m", "5s", "end it", "orders"),
            CheckResult("lock_holders", Status.PASS, "none", "5s", "", "customers"),
            # Three squawk findings of one check: one series, the worst.
            CheckResult("sql_lint", Status.WARN, "prefer-robust-stmts at 001.sql:2"),
            CheckResult("sql_lint", Status.FAIL, "require-lock-timeout at 001.sql:2"),
            CheckResult("sql_lint", Status.WARN, "require-statement-timeout at 001.sql:2"),
        ],
        migration_id=migration_id,
        at=AT,
    )


def verify(passed: int = 3, total: int = 4, migration_id: str = MIGRATION) -> Report:
    return Report(
        "verify",
        [
            CheckResult("schema_diff", Status.PASS, "1 column added", "as expected", "", "orders"),
            CheckResult("invalid_indexes", Status.FAIL, "orders_x_idx INVALID", "none", "DROP INDEX", "orders"),
            CheckResult("integrity", Status.FAIL if passed < total else Status.PASS, f"{passed}/{total}", "all"),
        ],
        migration_id=migration_id,
        at=AT + 600,
        integrity_passed=passed,
        integrity_total=total,
    )


def checks_series(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    names = ("migexport_preflight_", "migexport_verify_", "migexport_data_integrity_ratio")
    return {key: v for key, v in m.items() if key[0].startswith(names)}


def readable(m: Metrics) -> float:
    return value(m, "migexport_checks_file_readable")


@pytest.fixture
def serve(pg, tmp_path: Path, start_exporter) -> Callable[[Path], Exporter]:
    def start(checks_path: Path) -> Exporter:
        return start_exporter(
            Target("primary", monitor_dsn(pg.primary)),
            migration=Migration(id=MIGRATION),
            state_path=tmp_path / "state.json",
            checks_path=checks_path,
        )

    return start


def test_the_last_preflight_and_verify_are_exported(serve, tmp_path: Path):
    path = tmp_path / "migexport-checks.json"
    write_report(path, preflight())
    write_report(path, verify())
    m = scrape(serve(path).url)
    assert readable(m) == 1
    mid = ("migration_id", MIGRATION)
    assert series(m, "migexport_preflight_check") == {
        frozenset({mid, ("check", "pitr"), ("table", "")}): 1,
        frozenset({mid, ("check", "backup_recency"), ("table", "")}): -1,
        frozenset({mid, ("check", "lock_holders"), ("table", "orders")}): 0,
        frozenset({mid, ("check", "lock_holders"), ("table", "customers")}): 1,
        frozenset({mid, ("check", "sql_lint"), ("table", "")}): 0,
    }
    assert series(m, "migexport_verify_check") == {
        frozenset({mid, ("check", "schema_diff"), ("table", "orders")}): 1,
        frozenset({mid, ("check", "invalid_indexes"), ("table", "orders")}): 0,
        frozenset({mid, ("check", "integrity"), ("table", "")}): 0,
    }
    assert value(m, "migexport_preflight_timestamp_seconds", migration_id=MIGRATION) == AT
    assert value(m, "migexport_verify_timestamp_seconds", migration_id=MIGRATION) == AT + 600
    assert value(m, "migexport_data_integrity_ratio", migration_id=MIGRATION) == 0.75


def test_no_file_no_series_then_picked_up_without_a_restart(serve, tmp_path: Path):
    path = tmp_path / "not-yet" / "migexport-checks.json"
    exporter = serve(path)
    m = scrape(exporter.url)
    assert readable(m) == 1 and checks_series(m) == {}
    write_report(path, verify(4, 4))
    m = scrape(exporter.url)
    assert value(m, "migexport_data_integrity_ratio", migration_id=MIGRATION) == 1
    assert "migexport_preflight_timestamp_seconds" not in {name for name, _ in m}  # only verify ran


def test_without_integrity_checks_there_is_no_ratio(serve, tmp_path: Path):
    path = tmp_path / "migexport-checks.json"
    write_report(path, verify(0, 0))
    m = scrape(serve(path).url)
    assert series(m, "migexport_verify_check")  # the verification is there ...
    assert series(m, "migexport_data_integrity_ratio") == {}  # ... but 0 of 0 is no data, not 0 %


def test_each_report_carries_its_own_migration_id_else_the_watched_one(serve, tmp_path: Path):
    state = MigrationState("hotfix-7", RUNNING, started_at=AT, time_budget_seconds=1800, watch_window_seconds=3600)
    write_state(tmp_path / "state.json", state)
    path = tmp_path / "migexport-checks.json"
    write_report(path, preflight(migration_id="yesterday"))
    write_report(path, verify(migration_id=""))
    m = scrape(serve(path).url)
    assert {dict(labels)["migration_id"] for labels in series(m, "migexport_preflight_check")} == {"yesterday"}
    assert value(m, "migexport_data_integrity_ratio", migration_id="hotfix-7") == 0.75


def rewrite(path: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: os.truncate(p, p.stat().st_size // 2),
        lambda p: p.write_text('{"format": "migexport-baseline", "version": 2}'),
        lambda p: rewrite(p, lambda d: d["preflight"]["checks"][0].update(status="OK")),
        lambda p: rewrite(p, lambda d: d["verify"].update(integrity={"passed": 5, "total": 4})),
        lambda p: rewrite(p, lambda d: d["verify"].update(at="yesterday")),
        lambda p: rewrite(p, lambda d: d["preflight"].update(checks={"pitr": "PASS"})),
    ],
    ids=["truncated", "another-format", "unknown-status", "passed-over-total", "bad-time", "checks-not-a-list"],
)
def test_a_broken_file_is_unreadable_without_series_and_recovers(serve, tmp_path: Path, caplog, damage):
    caplog.set_level(logging.INFO, logger="migexport")
    path = tmp_path / "migexport-checks.json"
    write_report(path, preflight())
    write_report(path, verify())
    exporter = serve(path)
    assert checks_series(scrape(exporter.url))
    damage(path)
    for _ in range(3):
        m = scrape(exporter.url)
        assert readable(m) == 0 and checks_series(m) == {}  # never the previous file's values
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "checks" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0], warnings
    path.unlink()
    write_report(path, verify())
    m = scrape(exporter.url)
    assert readable(m) == 1 and value(m, "migexport_data_integrity_ratio", migration_id=MIGRATION) == 0.75


def test_serve_exports_the_configs_checks_file_or_the_one_given(pg, tmp_path: Path):
    config = tmp_path / "migexport.yml"
    config.write_text(
        f"targets: {{primary: '{monitor_dsn(pg.primary)}'}}\n"
        f"migration: {{id: {MIGRATION}, checks_file: checks/from-config.json, state_file: state.json}}\n"
    )
    write_report(tmp_path / "checks" / "from-config.json", verify(1, 4))  # relative to the config's directory
    write_report(tmp_path / "given.json", verify(2, 4))
    for args, ratio in (((), 0.25), (("--checks-file", str(tmp_path / "given.json")), 0.5)):
        server = Serve("-c", str(config), *args)
        try:
            m = scrape(server.url)
        finally:
            server.stop()
        assert value(m, "migexport_data_integrity_ratio", migration_id=MIGRATION) == ratio


def test_a_failed_integrity_check_pages_and_fails_the_success_row_in_prometheus(serve, tmp_path: Path):
    """The rules as rendered, in a real Prometheus scraping a real exporter: 3 of 4 integrity checks of the
    running migration fail -> MigrationDataIntegrityFailed fires (rollback) and data_integrity reads FAIL;
    a new verify with all passing -> the alert resolves and the row reads PASS."""
    now = time.time()
    state = MigrationState(MIGRATION, RUNNING, started_at=now, time_budget_seconds=1800, watch_window_seconds=3600)
    write_state(tmp_path / "state.json", state)
    path = tmp_path / "migexport-checks.json"
    write_report(path, verify(3, 4))
    exporter = serve(path)
    rules = tmp_path / "rules.yml"
    rules.write_text(render_rules(Thresholds()))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "migexport", "static_configs": [{"targets": [exporter.url.removeprefix("http://")]}]}
        ],
    }
    firing = 'ALERTS{alertname="MigrationDataIntegrityFailed", alertstate="firing", action="rollback"}'
    passed = 'migexport:success_criterion:passed{criterion="data_integrity"}'

    def row() -> list[float]:
        return [float(r["value"][1]) for r in prom.query(passed) if r["metric"]["migration_id"] == MIGRATION]

    with prometheus_server(tmp_path, yaml.safe_dump(config)) as prom:
        wait_for(lambda: prom.query(firing) != [], timeout=60, what="MigrationDataIntegrityFailed firing")
        [alert] = prom.query(firing)
        assert alert["metric"]["migration_id"] == MIGRATION and alert["metric"]["severity"] == "critical"
        wait_for(lambda: row() == [0.0], timeout=30, what="the data_integrity row to read FAIL")
        actual = prom.query('migexport:success_criterion:actual{criterion="data_integrity"}')
        assert [float(r["value"][1]) for r in actual] == [0.75]

        write_report(path, verify(4, 4))
        wait_for(lambda: row() == [1.0], timeout=30, what="the data_integrity row to read PASS")
        wait_for(lambda: prom.query(firing) == [], timeout=30, what="MigrationDataIntegrityFailed to resolve")
