"""The frozen `migexport_baseline_*` gauges, served from a baseline file written by hand.

The file is built with the keys `migexport baseline` writes, served by a real exporter (its target
is the session's primary), and read back from /metrics: every value, nulls left out, a missing,
truncated or hand-broken file reported as not loaded without failing the scrape, re-read once fixed
without a restart, a baseline older than the maximum age reported stale, every gauge labelled with
the migration watched now (whatever id the file was captured under), and each value the configured
targets' and probes' alerts need but the file lacks reported as missing.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Metrics, monitor_dsn, scrape, series, value
from migexport.baseline_file import BaselineError, write_baseline
from migexport.config import Migration, Probe
from migexport.dsn import Target
from migexport.service import Exporter
from migexport.state import RUNNING, MigrationState, write_state

MIGRATION = "m1"
Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def make_doc(captured_at: float | None = None) -> dict[str, Any]:
    """A baseline document with the keys `_document()` produces (plus slis, as `capture()` adds)."""
    return {
        "format": "migexport-baseline",
        "version": 2,
        "migration_id": MIGRATION,
        "captured_at": time.time() if captured_at is None else captured_at,
        "window_seconds": 300.0,
        "targets": {
            "primary": {
                "in_recovery": False,
                "server_version_num": 150000,
                "tps": 123.5,
                "commits": 37000.0,
                "rollbacks": 50.0,
                "transactions": 37050.0,
                "error_ratio": 0.00135,
                "statement_latency_seconds": 0.0042,
                "statement_latency_stddev_seconds": 0.0031,
                "statement_calls": 123075.0,
                "statement_calls_per_second": 410.25,
                "connections_by_state": {"active": 3.5, "idle": 20.0},
                "connections": 23.5,
                "connections_max": 97.0,
                "connection_utilisation": 0.2423,
                "replication_lag_seconds": {"replica1": {"mean": 0.25, "max": 1.75}},
                "standby_replay_lag_seconds": None,
                "database_size_bytes": 123456789.0,
                "table_rows_estimate": {"orders": 1000.0},
            },
        },
        "probes": {
            "recent_orders": {
                "target": "primary",
                "interval_seconds": 15.0,
                "runs": 20,
                "successful_runs": 19,
                "success_ratio": 0.95,
                "latency_buckets": {
                    "upper_bounds_seconds": [0.01, 0.016, 0.1],
                    "cumulative_counts": [2, 16, 19, 19],
                },
                "p50_seconds": 0.012,
                "p95_seconds": 0.085,
                "window_runs": 20,
                "p95_window_max_seconds": 0.0925,
            },
        },
        "slis": {"error_ratio": 0.002, "latency_seconds": 0.3},
        "missing": [],
    }


def expected_series(
    doc: dict[str, Any], targets: tuple[str, ...] = ("primary",), probes: tuple[tuple[str, str], ...] = ()
) -> Series:
    """Every baseline gauge the document should become, with its labels; nulls have none, and each value
    the exporter's `targets` and `probes` need but the document lacks is `missing`."""
    m = ("migration_id", MIGRATION)
    out: Series = {
        ("migexport_baseline_loaded", frozenset({m})): 1.0,
        ("migexport_baseline_info", frozenset({m, ("baseline_migration_id", doc["migration_id"])})): 1.0,
        ("migexport_baseline_stale", frozenset({m})): 0.0,
        ("migexport_baseline_captured_timestamp_seconds", frozenset({m})): doc["captured_at"],
        ("migexport_baseline_window_seconds", frozenset({m})): doc["window_seconds"],
    }

    def add(name: str, v: float | None, **labels: str) -> None:
        if v is not None:
            out[(f"migexport_baseline_{name}", frozenset({m, *labels.items()}))] = v

    for target, t in doc["targets"].items():
        for key in (
            "tps",
            "error_ratio",
            "statement_latency_seconds",
            "statement_latency_stddev_seconds",
            "statement_calls",
            "transactions",
            "connections",
            "connection_utilisation",
        ):
            add(key, t[key], target=target)
        add("database_size_bytes", t["database_size_bytes"], target=target)
        for standby, lag in t["replication_lag_seconds"].items():
            add("replication_lag_seconds", lag["max"], target=target, standby=standby)
        for table, rows in t["table_rows_estimate"].items():
            add("table_rows_estimate", rows, target=target, table=table)
    for probe, p in doc["probes"].items():
        add("probe_latency_seconds", p["p50_seconds"], target=p["target"], probe=probe, quantile="0.5")
        add("probe_latency_seconds", p["p95_seconds"], target=p["target"], probe=probe, quantile="0.95")
        add("probe_latency_window_max_seconds", p["p95_window_max_seconds"], target=p["target"], probe=probe)
        add("probe_success_ratio", p["success_ratio"], target=p["target"], probe=probe)
    for sli, v in doc["slis"].items():
        add("app_sli", v, sli=sli)
    for target in targets:
        t = doc["targets"].get(target, {})
        for name, key in (
            ("tps", "tps"),
            ("error_ratio", "error_ratio"),
            ("statement_latency", "statement_latency_seconds"),
        ):
            if t.get(key) is None:
                add("missing", 1.0, target=target, probe="", value=name)
    for target, probe in probes:
        p = doc["probes"].get(probe, {})
        if p.get("target") != target or p.get("p95_seconds") is None:
            add("missing", 1.0, target=target, probe=probe, value="p95")
    return out


def baseline_series(metrics: Metrics) -> Series:
    return {key: v for key, v in metrics.items() if key[0].startswith("migexport_baseline_")}


def loaded(metrics: Metrics) -> float:
    return value(metrics, "migexport_baseline_loaded", migration_id=MIGRATION)


def stale(metrics: Metrics) -> float:
    return value(metrics, "migexport_baseline_stale", migration_id=MIGRATION)


@pytest.fixture
def serve(pg, tmp_path: Path, start_exporter) -> Callable[..., Exporter]:
    """An exporter for the session primary serving `baseline_path`."""

    def start(baseline_path: Path, max_age_seconds: float = 86400.0) -> Exporter:
        return start_exporter(
            Target("primary", monitor_dsn(pg.primary)),
            migration=Migration(id=MIGRATION),
            state_path=tmp_path / "state.json",
            baseline_path=baseline_path,
            baseline_max_age_seconds=max_age_seconds,
        )

    return start


# -- a valid file -------------------------------------------------------------------------------------------
def test_every_baseline_gauge_is_the_files_value(serve, tmp_path):
    path = tmp_path / "baseline.json"
    doc = make_doc()
    write_baseline(path, doc, force=False)
    m = scrape(serve(path).url)

    assert loaded(m) == 1
    assert stale(m) == 0
    assert value(m, "migexport_baseline_captured_timestamp_seconds", migration_id=MIGRATION) == doc["captured_at"]
    assert value(m, "migexport_baseline_tps", target="primary", migration_id=MIGRATION) == 123.5
    assert (
        value(m, "migexport_baseline_replication_lag_seconds", target="primary", standby="replica1", migration_id="m1")
        == 1.75
    )
    assert (
        value(m, "migexport_baseline_table_rows_estimate", target="primary", table="orders", migration_id="m1") == 1000
    )
    assert (
        value(
            m,
            "migexport_baseline_probe_latency_seconds",
            target="primary",
            probe="recent_orders",
            quantile="0.95",
            migration_id="m1",
        )
        == 0.085
    )
    # And every other one: exactly the expected series, each with the file's value.
    assert baseline_series(m) == expected_series(doc)


def test_a_null_value_leaves_its_gauge_absent(serve, tmp_path):
    path = tmp_path / "baseline.json"
    doc = make_doc()
    doc["targets"]["primary"]["statement_latency_seconds"] = None
    doc["probes"]["recent_orders"]["p95_seconds"] = None
    write_baseline(path, doc, force=False)
    m = scrape(serve(path).url)

    assert loaded(m) == 1
    assert (
        "migexport_baseline_statement_latency_seconds",
        frozenset({("target", "primary"), ("migration_id", "m1")}),
    ) not in m
    got = baseline_series(m)
    assert not [k for k in got if k[0] == "migexport_baseline_statement_latency_seconds"]  # absent, not 0 or NaN
    assert not [k for k in got if ("quantile", "0.95") in k[1]]
    assert got == expected_series(doc)


# -- missing and broken files -------------------------------------------------------------------------------
def test_a_missing_file_is_reported_once_and_picked_up_when_written(serve, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="migexport")
    path = tmp_path / "not-yet" / "baseline.json"
    exporter = serve(path)
    for _ in range(4):
        with urllib.request.urlopen(exporter.url + "/metrics", timeout=10) as resp:
            assert resp.status == 200
        m = scrape(exporter.url)
        assert loaded(m) == 0
        assert stale(m) == 0
        assert baseline_series(m).keys() == {
            ("migexport_baseline_loaded", frozenset({("migration_id", "m1")})),
            ("migexport_baseline_stale", frozenset({("migration_id", "m1")})),
        }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]
    assert len(warnings) == 1, warnings

    doc = make_doc()
    write_baseline(path, doc, force=False)
    m = scrape(exporter.url)  # the same exporter: no restart
    assert loaded(m) == 1
    assert baseline_series(m) == expected_series(doc)


def truncate_to_half(path: Path, doc: dict[str, Any]) -> None:
    write_baseline(path, doc, force=True)
    os.truncate(path, path.stat().st_size // 2)


def broken_field(key: str, bad: Any) -> Callable[[Path, dict[str, Any]], None]:
    def write(path: Path, doc: dict[str, Any]) -> None:
        doc["targets"]["primary"][key] = bad
        write_baseline(path, doc, force=True)

    return write


def slis_as_list(path: Path, doc: dict[str, Any]) -> None:
    doc["slis"] = ["error_ratio", 0.002]
    write_baseline(path, doc, force=True)


@pytest.mark.parametrize(
    "damage",
    [
        truncate_to_half,
        broken_field("tps", "fast"),
        broken_field("database_size_bytes", "huge"),
        broken_field("table_rows_estimate", {"orders": "many"}),
        broken_field("table_rows_estimate", [1000]),
        broken_field("replication_lag_seconds", {"replica1": {"mean": 0.25, "max": "1.75"}}),
        slis_as_list,
    ],
    ids=["truncated", "tps-string", "size-string", "rows-string", "rows-list", "lag-string", "slis-list"],
)
def test_a_broken_file_is_not_loaded_and_recovers_when_fixed(serve, tmp_path, damage):
    path = tmp_path / "baseline.json"
    write_baseline(path, make_doc(), force=False)
    exporter = serve(path)
    assert loaded(scrape(exporter.url)) == 1

    damage(path, make_doc())
    for _ in range(2):
        m = scrape(exporter.url)  # HTTP 200, or this raises
        assert loaded(m) == 0
        assert value(m, "migexport_up", target="primary") == 1  # the rest of the scrape is intact
        assert len(baseline_series(m)) == 2  # loaded and stale only: no half-read values

    fixed = make_doc()
    write_baseline(path, fixed, force=True)
    m = scrape(exporter.url)
    assert loaded(m) == 1
    assert baseline_series(m) == expected_series(fixed)


# -- age ----------------------------------------------------------------------------------------------------
def test_an_old_baseline_is_loaded_but_stale(serve, tmp_path):
    path = tmp_path / "baseline.json"
    doc = make_doc(captured_at=time.time() - 2 * 86400)
    write_baseline(path, doc, force=False)
    m = scrape(serve(path, max_age_seconds=86400).url)

    assert loaded(m) == 1
    assert stale(m) == 1
    assert value(m, "migexport_baseline_captured_timestamp_seconds", migration_id=MIGRATION) == doc["captured_at"]
    assert value(m, "migexport_baseline_tps", target="primary", migration_id=MIGRATION) == 123.5


# -- writing ------------------------------------------------------------------------------------------------
def test_write_baseline_never_overwrites_without_force(tmp_path):
    path = tmp_path / "baseline.json"
    first, second = make_doc(), make_doc()
    second["targets"]["primary"]["tps"] = 999.0
    write_baseline(path, first, force=False)
    before = path.read_bytes()

    with pytest.raises(BaselineError, match="exists"):
        write_baseline(path, second, force=False)
    assert path.read_bytes() == before

    write_baseline(path, second, force=True)
    assert path.read_bytes() != before
    assert b"999.0" in path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["baseline.json"]  # no temporary file left behind


# -- identity: the migration watched now -------------------------------------------------------------------
def warnings_about_ids(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "was captured for migration" in r.getMessage()]


def test_gauges_carry_the_watched_migrations_id_whatever_the_baseline_was_captured_under(serve, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="migexport")
    path = tmp_path / "baseline.json"
    doc = make_doc()
    doc["migration_id"] = "captured-yesterday"
    write_baseline(path, doc, force=False)
    exporter = serve(path)

    def ids(m: Metrics) -> set[str]:
        return {dict(labels)["migration_id"] for name, labels in baseline_series(m)}

    for _ in range(3):
        m = scrape(exporter.url)
        # Labelled with the migration the alerts watch (no state file yet: the config's id), so they join.
        assert ids(m) == {MIGRATION}
        info = {"migration_id": MIGRATION, "baseline_migration_id": "captured-yesterday"}
        assert value(m, "migexport_baseline_info", **info) == 1
    assert len(warnings_about_ids(caplog)) == 1, warnings_about_ids(caplog)

    # `migexport run` starts another migration: the same baseline now arms that one's alerts.
    write_state(tmp_path / "state.json", MigrationState("hotfix-7", RUNNING, time.time(), 1800, 3600, pid=os.getpid()))
    for _ in range(3):
        m = scrape(exporter.url)
        assert ids(m) == {"hotfix-7"}
        assert value(m, "migexport_baseline_tps", target="primary", migration_id="hotfix-7") == 123.5
    assert len(warnings_about_ids(caplog)) == 2, warnings_about_ids(caplog)  # once per change
    assert "'captured-yesterday'" in warnings_about_ids(caplog)[1] and "'hotfix-7'" in warnings_about_ids(caplog)[1]

    # Captured under the id it is used for: no warning.
    doc["migration_id"] = "hotfix-7"
    write_baseline(path, doc, force=True)
    m = scrape(exporter.url)
    assert value(m, "migexport_baseline_info", migration_id="hotfix-7", baseline_migration_id="hotfix-7") == 1
    scrape(exporter.url)
    assert len(warnings_about_ids(caplog)) == 2


# -- holes: what the configured alerts need and the file lacks ----------------------------------------------
def test_each_value_an_alert_needs_and_the_file_lacks_is_missing(pg, tmp_path, start_exporter):
    path = tmp_path / "baseline.json"
    doc = make_doc()
    doc["targets"]["primary"]["error_ratio"] = None  # e.g. a quiet database: no transactions in the window
    doc["probes"]["elsewhere"] = {**doc["probes"]["recent_orders"], "target": "replica1"}
    write_baseline(path, doc, force=False)
    probes = (
        Probe("recent_orders", "SELECT 1", "primary", interval_seconds=60),  # in the file: no hole
        Probe("not_in_file", "SELECT 1", "primary", interval_seconds=60),
        Probe("elsewhere", "SELECT 1", "primary", interval_seconds=60),  # the file's is another target's
    )
    exporter = start_exporter(
        Target("primary", monitor_dsn(pg.primary)),
        Target("replica1", monitor_dsn(pg.replicas[0])),  # not in the file at all
        migration=Migration(id=MIGRATION),
        state_path=tmp_path / "state.json",
        baseline_path=path,
        probes=probes,
    )
    m = scrape(exporter.url)
    holes = {(d["target"], d["probe"], d["value"]) for d in map(dict, series(m, "migexport_baseline_missing"))}
    assert holes == {
        ("primary", "", "error_ratio"),
        ("replica1", "", "tps"),
        ("replica1", "", "error_ratio"),
        ("replica1", "", "statement_latency"),
        ("primary", "not_in_file", "p95"),
        ("primary", "elsewhere", "p95"),
    }
    expected = expected_series(doc, ("primary", "replica1"), tuple((p.target, p.name) for p in probes))
    assert baseline_series(m) == expected
