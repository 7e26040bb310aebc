"""The Grafana dashboards: in sync with their generator, driven by the thresholds, linted, and every query
evaluated by a real Prometheus."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.models.dashboard import Dashboard
from test_baseline_gauges import make_doc

from conftest import ddl_lock_queue, monitor_dsn, prometheus_server, wait_for
from migexport.baseline_file import write_baseline
from migexport.checks.result import CheckResult, Report, Status, write_report
from migexport.config import App, Migration, Probe, Thresholds
from migexport.dashboards import DATABASE_UID, FILES, MARKER, MIGRATION_UID, render
from migexport.dsn import Target
from migexport.rulegen import render as render_rules
from migexport.service import Exporter, ServeSettings
from test_cli import migexport_argv, run_cli

ROOT = Path(__file__).parent.parent
DIR = ROOT / "dashboards"

KNOWN_TYPES = {"row", "stat", "timeseries", "table"}
COUNTER = re.compile(r"\b[a-zA-Z_:][\w:]*_(?:total|bucket|count|sum)\b")
# Grafana's variables, as a test evaluating a query outside Grafana replaces them.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$target": ".*",
    "$migration_id": ".*",
    "${datasource}": "",
}

# Which thresholds each dashboard draws (and states in a description): changing one changes exactly these.
USED_BY = {
    "latency_degradation_ratio": {"migration.json"},
    "error_rate_increase_ratio": {"migration.json"},
    "error_ratio_floor": {"migration.json"},
    "latency_floor_seconds": {"migration.json"},
    "probe_latency_floor_seconds": {"migration.json"},
    "replication_lag_rollback_seconds": {"migration.json", "database.json"},
    "replication_lag_watch_seconds": {"migration.json", "database.json"},
    "lock_wait_seconds": {"migration.json", "database.json"},
    "connections_change_ratio": {"migration.json"},
    "connections_floor": {"migration.json"},
    "connections_utilisation_max": {"migration.json", "database.json"},
    # The recording rules' names carry the window (rate5m), and the descriptions say it.
    "rate_window_seconds": {"migration.json", "database.json"},
}


def load(name: str) -> dict[str, Any]:
    return json.loads((DIR / name).read_text())


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in doc["panels"]:
        out.append(panel)
        out.extend(panel.get("panels") or [])
    return out


def queries(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(where, expr, query) for every panel target, variable query and annotation query."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"], t) for p in panels(doc) for t in p.get("targets") or []]
    out += [(f"variable {v['name']}", v["query"], v) for v in doc["templating"]["list"] if v["type"] == "query"]
    out += [(f"annotation {a['name']!r}", a["expr"], a) for a in doc["annotations"].get("list", []) if a.get("expr")]
    return out


def as_promql(expr: str) -> str:
    m = re.fullmatch(r"label_values\((.*), (\w+)\)", expr)
    if m:
        expr = m.group(1)
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def leaves(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in leaves(item, f"{path}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{path}/{i}").items()}
    return {path: value}


@pytest.fixture(scope="module")
def docs() -> dict[str, dict[str, Any]]:
    return {name: load(name) for name in FILES}


def test_the_files_are_the_generators_output():
    assert sorted(p.name for p in DIR.glob("*.json")) == sorted(FILES)
    for name, text in render(Thresholds(), Migration()).items():
        stale = f"dashboards/{name} is stale: run 'migexport dashboards -o dashboards --force'"
        assert (DIR / name).read_text() == text, stale


def test_each_file_says_it_is_generated(docs):
    for name, uid in FILES.items():
        assert docs[name]["uid"] == uid
        assert MARKER in docs[name]["description"]
        assert "do not edit" in docs[name]["description"] and "migexport dashboards" in docs[name]["description"]
    assert {MIGRATION_UID, DATABASE_UID} == set(FILES.values())


def test_the_sdk_reads_them_back(docs):
    """A round trip through the SDK's own model keeps every panel, position and query."""
    for doc in docs.values():
        again = json.loads(json.dumps(Dashboard.from_json(doc).to_json(), default=lambda o: o.to_json()))
        assert again["uid"] == doc["uid"] and again["title"] == doc["title"]
        assert [(p["id"], p["type"], p["title"], p["gridPos"]) for p in panels(again)] == [
            (p["id"], p["type"], p["title"], p["gridPos"]) for p in panels(doc)
        ]
        assert [(w, e) for w, e, _ in queries(again)] == [(w, e) for w, e, _ in queries(doc)]
        for before, after in zip(panels(doc), panels(again), strict=True):
            assert after.get("fieldConfig") == before.get("fieldConfig"), before["title"]
            assert after.get("transformations") == before.get("transformations"), before["title"]


def test_panels_fit_the_grid_without_overlap(docs):
    for name, doc in docs.items():
        cells: dict[tuple[int, int], str] = {}
        for p in panels(doc):
            g = p["gridPos"]
            assert g["x"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, (name, p["title"], g)
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"{name}: {p['title']!r} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = p["title"]


def test_panel_ids_are_unique_and_types_known(docs):
    for name, doc in docs.items():
        ids = [p["id"] for p in panels(doc)]
        assert len(ids) == len(set(ids)), name
        assert {p["type"] for p in panels(doc)} <= KNOWN_TYPES


def test_every_panel_has_a_description_and_a_unit(docs):
    for name, doc in docs.items():
        for p in panels(doc):
            if p["type"] == "row":
                continue
            assert p.get("description", "").strip(), f"{name}: {p['title']!r} has no description"
            assert p["fieldConfig"]["defaults"].get("unit"), f"{name}: {p['title']!r} has no unit"


def test_every_query_uses_the_datasource_variable(docs):
    for name, doc in docs.items():
        variables = {v["name"]: v for v in doc["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert variables["target"]["query"] == "label_values(migexport_up, target)"
        for where, _, query in queries(doc):
            assert query["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, f"{name}: {where}"
        for p in panels(doc):
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "${datasource}", f"{name}: {p['title']!r}"


def test_counters_only_inside_rate_or_increase(docs):
    for name, doc in docs.items():
        for where, expr, _ in queries(doc):
            for m in COUNTER.finditer(expr):
                before = expr[: m.start()]
                assert re.search(r"\b(rate|increase)\(\s*$", before), f"{name}: {where}: bare counter {m.group()}"
                assert re.match(r"\{[^}]*\}\[\$__(rate_interval|range)\]", expr[m.end() :]), (
                    f"{name}: {where}: {m.group()} over a fixed range, not $__rate_interval"
                )


def test_the_lints_catch_a_bad_dashboard(docs):
    """The lints above are not vacuous: each rejects a dashboard broken its way."""
    doc = json.loads(json.dumps(docs["migration.json"]))
    p = next(p for p in panels(doc) if p["type"] == "timeseries")
    p["gridPos"]["x"] = 20
    p["targets"][0]["expr"] = "migexport_xact_commit_total"
    p["targets"][0]["datasource"] = {"type": "prometheus", "uid": "some-uid"}
    del p["description"]
    for lint in (
        test_panels_fit_the_grid_without_overlap,
        test_every_panel_has_a_description_and_a_unit,
        test_every_query_uses_the_datasource_variable,
        test_counters_only_inside_rate_or_increase,
    ):
        with pytest.raises(AssertionError):
            lint({"bad": doc})


def test_the_migration_dashboard_has_its_parts(docs):
    doc = docs["migration.json"]
    exprs = "\n".join(e for _, e, _ in queries(doc))
    for metric in (
        "migexport_migration_in_progress",
        "migexport_migration_failed",
        "migexport_migration_timed_out",
        "migexport_migration_lost",
        "migexport_migration_time_budget_seconds",
        'ALERTS{alertstate="firing", action!=""',
        "migexport:success_criterion:passed",
        "migexport:success_criterion:actual",
        "migexport:success_criterion:target",
        "migexport_lock_waiting_sessions",
        "migexport_lock_wait_max_seconds",
        "migexport_migration_blocked_sessions",
        "migexport_lock_root_blocked_sessions",
        "migexport_lock_root_transaction_seconds",
        "migexport_replication_lag_seconds",
        "migexport_replication_lag_bytes",
        "migexport_standby_replay_lag_seconds",
        "migexport_standby_replay_lag_bytes",
        "migexport:connections:sum",
        "migexport_baseline_connections",
        "migexport_connections_max",
        "migexport:error_ratio:rate5m",
        "migexport_baseline_error_ratio",
        "migexport:statement_latency_seconds:rate5m",
        "migexport_baseline_statement_latency_seconds",
        "migexport:probe_latency_seconds:p95_rate5m",
        "migexport_probe_success",
        "migexport_app_health_up",
        "migexport_migration_start_timestamp_seconds",
        "migexport_migration_end_timestamp_seconds",
        "migexport_preflight_check",
        "migexport_verify_check",
    ):
        assert metric in exprs, metric
    criteria = next(p for p in panels(doc) if p["title"] == "Success criteria")
    result = next(o for o in criteria["fieldConfig"]["overrides"] if o["matcher"]["options"] == "result")
    mappings = next(prop["value"] for prop in result["properties"] if prop["id"] == "mappings")
    assert mappings[0]["options"]["1"]["text"] == "PASS" and mappings[0]["options"]["1"]["color"] == "green"
    assert mappings[0]["options"]["0"]["text"] == "FAIL" and mappings[0]["options"]["0"]["color"] == "red"
    assert mappings[1]["options"]["match"] == "null+nan" and mappings[1]["options"]["result"]["text"] == "NO DATA"
    assert {a["name"] for a in doc["annotations"]["list"]} == {"Migration start", "Migration end"}
    for title in ("Last preflight", "Last verify"):
        checks = next(p for p in panels(doc) if p["title"] == title)
        result = next(o for o in checks["fieldConfig"]["overrides"] if o["matcher"]["options"] == "result")
        mapping = next(prop["value"] for prop in result["properties"] if prop["id"] == "mappings")[0]["options"]
        assert {v: (m["text"], m["color"]) for v, m in mapping.items()} == {
            "1": ("PASS", "green"),
            "0": ("FAIL", "red"),
            "-1": ("WARN", "orange"),
        }


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Thresholds)])
def test_a_threshold_changes_exactly_its_numbers(field):
    """Render with one threshold changed: the files that draw it change, in values that carry the new number."""
    default = getattr(Thresholds(), field)
    new = default * 2 + 7
    before = render(Thresholds(), Migration())
    after = render(dataclasses.replace(Thresholds(), **{field: new}), Migration())
    changed = {name for name in before if before[name] != after[name]}
    assert changed == USED_BY.get(field, set()), field
    numbers = {f"{new:g}", f"{new:g}s", f"{int(new // 60)}m" if new % 60 == 0 else "-"}
    if field == "rate_window_seconds":
        numbers = {f"rate{int(new)}s", f"{int(new)}s"}
    for name in changed:
        old, now = leaves(json.loads(before[name])), leaves(json.loads(after[name]))
        assert old.keys() == now.keys()
        for path in (p for p in old if old[p] != now[p]):
            if isinstance(now[path], float | int):
                assert now[path] == new, (field, path)
            else:
                assert any(n in now[path] for n in numbers), (field, path, now[path])


@pytest.mark.parametrize(
    ("field", "numbers"), [("time_budget_seconds", {3600, 2880}), ("watch_window_seconds", {"7200", "2h"})]
)
def test_the_migrations_budget_and_watch_window_change_only_their_numbers(field, numbers):
    new = 7200 if field == "watch_window_seconds" else 3600
    before = render(Thresholds(), Migration())
    after = render(Thresholds(), dataclasses.replace(Migration(), **{field: new}))
    assert before["database.json"] == after["database.json"]
    old, now = leaves(json.loads(before["migration.json"])), leaves(json.loads(after["migration.json"]))
    differing = [p for p in old if old[p] != now[p]]
    assert differing
    for path in differing:
        value = now[path]
        assert value in numbers if isinstance(value, float | int) else any(str(n) in value for n in numbers), path


def test_the_command_writes_both_files_and_refuses_to_overwrite(tmp_path: Path):
    config = tmp_path / "migexport.yml"
    config.write_text(
        "targets: {primary: 'host=db'}\n"
        "migration: {watch_window: 2h}\n"
        "thresholds: {replication_lag_rollback: 5m, lock_wait: 3s, latency_degradation_ratio: 2}\n"
    )
    out = tmp_path / "out"
    proc = run_cli("dashboards", "-c", str(config), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    migration = json.loads((out / "migration.json").read_text())
    exprs = "\n".join(e for _, e, _ in queries(migration))
    assert "* 2" in exprs and "+ 7200 - time()" in exprs
    lag = next(p for p in panels(migration) if p["title"] == "Replication lag (time)")
    assert [s["value"] for s in lag["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 30, 300]
    wait = next(p for p in panels(migration) if p["title"] == "Longest lock wait")
    assert [s["value"] for s in wait["fieldConfig"]["defaults"]["thresholds"]["steps"]] == [None, 3]
    again = run_cli("dashboards", "-c", str(config), "-o", str(out))
    assert again.returncode != 0 and "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert run_cli("dashboards", "-c", str(config), "-o", str(out), "--force").returncode == 0


def evaluate(url: str, expr: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(
            url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10
        ) as resp:
            assert resp.status == 200
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        pytest.fail(f"{expr}\n→ HTTP {exc.code}: {exc.read().decode()}")


def test_every_query_parses_in_prometheus(docs, tmp_path: Path):
    with prometheus_server(tmp_path) as prom:
        for name, doc in docs.items():
            for where, expr, _ in queries(doc):
                body = evaluate(prom.url, as_promql(expr))
                assert body["status"] == "success", f"{name}: {where}: {body}"


# --- every query against a Prometheus that scraped a real exporter during an induced migration -----------

LIVE_ID = "dash"
# Short and low where it helps a condition show within the test (an alert firing, the lag lines), so the
# dashboards are rendered from these too: the queries are the committed ones with other numbers.
LIVE_THRESHOLDS = Thresholds(
    lock_wait_seconds=1,
    blocking_seconds=1,
    replication_lag_watch_seconds=1,
    alert_for_seconds=1,
    critical_for_seconds=1,
)
# Queries that may return nothing here, with the condition the test did not induce: (file, where) → why.
# Empty: the test induces every condition a query needs (a running then finished migration, a lock queue
# behind the migration's ALTER, paused replay, rollbacks, a probe, an unreachable health URL, a baseline
# with a probe, an alert firing, a checks file with a preflight and a verify). A deadlock is not induced,
# but increase() of an unmoved counter is 0.
NOT_INDUCED: dict[tuple[str, str], str] = {}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def live_baseline(path: Path) -> None:
    doc = make_doc()
    doc["migration_id"] = LIVE_ID
    doc["probes"] = {"one": {**doc["probes"]["recent_orders"], "target": "primary"}}
    write_baseline(path, doc, force=True)


def live_checks(path: Path) -> None:
    """The last preflight and verify of the live migration, as `migexport preflight` and `verify` write them."""
    write_report(path, Report("preflight", [CheckResult("pitr", Status.PASS, "on", "on")], migration_id=LIVE_ID))
    verify = [CheckResult("invalid_indexes", Status.PASS, "none", "none", "", "dash_t")]
    write_report(path, Report("verify", verify, LIVE_ID, integrity_passed=1, integrity_total=1))


def snapshot(url: str, docs: dict[str, dict[str, Any]]) -> dict[tuple[str, str], int]:
    """(file, where) → how many series the query returns now."""
    out = {}
    for name, doc in docs.items():
        for where, expr, _ in queries(doc):
            body = evaluate(url, as_promql(expr))
            assert body["status"] == "success", f"{name}: {where}: {body}"
            out[(name, where)] = len(body["data"]["result"])
    return out


def test_every_query_returns_data_from_a_live_exporter(pg, tmp_path: Path):
    migration = Migration(id=LIVE_ID, session_application_name="migration", watch_window_seconds=3600)
    docs = {name: json.loads(text) for name, text in render(LIVE_THRESHOLDS, migration).items()}
    rules = tmp_path / "rules.yml"
    rules.write_text(render_rules(LIVE_THRESHOLDS, watch_window_seconds=migration.watch_window_seconds))
    live_baseline(tmp_path / "baseline.json")
    live_checks(tmp_path / "checks.json")
    exporter = Exporter(
        ServeSettings(
            targets=[Target("primary", monitor_dsn(pg.primary)), Target("replica1", monitor_dsn(pg.replicas[0]))],
            host="127.0.0.1",
            port=0,
            migration=migration,
            state_path=tmp_path / "state.json",
            baseline_path=tmp_path / "baseline.json",
            checks_path=tmp_path / "checks.json",
            probes=(Probe("one", "SELECT 1", "primary", interval_seconds=0.5),),
            apps=(App("web", f"http://127.0.0.1:{closed_port()}/healthz", interval_seconds=0.5, timeout_seconds=1),),
        )
    ).start()
    prom_config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {"job_name": "migexport", "static_configs": [{"targets": [exporter.url.removeprefix("http://")]}]}
        ],
    }
    run = [*migexport_argv(), "run", "--id", LIVE_ID, "--log-file", str(tmp_path / "migration.log")]
    run += ["--state-file", str(tmp_path / "state.json"), "--"]
    seen: dict[tuple[str, str], int] = {}
    try:
        with prometheus_server(tmp_path, yaml.safe_dump(prom_config)) as prom, pg.primary.connect() as app:
            app.execute("CREATE TABLE IF NOT EXISTS dash_writes (i int)")

            def workload(n: int = 20) -> None:
                for i in range(n):
                    app.execute("INSERT INTO dash_writes VALUES (%s)", (i,))
                app.execute("BEGIN")
                app.execute("SELECT 1")
                app.execute("ROLLBACK")

            wait_for(lambda: prom.query('migexport_up{target="replica1"} == 1') != [], timeout=30, what="a scrape")
            migration_run = subprocess.Popen([*run, "sleep", "25"], stdout=subprocess.DEVNULL)
            try:
                wait_for(lambda: prom.query("migexport_migration_in_progress == 1") != [], timeout=15)
                with ddl_lock_queue(pg.primary, "dash_t", alter_app="migration"), pg.replicas[0].connect() as replica:
                    replica.execute("SELECT pg_wal_replay_pause()")
                    try:
                        deadline = time.monotonic() + 12
                        while time.monotonic() < deadline:
                            workload()
                            time.sleep(0.5)
                        wait_for(lambda: prom.query('ALERTS{alertstate="firing"}') != [], timeout=20)
                        for key, n in snapshot(prom.url, docs).items():
                            seen[key] = max(seen.get(key, 0), n)
                    finally:
                        replica.execute("SELECT pg_wal_replay_resume()")
            finally:
                assert migration_run.wait(timeout=40) == 0
            wait_for(lambda: prom.query("migexport_migration_end_timestamp_seconds") != [], timeout=15)
            workload()
            time.sleep(3)
            for key, n in snapshot(prom.url, docs).items():
                seen[key] = max(seen.get(key, 0), n)
    finally:
        exporter.stop()
    if os.environ.get("MIGEXPORT_DASHBOARD_REPORT"):  # each query and how many series it returned
        exprs = {(name, where): expr for name, doc in docs.items() for where, expr, _ in queries(doc)}
        report = [{"file": f, "where": w, "series": n, "expr": exprs[(f, w)]} for (f, w), n in sorted(seen.items())]
        Path(os.environ["MIGEXPORT_DASHBOARD_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    empty = {key for key, n in seen.items() if n == 0}
    expected = set(NOT_INDUCED)
    assert empty == expected, f"queries without data: {sorted(empty)}"
