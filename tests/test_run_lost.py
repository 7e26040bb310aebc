"""A `run` that dies without writing its end (SIGKILL, OOM kill, reboot) is reported as lost, pages,
and keeps the watch window open: its command may still be running, orphaned, without a time limit."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import monitor_dsn, scrape, series, value, wait_for
from migexport.config import Migration
from migexport.dsn import Target
from migexport.state import HEARTBEAT_INTERVAL_SECONDS, HEARTBEAT_MISSES, RUNNING, MigrationState, write_state
from test_cli import migexport_argv


def migration(metrics, name: str) -> float:
    return value(metrics, f"migexport_migration_{name}", migration_id="m1")


@pytest.fixture
def exporter(pg, tmp_path: Path, start_exporter):
    return start_exporter(
        Target("primary", monitor_dsn(pg.primary)), migration=Migration(id="m1"), state_path=tmp_path / "state.json"
    )


def run_argv(tmp_path: Path, *command: str) -> list[str]:
    files = ["--state-file", str(tmp_path / "state.json"), "--log-file", str(tmp_path / "migration.log")]
    return [*migexport_argv(), "run", "--id", "m1", *files, "--", *command]


def is_zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def read(tmp_path: Path) -> dict:
    try:
        return json.loads((tmp_path / "state.json").read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def running_sleep(tmp_path: Path) -> Iterator[subprocess.Popen]:
    """`migexport run -- sleep 60`, up and with its command started; the orphaned sleep is killed after."""
    proc = subprocess.Popen(
        run_argv(tmp_path, "sleep", "60"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    command_pid = None
    try:
        wait_for(lambda: "command_pid" in read(tmp_path) and read(tmp_path)["command_pid"], what="the command to start")
        command_pid = read(tmp_path)["command_pid"]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if command_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(command_pid, signal.SIGKILL)


def test_kill_9_of_run_is_lost_within_one_scrape(tmp_path, exporter):
    with running_sleep(tmp_path) as proc:
        m = scrape(exporter.url)
        assert migration(m, "in_progress") == 1 and migration(m, "lost") == 0
        command_pid = read(tmp_path)["command_pid"]

        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: is_zombie(proc.pid), what="run to be a zombie")
        # Not reaped yet: a zombie is dead too.
        m = scrape(exporter.url)
        print(f"\nfrom kill -9 to a scrape that reads lost: {time.monotonic() - killed:.2f}s")
        assert migration(m, "lost") == 1
        assert migration(m, "in_progress") == 0
        assert migration(m, "watch_active") == 1  # the alerts stay armed
        assert migration(m, "failed") == 0  # not a failure of the command: a state of its own
        assert not series(m, "migexport_migration_end_timestamp_seconds")
        os.kill(command_pid, 0)  # the orphan the alert is about: still running (killed in the fixture)

        # The next run replaces the lost one, saying so, instead of refusing to start.
        proc.wait()
        nxt = subprocess.run(
            run_argv(tmp_path, "true"),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert nxt.returncode == 0
        assert "ended without recording its end" in nxt.stderr and f"process group {command_pid}" in nxt.stderr
    assert migration(scrape(exporter.url), "lost") == 0


def test_the_heartbeat_is_refreshed_while_the_command_runs(tmp_path):
    with running_sleep(tmp_path):
        first = read(tmp_path)["heartbeat_at"]
        wait_for(
            lambda: read(tmp_path).get("heartbeat_at", first) > first,
            timeout=3 * HEARTBEAT_INTERVAL_SECONDS,
            what="a newer heartbeat",
        )
        assert read(tmp_path)["status"] == "running"


def other_host_state(heartbeat_age: float) -> MigrationState:
    now = time.time()
    return MigrationState(
        "m1",
        RUNNING,
        now - 600,
        1800,
        3600,
        pid=1,  # alive here, but a pid of another machine means nothing here
        host="db-migration-runner-elsewhere",
        heartbeat_at=now - heartbeat_age,
        heartbeat_interval_seconds=HEARTBEAT_INTERVAL_SECONDS,
    )


def test_a_run_on_another_host_is_lost_when_its_heartbeat_stops(tmp_path, exporter):
    state = tmp_path / "state.json"
    stale = HEARTBEAT_MISSES * HEARTBEAT_INTERVAL_SECONDS
    write_state(state, other_host_state(heartbeat_age=stale - 5))
    m = scrape(exporter.url)
    assert migration(m, "lost") == 0 and migration(m, "in_progress") == 1

    write_state(state, other_host_state(heartbeat_age=stale + 1))
    m = scrape(exporter.url)
    assert migration(m, "lost") == 1 and migration(m, "in_progress") == 0 and migration(m, "watch_active") == 1


def test_a_live_run_elsewhere_is_not_replaced(tmp_path):
    write_state(tmp_path / "state.json", other_host_state(heartbeat_age=1))
    proc = subprocess.run(
        run_argv(tmp_path, "true"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2 and "still running (pid 1 on db-migration-runner-elsewhere" in proc.stderr
