"""`migexport demo` shows the loop: its scripted migrations fire alerts in its own Prometheus, then it all goes.

One demo for the module (the tests run in order): the stuck migration's lock alerts fire and reach the
Alertmanager; the breaking migration's key query fails, pages, and the workload recovers from the
rollback; Ctrl-C stops the servers and clusters and removes the temp directory.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from conftest import require_binary, scrape, value, wait_for
from test_cli import migexport_argv

LINES = {
    "metrics": r"metrics:\s+(http://\S+)/metrics",
    "prometheus": r"prometheus:\s+(http://\S+)/alerts",
    "alertmanager": r"alertmanager:\s+(http://\S+)",
    "primary_port": r"primary:.*port=(\d+)",
    "clean": r"clean:\s+(/\S+\.sh)",
    "stuck": r"stuck:\s+(/\S+\.sh)",
    "breaking": r"breaking:\s+(/\S+\.sh)",
}


@dataclass
class Demo:
    proc: subprocess.Popen
    stderr: Path
    found: dict[str, str] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    def get(self, url: str) -> dict:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.load(resp)

    def alerts(self, name: str, migration_id: str, state: str = "firing") -> list[dict]:
        data = self.get(self.found["prometheus"] + "/api/v1/alerts")["data"]["alerts"]
        return [
            a
            for a in data
            if a["labels"]["alertname"] == name
            and a["labels"].get("migration_id") == migration_id
            and a["state"] == state
        ]

    def criteria(self, migration_id: str, which: str = "passed") -> dict[str, float]:
        query = f'migexport:success_criterion:{which}{{migration_id="{migration_id}"}}'
        url = self.found["prometheus"] + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
        return {r["metric"]["criterion"]: float(r["value"][1]) for r in self.get(url)["data"]["result"]}

    def primary(self) -> psycopg.Connection:
        dsn = f"host=127.0.0.1 port={self.found['primary_port']} dbname=postgres user=postgres"
        return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


def _start_demo(tmp: Path) -> Demo:
    stderr = tmp / "demo.stderr"
    proc = subprocess.Popen(
        [*migexport_argv(), "demo", "--listen", "127.0.0.1:0", "--duration", "170s"],
        stdout=subprocess.PIPE,
        stderr=stderr.open("w"),
        text=True,
    )
    demo = Demo(proc, stderr)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        demo.lines.append(line)
        for key, pattern in LINES.items():
            if key not in demo.found and (match := re.search(pattern, line)):
                demo.found[key] = match.group(1)
        if line.startswith(("stopping by itself", "press Ctrl-C")):
            break
    missing = set(LINES) - set(demo.found)
    assert not missing, f"the demo did not print {missing}: {demo.lines} {stderr.read_text()[-2000:]}"
    # The rest of its output (baseline ready, reports written) is collected as it comes.
    threading.Thread(target=lambda: demo.lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    return demo


def _printed(demo: Demo, pattern: str, timeout: float, what: str) -> re.Match:
    found: list[re.Match] = []

    def seen() -> bool:
        found[:] = [m for line in list(demo.lines) if (m := re.search(pattern, line))]
        assert demo.proc.poll() is None, f"the demo ended: {demo.lines} {demo.stderr.read_text()[-2000:]}"
        return bool(found)

    wait_for(seen, timeout=timeout, what=what)
    return found[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    require_binary("prometheus", "prometheus")
    require_binary("prometheus-alertmanager", "prometheus-alertmanager")
    d = _start_demo(tmp_path_factory.mktemp("demo-loop"))
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def test_the_demo_prints_its_servers_and_scripts_and_prometheus_has_its_rules(demo: Demo) -> None:
    for name in ("clean", "stuck", "breaking"):
        script = Path(demo.found[name])
        assert script.stat().st_mode & 0o111, f"{script} must be executable"
        assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0, script.read_text()
        assert "--state-file" in script.read_text() and "--log-file" in script.read_text()
    rules = demo.get(demo.found["prometheus"] + "/api/v1/rules")["data"]["groups"]
    names = {r["name"] for g in rules for r in g["rules"]}
    assert {"MigrationBlockingSessions", "MigrationCriticalQueryFailing", "migexport:success_criterion:passed"} <= names
    # The demo thresholds: seconds, not minutes.
    blocking = next(r for g in rules for r in g["rules"] if r["name"] == "MigrationBlockingSessions")
    assert blocking["duration"] == 5
    assert "migexport:success_criterion:passed" in "".join(demo.lines)
    with urllib.request.urlopen(demo.found["alertmanager"] + "/-/ready", timeout=5) as resp:
        assert resp.status == 200
    _printed(demo, r"^baseline: (ready|not captured)", timeout=40, what="the demo's baseline")
    assert not any(line.startswith("baseline: not captured") for line in demo.lines), demo.lines


def test_the_clean_migration_fills_in_the_success_criteria(demo: Demo) -> None:
    clean = subprocess.run([demo.found["clean"]], capture_output=True, text=True, timeout=60, check=False)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    wanted = {"duration", "error_rate_change", "response_time_change", "rollback_required"}
    wait_for(lambda: wanted <= set(demo.criteria("demo-clean")), timeout=30, what="the criteria of demo-clean")
    passed = demo.criteria("demo-clean")
    # Deterministic for an instant ALTER TABLE; the two changes against the baseline depend on the host's load.
    assert passed["duration"] == 1 and passed["rollback_required"] == 1, (passed, demo.criteria("demo-clean", "actual"))
    assert "data_integrity" not in passed  # reserved: no data until a verification feeds it
    # The demo writes its report soon after the end (the window still open), through its config file.
    report = _printed(demo, r"^report: (/\S+/demo-clean-\d+\.html) \(", timeout=40, what="demo-clean's report")
    page = Path(report.group(1))
    assert page.exists() and "<svg" in page.read_text()
    summary = page.with_suffix(".md").read_text()
    assert "Migration duration" in summary and "demo-clean" in summary


def test_the_stuck_migration_fires_its_lock_alerts_in_the_demos_prometheus(demo: Demo) -> None:
    stuck = subprocess.Popen([demo.found["stuck"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(
            lambda: demo.alerts("MigrationBlockingSessions", "demo-stuck"),
            timeout=60,
            what="MigrationBlockingSessions firing for demo-stuck",
        )
        alert = demo.alerts("MigrationBlockingSessions", "demo-stuck")[0]
        assert alert["labels"]["target"] == "primary"

        def in_alertmanager() -> bool:
            alerts = demo.get(demo.found["alertmanager"] + "/api/v2/alerts")
            return any(a["labels"].get("alertname") == "MigrationBlockingSessions" for a in alerts)

        wait_for(in_alertmanager, timeout=30, what="the alert to reach the demo's Alertmanager")
    finally:
        stuck.send_signal(signal.SIGTERM)  # `run` ends the queued ALTER TABLE on the server
        stuck.communicate(timeout=30)
    with demo.primary() as conn:
        # The reader would hold demo_orders for a while yet: end it so the next migration does not queue.
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'demo-reader'")
        columns = conn.execute(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 'demo_orders' "
            "AND column_name = 'shipped_at'"
        ).fetchone()[0]
    assert columns == 0, "the stuck migration must not be applied"


def test_the_breaking_migration_pages_and_the_workload_recovers_from_the_rollback(demo: Demo) -> None:
    breaking = subprocess.Popen([demo.found["breaking"]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(
            lambda: demo.alerts("MigrationCriticalQueryFailing", "demo-breaking"),
            timeout=60,
            what="MigrationCriticalQueryFailing firing for demo-breaking",
        )
        # A rollback alert fired: the success criteria say a rollback was required.
        wait_for(
            lambda: demo.criteria("demo-breaking").get("rollback_required") == 0,
            timeout=20,
            what="rollback_required to FAIL for demo-breaking",
        )
    finally:
        breaking.send_signal(signal.SIGTERM)  # the script rolls back at once
        out, _ = breaking.communicate(timeout=30)
    assert "rolled back" in out or breaking.returncode == 130, out
    url = demo.found["metrics"]
    commits = value(scrape(url), "migexport_xact_commit_total", target="primary")
    wait_for(
        lambda: value(scrape(url), "migexport_xact_commit_total", target="primary") > commits + 20,
        timeout=20,
        what="the workload to commit again after the rollback",
    )
    with demo.primary() as conn:
        recent = conn.execute("SELECT count(*) FROM demo_orders WHERE created_at > now() - interval '3 seconds'")
        assert recent.fetchone()[0] > 0, "the workload writes to demo_orders again"


def test_ctrl_c_stops_the_servers_and_clusters_and_removes_the_temp_directory(demo: Demo) -> None:
    workdir = Path(demo.found["stuck"]).parent
    base = workdir.parent
    assert base.name.startswith("migexport-demo-") and base.exists()
    demo.proc.send_signal(signal.SIGINT)  # Ctrl-C (test_demo.py sends SIGTERM)
    assert demo.proc.wait(timeout=60) == 0, demo.stderr.read_text()[-2000:]
    wait_for(lambda: any("stopped" in line for line in demo.lines), timeout=10, what="the demo to say it stopped")
    assert not base.exists(), "the demo's temp directory must be removed"
    for key in ("prometheus", "alertmanager", "metrics"):
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(demo.found[key], timeout=3)
    probe = subprocess.run(
        ["pg_isready", "-h", "127.0.0.1", "-p", demo.found["primary_port"]], capture_output=True, check=False
    )
    assert probe.returncode != 0, "the demo's primary must be stopped"
