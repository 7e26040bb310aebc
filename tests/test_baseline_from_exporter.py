"""The baseline takes probe latency and transactions from the running exporter: both sides measured alike.

A real exporter runs a real probe; `capture()` reads its histograms over the window and the document's
buckets are exactly the exporter's increase over that window: what the live histogram_quantile() reads.
Without a reachable exporter the baseline times the probe itself and says so.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import psycopg

from conftest import monitor_dsn, scrape
from migexport.baseline import capture
from migexport.config import Migration, Probe, parse_config
from migexport.dsn import Target
from migexport.exporter_histograms import cumulative_from_page
from migexport.localpg import free_port
from migexport.probes import PROBE_BUCKETS

PROBE_SQL = "SELECT count(*) FROM pg_class"


def config_for(dsn: str, tmp: Path):
    return parse_config(
        {
            "targets": {"primary": dsn},
            "migration": {"id": "m1"},
            "probes": [{"name": "catalog", "target": "primary", "sql": PROBE_SQL, "interval": "200ms"}],
            "thresholds": {"rate_window": "2s", "probe_min_runs": 2},
        },
        tmp / "migexport.yml",
    )


def served_counts(url: str) -> list[float]:
    metrics = scrape(url)
    by_le = {
        float(dict(labels)["le"]): v
        for (name, labels), v in metrics.items()
        if name == "migexport_probe_duration_seconds_bucket" and dict(labels).get("probe") == "catalog"
    }
    return [by_le[b] for b in [*PROBE_BUCKETS, math.inf]]


def test_probe_latency_comes_from_the_exporters_histograms(pg, start_exporter, tmp_path: Path):
    dsn = monitor_dsn(pg.primary)
    exporter = start_exporter(
        Target("primary", dsn),
        migration=Migration(id="m1"),
        probes=(Probe(name="catalog", sql=PROBE_SQL, target="primary", interval_seconds=0.2),),
        state_path=tmp_path / "state.json",
    )
    before = served_counts(exporter.url)
    doc = capture(config_for(dsn, tmp_path), 4.0, sample_interval_seconds=0.5, exporter_url=exporter.url)
    after = served_counts(exporter.url)
    probe = doc["probes"]["catalog"]
    assert probe["latency_source"] == "exporter"
    counts = probe["latency_buckets"]["cumulative_counts"]
    # The window's increase, within what the exporter served around the capture.
    assert all(0 <= c <= a - b for c, a, b in zip(counts, after, before, strict=True))
    assert 12 <= probe["latency_runs"] == counts[-1]  # ~20 runs at 5/s in 4 s
    assert probe["successful_runs"] >= 1  # the baseline still proves the probe itself
    assert 0 < probe["p50_seconds"] <= probe["p95_seconds"]
    # The highest p95 of any 2 s stretch (the rate window): not bounded below by the whole window's p95
    # (two slow runs in different halves lift the p95 of 20 runs, not that of either 10), only positive.
    assert probe["p95_window_max_seconds"] > 0
    assert not [m for m in doc["missing"] if "catalog" in m or "exporter" in m], doc["missing"]


def test_without_a_reachable_exporter_the_baseline_times_the_probe_and_says_so(pg, tmp_path: Path):
    url = f"http://127.0.0.1:{free_port()}"
    doc = capture(config_for(monitor_dsn(pg.primary), tmp_path), 2.0, sample_interval_seconds=0.2, exporter_url=url)
    probe = doc["probes"]["catalog"]
    assert probe["latency_source"] == "baseline"
    assert probe["latency_runs"] == probe["successful_runs"] >= 5
    assert any(url in m and "start 'migexport serve' first" in m for m in doc["missing"]), doc["missing"]


def test_histograms_with_other_buckets_are_not_read_as_ours():
    ours = "".join(
        f'migexport_probe_duration_seconds_bucket{{target="p",probe="a",le="{b}"}} {i}\n'
        for i, b in enumerate([*(repr(x) for x in PROBE_BUCKETS), "+Inf"])
    )
    theirs = 'migexport_probe_duration_seconds_bucket{target="p",probe="b",le="0.5"} 3\n'
    theirs += 'migexport_probe_duration_seconds_bucket{target="p",probe="b",le="+Inf"} 4\n'
    page = "# TYPE migexport_probe_duration_seconds histogram\n" + ours + theirs
    found = cumulative_from_page(page)
    assert list(found) == [("p", "a")]
    assert found[("p", "a")] == list(range(len(PROBE_BUCKETS) + 1))


def test_transactions_come_from_the_exporter_without_its_own(pg, start_exporter, tmp_path: Path):
    """A scraped exporter adds ~10 commits a scrape to pg_stat_database; the live counters leave them out,
    so the baseline must too: 40 commits and 4 rollbacks of the application, whatever the scrapes did."""
    with pg.primary.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS baseline_xacts")
        conn.execute("CREATE DATABASE baseline_xacts")
    with pg.primary.connect(dbname="baseline_xacts") as conn:
        conn.execute("CREATE TABLE t (i int)")
    dsn = monitor_dsn(pg.primary, "baseline_xacts")
    exporter = start_exporter(Target("primary", dsn), migration=Migration(id="m1"), state_path=tmp_path / "s.json")
    stop = threading.Event()

    def prometheus_like() -> None:  # scrapes as often as a busy Prometheus would, and more
        while not stop.wait(0.1):
            scrape(exporter.url)

    def application() -> None:
        time.sleep(1.5)  # inside the window: the capture checks the target before it starts
        with psycopg.connect(pg.primary.dsn(dbname="baseline_xacts")) as app:
            for i in range(44):
                app.execute("INSERT INTO t VALUES (%s)", (i,))
                app.rollback() if i % 11 == 0 else app.commit()

    threads = [threading.Thread(target=prometheus_like), threading.Thread(target=application)]
    for thread in threads:
        thread.start()
    try:
        config = parse_config({"targets": {"primary": dsn}, "migration": {"id": "m1"}}, tmp_path / "migexport.yml")
        doc = capture(config, 4.0, sample_interval_seconds=0.5, exporter_url=exporter.url)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    target = doc["targets"]["primary"]
    assert target["rollbacks"] == 4
    # 40 commits, and one for the application's connection; autovacuum and autoanalyze of t may add a few of
    # their own (more on a loaded machine). The ~400 commits of the 40 scrapes are what must not be there.
    assert 41 <= target["commits"] <= 48, target
