"""rules/alertmanager.yml: valid, routes every migexport alert by its action, and inhibits for real.

Routing is checked offline with amtool, for each alert the rules define (so a new alert or a changed
action is covered without editing this file). Inhibition cannot be checked offline: a real
Alertmanager runs on 127.0.0.1 with a copy of the config whose webhooks point at a recorder here.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import (
    WebhookRecorder,
    alertmanager_server,
    quick_alertmanager_config,
    require_binary,
    wait_for,
    webhook_recorder,
)
from migexport.config import Thresholds
from migexport.rulegen import CONSIDER, INVESTIGATE, ROLLBACK, WATCH, Alert, alerts

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "rules" / "alertmanager.yml"
RECEIVER = {ROLLBACK: "pager", INVESTIGATE: "pager", CONSIDER: "notify", WATCH: "notify"}
OTHER = {"pager": "notify", "notify": "pager"}
ALERTS = alerts(Thresholds())


def amtool(*args: str) -> subprocess.CompletedProcess:
    binary = require_binary("amtool", "prometheus-alertmanager")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=30)


def route_test(receiver: str, labels: dict[str, str]) -> subprocess.CompletedProcess:
    return amtool(
        "config",
        "routes",
        "test",
        f"--config.file={CONFIG}",
        f"--verify.receivers={receiver}",
        *(f"{k}={v}" for k, v in labels.items()),
    )


def alert_labels(alert: Alert, migration_id: str = "m1") -> dict[str, str]:
    return {
        "alertname": alert.name,
        "action": alert.action,
        "severity": alert.severity,
        "migration_id": migration_id,
        "target": "primary",
    }


def test_config_is_valid() -> None:
    result = amtool("check-config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_action_has_a_receiver() -> None:
    assert len(ALERTS) == 17
    unknown = {a.name: a.action for a in ALERTS if a.action not in RECEIVER}
    assert not unknown, f"alerts with an action the Alertmanager config does not route: {unknown}"


def test_failed_migration_pages() -> None:
    labels = {"action": "rollback", "severity": "critical", "alertname": "MigrationFailed", "migration_id": "m1"}
    result = route_test("pager", labels)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", ALERTS, ids=[a.name for a in ALERTS])
def test_alert_routes_by_action(alert: Alert) -> None:
    expected = RECEIVER[alert.action]
    result = route_test(expected, alert_labels(alert))
    assert result.returncode == 0, f"{alert.name} ({alert.action}) not routed to {expected}: {result.stdout}"
    wrong = route_test(OTHER[expected], alert_labels(alert))
    assert wrong.returncode != 0, f"{alert.name} ({alert.action}) also verified against {OTHER[expected]}"


def test_unlabelled_alert_goes_to_default_receiver() -> None:
    assert route_test("notify", {"alertname": "SomethingElse"}).returncode == 0
    assert route_test("pager", {"alertname": "SomethingElse"}).returncode != 0


# Inhibition, against a real Alertmanager.


def http_json(url: str, payload: object | None = None) -> object:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def received(hooks: WebhookRecorder, path: str) -> set[tuple[str, str]]:
    return {(a["labels"]["alertname"], a["labels"].get("migration_id", "")) for a in hooks.alerts(path)}


def posted(alert: Alert, migration_id: str, target: str) -> dict:
    return {
        "labels": {**alert_labels(alert, migration_id), "target": target},
        "annotations": {"summary": alert.summary},
    }


def test_rollback_inhibits_watch_alerts_of_the_same_migration(tmp_path: Path) -> None:
    by_name = {a.name: a for a in ALERTS}
    failed, lock_wait, lag = (
        by_name["MigrationFailed"],
        by_name["MigrationLockWaitHigh"],
        by_name["MigrationReplicationLagHigh"],
    )
    assert (failed.action, lock_wait.action, lag.action) == (ROLLBACK, WATCH, WATCH)

    with (
        webhook_recorder() as hooks,
        alertmanager_server(tmp_path, quick_alertmanager_config(tmp_path, hooks.url)) as am,
    ):
        http_json(
            am + "/api/v2/alerts",
            [posted(failed, "m1", "primary"), posted(lock_wait, "m1", "primary"), posted(lag, "m2", "replica1")],
        )

        def states() -> dict[tuple[str, str], dict]:
            alerts_now = http_json(am + "/api/v2/alerts")
            assert isinstance(alerts_now, list)
            return {(a["labels"]["alertname"], a["labels"]["migration_id"]): a["status"] for a in alerts_now}

        def settled() -> bool:
            s = states()
            return len(s) == 3 and s[(lock_wait.name, "m1")]["state"] == "suppressed"

        wait_for(settled, timeout=10, what="the m1 watch alert to be suppressed")
        status = states()
        assert status[(lock_wait.name, "m1")]["inhibitedBy"], status
        assert status[(lag.name, "m2")]["state"] == "active", status
        assert not status[(lag.name, "m2")]["inhibitedBy"], status
        assert status[(failed.name, "m1")]["state"] == "active", status

        wait_for(
            lambda: (failed.name, "m1") in received(hooks, "/page") and (lag.name, "m2") in received(hooks, "/notify"),
            timeout=10,
            what="notifications on /page and /notify",
        )
        # A few more group intervals: the suppressed alert must stay undelivered.
        time.sleep(3)
        assert received(hooks, "/page") == {(failed.name, "m1")}
        assert received(hooks, "/notify") == {(lag.name, "m2")}
        assert (lock_wait.name, "m1") not in received(hooks, "/page") | received(hooks, "/notify")
