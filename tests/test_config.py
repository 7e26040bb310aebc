"""The config file: the annotated example, the checklist's defaults, and one line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from migexport.config import EXAMPLE_CONFIG, Thresholds, load_config
from test_cli import run_cli


def test_init_writes_the_example_which_loads_with_the_checklist_defaults(tmp_path: Path):
    path = tmp_path / "migexport.yml"
    proc = run_cli("init", str(path))
    assert proc.returncode == 0, proc.stderr
    assert path.read_text() == EXAMPLE_CONFIG
    assert path.stat().st_mode & 0o077 == 0  # private: a config may come to hold a password
    config = load_config(path, environ={"MIGEXPORT_PRIMARY_DSN": "host=db1 dbname=app"})
    assert config.thresholds == Thresholds()  # the file states exactly the defaults
    assert config.thresholds.latency_degradation_ratio == 1.5  # "response times degraded >50%"
    assert config.thresholds.error_rate_increase_ratio == 1.1  # "error rate increased >10%"
    assert config.thresholds.replication_lag_rollback_seconds == 600  # "replication lag >10 minutes"
    assert config.migration.time_budget_seconds == 1800  # "timeout 30m"
    assert config.migration.watch_window_seconds == 3600
    assert config.targets[0].dsn == "host=db1 dbname=app"
    assert config.probes[0].name == "recent_orders"


def test_init_does_not_overwrite(tmp_path: Path):
    path = tmp_path / "migexport.yml"
    path.write_text("mine\n")
    proc = run_cli("init", str(path))
    assert proc.returncode == 2 and "use --force" in proc.stderr
    assert path.read_text() == "mine\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listen: ':9745'\n", "targets: at least one target is required"),
        ("targets: {p: {dsn: 'host=x'}}\ntreshholds: {}\n", "treshholds: unknown key"),
        (
            "targets: {p: {dsn: 'host=x'}}\nthresholds: {lock_wait: -5s}\n",
            "thresholds.lock_wait: duration '-5s' is negative",
        ),
        (
            "targets: {p: {dsn: 'host=x'}}\nthresholds: {error_ratio_floor: -0.1}\n",
            "thresholds.error_ratio_floor: must be >= 0",
        ),
        ("targets: {p: {dsn: 'host=x'}}\nmigration: {time_budgt: 5m}\n", "migration.time_budgt: unknown key"),
        (
            "targets: {p: {dsn_env: MIGEXPORT_TEST_NOPE}}\n",
            "targets.p.dsn_env: environment variable MIGEXPORT_TEST_NOPE",
        ),
        ("targets: {p: {dsn: 'host=x', dsn_env: X}}\n", "targets.p: give exactly one of dsn, dsn_env, dsn_file"),
        ("targets: {p: {dsn: 'host=x'}}\nprobes: [{name: q}]\n", "probes[0].sql: is required"),
        (
            "targets: {p: {dsn: 'host=x'}}\nprobes: [{name: q, sql: 'SELECT 1', target: nope}]\n",
            "probes[0].target: 'nope'",
        ),
        ("targets: {p: {dsn: 'host=x'}}\napps: [{name: web, url: 'ftp://x'}]\n", "apps[0].url: must start with http"),
        ("targets: [\n", "not valid YAML at line 2"),
    ],
    ids=[
        "no-target",
        "unknown-key",
        "negative-duration",
        "negative-number",
        "unknown-nested",
        "unset-env",
        "two-sources",
        "probe-sql",
        "probe-target",
        "app-url",
        "yaml",
    ],
)
def test_config_errors_exit_2_naming_the_key(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "bad.yml"
    path.write_text(text)
    proc = run_cli("serve", "-c", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert any(line.startswith(f"migexport: error: {path}: ") and expected in line for line in lines), lines


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path):
    path = tmp_path / "bad.yml"
    path.write_text(
        "targets: {p: {dsn: 'host=x'}}\nthresholds: {lock_wait: -1s, bogus: 1, latency_degradation_ratio: 0.5}\n"
    )
    proc = run_cli("serve", "-c", str(path))
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert {line.split(": ")[3] for line in lines} == {
        "thresholds.bogus",
        "thresholds.lock_wait",
        "thresholds.latency_degradation_ratio",
    }


def test_missing_config_file(tmp_path: Path):
    proc = run_cli("serve", "-c", str(tmp_path / "nope.yml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"migexport: error: {tmp_path / 'nope.yml'}: cannot read: No such file or directory"
