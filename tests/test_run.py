"""`migexport run`: exit status, time limit, signals, the log, and the state `serve` exports."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import monitor_dsn, scrape, series, value, wait_for
from migexport.config import Migration
from migexport.dsn import Target
from test_cli import migexport_argv


def run(
    tmp_path: Path, *command: str, limit: str = "30s", watch: str = "1h", timeout: float = 30, mid: str = "m1"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *migexport_argv(),
            "run",
            "--id",
            mid,
            "--time-limit",
            limit,
            "--watch-window",
            watch,
            "--log-file",
            str(tmp_path / "migration.log"),
            "--state-file",
            str(tmp_path / "state.json"),
            "--",
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def exporter_for(pg, tmp_path: Path, start_exporter):
    """An exporter that reads the state file these tests' runs write."""
    return lambda: start_exporter(
        Target("primary", monitor_dsn(pg.primary)), migration=Migration(id="m1"), state_path=tmp_path / "state.json"
    )


def migration(metrics, name: str) -> float:
    return value(metrics, f"migexport_migration_{name}", migration_id="m1")


def test_before_any_run_nothing_is_in_progress_or_failed(exporter_for):
    m = scrape(exporter_for().url)
    assert migration(m, "in_progress") == 0
    assert migration(m, "failed") == 0
    assert migration(m, "watch_active") == 0
    assert migration(m, "time_budget_seconds") == 1800
    assert migration(m, "state_readable") == 1


def test_failing_command_exits_1_and_is_exported_as_failed(tmp_path, exporter_for):
    proc = run(tmp_path, "sh", "-c", "echo applying step 1; echo 'ERROR: column exists' >&2; false")
    assert proc.returncode == 1
    log = (tmp_path / "migration.log").read_text()
    assert log.startswith("Migration started at ")
    assert "applying step 1\n" in log and "ERROR: column exists\n" in log  # stdout and stderr, combined
    assert "failed, exit code 1" in log

    m = scrape(exporter_for().url)
    assert migration(m, "failed") == 1
    assert migration(m, "timed_out") == 0
    assert migration(m, "in_progress") == 0
    assert migration(m, "exit_code") == 1
    assert migration(m, "watch_active") == 1  # the hour after the end is watched too
    assert migration(m, "end_timestamp_seconds") >= migration(m, "start_timestamp_seconds")


def test_time_limit_kills_the_command_and_its_children(tmp_path, exporter_for):
    child_pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    proc = run(
        tmp_path,
        "sh",
        "-c",
        f"echo started; sleep 300 & echo $! > {child_pid_file}; wait",
        limit="2s",
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 124
    assert elapsed < 20
    child = int(child_pid_file.read_text())
    wait_for(lambda: not _alive(child), timeout=5, what="the background child to be killed too")
    log = (tmp_path / "migration.log").read_text()
    assert "started\n" in log and "time limit of 2s reached" in log and "timed out, exit code 124" in log

    m = scrape(exporter_for().url)
    assert migration(m, "timed_out") == 1
    assert migration(m, "failed") == 1
    assert migration(m, "time_budget_seconds") == 2


def test_log_is_appended_not_overwritten(tmp_path):
    run(tmp_path, "echo", "first")
    run(tmp_path, "echo", "second")
    log = (tmp_path / "migration.log").read_text()
    assert log.count("Migration started at") == 2
    assert log.index("first") < log.index("second")


def test_running_state_then_sigterm_is_forwarded(tmp_path, exporter_for):
    exporter = exporter_for()
    proc = subprocess.Popen(
        [
            *migexport_argv(),
            "run",
            "--id",
            "m1",
            "--log-file",
            str(tmp_path / "migration.log"),
            "--state-file",
            str(tmp_path / "state.json"),
            "--",
            "sh",
            "-c",
            "trap 'echo got TERM; exit 143' TERM; echo ready; while true; do sleep 0.1; done",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "ready\n"
        m = scrape(exporter.url)
        assert migration(m, "in_progress") == 1
        assert migration(m, "watch_active") == 1
        assert ("migexport_migration_end_timestamp_seconds", frozenset({("migration_id", "m1")})) not in m

        # A second run while this one is alive is refused, and does not touch the state.
        second = run(tmp_path, "true")
        assert second.returncode == 2
        assert "is still running" in second.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "got TERM" in (tmp_path / "migration.log").read_text()
    m = scrape(exporter.url)
    assert migration(m, "in_progress") == 0
    assert migration(m, "failed") == 1


def test_watch_window_closes_after_the_end(tmp_path, exporter_for):
    assert run(tmp_path, "true", watch="1s").returncode == 0
    exporter = exporter_for()
    wait_for(lambda: migration(scrape(exporter.url), "watch_active") == 0, timeout=5, what="watch window to close")
    assert migration(scrape(exporter.url), "failed") == 0


def test_missing_command_exits_127_with_one_line(tmp_path, exporter_for):
    proc = run(tmp_path, "/nonexistent/migrate")
    assert proc.returncode == 127
    assert proc.stderr.strip().count("\n") == 0 and "cannot start" in proc.stderr
    assert migration(scrape(exporter_for().url), "failed") == 1


def test_the_exported_migration_is_the_one_run_ran_not_the_configs(tmp_path, exporter_for):
    exporter = exporter_for()  # configured for m1
    assert run(tmp_path, "false", mid="hotfix-7").returncode == 1
    m = scrape(exporter.url)
    assert value(m, "migexport_migration_failed", migration_id="hotfix-7") == 1
    assert value(m, "migexport_migration_watch_active", migration_id="hotfix-7") == 1
    assert {dict(lbl)["migration_id"] for lbl in series(m, "migexport_migration_state_readable")} == {"hotfix-7"}

    # The next migration replaces it over the same exporter's lifetime.
    assert run(tmp_path, "true", mid="m2").returncode == 0
    m = scrape(exporter.url)
    assert value(m, "migexport_migration_failed", migration_id="m2") == 0
    assert not any(dict(lbl).get("migration_id") == "hotfix-7" for (_, lbl) in m)


def test_broken_state_file_is_reported_not_fatal(tmp_path, exporter_for):
    (tmp_path / "state.json").write_text('{"format": "migexport-state", "version": 1, "status": ')
    m = scrape(exporter_for().url)
    assert migration(m, "state_readable") == 0
    assert migration(m, "in_progress") == 0
    assert value(m, "migexport_up", target="primary") == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
