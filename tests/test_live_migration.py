"""Trustworthy pages (issue 8): real migrations against a real application, paged through the real stack.

An OLTP application (tests/live_app.py: 4 workers at 30 tx/s each on the test primary, 3 % business
rollbacks, a replica reader, a health URL) runs in a database of its own (`migexport_live`). The stack is
what a user runs: a `migexport.yml` for the primary and the replica (the exporter connects as the
`migexport_monitor` role), `migexport rules` rendered from it with short test thresholds, `migexport
serve`, a real Prometheus (scrape and evaluation every 1 s) and a real Alertmanager with the shipped
routing (webhooks recorded here), then `migexport baseline --duration 30s` while the application runs.

The tests share that setup and run in file order, one scenario each; each starts only when the previous
migration's watch window has closed and the rate window no longer holds the previous disturbance:

    setup       ~50 s   database + 200k orders, app, serve/Prometheus/Alertmanager, 30 s baseline
    at rest      30 s   nothing armed, nothing fires; live/baseline ratios sampled every second
    (a)         ~35 s   `ALTER TABLE app_orders ADD COLUMN note text`: nothing at all in ALERTS, nothing
                        delivered, over its whole watch window (30 s after its end)
    (b)         ~38 s   `sleep 3`: the same
    (c)         ~17 s   `run --id other --watch-window 15s -- false`: MigrationFailed{migration_id="other"} on /page
    (d)         ~17 s   `run --id second --watch-window 15s -- false` in the same `serve` lifetime:
                        MigrationFailed{migration_id="second"} on /page
    (e)         ~35 s   `DROP INDEX app_orders_customer_idx` (the app's key query): MigrationLatencyDegraded
                        delivered; the index is restored once both its series (the app's statements on the
                        primary, the key-query probe) paged, or 10 s after the first page, or at the window's end
    (f)         ~35 s   `ADD CONSTRAINT amount_positive CHECK (amount > 0) NOT VALID`, which ~8 % of the app's
                        writes violate: MigrationErrorRateIncreased delivered; the constraint is dropped after
    (g)         ~35 s   a migration runs, then replay is paused on the replica while the app writes: the lag
                        alerts from both ends, and no latency or error alert over the window
    (h)         ~20 s   `run --time-limit 3s -- sleep 60`: killed at its limit, MigrationFailed paged

The success-criteria table is read for each: (a) and (b) just before their watch windows close, every
row PASS and data integrity NO DATA; (c) and (d) rollback required FAIL, duration PASS (a command that
fails at once is within budget); (e) response time change FAIL while the index is missing; (f) error
rate change FAIL; (h) duration and rollback required FAIL.

Measured per scenario: the time from onset (the migration's start from the state file; the pause for (g))
to the delivered notification, and every alert Prometheus showed (pending or firing) with its time. The
summary is printed at the end (`pytest -s`) and written as JSON to $MIGEXPORT_LIVE_REPORT when set.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import live_app
import psycopg
import pytest
import yaml

from conftest import (
    MONITOR_ROLE,
    PrometheusServer,
    WebhookRecorder,
    alertmanager_server,
    monitor_dsn,
    prometheus_server,
    quick_alertmanager_config,
    running,
    wait_for,
    webhook_recorder,
)
from migexport import localpg
from test_cli import migexport_argv

DATABASE = "migexport_live"
MIGRATION_ID = "live"
RATE_WINDOW = 20.0
ALERT_FOR = 5.0
CRITICAL_FOR = 3.0
WATCH_WINDOW = 30.0
FAILED_WATCH_WINDOW = 15.0
BASELINE_SECONDS = 30
AT_REST_SECONDS = 30
LATENCY_FLOOR = 0.001  # the default latency_floor: the rules compare with max(baseline, this)
PROBE = "customer_orders"
PROBE_SQL = f"SELECT id, status, amount, created_at FROM {live_app.TABLE} WHERE customer = 4242"
EXTRA_WAIT = 10.0  # after a first page, how long a harmful scenario waits for the alert's other series
EPISODE_GAP = 1.2  # polls are 0.5 s apart: an alert missing from one evaluation (1 s) starts a new episode
LATENCY_OR_ERROR = {"MigrationLatencyDegraded", "MigrationErrorRateIncreased"}

THRESHOLDS = {
    "rate_window": "20s",
    "alert_for": "5s",
    "critical_for": "3s",
    "lock_wait": "5s",
    "blocking": "5s",
    "replication_lag_watch": "3s",
    "latency_degradation_ratio": 1.5,  # the checklist's
    "error_rate_increase_ratio": 1.1,  # the checklist's
    "significance_sigmas": 3,
}


# -- what the stack did, with times ------------------------------------------------------------------


def _labels(metric: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metric.items() if k not in ("__name__", "job", "instance")}


class Timeline:
    """Every alert Prometheus shows (polled every 0.5 s) and every webhook delivery (stamped on arrival,
    within 0.1 s), in wall-clock time."""

    def __init__(self, prom: PrometheusServer, webhook: WebhookRecorder) -> None:
        self.prom = prom
        self.webhook = webhook
        # Per label set (alertstate included), its episodes: seen continuously from "first" to "last".
        self.alerts: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        self.deliveries: list[dict[str, Any]] = []
        self._seen_posts = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="live-timeline", daemon=True)

    def start(self) -> Timeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(0.1):
            self._stamp_posts()
            tick += 1
            if tick % 5 == 0:
                with contextlib.suppress(Exception):
                    self._note_alerts(self.prom.query("ALERTS"), time.time())

    def _stamp_posts(self) -> None:
        with self.webhook.lock:
            new = self.webhook.posts[self._seen_posts :]
            self._seen_posts += len(new)
        now = time.time()
        with self._lock:
            for path, body in new:
                for alert in body.get("alerts", []):
                    self.deliveries.append(
                        {
                            "at": now,
                            "path": path,
                            "status": alert.get("status"),
                            "labels": alert.get("labels", {}),
                            "description": alert.get("annotations", {}).get("description", ""),
                        }
                    )

    def _note_alerts(self, result: list[dict], now: float) -> None:
        with self._lock:
            for series in result:
                labels = _labels(series["metric"])
                episodes = self.alerts.setdefault(tuple(sorted(labels.items())), [])
                if episodes and now - episodes[-1]["last"] < EPISODE_GAP:
                    episodes[-1]["last"] = now
                else:
                    episodes.append({"labels": labels, "first": now, "last": now})

    def alerts_between(self, start: float, end: float, names: set[str] | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                dict(a)
                for episodes in self.alerts.values()
                for a in episodes
                if a["last"] >= start and a["first"] <= end and (names is None or a["labels"]["alertname"] in names)
            ]

    def delivered(
        self, start: float, end: float = float("inf"), alertname: str | None = None, path: str | None = None
    ) -> list[dict[str, Any]]:
        self._stamp_posts()
        with self._lock:
            return [
                d
                for d in self.deliveries
                if start <= d["at"] <= end
                and d["status"] == "firing"
                and alertname in (None, d["labels"].get("alertname"))
                and path in (None, d["path"])
            ]


def _describe(alerts: list[dict[str, Any]], onset: float) -> list[dict[str, Any]]:
    """Alerts as the report shows them: name, state, the labels that matter, seconds from onset."""
    out = []
    for a in sorted(alerts, key=lambda a: a["first"]):
        labels = a["labels"]
        out.append(
            {
                "alertname": labels.get("alertname"),
                "state": labels.get("alertstate"),
                "labels": {
                    k: v
                    for k, v in labels.items()
                    if k not in ("alertname", "alertstate", "severity", "action") and v != ""
                },
                "first_s": round(a["first"] - onset, 1),
                "last_s": round(a["last"] - onset, 1),
            }
        )
    return out


def _describe_deliveries(deliveries: list[dict[str, Any]], onset: float) -> list[dict[str, Any]]:
    return [
        {
            "alertname": d["labels"].get("alertname"),
            "path": d["path"],
            "labels": {
                k: v for k, v in d["labels"].items() if k not in ("alertname", "severity", "action", "job", "instance")
            },
            "at_s": round(d["at"] - onset, 1),
            "description": d["description"],
        }
        for d in deliveries
    ]


# -- the stack -------------------------------------------------------------------------------------


@dataclass
class Run:
    rc: int
    started: float  # from the state file `run` wrote
    ended: float
    watch_window: float
    output: str


@dataclass
class Live:
    pg: Any
    tmp: Path
    cfg: Path
    app: live_app.LiveApp
    prom: PrometheusServer
    timeline: Timeline
    records: dict[str, str]
    psql: list[str]
    migration_env: dict[str, str]
    report: dict[str, Any] = field(default_factory=dict)
    last_run_end: float = 0.0
    last_watch_window: float = 0.0
    last_disturbance: float = 0.0

    def primary(self) -> psycopg.Connection:
        return self.pg.primary.connect(dbname=DATABASE, application_name="test-restore")

    def migrate(
        self,
        *command: str,
        migration_id: str | None = None,
        watch_window: float | None = None,
        time_limit: float | None = None,
    ) -> Run:
        # The preflight (these clusters do not archive WAL: PITR is a no-go) and verify have tests of their
        # own; here `run` is what the alerts watch.
        argv = [*migexport_argv(), "run", "-c", str(self.cfg), "--skip-preflight", "--no-verify"]
        if migration_id:
            argv += ["--id", migration_id]
        if watch_window:
            argv += ["--watch-window", f"{watch_window:g}s"]
        if time_limit:
            argv += ["--time-limit", f"{time_limit:g}s"]
        proc = subprocess.run(
            [*argv, "--", *command],
            env=self.migration_env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        state = json.loads((self.tmp / "state.json").read_text())
        run = Run(
            proc.returncode,
            state["started_at"],
            state["ended_at"] or time.time(),
            watch_window or WATCH_WINDOW,
            proc.stdout + proc.stderr,
        )
        self.last_run_end, self.last_watch_window = run.ended, run.watch_window
        return run

    def criteria(self, migration_id: str = MIGRATION_ID) -> dict[str, dict[str, float]]:
        """The success-criteria table as Prometheus has it now: {criterion: {target, actual, passed}}."""
        table: dict[str, dict[str, float]] = {}
        for which in ("target", "actual", "passed"):
            for r in self.prom.query(f'migexport:success_criterion:{which}{{migration_id="{migration_id}"}}'):
                table.setdefault(r["metric"]["criterion"], {})[which] = float(r["value"][1])
        return table

    def sql(self, statement: str) -> list[str]:
        return [*self.psql, "-c", statement]

    def settle(self) -> dict[str, Any]:
        """Wait until the previous migration's watch window has closed, the rate window no longer holds
        the previous disturbance, and Prometheus shows no alert (at most 20 s for the last)."""
        ready = max(self.last_run_end + self.last_watch_window + 2, self.last_disturbance + RATE_WINDOW + 2)
        time.sleep(max(0.0, ready - time.time()))
        leftover: list[dict] = []
        deadline = time.time() + 20
        while time.time() < deadline:
            leftover = self.prom.query("ALERTS") + self.prom.query("migexport_migration_watch_active == 1")
            if not leftover:
                break
            time.sleep(1)
        return {"leftover_at_start": [_labels(s["metric"]) for s in leftover]}

    def scenario(self, name: str, **values: Any) -> dict[str, Any]:
        entry = self.report.setdefault("scenarios", {}).setdefault(name, {})
        entry.update(values)
        return entry


def _create_database(pg: localpg.LocalSetup) -> None:
    with pg.primary.connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {DATABASE}")
    with pg.primary.connect(dbname=DATABASE) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


def _grant_and_wait_for_replica(pg: localpg.LocalSetup) -> None:
    with pg.primary.connect(dbname=DATABASE) as conn:
        # pg_monitor reads statistics, not application tables: the key-query probe needs this.
        conn.execute(f"GRANT SELECT ON {live_app.TABLE} TO {MONITOR_ROLE}")

    def replica_has_table() -> bool:
        try:
            with pg.replicas[0].connect(dbname=DATABASE) as conn:
                return conn.execute(f"SELECT count(*) FROM {live_app.TABLE}").fetchone()[0] > 0
        except psycopg.Error:
            return False

    wait_for(replica_has_table, timeout=60, what="the replica to replay the application's table")


def _write_config(pg: localpg.LocalSetup, tmp: Path, port: int, health_url: str) -> Path:
    config = {
        "targets": {
            "primary": {"dsn": monitor_dsn(pg.primary, DATABASE)},
            "replica1": {"dsn": monitor_dsn(pg.replicas[0], DATABASE)},
        },
        "listen": f"127.0.0.1:{port}",
        "baseline_file": "baseline.json",
        "migration": {
            "id": MIGRATION_ID,
            "target": "primary",
            "affected_tables": [live_app.TABLE],
            "time_budget": "2m",
            "watch_window": f"{WATCH_WINDOW:g}s",
            "session_application_name": "migration",
            "log_file": "migration.log",
            "state_file": "state.json",
        },
        "thresholds": THRESHOLDS,
        "probes": [{"name": PROBE, "target": "primary", "sql": PROBE_SQL, "interval": "1s", "timeout": "2s"}],
        "apps": [{"name": "shop", "url": health_url, "interval": "1s", "timeout": "1s"}],
    }
    path = tmp / "migexport.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*migexport_argv(), *args], capture_output=True, text=True, timeout=timeout, check=False)


def _recording_rules(rules: Path) -> dict[str, str]:
    """The names of the recording rules the relative alerts compare, read from the rendered file:
    `<family>:rate<window>` (`p95_rate<window>` for the probe), and the z-scores where the rules have them."""
    doc = yaml.safe_load(rules.read_text())
    names = [r["record"] for g in doc["groups"] for r in g["rules"] if "record" in r]

    def find(family: str, kind: str) -> str | None:
        found = sorted(n for n in names if re.fullmatch(re.escape(family) + ":" + kind + r"rate\d+(ms|s|m|h)", n))
        assert len(found) <= 1, f"more than one {family}:{kind}rate* recording rule in {rules}: {found}"
        return found[0] if found else None

    out = {
        "statement_latency": find("migexport:statement_latency_seconds", ""),
        "error_ratio": find("migexport:error_ratio", ""),
        "probe_p95": find("migexport:probe_latency_seconds", "p95_"),
        "statement_latency_zscore": find("migexport:statement_latency_seconds", "zscore_"),
        "error_ratio_zscore": find("migexport:error_ratio", "zscore_"),
    }
    for required in ("statement_latency", "error_ratio", "probe_p95"):
        assert out[required], f"no {required} recording rule in {rules}: {names}"
    return {k: v for k, v in out.items() if v}


def _psql() -> str:
    for candidate in (localpg.find_bindir() / "psql", Path("/usr/lib/postgresql/15/bin/psql"), Path("/usr/bin/psql")):
        if candidate.exists():
            return str(candidate)
    pytest.fail("psql is needed for this test: apt-get install -y postgresql-client", pytrace=False)


@pytest.fixture(scope="module")
def live(pg, tmp_path_factory) -> Iterator[Live]:
    module_started = time.time()
    tmp = tmp_path_factory.mktemp("live")
    _create_database(pg)
    t = time.perf_counter()
    live_app.create_schema(pg.primary.dsn(dbname=DATABASE))
    fill_seconds = time.perf_counter() - t
    _grant_and_wait_for_replica(pg)
    port = localpg.free_port()
    with contextlib.ExitStack() as stack:
        app = stack.enter_context(
            live_app.LiveApp(pg.primary.dsn(dbname=DATABASE), pg.replicas[0].dsn(dbname=DATABASE), max_seconds=900)
        )
        cfg = _write_config(pg, tmp, port, app.health_url)
        rendered = _cli("rules", "-c", str(cfg), "-o", str(tmp / "rules.yml"))
        assert rendered.returncode == 0, rendered.stderr
        records = _recording_rules(tmp / "rules.yml")
        url = f"http://127.0.0.1:{port}"
        stack.enter_context(
            running([*migexport_argv(), "serve", "-c", str(cfg)], tmp / "serve.log", url + "/", "migexport serve")
        )
        webhook = stack.enter_context(webhook_recorder())
        am_url = stack.enter_context(alertmanager_server(tmp, quick_alertmanager_config(tmp, webhook.url)))
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp / "rules.yml")],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am_url.removeprefix("http://")]}]}]},
            "scrape_configs": [{"job_name": "migexport", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        }
        prom = stack.enter_context(prometheus_server(tmp, yaml.safe_dump(prom_config)))
        timeline = Timeline(prom, webhook).start()
        stack.callback(timeline.stop)
        wait_for(
            lambda: (
                len(prom.query("migexport_up == 1")) == 2
                and prom.query(f'migexport_probe_success{{probe="{PROBE}"}} == 1') != []
                and prom.query('migexport_app_health_up{app="shop"} == 1') != []
            ),
            timeout=30,
            what="Prometheus to scrape both targets, the probe and the app's health",
        )

        # The baseline, captured while the application runs (and the exporter watches, as it will later).
        before = app.stats()
        t = time.perf_counter()
        captured = _cli("baseline", "-c", str(cfg), "--duration", f"{BASELINE_SECONDS}s", timeout=BASELINE_SECONDS + 60)
        baseline_seconds = time.perf_counter() - t
        assert captured.returncode == 0, captured.stdout + captured.stderr
        baseline_doc = json.loads((tmp / "baseline.json").read_text())
        wait_for(
            lambda: prom.query("migexport_baseline_loaded == 1") != [], timeout=15, what="serve to load the baseline"
        )

        psql = [_psql(), "-X", "-q", "-v", "ON_ERROR_STOP=1"]
        migration_env = {
            **os.environ,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(pg.primary.port),
            "PGUSER": "postgres",
            "PGDATABASE": DATABASE,
            "PGAPPNAME": "migration",
            "PGCONNECT_TIMEOUT": "10",
        }
        live = Live(pg, tmp, cfg, app, prom, timeline, records, psql, migration_env)
        live.report.update(
            {
                "thresholds": THRESHOLDS,
                "watch_window_s": WATCH_WINDOW,
                "recording_rules": records,
                "fill_seconds": round(fill_seconds, 1),
                "baseline_command_seconds": round(baseline_seconds, 1),
                "baseline": {
                    "window_seconds": baseline_doc.get("window_seconds"),
                    "targets": {
                        name: {
                            k: t.get(k)
                            for k in ("tps", "error_ratio", "statement_latency_seconds", "connections", "commits")
                        }
                        for name, t in baseline_doc.get("targets", {}).items()
                    },
                    "probes": baseline_doc.get("probes"),
                    "missing": baseline_doc.get("missing"),
                    "app_during_baseline": app.stats().since(before),
                },
                "files": {"dir": str(tmp), "serve_log": str(tmp / "serve.log")},
            }
        )
        try:
            yield live
        finally:
            live.report["app_total"] = app.stats().since(live_app.AppStats())
            live.report["all_alerts"] = _describe(timeline.alerts_between(0, float("inf")), module_started)
            live.report["module_seconds"] = round(time.time() - module_started, 1)
            _publish(live.report)
    with pg.primary.connect() as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def _publish(report: dict[str, Any]) -> None:
    """Print the summary (seen with `pytest -s`) and write the whole report to $MIGEXPORT_LIVE_REPORT."""
    print("\n=== live migration report ===")
    at_rest = report.get("at_rest", {})
    print(f"at rest ({at_rest.get('samples')} samples, 1/s), min..max:")
    for name, per_key in at_rest.get("ratios", {}).items():
        values = ", ".join(f"{key} {v['min']:.4g}..{v['max']:.4g}" for key, v in per_key.items())
        print(f"  {name}: {values}")
    for name, s in report.get("scenarios", {}).items():
        delivered = [
            (d["alertname"], d["path"], d["labels"].get("probe") or d["labels"].get("target"), d["at_s"])
            for d in s.get("delivered", [])
        ]
        alerts = [(a["alertname"], a["state"], a["first_s"]) for a in s.get("alerts", [])]
        page = s.get("onset_to_page_by_series_s") or s.get("onset_to_page_s")
        print(f"{name}: expected {s.get('expected')}")
        print(f"  onset -> page: {page} s; delivered (alert, path, series, s): {delivered}")
        print(f"  in Prometheus (alert, state, first s): {alerts}")
    print(f"module: {report.get('module_seconds')} s")
    out = os.environ.get("MIGEXPORT_LIVE_REPORT")
    if out:
        Path(out).write_text(json.dumps(report, indent=2, default=str) + "\n")


# -- at rest ---------------------------------------------------------------------------------------


def _by(result: list[dict], *keys: str) -> dict[tuple[str, ...], float]:
    return {tuple(r["metric"].get(k, "") for k in keys): float(r["value"][1]) for r in result}


def _sample_ratios(live: Live) -> dict[str, dict[tuple[str, ...], float]]:
    q = live.prom.query
    out: dict[str, dict[tuple[str, ...], float]] = {}
    pairs = {
        "statement_latency": (
            live.records["statement_latency"],
            "migexport_baseline_statement_latency_seconds",
            ("target",),
            LATENCY_FLOOR,
        ),
        "error_ratio": (live.records["error_ratio"], "migexport_baseline_error_ratio", ("target",), 0.0),
        "probe_p95": (
            live.records["probe_p95"],
            'migexport_baseline_probe_latency_seconds{quantile="0.95"}',
            ("target", "probe"),
            LATENCY_FLOOR,
        ),
    }
    for name in ("statement_latency_zscore", "error_ratio_zscore"):
        if name in live.records:
            out[name] = _by(q(live.records[name]), "target")
    for name, (live_expr, baseline_expr, keys, floor) in pairs.items():
        now, base = _by(q(live_expr), *keys), _by(q(baseline_expr), *keys)
        for key, value in now.items():
            if key in base:
                out.setdefault(f"{name}/live", {})[key] = value
                out.setdefault(f"{name}/baseline", {})[key] = base[key]
                if base[key] > 0:
                    out.setdefault(f"{name}/ratio", {})[key] = value / base[key]
                if floor:
                    out.setdefault(f"{name}/ratio_to_floored_baseline", {})[key] = value / max(base[key], floor)
    return out


def test_at_rest_nothing_fires_and_the_ratios_the_rules_use(live: Live):
    """Before any migration, with the application running: nothing is armed, nothing fires; the live
    values the relative alerts compare, divided by their baselines, sampled every second."""
    start = time.time()
    samples: list[dict[str, dict[tuple[str, ...], float]]] = []
    before = live.app.stats()
    while time.time() < start + AT_REST_SECONDS:
        tick = time.time()
        with contextlib.suppress(Exception):
            samples.append(_sample_ratios(live))
        time.sleep(max(0.0, tick + 1 - time.time()))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for sample in samples:
        for name, values in sample.items():
            for key, v in values.items():
                entry = summary.setdefault(name, {}).setdefault("/".join(key), {"min": v, "max": v, "n": 0})
                entry["min"], entry["max"] = min(entry["min"], v), max(entry["max"], v)
                entry["n"] += 1
    live.report["at_rest"] = {
        "seconds": AT_REST_SECONDS,
        "samples": len(samples),
        "ratios": summary,
        "app": live.app.stats().since(before),
    }
    # Where the live probe runs fell, to compare with the baseline's buckets (report.baseline.probes).
    with contextlib.suppress(Exception):
        buckets = live.prom.query(
            f'sum by (le) (increase(migexport_probe_duration_seconds_bucket{{probe="{PROBE}"}}[{AT_REST_SECONDS}s]))'
        )
        live.report["at_rest"]["probe_buckets_live_cumulative"] = {
            r["metric"]["le"]: round(float(r["value"][1]), 1)
            for r in sorted(buckets, key=lambda r: float(r["metric"]["le"]))
        }
    assert summary, "no live/baseline ratio could be computed at rest (recording rules or baseline gauges missing)"
    alerts = live.timeline.alerts_between(start, time.time())
    assert alerts == [], f"alerts at rest, before any migration: {_describe(alerts, start)}"
    assert live.timeline.delivered(start) == []


# -- scenarios that must page nothing --------------------------------------------------------------


def _expect_nothing(live: Live, name: str, *command: str) -> None:
    pre = live.settle()
    before = live.app.stats()
    run = live.migrate(*command)
    # The success criteria are judged over the watch window (a range of its length): read them just
    # before it closes, when that range holds the migration and everything after it.
    time.sleep(max(0.0, run.ended + run.watch_window - 2 - time.time()))
    criteria = live.criteria()
    end = run.ended + run.watch_window + 3  # the whole watch window, and a delivery that was on its way
    time.sleep(max(0.0, end - time.time()))
    alerts = live.timeline.alerts_between(run.started, end)
    delivered = live.timeline.delivered(run.started, end)
    live.scenario(
        name,
        expected="nothing in ALERTS, nothing delivered",
        command=list(command),
        rc=run.rc,
        migration_s=round(run.ended - run.started, 2),
        alerts=_describe(alerts, run.started),
        delivered=_describe_deliveries(delivered, run.started),
        app=live.app.stats().since(before),
        success_criteria=criteria,
        **pre,
    )
    assert run.rc == 0, run.output
    assert alerts == [], (
        f"{name}: alerts during its watch window (seconds from start): {_describe(alerts, run.started)}"
    )
    assert delivered == [], f"{name}: notifications: {_describe_deliveries(delivered, run.started)}"
    _assert_criteria(name, criteria, passed=CLEAN_CRITERIA)


# A clean migration's table: every row PASS but data integrity, which has a target and no value until
# a verification feeds it (NO DATA on the dashboard, not FAIL).
CLEAN_CRITERIA = {"duration": 1, "error_rate_change": 1, "response_time_change": 1, "rollback_required": 1}


def _assert_criteria(name: str, criteria: dict[str, dict[str, float]], passed: dict[str, float]) -> None:
    """`passed` holds the expected passed value of some rows; every row has its target; data integrity has
    no actual and no passed value (no verification ran)."""
    got = {c: v.get("passed") for c, v in criteria.items() if c in passed}
    assert got == passed, f"{name}: success criteria {criteria}"
    assert {c for c, v in criteria.items() if "target" in v} == {*CLEAN_CRITERIA, "data_integrity"}, criteria
    assert criteria["data_integrity"] == {"target": 1.0}, f"{name}: data integrity must read NO DATA: {criteria}"


def test_a_benign_add_column_pages_nothing(live: Live):
    _expect_nothing(live, "a_add_column", *live.sql(f"ALTER TABLE {live_app.TABLE} ADD COLUMN note text"))


def test_b_a_command_that_only_sleeps_pages_nothing(live: Live):
    _expect_nothing(live, "b_sleep", "sleep", "3")


# -- scenarios that must page ----------------------------------------------------------------------


def _wait_delivery(
    live: Live, since: float, deadline: float, alertname: str, path: str, **labels: str
) -> dict[str, Any] | None:
    def match() -> dict[str, Any] | None:
        for d in live.timeline.delivered(since, alertname=alertname, path=path):
            if all(d["labels"].get(k) == v for k, v in labels.items()):
                return d
        return None

    while time.time() < deadline:
        found = match()
        if found:
            return found
        time.sleep(0.1)
    return match()


def _failed_run_pages_under_its_id(live: Live, name: str, migration_id: str) -> None:
    pre = live.settle()
    run = live.migrate("false", migration_id=migration_id, watch_window=FAILED_WATCH_WINDOW)
    deadline = run.ended + run.watch_window + 2
    page = _wait_delivery(live, run.started, deadline, "MigrationFailed", "/page", migration_id=migration_id)
    time.sleep(max(0.0, deadline - time.time()))  # the report covers its whole watch window
    # After the window: ALERTS no longer holds MigrationFailed (disarmed); the rollback row's latch does.
    criteria = live.criteria(migration_id)
    failed_pages = live.timeline.delivered(run.started, alertname="MigrationFailed")
    live.scenario(
        name,
        expected=f'MigrationFailed{{migration_id="{migration_id}"}} on /page',
        command=["false"],
        migration_id=migration_id,
        rc=run.rc,
        onset="migration start (the command fails at once)",
        onset_to_page_s=round(page["at"] - run.started, 1) if page else None,
        alerts=_describe(live.timeline.alerts_between(run.started, deadline), run.started),
        delivered=_describe_deliveries(live.timeline.delivered(run.started, deadline), run.started),
        success_criteria=criteria,
        **pre,
    )
    assert run.rc == 1, run.output
    assert page is not None, (
        f"{name}: no MigrationFailed{{migration_id={migration_id!r}}} on /page within its watch window; "
        f"MigrationFailed delivered: {_describe_deliveries(failed_pages, run.started)}; Prometheus: "
        f"{_describe(live.timeline.alerts_between(run.started, time.time()), run.started)}"
    )
    assert page["labels"]["severity"] == "critical"
    assert page["labels"]["action"] == "rollback"
    wrong = [d for d in failed_pages if d["labels"].get("migration_id") != migration_id]
    assert wrong == [], f"{name}: MigrationFailed paged under another id: {_describe_deliveries(wrong, run.started)}"
    # A rollback trigger fired: "Rollback required: Yes". A command that fails at once is within its budget.
    _assert_criteria(name, criteria, passed={"duration": 1, "rollback_required": 0})
    assert criteria["rollback_required"]["actual"] == 1, criteria


def test_c_a_failed_run_of_another_id_pages_under_that_id(live: Live):
    _failed_run_pages_under_its_id(live, "c_failed_other_id", "other")


def test_d_a_second_migration_in_the_same_serve_pages_under_its_own_id(live: Live):
    _failed_run_pages_under_its_id(live, "d_failed_second_id", "second")


def _series(delivery: dict[str, Any]) -> str:
    """Which part of an alert a delivery is: a probe's (`probe NAME`) or a target's statements/transactions."""
    labels = delivery["labels"]
    return f"probe {labels['probe']}" if labels.get("probe") else labels.get("target", "")


def _harmful_migration_pages(
    live: Live,
    name: str,
    statement: str,
    alertname: str,
    restore: str,
    restore_what: str,
    series: set[str],
    failing_criterion: str | None = None,
) -> None:
    """The migration does harm: expect `alertname` delivered within its watch window. The harm is undone
    once every one of `series` has paged, or EXTRA_WAIT after the first page, or when the window closes."""
    pre = live.settle()
    before = live.app.stats()
    firsts: dict[str, float] = {}
    criteria: dict[str, dict[str, float]] = {}
    try:
        run = live.migrate(*live.sql(statement))
        window_end = run.ended + run.watch_window
        deadline = window_end + 2
        while time.time() < deadline and not series <= set(firsts):
            for d in live.timeline.delivered(run.started, alertname=alertname, path="/notify"):
                if d["labels"].get("migration_id") == MIGRATION_ID:
                    firsts.setdefault(_series(d), d["at"])
            if firsts:
                deadline = min(window_end + 2, min(firsts.values()) + EXTRA_WAIT)
            time.sleep(0.1)
        during = live.app.stats().since(before)
        # The table while the harm is still there (it judges the whole window, so it stays FAIL a while after).
        if failing_criterion:
            wait_for(
                lambda: live.criteria().get(failing_criterion, {}).get("passed") == 0,
                timeout=max(1.0, window_end - time.time()),
                what=f"the {failing_criterion} row to FAIL",
            )
        criteria = live.criteria()
    finally:
        with live.primary() as conn:
            conn.execute(restore)
        live.last_disturbance = time.time()
    end = max(window_end + 2, time.time())
    time.sleep(max(0.0, end - time.time()))  # the report covers its whole watch window
    live.scenario(
        name,
        expected=f"{alertname} on /notify",
        command=[statement],
        rc=run.rc,
        onset="migration start",
        onset_to_page_s=round(min(firsts.values()) - run.started, 1) if firsts else None,
        onset_to_page_by_series_s={k: round(v - run.started, 1) for k, v in sorted(firsts.items())},
        restored=f"{restore_what} at {round(live.last_disturbance - run.started, 1)} s",
        alerts=_describe(live.timeline.alerts_between(run.started, end), run.started),
        delivered=_describe_deliveries(live.timeline.delivered(run.started, end), run.started),
        app_until_restored=during,
        success_criteria=criteria,
        **pre,
    )
    assert run.rc == 0, run.output
    assert firsts, (
        f"{name}: no {alertname} delivered within the watch window; Prometheus: "
        f"{_describe(live.timeline.alerts_between(run.started, end), run.started)}; app: {during}"
    )
    if failing_criterion:
        _assert_criteria(name, criteria, passed={failing_criterion: 0, "duration": 1, "rollback_required": 1})
        assert criteria[failing_criterion]["actual"] > criteria[failing_criterion]["target"], criteria


def test_e_dropping_the_index_the_app_uses_pages_latency_degraded(live: Live):
    _harmful_migration_pages(
        live,
        "e_drop_index",
        f"DROP INDEX {live_app.CUSTOMER_INDEX}",
        "MigrationLatencyDegraded",
        f"CREATE INDEX IF NOT EXISTS {live_app.CUSTOMER_INDEX} ON {live_app.TABLE} (customer)",
        "index re-created",
        {"primary", f"probe {PROBE}"},  # the app's statements and the key-query probe both slow down
        failing_criterion="response_time_change",
    )


def test_f_a_constraint_the_app_violates_pages_error_rate_increased(live: Live):
    _harmful_migration_pages(
        live,
        "f_check_constraint",
        f"ALTER TABLE {live_app.TABLE} ADD CONSTRAINT amount_positive CHECK (amount > 0) NOT VALID",
        "MigrationErrorRateIncreased",
        f"ALTER TABLE {live_app.TABLE} DROP CONSTRAINT IF EXISTS amount_positive",
        "constraint dropped",
        {"primary"},
        failing_criterion="error_rate_change",
    )


def test_g_paused_replay_pages_the_lag_alerts_and_no_latency_or_error_alert(live: Live):
    pre = live.settle()
    before = live.app.stats()
    run = live.migrate("sleep", "1")
    firsts: dict[str, float] = {}
    with live.pg.replicas[0].connect() as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        paused = time.time()
        try:
            deadline = run.ended + run.watch_window - 2
            while time.time() < deadline and len(firsts) < 2:
                for d in live.timeline.delivered(paused, alertname="MigrationReplicationLagHigh", path="/notify"):
                    side = d["labels"].get("target", "") + "/" + d["labels"].get("standby", "")
                    firsts.setdefault(side, d["at"])
                time.sleep(0.1)
        finally:
            replica.execute("SELECT pg_wal_replay_resume()")
            resumed = time.time()
    live.last_disturbance = resumed
    end = run.ended + run.watch_window + 3
    time.sleep(max(0.0, end - time.time()))
    bad_alerts = [
        a for a in live.timeline.alerts_between(paused, end, LATENCY_OR_ERROR) if a["labels"]["alertstate"] == "firing"
    ]
    bad_deliveries = [
        d for d in live.timeline.delivered(paused, end) if d["labels"].get("alertname") in LATENCY_OR_ERROR
    ]
    live.scenario(
        "g_paused_replay",
        expected="MigrationReplicationLagHigh from primary/replica1 and replica1/, no latency or error alert",
        command=["sleep 1", "then pg_wal_replay_pause() on replica1"],
        rc=run.rc,
        onset="replay paused",
        onset_to_page_s={k: round(v - paused, 1) for k, v in firsts.items()},
        resumed_s=round(resumed - paused, 1),
        alerts=_describe(live.timeline.alerts_between(run.started, end), paused),
        delivered=_describe_deliveries(live.timeline.delivered(run.started, end), paused),
        app=live.app.stats().since(before),
        **pre,
    )
    assert run.rc == 0, run.output
    assert {"primary/replica1", "replica1/"} <= set(firsts), f"lag alerts delivered from: {sorted(firsts)}"
    assert bad_alerts == [], f"latency/error alerts fired while replay was paused: {_describe(bad_alerts, paused)}"
    assert bad_deliveries == [], f"latency/error notifications: {_describe_deliveries(bad_deliveries, paused)}"


def test_h_a_migration_killed_at_its_time_limit_fails_the_duration_and_rollback_rows(live: Live):
    """`run --time-limit 3s -- sleep 60`: killed at its limit (exit 124), MigrationFailed pages, and the
    table reads duration FAIL (it took its whole budget) and rollback required FAIL."""
    pre = live.settle()
    run = live.migrate("sleep", "60", migration_id="timeout", watch_window=FAILED_WATCH_WINDOW, time_limit=3)
    deadline = run.ended + run.watch_window
    wanted = {"duration": 0.0, "rollback_required": 0.0}

    def failed_rows() -> bool:
        table = live.criteria("timeout")
        return all(table.get(c, {}).get("passed") == v for c, v in wanted.items())

    wait_for(failed_rows, timeout=max(1.0, deadline - time.time()), what="the duration and rollback rows to FAIL")
    criteria = live.criteria("timeout")
    page = _wait_delivery(live, run.started, deadline + 2, "MigrationFailed", "/page", migration_id="timeout")
    live.scenario(
        "h_timed_out",
        expected="duration FAIL, rollback_required FAIL, MigrationFailed on /page",
        command=["sleep 60", "--time-limit 3s"],
        migration_id="timeout",
        rc=run.rc,
        migration_s=round(run.ended - run.started, 2),
        success_criteria=criteria,
        onset_to_page_s=round(page["at"] - run.started, 1) if page else None,
        delivered=_describe_deliveries(live.timeline.delivered(run.started, deadline + 2), run.started),
        **pre,
    )
    assert run.rc == 124, run.output
    _assert_criteria("h_timed_out", criteria, passed=wanted)
    assert criteria["duration"]["target"] == 3.0
    assert criteria["duration"]["actual"] >= 3.0, criteria
    assert page is not None, "MigrationFailed{migration_id='timeout'} was not paged"
