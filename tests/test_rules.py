"""The alert rules: in sync with their generator, driven by the thresholds, checked and unit-tested by promtool."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import require_binary
from migexport.config import Thresholds
from migexport.rulegen import HEADER, alerts, render
from test_cli import run_cli

ROOT = Path(__file__).parent.parent
RULES = ROOT / "rules" / "migexport.rules.yml"
RULE_TESTS = ROOT / "rules" / "tests"
RUNBOOKS = ROOT / "rules" / "runbooks"

# Which alerts each threshold feeds: changing it must change those alerts and nothing else.
USED_BY = {
    "latency_degradation_ratio": {"MigrationLatencyDegraded"},
    "error_rate_increase_ratio": {"MigrationErrorRateIncreased"},
    "error_ratio_floor": {"MigrationErrorRateIncreased"},
    "latency_floor_seconds": {"MigrationLatencyDegraded"},
    "probe_latency_floor_seconds": {"MigrationLatencyDegraded"},
    "replication_lag_rollback_seconds": {"MigrationReplicationLagTooHigh"},
    "replication_lag_watch_seconds": {"MigrationReplicationLagHigh"},
    "lock_wait_seconds": {"MigrationLockWaitHigh"},
    "blocking_seconds": {"MigrationBlockingSessions"},
    "connections_change_ratio": {"MigrationConnectionsUnstable"},
    "connections_utilisation_max": {"MigrationConnectionsUnstable"},
    "connections_floor": {"MigrationConnectionsUnstable"},
    "alert_for_seconds": {
        "MigrationLatencyDegraded",
        "MigrationErrorRateIncreased",
        "MigrationReplicationLagTooHigh",
        "MigrationLockWaitHigh",
        "MigrationReplicationLagHigh",
        "MigrationConnectionsUnstable",
        "MigrationBaselineMissing",
    },
    "critical_for_seconds": {
        "MigrationApplicationDown",
        "MigrationCriticalQueryFailing",
        "MigrationProbeBroken",
        "MigrationStateUnreadable",
        "MigrationExporterDown",
    },
    "rate_window_seconds": {"MigrationLatencyDegraded", "MigrationErrorRateIncreased", "MigrationBaselineMissing"},
    "significance_sigmas": {"MigrationLatencyDegraded", "MigrationErrorRateIncreased"},
    "error_min_transactions": {"MigrationErrorRateIncreased", "MigrationBaselineMissing"},
    "latency_min_calls": {"MigrationLatencyDegraded", "MigrationBaselineMissing"},
    "probe_min_runs": {"MigrationLatencyDegraded"},
    # Used by the success-criteria table and `serve`, not by alert rules.
    "success_error_rate_change_max": set(),
    "success_latency_change_max": set(),
    "baseline_max_age_seconds": set(),
}


def alert_rules(text: str) -> dict[str, dict]:
    doc = yaml.safe_load(text)
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}


def untested_alerts(rules_file: Path, tests_dir: Path) -> set[str]:
    """Alerts of the rules file that no promtool test case names."""
    tested: set[str] = set()
    for test_file in tests_dir.glob("*.yml"):
        for test in yaml.safe_load(test_file.read_text()).get("tests", []):
            tested |= {case["alertname"] for case in test.get("alert_rule_test", [])}
    return set(alert_rules(rules_file.read_text())) - tested


def test_rules_file_is_the_generators_output():
    text = RULES.read_text()
    assert text.startswith(HEADER) and "generated" in text.splitlines()[0].lower() and "do not edit" in text
    assert text == render(Thresholds()), "rules/migexport.rules.yml is stale: run 'migexport rules -o ... --force'"


def test_every_alert_carries_the_contract_labels_and_annotations():
    rules = alert_rules(RULES.read_text())
    assert set(rules) == {a.name for a in alerts(Thresholds())}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["labels"]["action"] in {"rollback", "consider_rollback", "watch", "investigate"}
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        assert rule["annotations"]["runbook_url"].endswith(f"/{name}.md")
        # Armed by the watch window (in progress implies it). An unreadable state file is the exception:
        # nobody can tell then whether a migration runs.
        armed = "watch_active" in rule["expr"] or "migexport_migration_in_progress == 1" in rule["expr"]
        assert armed or name == "MigrationStateUnreadable", f"{name} must only fire during the watch window"
    by_action = {r["labels"]["action"]: set() for r in rules.values()}
    for name, rule in rules.items():
        by_action[rule["labels"]["action"]].add(name)
    assert by_action["rollback"] == {
        "MigrationFailed",
        "MigrationApplicationDown",
        "MigrationCriticalQueryFailing",
        "MigrationDataIntegrityFailed",
    }
    assert by_action["investigate"] == {"MigrationExporterDown", "MigrationRunLost", "MigrationStateUnreadable"}


def test_every_rule_follows_the_rate_window():
    """A 30 s window renders no 5m range anywhere, and the recording rules say their window."""
    text = render(dataclasses.replace(Thresholds(), rate_window_seconds=30))
    doc = yaml.safe_load(text)
    ranges = {r for g in doc["groups"] for rule in g["rules"] for r in re.findall(r"\[(\w+)\]", rule["expr"])}
    assert ranges <= {"30s", "1h"}, ranges  # 1h: MigrationExporterDown's memory of the last watch window
    records = [r["record"] for r in doc["groups"][0]["rules"]]
    assert all(r.endswith(("rate30s", "increase30s")) for r in records if r != "migexport:connections:sum")
    assert "5m" not in text.replace("humanize", "")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(Thresholds)])
def test_a_threshold_changes_exactly_the_alerts_that_use_it(field):
    assert field in USED_BY, f"say which alerts use the new threshold {field}"
    default = getattr(Thresholds(), field)
    changed = dataclasses.replace(Thresholds(), **{field: default * 2 + 7})
    before, after = alert_rules(render(Thresholds())), alert_rules(render(changed))
    differing = {name for name in before if before[name] != after[name]}
    assert differing == USED_BY[field]


def test_a_config_with_other_thresholds_renders_those_numbers(tmp_path: Path):
    config = tmp_path / "migexport.yml"
    config.write_text(
        "targets: {primary: 'host=db'}\n"
        "thresholds: {replication_lag_rollback: 5m, lock_wait: 3s, latency_degradation_ratio: 2}\n"
    )
    proc = run_cli("rules", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    rules = alert_rules(proc.stdout)
    assert "migexport_replication_lag_seconds > 300" in rules["MigrationReplicationLagTooHigh"]["expr"]
    assert "migexport_lock_wait_max_seconds > 3" in rules["MigrationLockWaitHigh"]["expr"]
    assert "* 2)" in rules["MigrationLatencyDegraded"]["expr"]
    default = alert_rules(RULES.read_text())
    assert {n for n in rules if rules[n] != default[n]} == {
        "MigrationReplicationLagTooHigh",
        "MigrationLockWaitHigh",
        "MigrationLatencyDegraded",
    }


def test_prometheus_operator_format_wraps_the_same_groups():
    proc = run_cli("rules", "--format", "prometheus-operator")
    assert proc.returncode == 0, proc.stderr
    manifest = yaml.safe_load(proc.stdout)
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == yaml.safe_load(RULES.read_text())


def test_promtool_checks_the_rules():
    promtool = require_binary("promtool", "prometheus")
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass():
    promtool = require_binary("promtool", "prometheus")
    files = sorted(RULE_TESTS.glob("*.yml"))
    assert files, "no promtool tests under rules/tests"
    proc = subprocess.run(
        [promtool, "test", "rules", *(f.name for f in files)],
        cwd=RULE_TESTS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]


def test_every_alert_has_a_promtool_test():
    assert untested_alerts(RULES, RULE_TESTS) == set()


def test_the_coverage_check_catches_an_alert_without_a_test(tmp_path: Path):
    doc = yaml.safe_load(RULES.read_text())
    doc["groups"][1]["rules"].append({"alert": "MigrationSomethingNew", "expr": "vector(1)"})
    extended = tmp_path / "rules.yml"
    extended.write_text(yaml.safe_dump(doc))
    assert untested_alerts(extended, RULE_TESTS) == {"MigrationSomethingNew"}


def test_every_alert_has_a_runbook_and_a_readme_row():
    readme = (ROOT / "README.md").read_text()
    for alert in alerts(Thresholds()):
        runbook = RUNBOOKS / f"{alert.name}.md"
        assert runbook.exists(), f"missing runbook {runbook}"
        text = runbook.read_text()
        for heading in ("Meaning", "Impact", "Diagnosis", "Action"):
            assert heading in text, f"{runbook} has no {heading} section"
        assert f"`{alert.name}`" in readme, f"README.md does not list {alert.name}"
