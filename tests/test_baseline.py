"""`migexport baseline` against a real workload, and the baseline file's life: round trip, damage, overwrite."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import psycopg
import pytest
import yaml

from conftest import monitor_dsn, prometheus_server
from migexport.baseline_file import read_baseline
from migexport.localpg import free_port
from test_cli import run_cli


@pytest.fixture(scope="module")
def baseline_db(pg) -> str:
    with pg.primary.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS baseline_app")
        conn.execute("CREATE DATABASE baseline_app")
    with pg.primary.connect(dbname="baseline_app") as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, amount int)")
        conn.execute("INSERT INTO orders (amount) SELECT g FROM generate_series(1, 5000) g")
        conn.execute("ANALYZE orders")
    return "baseline_app"


def write_config(path: Path, pg, dbname: str) -> Path:
    config = {
        "targets": {"primary": {"dsn": monitor_dsn(pg.primary, dbname)}, "replica1": monitor_dsn(pg.replicas[0])},
        "baseline_file": "baseline.json",
        "migration": {"id": "add-status", "affected_tables": ["orders"]},
        "probes": [{"name": "slow_lookup", "target": "primary", "sql": "SELECT pg_sleep(0.05)"}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


class Workload:
    """One persistent connection, every fifth transaction rolled back: a 20 % error ratio."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with psycopg.connect(self.dsn) as conn:
            i = 0
            while not self.stop.is_set():
                conn.execute("UPDATE orders SET amount = amount + 1 WHERE id = %s", (i % 5000 + 1,))
                if i % 5 == 0:
                    conn.rollback()
                else:
                    conn.commit()
                i += 1
                time.sleep(0.002)

    def __enter__(self) -> Workload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def test_baseline_captures_error_ratio_and_probe_latency(pg, baseline_db, tmp_path: Path):
    config = write_config(tmp_path / "migexport.yml", pg, baseline_db)
    with Workload(pg.primary.dsn(dbname=baseline_db)):
        time.sleep(0.5)
        proc = run_cli("baseline", "-c", str(config), "--duration", "10s", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "primary error ratio" in proc.stdout and "probe slow_lookup p50 / p95" in proc.stdout

    baseline = read_baseline(tmp_path / "baseline.json")
    primary = baseline.targets["primary"]
    assert primary["error_ratio"] == pytest.approx(0.20, abs=0.02)
    assert primary["tps"] > 10
    assert primary["statement_latency_seconds"] > 0
    assert primary["table_rows_estimate"] == {"orders": 5000}
    assert "replica1" in primary["replication_lag_seconds"]
    assert primary["transactions"] == primary["commits"] + primary["rollbacks"]
    assert primary["statement_calls"] > 0 and primary["statement_latency_stddev_seconds"] > 0
    probe = baseline.probes["slow_lookup"]
    # histogram_quantile() over the probe buckets: 50 ms falls in the 40-63 ms bucket.
    assert 0.040 <= probe["p50_seconds"] <= probe["p95_seconds"] <= 0.1
    assert probe["success_ratio"] == 1
    assert probe["runs"] == probe["successful_runs"] == probe["latency_buckets"]["cumulative_counts"][-1] >= 10
    assert probe["window_runs"] == 20  # a 5m live window holds 20 runs of a probe every 15s
    assert probe["p95_window_max_seconds"] >= probe["p50_seconds"]
    assert baseline.migration_id == "add-status"
    assert 9.5 <= baseline.window_seconds <= 12
    # The standby has no writes of its own: said, not invented.
    assert baseline.targets["replica1"]["error_ratio"] is None
    assert any("replica1: no transactions" in m for m in baseline.missing)

    # It round-trips: show-baseline reads it back and prints the same figures.
    shown = run_cli("show-baseline", str(tmp_path / "baseline.json"))
    assert shown.returncode == 0, shown.stderr
    assert f"{primary['error_ratio'] * 100:.2f}%" in shown.stdout


def test_existing_baseline_is_not_overwritten_without_force(pg, baseline_db, tmp_path: Path):
    config = write_config(tmp_path / "migexport.yml", pg, baseline_db)
    precious = tmp_path / "baseline.json"
    precious.write_text("hand-kept\n")
    started = time.monotonic()
    proc = run_cli("baseline", "-c", str(config), "--duration", "30s")
    assert proc.returncode == 2
    assert time.monotonic() - started < 10, "refused before sampling, not after"
    assert proc.stderr.strip() == f"migexport: error: {precious} exists; use --force to replace it"
    assert precious.read_text() == "hand-kept\n"

    forced = run_cli("baseline", "-c", str(config), "--duration", "1s", "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(precious.read_text())["format"] == "migexport-baseline"


def _valid_doc(pg, baseline_db, tmp_path: Path) -> dict:
    config = write_config(tmp_path / "migexport.yml", pg, baseline_db)
    assert run_cli("baseline", "-c", str(config), "--duration", "1s").returncode == 0
    return json.loads((tmp_path / "baseline.json").read_text())


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda text, doc: text[: len(text) // 2], "not valid JSON (truncated or edited?)"),
        (lambda text, doc: json.dumps({**doc, "version": 7}), "baseline version 7 is not supported"),
        (lambda text, doc: json.dumps({k: v for k, v in doc.items() if k != "targets"}), "field 'targets' is missing"),
        (
            lambda text, doc: json.dumps({**doc, "targets": {"primary": {**doc["targets"]["primary"], "tps": "fast"}}}),
            "targets.primary.tps: expected a non-negative number, got 'fast'",
        ),
        (lambda text, doc: json.dumps([1, 2]), "not a migexport baseline file"),
        (
            lambda text, doc: json.dumps(
                {**doc, "targets": {"primary": {**doc["targets"]["primary"], "table_rows_estimate": [1000]}}}
            ),
            "targets.primary.table_rows_estimate: expected an object, got list",
        ),
        (lambda text, doc: json.dumps({**doc, "slis": [0.1]}), "slis: expected an object, got list"),
    ],
    ids=["truncated", "future-version", "missing-field", "wrong-type", "not-a-baseline", "rows-list", "slis-list"],
)
def test_damaged_baseline_gives_exit_2_and_one_line(pg, baseline_db, tmp_path: Path, damage, expected):
    doc = _valid_doc(pg, baseline_db, tmp_path)
    path = tmp_path / "baseline.json"
    path.write_text(damage(path.read_text(), doc))
    proc = run_cli("show-baseline", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_application_slis_are_captured_from_a_real_prometheus(pg, baseline_db, tmp_path: Path):
    with prometheus_server(tmp_path) as prom:
        config = {
            "targets": {"primary": monitor_dsn(pg.primary, baseline_db)},
            "slis": {
                "prometheus_url": prom.url,
                "error_ratio": "vector(0.0125)",
                "latency_seconds": "sum(vector(0.25))",
            },
        }
        (tmp_path / "migexport.yml").write_text(yaml.safe_dump(config))
        proc = run_cli("baseline", "-c", str(tmp_path / "migexport.yml"), "--duration", "1s")
    assert proc.returncode == 0, proc.stderr
    assert read_baseline(tmp_path / "baseline.json").slis == {"error_ratio": 0.0125, "latency_seconds": 0.25}


def test_unreachable_prometheus_is_reported_as_not_captured(pg, baseline_db, tmp_path: Path):
    config = {
        "targets": {"primary": monitor_dsn(pg.primary, baseline_db)},
        "slis": {"prometheus_url": f"http://127.0.0.1:{free_port()}", "error_ratio": "vector(1)"},
    }
    (tmp_path / "migexport.yml").write_text(yaml.safe_dump(config))
    proc = run_cli("baseline", "-c", str(tmp_path / "migexport.yml"), "--duration", "1s")
    assert proc.returncode == 0, proc.stderr
    assert "not captured: sli error_ratio" in proc.stdout
    assert read_baseline(tmp_path / "baseline.json").slis == {"error_ratio": None}


def test_a_nan_sli_is_not_captured_and_the_file_stays_readable(pg, baseline_db, tmp_path: Path):
    with prometheus_server(tmp_path) as prom:
        config = {
            "targets": {"primary": monitor_dsn(pg.primary, baseline_db)},
            # A ratio over no requests: NaN, which no reader of the file would accept.
            "slis": {"prometheus_url": prom.url, "error_ratio": "vector(0) / vector(0)"},
        }
        (tmp_path / "migexport.yml").write_text(yaml.safe_dump(config))
        proc = run_cli("baseline", "-c", str(tmp_path / "migexport.yml"), "--duration", "1s")
    assert proc.returncode == 0, proc.stderr
    assert "not captured: sli error_ratio: query returned nan" in proc.stdout
    assert read_baseline(tmp_path / "baseline.json").slis == {"error_ratio": None}
