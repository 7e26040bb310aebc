"""The page arrives: real Prometheus scraping a real `migexport serve`, sending to a real Alertmanager.

Rules are rendered by the generator with short thresholds and `for:` durations, Alertmanager routes
with the shipped rules/alertmanager.yml (receivers pointed at a webhook in this test), and each
rollback trigger is induced for real: a migration session queued behind an open reader with readers
behind it, replay paused on the standby while the primary writes, and `migexport run -- false`.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import monitor_dsn, prometheus_server, require_binary, run_blocking, wait_for
from migexport import localpg
from migexport.baseline import FORMAT, VERSION, write_baseline
from migexport.config import Migration, Thresholds
from migexport.dsn import Target
from migexport.rulegen import render
from migexport.service import Exporter, ServeSettings
from test_cli import migexport_argv

ROOT = Path(__file__).parent.parent
MIGRATION_ID = "e2e"

# Short enough for a test, and high where an alert is not under test, so that only the induced
# conditions fire: the relative triggers get factors nothing here can reach.
TEST_THRESHOLDS = Thresholds(
    lock_wait_seconds=1,
    blocking_seconds=1,
    replication_lag_watch_seconds=1,
    alert_for_seconds=1,
    critical_for_seconds=1,
    latency_degradation_ratio=1e6,
    error_rate_increase_ratio=1e6,
    connections_change_ratio=1e6,
)


@dataclass
class Webhook:
    """Records what Alertmanager delivers, by receiver path."""

    port: int = 0
    received: list[tuple[str, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def firing(self, path: str | None = None) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        with self.lock:
            for p, body in self.received:
                if path is None or p == path:
                    for alert in body["alerts"]:
                        if alert["status"] == "firing":
                            out.setdefault(alert["labels"]["alertname"], []).append(alert)
        return out


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with hook.lock:
                hook.received.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def alertmanager(tmp: Path, webhook_port: int) -> Iterator[str]:
    """The shipped routing, with its receivers pointed at the test's webhook and quick grouping."""
    binary = require_binary("prometheus-alertmanager", "prometheus-alertmanager")
    config = yaml.safe_load((ROOT / "rules" / "alertmanager.yml").read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = f"http://127.0.0.1:{webhook_port}/{receiver['name']}"

    def quick(route: dict) -> None:
        route.update({"group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"})
        for child in route.get("routes", []):
            quick(child)

    quick(config["route"])
    (tmp / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = localpg.free_port()
    log = open(tmp / "alertmanager.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'alertmanager.yml'}",
            f"--storage.path={tmp / 'am'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ok(url + "/-/ready") or proc.poll() is not None, timeout=30, what="alertmanager")
        assert proc.poll() is None, (tmp / "alertmanager.log").read_text()[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def _ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def write_calm_baseline(path: Path) -> None:
    """A baseline as if captured just now, so MigrationBaselineMissing stays quiet."""
    write_baseline(
        path,
        {
            "format": FORMAT,
            "version": VERSION,
            "migration_id": MIGRATION_ID,
            "captured_at": time.time(),
            "window_seconds": 60.0,
            "targets": {
                "primary": {
                    "tps": 1.0,
                    "error_ratio": 0.0,
                    "statement_latency_seconds": 0.001,
                    "connections": 5.0,
                    "connection_utilisation": 0.05,
                }
            },
            "probes": {},
            "slis": {},
            "missing": [],
        },
        force=True,
    )


def run_migration(tmp: Path, *command: str) -> int:
    return subprocess.run(
        [
            *migexport_argv(),
            "run",
            "--id",
            MIGRATION_ID,
            "--log-file",
            str(tmp / "migration.log"),
            "--state-file",
            str(tmp / "state.json"),
            "--",
            *command,
        ],
        capture_output=True,
        timeout=30,
        check=False,
    ).returncode


def test_rollback_triggers_are_delivered_end_to_end(pg, tmp_path: Path, webhook: Webhook):
    rules = tmp_path / "rules.yml"
    rules.write_text(render(TEST_THRESHOLDS))
    write_calm_baseline(tmp_path / "baseline.json")
    settings = ServeSettings(
        targets=[Target("primary", monitor_dsn(pg.primary)), Target("replica1", monitor_dsn(pg.replicas[0]))],
        host="127.0.0.1",
        port=0,
        migration=Migration(id=MIGRATION_ID, session_application_name="migration", watch_window_seconds=3600),
        state_path=tmp_path / "state.json",
        baseline_path=tmp_path / "baseline.json",
    )
    exporter = Exporter(settings).start()
    try:
        with alertmanager(tmp_path, webhook.port) as am_address:
            prom_config = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am_address]}]}]},
                "scrape_configs": [
                    {
                        "job_name": "migexport",
                        "static_configs": [{"targets": [exporter.url.removeprefix("http://")]}],
                    }
                ],
            }
            with prometheus_server(tmp_path, yaml.safe_dump(prom_config)) as prom:
                wait_for(
                    lambda: prom.query('migexport_up{target="replica1"} == 1') != [],
                    timeout=30,
                    what="prometheus to scrape the exporter",
                )

                # At rest, before any migration: nothing is armed, nothing arrives.
                time.sleep(5)
                assert prom.query("ALERTS") == []
                assert webhook.firing() == {}

                # The migration ran (and succeeded): the watch window is open from here on.
                assert run_migration(tmp_path, "true") == 0
                wait_for(lambda: prom.query("migexport_migration_watch_active == 1") != [], timeout=15)

                induce_lock_queue_and_expect_pages(pg, webhook)
                induce_paused_replay_and_expect_lag_alert(pg, webhook)

                # (a) The migration command fails: the immediate rollback trigger pages.
                assert run_migration(tmp_path, "false") == 1
                wait_for(
                    lambda: "MigrationFailed" in webhook.firing("/pager"),
                    timeout=30,
                    what="MigrationFailed to be paged",
                )
                page = webhook.firing("/pager")["MigrationFailed"][0]
                assert page["labels"]["severity"] == "critical"
                assert page["labels"]["action"] == "rollback"
                assert page["labels"]["migration_id"] == MIGRATION_ID
                assert page["annotations"]["runbook_url"].endswith("/MigrationFailed.md")
    finally:
        exporter.stop()


def induce_lock_queue_and_expect_pages(pg, webhook: Webhook) -> None:
    """(b) The migration's session queues behind an open reader; readers queue behind it."""
    with pg.primary.connect() as setup:
        setup.execute("DROP TABLE IF EXISTS e2e_t")
        setup.execute("CREATE TABLE e2e_t (id int)")
    reader = pg.primary.connect(application_name="e2e-old-reader")
    reader.execute("BEGIN")
    reader.execute("SELECT * FROM e2e_t")
    blocked = [run_blocking(pg.primary, "ALTER TABLE e2e_t ADD COLUMN status text", app="migration")]
    try:
        blocked += [run_blocking(pg.primary, "SELECT count(*) FROM e2e_t", app="e2e-app") for _ in range(3)]
        wait_for(
            lambda: {"MigrationBlockingSessions", "MigrationLockWaitHigh"} <= set(webhook.firing("/notify")),
            timeout=40,
            what="the lock alerts to be delivered",
        )
    finally:
        reader.execute("ROLLBACK")
        reader.close()
        for b in blocked:
            b.thread.join(timeout=10)
            b.conn.close()
    alert = webhook.firing("/notify")["MigrationBlockingSessions"][0]
    assert alert["labels"]["action"] == "watch"
    assert alert["labels"]["target"] == "primary"
    assert alert["labels"]["migration_id"] == MIGRATION_ID
    assert "has blocked 3 sessions" in alert["annotations"]["description"]


def induce_paused_replay_and_expect_lag_alert(pg, webhook: Webhook) -> None:
    """(c) Replay paused on the standby while the primary writes."""
    with pg.primary.connect() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS e2e_writes (i int)")
    with pg.replicas[0].connect() as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        try:
            with pg.primary.connect() as writer:

                def lag_alerts() -> set[str]:
                    writer.execute("INSERT INTO e2e_writes VALUES (1)")
                    return {
                        a["labels"].get("target", "") + "/" + a["labels"].get("standby", "")
                        for a in webhook.firing("/notify").get("MigrationReplicationLagHigh", [])
                    }

                wait_for(
                    lambda: {"primary/replica1", "replica1/"} <= lag_alerts(),
                    timeout=40,
                    what="replication lag alerts from both ends",
                )
        finally:
            replica.execute("SELECT pg_wal_replay_resume()")
