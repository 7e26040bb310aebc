"""The baseline's values are the estimators the live rules use, measured over exactly its window.

A known load is run inside the sampling window (from the progress callback, which is first called
once the start counters are read): statements of two known durations, autocommit and rolled-back
transactions, a probe the exporter's role may not read. The document must hold the window's statement
calls, mean and standard deviation (checked against pg_stat_statements' own entry), its transactions
with the sampler's own (its queries and its failing probe's rollbacks) excluded, and probe latencies
that are histogram_quantile() over the buckets it stores, with the noise ceiling over live-window-sized
runs of probes.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator

import pytest
from psycopg import sql

from conftest import BACKGROUND_COMMITS, monitor_dsn
from migexport.baseline import FLUSH_SQL, capture, window_p95_max
from migexport.config import Config, Migration, Probe, Thresholds
from migexport.dsn import Target
from migexport.probes import PROBE_BUCKETS, cumulative_buckets, probe_quantile


@pytest.fixture
def app_db(pg) -> Iterator[str]:
    name = f"estimators_{uuid.uuid4().hex[:10]}"
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with pg.primary.connect(dbname=name) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE TABLE secret_orders (id int)")  # the monitor role may not read it
    yield name
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def config_for(pg, db: str, probes: tuple[Probe, ...] = (), **thresholds: float) -> Config:
    return Config(
        targets=(Target("primary", monitor_dsn(pg.primary, db)),),
        migration=Migration(id="m1"),
        probes=probes,
        thresholds=Thresholds(**thresholds),
    )


def once(load: Callable[[], None]) -> Callable[[float], None]:
    """A progress callback that runs `load` at its first call: inside the window, before any end read."""
    done: list[bool] = []

    def progress(fraction: float) -> None:
        if not done:
            done.append(True)
            load()

    return progress


def test_statement_calls_mean_and_stddev_are_the_windows(pg, app_db):
    app = pg.primary.connect(dbname=app_db)  # opened before the window: not part of it

    def load() -> None:
        for i in range(40):
            app.execute("SELECT pg_sleep(%s)", (0.01 if i % 2 else 0.03,))

    doc = capture(config_for(pg, app_db), 0.5, once(load), sample_interval_seconds=0.1)
    app.close()
    t = doc["targets"]["primary"]

    assert t["statement_calls"] == 40  # the exporter's own statements are not calls of the application
    # pg_stat_statements' entry for this statement holds exactly these 40 calls: the same mean, and the
    # same (population) standard deviation, recovered from the sums of times and of squared times.
    with pg.primary.connect(dbname=app_db) as conn:
        calls, mean_ms, stddev_ms = conn.execute(
            "SELECT calls, mean_exec_time, stddev_exec_time FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND query LIKE 'SELECT pg_sleep%'"
        ).fetchone()
    assert calls == 40
    assert t["statement_latency_seconds"] == pytest.approx(mean_ms / 1000, rel=1e-6)
    assert t["statement_latency_stddev_seconds"] == pytest.approx(stddev_ms / 1000, rel=1e-4)
    assert t["statement_latency_stddev_seconds"] == pytest.approx(0.010, abs=0.002)  # half of 30 ms - 10 ms


def test_transactions_are_the_windows_with_the_samplers_own_excluded(pg, app_db):
    app = pg.primary.connect(dbname=app_db)
    app.execute(FLUSH_SQL)  # its connection's own commit is published before the window

    def load() -> None:
        for _ in range(40):
            app.execute("SELECT 1")
        for _ in range(10):
            with app.transaction(force_rollback=True):
                app.execute("SELECT 1")
        app.execute(FLUSH_SQL)  # one more commit, published with the others before the window ends

    probes = (
        Probe("open", "SELECT 1", "primary", interval_seconds=1),
        # Fails at every run: a rollback of the sampler's each time, which must not count.
        Probe("secret", "SELECT count(*) FROM secret_orders", "primary", interval_seconds=1),
    )
    doc = capture(config_for(pg, app_db, probes), 1.0, once(load), sample_interval_seconds=0.1, allow_partial=True)
    app.close()
    t = doc["targets"]["primary"]

    assert doc["probes"]["secret"]["runs"] >= 5 and doc["probes"]["secret"]["success_ratio"] == 0
    assert t["rollbacks"] == 10
    assert 41 <= t["commits"] <= 41 + BACKGROUND_COMMITS  # autovacuum may add its own
    assert t["transactions"] == t["commits"] + t["rollbacks"]
    assert t["error_ratio"] == pytest.approx(10 / t["transactions"])
    assert t["tps"] == pytest.approx(t["transactions"] / doc["window_seconds"])


def test_probe_latency_is_histogram_quantile_over_the_stored_buckets(pg, app_db):
    probe = Probe("nap", "SELECT pg_sleep(0.002)", "primary", interval_seconds=1)
    # A 3 s live window holds 3 runs of a probe every second.
    doc = capture(config_for(pg, app_db, (probe,), rate_window_seconds=3), 2.0, sample_interval_seconds=0.1)
    p = doc["probes"]["nap"]
    counts = p["latency_buckets"]["cumulative_counts"]

    assert p["latency_buckets"]["upper_bounds_seconds"] == list(PROBE_BUCKETS)
    assert p["runs"] == p["successful_runs"] == counts[-1] >= 10
    assert p["p50_seconds"] == probe_quantile(0.5, counts)
    assert p["p95_seconds"] == probe_quantile(0.95, counts)
    assert 0.002 <= p["p50_seconds"] <= p["p95_seconds"] <= 0.1
    assert p["window_runs"] == 3
    # A 3-run window's p95 is no lower than the lowest run's bucket and never beyond the slowest's.
    lowest = PROBE_BUCKETS[next(i for i, c in enumerate(counts) if c)]
    highest = PROBE_BUCKETS[counts.index(counts[-1])]
    assert lowest * 0.6 <= p["p95_window_max_seconds"] <= highest


def test_with_fewer_runs_than_the_live_window_holds_the_ceiling_is_the_p95(pg, app_db):
    probe = Probe("nap", "SELECT pg_sleep(0.002)", "primary", interval_seconds=1)
    doc = capture(config_for(pg, app_db, (probe,)), 1.0, sample_interval_seconds=0.1)  # 5m window: 300 runs
    p = doc["probes"]["nap"]
    assert p["window_runs"] == 300 > p["successful_runs"]
    assert p["p95_window_max_seconds"] == p["p95_seconds"]
    assert any("only" in m and "probe_min_runs" in m for m in doc["missing"]) == (p["successful_runs"] < 10)


# -- the noise ceiling, as a function --------------------------------------------------------------------
def brute_force(durations: list[float], k: int) -> float:
    k = min(k, len(durations))
    return max(
        probe_quantile(0.95, cumulative_buckets(durations[i : i + k]))  # type: ignore[type-var]
        for i in range(len(durations) - k + 1)
    )


@pytest.mark.parametrize("seed", range(6))
def test_the_sliding_window_maximum_is_the_highest_p95_of_any_window(seed):
    rng = random.Random(seed)
    durations = [rng.lognormvariate(-6, 1.2) for _ in range(rng.randint(1, 200))]
    for k in (2, 3, 7, 20, 500):
        assert window_p95_max(durations, k) == brute_force(durations, k)


def test_two_slow_runs_in_one_window_raise_the_ceiling_above_the_p95():
    durations = [0.0005] * 30 + [0.05, 0.05] + [0.0005] * 28
    k = 10
    overall = probe_quantile(0.95, cumulative_buckets(durations))
    ceiling = window_p95_max(durations, k)
    assert overall is not None and overall < 0.001  # 2 of 60 runs: the p95 of all runs does not see them
    assert ceiling is not None and ceiling > 0.04  # a live window holding both does: that is noise at rest
