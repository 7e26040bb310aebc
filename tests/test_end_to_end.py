"""The page arrives: real Prometheus scraping a real `migexport serve`, sending to a real Alertmanager.

Rules are rendered by the generator with short thresholds and `for:` durations, Alertmanager routes
with the shipped rules/alertmanager.yml (receivers pointed at a webhook in this test), and each
rollback trigger is induced for real: a migration session queued behind an open reader with readers
behind it, replay paused on the standby while the primary writes, and `migexport run -- false`.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import yaml

from conftest import (
    WebhookRecorder,
    alertmanager_server,
    ddl_lock_queue,
    monitor_dsn,
    prometheus_server,
    quick_alertmanager_config,
    wait_for,
    webhook_recorder,
)
from migexport.baseline_file import FORMAT, VERSION, write_baseline
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


def test_rollback_triggers_are_delivered_end_to_end(pg, tmp_path: Path):
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
        with (
            webhook_recorder() as webhook,
            alertmanager_server(tmp_path, quick_alertmanager_config(tmp_path, webhook.url)) as am_url,
        ):
            prom_config = {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(rules)],
                "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am_url.removeprefix("http://")]}]}]},
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
                    lambda: "MigrationFailed" in webhook.firing("/page"),
                    timeout=30,
                    what="MigrationFailed to be paged",
                )
                page = webhook.firing("/page")["MigrationFailed"][0]
                assert page["labels"]["severity"] == "critical"
                assert page["labels"]["action"] == "rollback"
                assert page["labels"]["migration_id"] == MIGRATION_ID
                assert page["annotations"]["runbook_url"].endswith("/MigrationFailed.md")
    finally:
        exporter.stop()


def induce_lock_queue_and_expect_pages(pg, webhook: WebhookRecorder) -> None:
    """(b) The migration's session queues behind an open reader; readers queue behind it."""
    with ddl_lock_queue(pg.primary, "e2e_t", alter_app="migration"):
        wait_for(
            lambda: {"MigrationBlockingSessions", "MigrationLockWaitHigh"} <= set(webhook.firing("/notify")),
            timeout=40,
            what="the lock alerts to be delivered",
        )
    alert = webhook.firing("/notify")["MigrationBlockingSessions"][0]
    assert alert["labels"]["action"] == "watch"
    assert alert["labels"]["target"] == "primary"
    assert alert["labels"]["migration_id"] == MIGRATION_ID
    assert "blocking other sessions" in alert["annotations"]["description"]
    assert alert["annotations"]["description"].endswith("(now 3).")


def induce_paused_replay_and_expect_lag_alert(pg, webhook: WebhookRecorder) -> None:
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
