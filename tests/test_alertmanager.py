"""rules/alertmanager.yml: valid, routes every migexport alert by its action, and inhibits for real.

Routing is checked offline with amtool, for each alert the rules define (so a new alert or a changed
action is covered without editing this file). Inhibition cannot be checked offline: a real
Alertmanager runs on 127.0.0.1 with a copy of the config whose webhooks point at a recorder here.
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

from conftest import require_binary, wait_for
from migexport.config import Thresholds
from migexport.localpg import free_port
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
    assert len(ALERTS) == 13
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


@dataclass
class Recorder:
    """A webhook receiver on 127.0.0.1 that records (path, alertnames with migration_id) per POST."""

    server: ThreadingHTTPServer
    posts: list[tuple[str, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def received(self, path: str) -> set[tuple[str, str]]:
        with self.lock:
            return {
                (a["labels"]["alertname"], a["labels"].get("migration_id", ""))
                for p, body in self.posts
                if p == path
                for a in body.get("alerts", [])
            }


@contextlib.contextmanager
def webhook_recorder() -> Iterator[Recorder]:
    recorder: Recorder

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with recorder.lock:
                recorder.posts.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder = Recorder(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()


def fast_copy(tmp: Path, webhook: str) -> Path:
    """The shipped config with fast grouping and webhooks pointing at the recorder."""
    config = yaml.safe_load(CONFIG.read_text())
    config["route"].update(group_wait="1s", group_interval="1s", repeat_interval="1h")
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = webhook + "/" + hook["url"].rsplit("/", 1)[1]
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def http_json(url: str, payload: object | None = None) -> object:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def alertmanager(tmp: Path, config: Path) -> Iterator[str]:
    binary = require_binary("prometheus-alertmanager", "prometheus-alertmanager")
    port = free_port()
    log_path = tmp / "alertmanager.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: ready(url) or proc.poll() is not None, timeout=10, what="alertmanager to start")
        if proc.poll() is not None:
            raise AssertionError(f"alertmanager exited: {log_path.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


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

    with webhook_recorder() as hooks, alertmanager(tmp_path, fast_copy(tmp_path, hooks.url)) as am:
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
            lambda: (failed.name, "m1") in hooks.received("/page") and (lag.name, "m2") in hooks.received("/notify"),
            timeout=10,
            what="notifications on /page and /notify",
        )
        # A few more group intervals: the suppressed alert must stay undelivered.
        time.sleep(3)
        assert hooks.received("/page") == {(failed.name, "m1")}
        assert hooks.received("/notify") == {(lag.name, "m2")}
        assert (lock_wait.name, "m1") not in hooks.received("/page") | hooks.received("/notify")
