"""The demo's parts without a demo: its thresholds, the files it gives Prometheus and Alertmanager, its scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import require_binary
from migexport import rulegen
from migexport.config import Thresholds
from migexport.demo import monitoring, scripts
from migexport.localpg import LocalCluster


def test_the_demo_thresholds_are_seconds_and_the_rules_pass_promtool(tmp_path: Path) -> None:
    t = monitoring.THRESHOLDS
    assert t.rate_window_seconds == 30 and t.alert_for_seconds == 10 and t.critical_for_seconds == 10
    assert t.lock_wait_seconds == 5 and t.blocking_seconds == 5 and t.replication_lag_watch_seconds == 5
    # Everything else is the checklist's.
    assert t.latency_degradation_ratio == Thresholds().latency_degradation_ratio
    rules = tmp_path / "rules.yml"
    rules.write_text(rulegen.render(t, watch_window_seconds=monitoring.WATCH_WINDOW_SECONDS))
    promtool = require_binary("promtool", "prometheus")
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_demo_alertmanager_config_has_one_receiver_without_webhooks_and_passes_amtool(tmp_path: Path) -> None:
    config = monitoring.ALERTMANAGER_CONFIG
    assert config["receivers"] == [{"name": "demo"}] and config["route"]["receiver"] == "demo"
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    amtool = require_binary("amtool", "prometheus-alertmanager")
    proc = subprocess.run([amtool, "check-config", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_without_prometheus_the_demo_says_what_is_missing_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitoring.shutil, "which", lambda name: None)
    watch = monitoring.start_monitoring(tmp_path, "http://127.0.0.1:1")
    assert watch.missing == ["prometheus", "prometheus-alertmanager"]
    assert watch.servers == [] and list(tmp_path.iterdir()) == []
    watch.stop()


def test_the_scripts_call_this_migexport_with_the_demos_state_and_log_and_parse(tmp_path: Path) -> None:
    primary = LocalCluster(name="primary", datadir=tmp_path / "primary", port=54329, bindir=tmp_path)
    migration = monitoring.migration(tmp_path)
    paths = scripts.write_scripts(tmp_path, primary, migration)
    assert set(paths) == {"clean", "stuck", "breaking"}
    command = scripts.migexport_command()
    assert command.startswith(str(Path(sys.executable).parent)) or "migexport" in command
    for name, path in paths.items():
        text = path.read_text()
        assert path.stat().st_mode & 0o111
        assert subprocess.run(["sh", "-n", str(path)], check=False).returncode == 0, text
        assert "PGPORT=54329" in text and "PGHOST=127.0.0.1" in text
        assert f"--state-file {migration.state_file}" in text and f"--log-file {migration.log_file}" in text
        assert f"{command} run" in text and f"--id demo-{name}" in text
        assert "PGAPPNAME=migration" in text
    assert "--time-limit 40s" in paths["stuck"].read_text()
    assert "RENAME TO demo_orders_old" in paths["breaking"].read_text()
    assert "trap 'rollback; exit 130'" in paths["breaking"].read_text()


def test_demo_sh_installs_prometheus_and_alertmanager_before_the_demo() -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "demo.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    lines = [line.strip() for line in script.read_text().splitlines()]
    assert lines.index("ensure_prometheus_tools") < lines.index('exec migexport demo "$@"')
    assert lines.index("ensure_postgres") < lines.index('exec migexport demo "$@"')
