"""Every number validated (issue 12, item 4): timeouts that would become 0 on the server, durations
Prometheus cannot represent, NaN and infinity, duplicate keys, and inputs that used to end in a
traceback (deep nesting, an alias bomb, non-UTF-8, integers beyond float range). Each is one line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest

from conftest import require_binary
from migexport.baseline_file import BaselineError, read_baseline
from migexport.cli import main
from migexport.config import ConfigError, Thresholds, load_config, parse_config
from migexport.rulegen import RuleError, render
from migexport.state import StateError, read_state
from migexport.targets import SessionSettings
from migexport.units import PROMETHEUS_MAX_DURATION_SECONDS, parse_duration

TARGETS = "targets:\n  p: {dsn: 'host=127.0.0.1 port=1'}\n"


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    logging.root.handlers.clear()
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("migexport: error: "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def config_problems(tmp_path: Path, text: str | bytes) -> list[str]:
    path = tmp_path / "migexport.yml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    for problem in exc.value.problems:
        assert "\n" not in problem and len(problem) < 400
    return exc.value.problems


# -- timeouts below 1 ms: 0 on the server is no timeout at all ------------------------------------
@pytest.mark.parametrize(("option", "value"), [("--statement-timeout", "0.1ms"), ("--lock-timeout", "0.4ms")])
def test_sub_millisecond_timeout_is_an_error_not_zero(option: str, value: str):
    code, _, err = cli("serve", "-t", "p=host=127.0.0.1 port=1", option, value, "--listen", "127.0.0.1:1")
    assert code == 2
    assert f"{option}: duration '{value}' is below 1ms" in one_error_line(err)


@pytest.mark.parametrize("key", ["statement_timeout", "lock_timeout"])
def test_sub_millisecond_timeout_in_the_config_is_an_error(tmp_path: Path, key: str):
    problems = config_problems(tmp_path, f"{TARGETS}{key}: 0.4ms\n")
    assert problems == [f"{tmp_path / 'migexport.yml'}: {key}: duration '0.4ms' is below 1ms"]


def test_session_settings_refuse_a_timeout_postgresql_reads_as_none():
    with pytest.raises(ValueError, match="lock_timeout: must be from 1ms"):
        SessionSettings(lock_timeout_ms=0)
    with pytest.raises(ValueError, match="statement_timeout: must be from 1ms"):
        SessionSettings(statement_timeout_ms=2**31)
    assert SessionSettings(lock_timeout_ms=1).options().startswith("-c lock_timeout=1 ")


# -- durations beyond what timers and Prometheus hold -------------------------------------------------
def test_huge_scrape_timeout_is_one_line_not_a_500_per_scrape():
    code, _, err = cli("serve", "-t", "p=host=127.0.0.1 port=1", "--scrape-timeout", "99999999h")
    assert code == 2
    assert "--scrape-timeout: duration '99999999h' is out of range (at most 1h)" in one_error_line(err)


def test_alert_for_promtool_cannot_represent_is_refused(tmp_path: Path):
    problems = config_problems(tmp_path, f"{TARGETS}thresholds: {{alert_for: 99999999h}}\n")
    assert len(problems) == 1 and "thresholds.alert_for: duration '99999999h' is out of range" in problems[0]
    with pytest.raises(RuleError, match=r"thresholds\.alert_for"):
        render(Thresholds(alert_for_seconds=99999999 * 3600.0))
    code, _, err = cli("rules", "-c", str(tmp_path / "migexport.yml"))
    assert code == 2 and "thresholds.alert_for" in one_error_line(err)


def test_the_longest_duration_allowed_renders_rules_promtool_accepts(tmp_path: Path):
    promtool = require_binary("promtool", "prometheus")
    seconds = parse_duration("2562047h")  # the longest whole hours Prometheus can hold
    assert seconds <= PROMETHEUS_MAX_DURATION_SECONDS
    config = parse_config(
        {"targets": {"p": "host=x"}, "thresholds": {"alert_for": "2562047h", "critical_for": "2562047h"}}
    )
    rules = tmp_path / "rules.yml"
    rules.write_text(render(config.thresholds))
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules.write_text(rules.read_text().replace("for: 2562047h", "for: 2562048h"))
    proc = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, check=False)
    assert "duration out of range" in proc.stdout + proc.stderr  # the bound is promtool's own


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        (".nan", "thresholds.lock_wait: duration .nan is not a number"),
        (".inf", "thresholds.lock_wait: duration inf is out of range"),
        ("-.inf", "thresholds.lock_wait: duration -inf is negative"),
    ],
)
def test_nan_and_infinite_durations_are_refused(tmp_path: Path, yaml_value: str, expected: str):
    problems = config_problems(tmp_path, f"{TARGETS}thresholds: {{lock_wait: {yaml_value}}}\n")
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize("key", ["latency_degradation_ratio", "connections_floor", "connections_change_ratio"])
@pytest.mark.parametrize("yaml_value", [".nan", ".inf", "1" + "0" * 400])
def test_nan_infinite_and_huge_ratios_are_refused(tmp_path: Path, key: str, yaml_value: str):
    problems = config_problems(tmp_path, f"{TARGETS}thresholds: {{{key}: {yaml_value}}}\n")
    assert len(problems) == 1 and f"thresholds.{key}: must be" in problems[0], problems


def test_nan_threshold_no_longer_renders_a_rule_that_cannot_fire(tmp_path: Path):
    (tmp_path / "migexport.yml").write_text(f"{TARGETS}thresholds: {{connections_floor: .nan}}\n")
    code, out, err = cli("rules", "-c", str(tmp_path / "migexport.yml"))
    assert code == 2 and "thresholds.connections_floor: must be a finite number" in one_error_line(err)
    assert "nan" not in out


# -- YAML: duplicate keys, nesting, alias bombs, encodings, numbers Python cannot hold ----------------
def test_duplicate_keys_are_errors(tmp_path: Path):
    problems = config_problems(tmp_path, f"{TARGETS}listen: ':1'\nlisten: ':2'\n")
    assert problems == [f"{tmp_path / 'migexport.yml'}: not valid YAML at line 4, column 1: duplicate key 'listen'"]
    problems = config_problems(tmp_path, f"{TARGETS}thresholds:\n  lock_wait: 1s\n  lock_wait: 1h\n")
    assert "duplicate key 'lock_wait'" in problems[0]


def test_merge_keys_still_work(tmp_path: Path):
    path = tmp_path / "migexport.yml"
    path.write_text(
        f"{TARGETS}x: &probe {{interval: 5s, timeout: 1s}}\n".replace(
            "x:", "probes:\n  - name: a\n    sql: SELECT 1\n    <<:"
        )
    )
    config = load_config(path)
    assert config.probes[0].interval_seconds == 5.0


def test_deeply_nested_config_is_one_line_quickly(tmp_path: Path):
    started = time.monotonic()
    problems = config_problems(tmp_path, f"{TARGETS}x: {'[' * 5000}{']' * 5000}\n")
    assert time.monotonic() - started < 5
    assert len(problems) == 1 and "nested more than 50 levels deep" in problems[0]


def test_alias_bomb_is_refused_before_it_is_built(tmp_path: Path):
    # 10 x 10 ... 7 levels: 10^7 values once expanded, from a few hundred bytes.
    lines = [TARGETS.rstrip("\n"), "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    tracemalloc.start()
    started = time.monotonic()
    try:
        problems = config_problems(tmp_path, "\n".join(lines) + "\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5
    assert peak < 20 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"
    assert len(problems) == 1 and "more than 100000 values once its aliases are expanded" in problems[0]


def test_a_recursive_alias_is_one_line(tmp_path: Path):
    problems = config_problems(tmp_path, f"{TARGETS}x: &a [*a]\n")
    assert "refers to its own anchor" in problems[0]


def test_non_utf8_config_is_one_line(tmp_path: Path):
    problems = config_problems(tmp_path, f"{TARGETS}# caf\xe9\n".encode("latin-1"))
    assert problems == [f"{tmp_path / 'migexport.yml'}: not UTF-8 text (byte 50)"]
    code, _, err = cli("rules", "-c", str(tmp_path / "migexport.yml"))
    assert code == 2 and "not UTF-8 text" in one_error_line(err)


def test_oversized_config_is_refused_before_parsing(tmp_path: Path):
    problems = config_problems(tmp_path, TARGETS + "#" * (2 * 1024 * 1024) + "\n")
    assert "larger than 1024 KiB" in problems[0]


def test_integer_yaml_cannot_convert_is_one_line(tmp_path: Path):
    problems = config_problems(tmp_path, f"{TARGETS}listen: {'9' * 5000}\n")
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'migexport.yml'}: not valid YAML"), problems


def test_an_error_line_never_holds_a_huge_value(tmp_path: Path):
    problems = config_problems(tmp_path, f"{TARGETS}listen: [{', '.join(['abcdef'] * 20000)}]\n")
    assert all(len(p) < 400 for p in problems)


# -- JSON files: integers beyond float range ---------------------------------------------------------
@pytest.mark.parametrize("number", ["9" * 400, "1" + "0" * 400 + ".5", "1e400", "-1e400", "NaN", "Infinity"])
def test_baseline_and_state_files_with_numbers_beyond_float_are_one_line(tmp_path: Path, number: str):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(f'{{"format": "migexport-baseline", "version": 1, "window_seconds": {number}}}')
    with pytest.raises(BaselineError) as exc:
        read_baseline(baseline)
    assert "\n" not in str(exc.value)
    code, _, err = cli("show-baseline", str(baseline))
    assert code == 2 and "not a migexport baseline file" in one_error_line(err)
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"format": "migexport-state", "version": 1}).replace("}", f', "pid": {number}}}'))
    with pytest.raises(StateError) as exc:
        read_state(state)
    assert "\n" not in str(exc.value)


def test_checks_and_snapshot_files_are_bounded_before_parsing(tmp_path: Path):
    from migexport.checks.result import ChecksFileError, read_checks
    from migexport.checks.snapshot import SnapshotError, read_snapshot

    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:
        f.truncate(200 * 1024 * 1024)  # sparse: 200 MB of NUL bytes on no disk
    tracemalloc.start()
    try:
        with pytest.raises(ChecksFileError, match="larger than 16 MiB"):
            read_checks(huge)
        config = parse_config({"targets": {"p": "host=x"}, "migration": {"snapshot_file": str(huge)}})
        with pytest.raises(SnapshotError, match="larger than 16 MiB"):
            read_snapshot(config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 40 * 1024 * 1024, f"peak {peak / 1e6:.0f} MB"
