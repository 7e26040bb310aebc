"""What got slower: the baseline's statement snapshot against a fresh one, on the real test clusters.

One scenario for the module: `migexport serve` runs (a probe of its own on one of the workload's
tables), a workload runs two statements as the application's role and a sleep as the migration's role,
and the real `migexport baseline --duration 3s` captures it. Then the index of one statement's table
is dropped (its mean goes from an index lookup to a scan of 100,000 rows) and the sleep gets longer;
`slower_statements` must name the scan first, with its ratio, and neither the untouched statement, nor
the migration role's sleep, nor anything the exporter ran. The text is in the baseline file and in no
metric of the running exporter. Also: an old baseline without the snapshot, a reset of the entries,
a role without pg_read_all_stats, a database without the extension, and a damaged snapshot.
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from psycopg import sql

from conftest import MONITOR_ROLE, monitor_dsn, running, wait_for
from migexport.baseline import _fit_statements, capture
from migexport.baseline_file import MAX_BASELINE_BYTES, BaselineError, read_baseline, write_baseline
from migexport.config import Config, load_config
from migexport.localpg import free_port
from migexport.report.slower import NO_SNAPSHOT, SlowerResult, slower_statements
from migexport.topstatements import (
    TEXT_MAX,
    Counters,
    Reading,
    clean_text,
    delta,
    reset_between,
    snapshot_doc,
    window_entries,
)
from test_cli import migexport_argv, run_cli

APP_ROLE, MIGRATION_ROLE, NOPRIV_ROLE = "slower_app", "slower_migration", "slower_nopriv"
FAST_SQL = "SELECT v FROM fast_items WHERE id = %s"
SLOW_SQL = "SELECT count(*) FROM slow_orders WHERE customer = %s"
PROBE_SQL = "SELECT count(*) FROM fast_items"


class Workload:
    """The application (two statements) and, now and then, the migration's role (a sleep)."""

    def __init__(self, pg, db: str) -> None:
        self.app = pg.primary.connect(dbname=db, user=APP_ROLE, autocommit=True)
        self.migration = pg.primary.connect(dbname=db, user=MIGRATION_ROLE, autocommit=True)
        self.sleep = 0.001
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def burst(self, n: int) -> None:
        for i in range(n):
            self.app.execute(FAST_SQL, (random.randint(1, 10_000),))
            self.app.execute(SLOW_SQL, (random.randint(1, 5_000),))
            if i % 20 == 0:
                self.migration.execute("SELECT pg_sleep(%s)", (self.sleep,))

    def _run(self) -> None:
        while not self.stop.is_set():
            self.burst(10)

    def __enter__(self) -> Workload:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.app.close()
        self.migration.close()


@dataclass
class Scenario:
    db: str
    config: Config
    baseline_path: Path
    result: SlowerResult
    metrics_text: str


def _setup_database(pg, db: str) -> None:
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
        for role in (APP_ROLE, MIGRATION_ROLE, NOPRIV_ROLE):
            conn.execute(f"DROP ROLE IF EXISTS {role}")  # left by an interrupted run
            conn.execute(f"CREATE ROLE {role} LOGIN")
    with pg.primary.connect(dbname=db) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE TABLE fast_items (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO fast_items SELECT g, g FROM generate_series(1, 10000) g")
        conn.execute("CREATE TABLE slow_orders (id int, customer int, amount int)")
        conn.execute("INSERT INTO slow_orders SELECT g, g % 5000, g FROM generate_series(1, 100000) g")
        conn.execute("CREATE INDEX slow_orders_customer ON slow_orders (customer)")
        conn.execute("VACUUM ANALYZE fast_items, slow_orders")
        conn.execute(f"GRANT SELECT ON fast_items, slow_orders TO {APP_ROLE}")
        conn.execute(f"GRANT SELECT ON fast_items TO {MONITOR_ROLE}")
        # A utility statement keeps its constants in pg_stat_statements: the snapshot must redact it.
        conn.execute(f"ALTER ROLE {NOPRIV_ROLE} PASSWORD 'hunter2-slower'")


def _write_config(pg, db: str, tmp: Path, listen_port: int) -> Path:
    path = tmp / "migexport.yml"
    config = {
        "listen": f"127.0.0.1:{listen_port}",
        "targets": {"primary": monitor_dsn(pg.primary, db), "replica": monitor_dsn(pg.replicas[0], db)},
        "baseline_file": "baseline.json",
        "migration": {"id": "m1", "role": MIGRATION_ROLE, "state_file": "state.json"},
        "probes": [{"name": "items", "target": "primary", "sql": PROBE_SQL, "interval": "200ms"}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def scenario(pg, tmp_path_factory) -> Iterator[Scenario]:
    db, tmp = f"slower_{uuid.uuid4().hex[:10]}", tmp_path_factory.mktemp("slower")
    _setup_database(pg, db)
    port = free_port()
    config_path = _write_config(pg, db, tmp, port)
    url = f"http://127.0.0.1:{port}"
    serve = [*migexport_argv(), "serve", "-c", str(config_path)]
    try:
        with running(serve, tmp / "serve.log", url + "/metrics", "serve"), Workload(pg, db) as workload:
            time.sleep(0.5)  # the workload's first calls (plans, caches) before the window
            proc = run_cli("baseline", "-c", str(config_path), "--duration", "3s", timeout=60)
            assert proc.returncode == 0, proc.stderr + proc.stdout
            with pg.primary.connect(dbname=db) as conn:
                conn.execute("DROP INDEX slow_orders_customer")
            workload.sleep = 0.02  # slower, but the migration's own: never listed
            config = load_config(config_path)
            baseline = read_baseline(tmp / "baseline.json")
            # The mean since the baseline also holds the fast calls made between the window's end and the
            # drop (more of them when the baseline command takes longer to finish on a loaded machine): read
            # again until the slow calls outweigh them, as a user reading the report later would see.
            deadline = time.monotonic() + 30
            while True:
                time.sleep(1.0)
                result = slower_statements(config, baseline)
                named = [s for s in result.slower if "slow_orders" in (s.query or "")]
                if (named and named[0].ratio > 2) or time.monotonic() > deadline:
                    break
            wait_for(lambda: 'migexport_baseline_loaded{migration_id="m1"} 1' in _metrics(url), what="baseline served")
            text = _metrics(url)
        yield Scenario(db, config, tmp / "baseline.json", result, text)
    finally:
        with pg.primary.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
            for role in (APP_ROLE, MIGRATION_ROLE, NOPRIV_ROLE):
                conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_the_slowed_statement_is_named_first_and_the_other_not_at_all(scenario):
    result = scenario.result
    assert result.available and result.compared["primary"] >= 2, result.to_dict()
    first = result.slower[0]
    assert first.target == "primary" and first.role == APP_ROLE
    assert "slow_orders" in first.query and "$1" in first.query, first
    assert first.ratio > 2 and first.mean_now_seconds > first.mean_baseline_seconds * 2
    assert first.baseline_mean_source == "window" and first.mean_now_source == "since_baseline"
    assert first.calls_baseline > 0 and first.calls_since > 0
    assert not [s for s in result.slower if "fast_items" in (s.query or "")], result.to_dict()
    as_json = json.loads(json.dumps(result.to_dict()))  # what a template or --format json gets
    assert as_json["slower"][0]["queryid"] == str(first.queryid)
    assert set(as_json) == {
        "available",
        "baseline_captured_at",
        "taken_at",
        "min_ratio",
        "latency_floor_seconds",
        "compared",
        "slower",
        "new",
        "notes",
    }
    print(
        f"slowed: x{first.ratio:.1f} ({first.mean_baseline_seconds * 1e3:.3f} -> {first.mean_now_seconds * 1e3:.3f} ms)"
    )


def test_the_baseline_holds_both_statements_with_window_means(scenario):
    baseline = read_baseline(scenario.baseline_path)
    snap = baseline.top_statements["primary"]
    texts = {st.query: st for st in snap.statements}
    fast = next(st for q, st in texts.items() if "fast_items" in q and "WHERE id" in q)
    slow = next(st for q, st in texts.items() if "slow_orders" in q)
    for st in (fast, slow):
        assert st.role == APP_ROLE and st.mean_source == "window" and st.calls > 10
        assert st.cumulative_calls >= st.calls and 0 < st.mean_exec_seconds < 0.01
    assert snap.window_start_at < snap.captured_at and snap.limit == 50 and snap.hidden_statements == 0
    assert "replica" in baseline.top_statements  # read there too (nothing ran on it)
    shown = run_cli("show-baseline", str(scenario.baseline_path))
    assert shown.returncode == 0 and "primary top statements" in shown.stdout, shown.stdout + shown.stderr


def test_neither_the_exporter_nor_the_migration_role_appears(pg, scenario):
    with pg.primary.connect(dbname=scenario.db) as conn:  # they are there to be left out
        there = conn.execute(
            "SELECT DISTINCT pg_get_userbyid(userid), query FROM pg_stat_statements "
            "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchall()
    assert any(r == MONITOR_ROLE and PROBE_SQL in q for r, q in there), there
    assert any(r == MIGRATION_ROLE and "pg_sleep" in q for r, q in there)
    baseline = read_baseline(scenario.baseline_path)
    listed = [st for snap in baseline.top_statements.values() for st in snap.statements]
    listed += [*scenario.result.slower, *scenario.result.new]
    assert listed
    for st in listed:
        assert st.role not in (MONITOR_ROLE, MIGRATION_ROLE), st
        assert st.query is None or not any(
            word in st.query for word in ("pg_sleep", "/* migexport", "pg_stat_statements(", PROBE_SQL)
        ), st


def test_the_text_is_in_the_baseline_file_and_in_no_metric(scenario):
    text = scenario.baseline_path.read_text()
    assert "slow_orders" in text
    assert f"ALTER ROLE {NOPRIV_ROLE} PASSWORD '***'" in text and "hunter2" not in text
    assert "migexport_baseline_loaded" in scenario.metrics_text
    for word in ("slow_orders", "fast_items", "SELECT", "queryid"):
        assert word not in scenario.metrics_text, word


def test_an_old_baseline_without_the_snapshot_gives_the_note(scenario, tmp_path):
    doc = json.loads(scenario.baseline_path.read_text())
    del doc["top_statements"]  # as every file written before the snapshot existed
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = read_baseline(tmp_path / "old.json")
    assert old.top_statements is None and old.targets == read_baseline(scenario.baseline_path).targets
    result = slower_statements(scenario.config, old)
    assert result.notes == [NO_SNAPSHOT] and not result.slower and not result.available
    shown = run_cli("show-baseline", str(tmp_path / "old.json"))
    assert shown.returncode == 0, shown.stderr


def test_a_reset_falls_back_to_the_mean_since_the_reset(pg, scenario):
    with pg.primary.connect(dbname=scenario.db) as conn:
        dbid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
        # Only this database's entries: the rest of the cluster keeps its counters (no stats_reset either).
        conn.execute("SELECT pg_stat_statements_reset(0, %s, 0)", (dbid,))
    workload = Workload(pg, scenario.db)
    try:
        workload.burst(30)
    finally:
        workload.app.close()
        workload.migration.close()
    result = slower_statements(scenario.config, read_baseline(scenario.baseline_path))
    first = result.slower[0]
    assert "slow_orders" in first.query and first.ratio > 2
    assert first.mean_now_source == "since_reset" and first.calls_since == 30


def test_a_role_without_pg_read_all_stats_gets_a_note(pg, scenario):
    targets = {"primary": pg.primary.dsn(dbname=scenario.db, user=NOPRIV_ROLE)}
    config = load_config(_config_file(scenario, targets))
    result = slower_statements(config, read_baseline(scenario.baseline_path))
    assert any("pg_read_all_stats" in n for n in result.notes), result.notes
    assert not result.slower and not result.available  # nothing of the application's can be identified


def test_a_database_without_the_extension_gets_a_note(pg, scenario):
    noext = scenario.db + "_noext"
    with pg.primary.connect() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(noext)))
    try:
        config = load_config(_config_file(scenario, {"primary": monitor_dsn(pg.primary, noext)}))
        result = slower_statements(config, read_baseline(scenario.baseline_path))
        doc = capture(config, 0.5)  # and a baseline there: a note, not a failure
    finally:
        with pg.primary.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(noext)))
    assert any("primary: pg_stat_statements is not installed" in n for n in result.notes), result.notes
    assert "replica: no statement snapshot" not in " ".join(result.notes)  # not in this config
    assert doc["top_statements"] == {}
    expected = "primary: no statement snapshot: pg_stat_statements is not installed"
    assert any(m.startswith(expected) for m in doc["missing"]), doc["missing"]


def _config_file(scenario: Scenario, targets: dict[str, str]) -> Path:
    path = scenario.baseline_path.parent / f"config-{uuid.uuid4().hex[:6]}.yml"
    path.write_text(yaml.safe_dump({"targets": targets, "migration": {"id": "m1", "role": MIGRATION_ROLE}}))
    return path


@pytest.mark.parametrize(
    ("field", "bad", "expected"),
    [
        ("queryid", 123, "queryid: expected a 64-bit integer as text"),
        ("queryid", "9223372036854775808", "queryid: expected a 64-bit integer as text"),
        ("query", "SELECT 1\nFROM x", "query: expected one printable line"),
        ("query", "x" * (TEXT_MAX + 1), "query: expected one printable line"),
        ("mean_source", "guess", "mean_source: expected 'window' or 'cumulative'"),
        ("cumulative_calls", -1, "cumulative_calls: expected a non-negative number"),
    ],
)
def test_a_damaged_snapshot_is_one_line(scenario, tmp_path, field, bad, expected):
    doc = json.loads(scenario.baseline_path.read_text())
    doc["top_statements"]["primary"]["statements"][0][field] = bad
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(BaselineError) as err:
        read_baseline(tmp_path / "bad.json")
    assert "top_statements.primary.statements[0]." + expected in str(err.value)


def test_texts_are_one_printable_line_cut_at_the_limit():
    assert clean_text("SELECT a,\n\t b  FROM t\x1b") == ("SELECT a, b FROM t\ufffd", False)
    cut, was_cut = clean_text("SELECT " + "x" * 3 * TEXT_MAX)
    assert was_cut and len(cut) == TEXT_MAX and cut.endswith("…")
    assert clean_text(b"SELECT '\xff'") == ("SELECT '\ufffd'", False)
    assert clean_text("ALTER ROLE a PASSWORD 'x''y' LOGIN") == ("ALTER ROLE a PASSWORD '***' LOGIN", False)
    assert clean_text("CREATE ROLE a PASSWORD $q$x$$y$q$") == ("CREATE ROLE a PASSWORD '***'", False)
    assert "hunter2" not in clean_text("SELECT dblink_connect('host=db password=hunter2')")[0]


def _reading(counters: dict[int, tuple[float, float]], stats_reset: float = 100.0) -> Reading:
    keys = {q: (q, 10, 5) for q in counters}
    return Reading(
        taken_at=stats_reset + 1,
        database="app",
        counters={keys[q]: Counters(calls, seconds, calls) for q, (calls, seconds) in counters.items()},
        roles={keys[q]: "app" for q in counters},
        stats_reset=stats_reset,
        hidden=0,
        schema="public",
        version="1.10",
    )


def test_the_window_ranks_what_ran_in_it_then_fills_with_cumulative_means():
    start = _reading({1: (10, 1.0), 2: (5, 9.0), 3: (100, 5.0)})
    # 1 ran 10 times (2 s); 2 did not run; 3 went down (evicted and back: all 3 calls are the window's); 4 is new.
    end = _reading({1: (20, 3.0), 2: (5, 9.0), 3: (3, 0.3), 4: (1, 0.1)})
    assert [k[0] for k, _, _ in window_entries(start, end, 3)] == [1, 3, 4]
    doc = snapshot_doc(start, end, {}, 4)
    by_id = {e["queryid"]: e for e in doc["statements"]}
    assert list(by_id) == ["1", "3", "4", "2"]
    assert by_id["1"]["mean_exec_seconds"] == 0.2 and by_id["1"]["calls"] == 10
    assert by_id["3"]["mean_exec_seconds"] == pytest.approx(0.1) and by_id["3"]["mean_source"] == "window"
    assert by_id["2"]["mean_source"] == "cumulative" and by_id["2"]["mean_exec_seconds"] == 1.8
    # A full reset in the window (stats_reset moved): every count at the end is the window's.
    reset = snapshot_doc(start, _reading({1: (4, 2.0)}, stats_reset=150.0), {}, 4)
    assert reset["statements"][0]["calls"] == 4 and reset["statements"][0]["mean_exec_seconds"] == 0.5


def test_counters_are_compared_only_when_they_did_not_go_back():
    before = Counters(100, 1.0, 100)
    assert delta(before, Counters(150, 2.0, 150), reset_between=False) == (Counters(50, 1.0, 50), True)
    assert delta(before, Counters(40, 2.0, 40), reset_between=False) == (Counters(40, 2.0, 40), False)
    assert delta(before, Counters(150, 2.0, 150), reset_between=True) == (Counters(150, 2.0, 150), False)
    assert reset_between(100.0, 150.0) and not reset_between(100.0, 100.0) and not reset_between(None, 150.0)


def test_top_statements_0_writes_no_snapshot(scenario, tmp_path):
    config_path = _config_file(scenario, {"primary": scenario.config.targets[0].dsn})
    out = tmp_path / "none.json"
    proc = run_cli(
        "baseline", "-c", str(config_path), "--duration", "1s", "--exporter-url", "none", "--top-statements", "0",
        "-o", str(out), timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "top_statements" not in json.loads(out.read_text()) and "top statements" not in proc.stdout
    assert slower_statements(scenario.config, read_baseline(out)).notes == [NO_SNAPSHOT]


def test_a_snapshot_too_large_for_the_readers_is_cut_not_the_file(scenario, tmp_path):
    doc = json.loads(scenario.baseline_path.read_text())
    entry = doc["top_statements"]["primary"]["statements"][0]
    for name in ("primary", "replica", "third"):  # 3 x 1,000 statements of 2,000 characters: 6 MB
        doc["top_statements"][name] = {
            **doc["top_statements"]["primary"],
            "statements": [{**entry, "queryid": str(i), "query": "x" * TEXT_MAX} for i in range(1000)],
        }
    _fit_statements(doc)
    write_baseline(tmp_path / "big.json", doc, force=False)
    assert (tmp_path / "big.json").stat().st_size <= MAX_BASELINE_BYTES // 2
    back = read_baseline(tmp_path / "big.json")
    kept = {len(snap.statements) for snap in back.top_statements.values()}
    assert len(kept) == 1 and 100 < kept.pop() < 1000
    assert any("statement snapshot cut to" in m for m in back.missing)
