"""`migexport baseline` refuses to write a baseline with holes, and says why, in seconds.

A target it cannot reach or a probe that never succeeds would leave the alerts that need those values
silently disarmed. Each is induced for real: a probe on a table the exporter's role may not read (the
GRANT it needs is named), a target whose DSN points at a closed port. Both fail before the sampling
window (a 10-minute --duration ends in seconds), exit 1 and write nothing; `--allow-partial` writes what
it could, lists the rest, and `serve` then reports the holes as migexport_baseline_missing. A standby
without transactions, a database without pg_stat_statements and an unanalyzed table are notes, not
failures.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from psycopg import sql

from conftest import MONITOR_ROLE, monitor_dsn, scrape, series, value
from migexport.baseline_file import read_baseline
from migexport.config import Migration, Probe
from migexport.dsn import Target
from migexport.localpg import free_port
from test_cli import run_cli


@pytest.fixture
def app_db(pg) -> Iterator[str]:
    """A database of this test's own, with pg_stat_statements and a table the monitor role may not read."""
    name = f"capture_{uuid.uuid4().hex[:10]}"
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with pg.primary.connect(dbname=name) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE TABLE secret_orders (id int)")  # no GRANT to the monitor role
        conn.execute("CREATE TABLE open_orders (id int)")
        conn.execute(sql.SQL("GRANT SELECT ON open_orders TO {}").format(sql.Identifier(MONITOR_ROLE)))
    yield name
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def closed_port_dsn() -> str:
    return f"host=127.0.0.1 port={free_port()} dbname=postgres user={MONITOR_ROLE}"


def write_config(tmp: Path, targets: dict[str, str], probes: list[dict]) -> Path:
    path = tmp / "migexport.yml"
    config = {"targets": targets, "baseline_file": "baseline.json", "migration": {"id": "m1"}, "probes": probes}
    path.write_text(yaml.safe_dump(config))
    return path


PROBES = [
    {"name": "open", "target": "primary", "sql": "SELECT count(*) FROM open_orders", "interval": "1s"},
    {"name": "secret", "target": "primary", "sql": "SELECT count(*) FROM secret_orders", "interval": "1s"},
]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("migexport: error:")]


def test_a_probe_the_role_may_not_read_fails_the_baseline_at_once(pg, app_db, tmp_path):
    config = write_config(tmp_path, {"primary": monitor_dsn(pg.primary, app_db)}, PROBES)
    started = time.monotonic()
    # Ten minutes of sampling asked for: only a failure before the window ends within the timeout.
    proc = run_cli("baseline", "-c", str(config), "--duration", "10m", timeout=60)
    elapsed = time.monotonic() - started

    assert proc.returncode == 1, proc.stderr
    lines = errors(proc.stderr)
    assert len(lines) == 2, proc.stderr  # the probe, then "not written"
    assert "probe secret on primary: failed: permission denied for table secret_orders" in lines[0]
    assert f"fix: GRANT SELECT ON secret_orders TO {MONITOR_ROLE}" in lines[0]
    assert "not written" in lines[1] and "--allow-partial" in lines[1]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "baseline.json").exists()
    print(f"broken probe failed the baseline after {elapsed:.2f}s")  # a figure for the record, not a limit


def test_an_unreachable_target_fails_the_baseline(pg, app_db, tmp_path):
    config = write_config(tmp_path, {"primary": monitor_dsn(pg.primary, app_db), "gone": closed_port_dsn()}, PROBES[:1])
    proc = run_cli("baseline", "-c", str(config), "--duration", "10m", timeout=60)

    assert proc.returncode == 1, proc.stderr
    lines = errors(proc.stderr)
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("migexport: error: target gone: not reachable:")
    assert "refused" in lines[0] and "check its DSN" in lines[0]
    assert not (tmp_path / "baseline.json").exists()


def test_allow_partial_writes_what_it_could_and_serve_reports_the_holes(pg, app_db, tmp_path, start_exporter):
    targets = {"primary": monitor_dsn(pg.primary, app_db), "gone": closed_port_dsn()}
    probes = [*PROBES, {"name": "elsewhere", "target": "gone", "sql": "SELECT 1"}]
    config = write_config(tmp_path, targets, probes)
    proc = run_cli("baseline", "-c", str(config), "--duration", "2s", "--allow-partial", timeout=60)

    assert proc.returncode == 0, proc.stderr
    missing = [line for line in proc.stdout.splitlines() if "MISSING" in line]
    assert len(missing) == 3, proc.stdout
    assert any("target gone: not reachable" in line for line in missing)
    assert any("probe elsewhere on gone: not run" in line for line in missing)
    assert any("probe secret on primary: failed: permission denied" in line for line in missing)
    doc = read_baseline(tmp_path / "baseline.json")
    assert set(doc.targets) == {"primary"}  # the target it could not reach is absent, not zero
    assert doc.probes["open"]["p95_seconds"] is not None
    assert doc.probes["secret"]["p95_seconds"] is None and doc.probes["secret"]["success_ratio"] == 0
    assert "elsewhere" not in doc.probes
    assert len(doc.failures) == 3
    assert json.loads((tmp_path / "baseline.json").read_text())["failures"] == list(doc.failures)

    # Served, the holes are named: each value an alert of the config needs and the file lacks.
    exporter = start_exporter(
        Target("primary", monitor_dsn(pg.primary, app_db)),
        Target("gone", closed_port_dsn()),
        migration=Migration(id="m1"),
        state_path=tmp_path / "state.json",
        baseline_path=tmp_path / "baseline.json",
        probes=tuple(Probe(p["name"], p["sql"], p["target"], interval_seconds=60) for p in probes),
    )
    m = scrape(exporter.url)
    assert value(m, "migexport_baseline_loaded", migration_id="m1") == 1
    holes = {tuple(sorted(labels)) for labels in series(m, "migexport_baseline_missing")}
    # The primary's database had no application traffic in the window: no error ratio, no latency
    # either (a note at capture, still a hole for the alerts).
    expected = {(t, "", v) for t in ("gone", "primary") for v in ("error_ratio", "statement_latency")} | {
        ("gone", "", "tps"),
        ("primary", "secret", "p95"),
        ("gone", "elsewhere", "p95"),
    }
    assert holes == {
        tuple(sorted({("target", t), ("probe", p), ("value", v), ("migration_id", "m1")})) for t, p, v in expected
    }


def test_quiet_standby_missing_extension_and_unanalyzed_table_are_notes(pg, tmp_path):
    name = f"plain_{uuid.uuid4().hex[:10]}"
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))  # no pg_stat_statements
    try:
        with pg.primary.connect(dbname=name) as conn:
            conn.execute("CREATE TABLE fresh (id int)")  # never analyzed
        path = tmp_path / "migexport.yml"
        config = {
            "targets": {"primary": monitor_dsn(pg.primary, name), "replica1": monitor_dsn(pg.replicas[0])},
            "migration": {"id": "m1", "affected_tables": ["fresh"]},
        }
        path.write_text(yaml.safe_dump(config))
        proc = run_cli("baseline", "-c", str(path), "--duration", "1s", timeout=60)
    finally:
        with pg.primary.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stdout.splitlines() if "not captured:" in line]
    assert any("replica1: no transactions in the window" in line for line in notes), proc.stdout
    assert any("primary: pg_stat_statements not available" in line for line in notes), proc.stdout
    assert any("affected table fresh never analyzed" in line for line in notes), proc.stdout
    assert read_baseline(tmp_path / "baseline.json").failures == ()
