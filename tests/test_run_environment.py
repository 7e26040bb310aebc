"""`migexport run` survives its environment: a log on a full disk never blocks or stops the command
(its output keeps reaching stdout, the failure is said once and recorded in the state, the time limit
still kills the process group), and two runs of one state file started together never both run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_run_server import pg_env

from conftest import wait_for
from test_cli import migexport_argv

LINES = 3000  # ~180 kB of output: far more than the tiny filesystem and than a pipe's 64 kB buffer
NOISY = (
    f'i=0; while [ $i -lt {LINES} ]; do echo "line $i of the migration output, padded to sixty bytes"; i=$((i+1)); done'
)


@pytest.fixture
def full_disk_log(tmp_path: Path) -> Iterator[Path]:
    """A log path on a filesystem of 64 kB that the migration's output fills: a tmpfs (as root), else
    /dev/full (every write: ENOSPC)."""
    mount = Path(tempfile.mkdtemp(prefix="migexport-tinyfs-"))
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=False).returncode == 0
    )
    try:
        yield mount / "migration.log" if mounted else Path("/dev/full")
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


@pytest.fixture
def quiet_env(pg) -> dict[str, str]:
    """The libpq environment of the migration (and of run's control session), with a lock_timeout so
    that run has nothing to warn about but what the test provokes."""
    return pg_env(pg.primary, PGOPTIONS="-c lock_timeout=5s")


def run(tmp_path: Path, log: Path, *command: str, env: dict[str, str], limit: str = "20s"):
    argv = [*migexport_argv(), "run", "--id", "m1", "--time-limit", limit, "--log-file", str(log)]
    argv += ["--state-file", str(tmp_path / "state.json"), "--", *command]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "state.json").read_text())


def test_full_disk_log_never_blocks_the_command(tmp_path, full_disk_log, quiet_env):
    started = time.monotonic()
    proc = run(tmp_path, full_disk_log, "sh", "-c", f"{NOISY}; echo DONE; exit 3", env=quiet_env)
    assert time.monotonic() - started < 15  # not held until the time limit
    assert proc.returncode == 3, proc.stderr  # the command's own status
    out = proc.stdout.splitlines()
    assert len([line for line in out if line.startswith("line ")]) == LINES and out[-1] == "DONE"
    warnings = proc.stderr.splitlines()
    assert len(warnings) == 1, warnings  # said once, not once per line
    assert "cannot write the migration log" in warnings[0] and "No space left on device" in warnings[0]
    assert "internal error" not in proc.stderr
    s = state(tmp_path)
    assert (s["status"], s["exit_code"]) == ("failed", 3) and s["ended_at"] is not None
    assert "No space left on device" in s["log_error"]


def test_full_disk_log_time_limit_still_kills_the_process_group(tmp_path, full_disk_log, quiet_env):
    child_pid = tmp_path / "child.pid"
    proc = run(
        tmp_path,
        full_disk_log,
        "sh",
        "-c",
        f"{NOISY}; echo WAITING; sleep 300 & echo $! > {child_pid}; wait",
        env=quiet_env,
        limit="4s",
    )
    assert proc.returncode == 124, proc.stderr
    assert proc.stdout.splitlines()[-1] == "WAITING"
    child = int(child_pid.read_text())
    wait_for(lambda: not _alive(child), timeout=5, what="the background child to be killed with its group")
    warnings = proc.stderr.splitlines()
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    s = state(tmp_path)
    assert (s["status"], s["exit_code"]) == ("timed_out", 124) and s["ended_at"] is not None
    assert "No space left on device" in s["log_error"]


# --- Two runs at once ----------------------------------------------------------------------------

# Started as real processes, each imports migexport (the slow part), says it is ready, and waits for
# the go file: the two of a pair then enter `run` within a millisecond of each other.
GATED = (
    "import os, sys, time\n"
    "from migexport.cli import main\n"
    "ready, go = sys.argv[1], sys.argv[2]\n"
    "open(ready, 'w').close()\n"
    "while not os.path.exists(go): time.sleep(0.0005)\n"
    "main(sys.argv[3:])\n"
)


def _gated_pair(tmp_path: Path, trial: int, env: dict[str, str]) -> tuple[list[subprocess.CompletedProcess], Path]:
    events = tmp_path / f"events-{trial}"
    go = tmp_path / f"go-{trial}"
    procs = []
    for n in (1, 2):
        argv = ["run", "--id", f"m{trial}-{n}", "--time-limit", "30s", "--log-file", str(tmp_path / "migration.log")]
        argv += ["--state-file", str(tmp_path / f"state-{trial}.json"), "--"]
        argv += ["sh", "-c", f"echo start {n} >> {events}; sleep 1.5; echo end {n} >> {events}"]
        ready = tmp_path / f"ready-{trial}-{n}"
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-c", GATED, str(ready), str(go), *argv],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                ready,
            )
        )
    wait_for(lambda: all(ready.exists() for _, ready in procs), timeout=30, what="both runs to be ready")
    go.touch()
    done = []
    for p, _ in procs:
        out, err = p.communicate(timeout=60)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done, events


def test_two_runs_at_once_exactly_one_runs(tmp_path, quiet_env):
    trials = 10
    overlaps = []
    for trial in range(trials):
        (pair, events) = _gated_pair(tmp_path, trial, quiet_env)
        starts = [line for line in events.read_text().splitlines() if line.startswith("start")]
        codes = sorted(p.returncode for p in pair)
        if len(starts) != 1 or codes != [0, 2]:
            overlaps.append((trial, starts, codes, [p.stderr for p in pair]))
            continue
        loser = next(p for p in pair if p.returncode == 2)
        lines = loser.stderr.splitlines()
        assert len(lines) == 1, lines
        # It names the holder: from the state file once the winner wrote it, else from the lock file.
        assert "is still running" in lines[0] and "pid " in lines[0], lines
    assert not overlaps, f"{len(overlaps)} of {trials} pairs did not have exactly one run: {overlaps}"


def test_a_killed_runs_lock_file_blocks_nobody(tmp_path, quiet_env):
    """flock() goes with its holder: the lock file a SIGKILLed run leaves behind is no obstacle."""
    log = tmp_path / "migration.log"
    child_pid = tmp_path / "child.pid"
    argv = [*migexport_argv(), "run", "--id", "m1", "--log-file", str(log)]
    argv += ["--state-file", str(tmp_path / "state.json")]
    first = subprocess.Popen(
        [*argv, "--", "sh", "-c", f"echo $$ > {child_pid}; echo ready; exec sleep 300"],
        env=quiet_env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline() == "ready\n"
        second = subprocess.run([*argv, "--", "true"], env=quiet_env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 2 and "is still running" in second.stderr
        first.kill()
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.killpg(int(child_pid.read_text()), signal.SIGKILL)
    assert (tmp_path / "state.json.lock").exists()
    third = subprocess.run([*argv, "--", "echo", "after"], env=quiet_env, capture_output=True, text=True, timeout=30)
    assert third.returncode == 0, third.stderr
    assert third.stdout == "after\n"
    assert "ended without recording its end" in third.stderr  # the killed run's state is called lost
    assert state(tmp_path)["status"] == "succeeded"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_lock_path_that_is_not_a_regular_file_refuses_to_start(tmp_path):
    (tmp_path / "state.json.lock").mkdir()
    proc = run(tmp_path, tmp_path / "migration.log", "sh", "-c", f"touch {tmp_path / 'ran'}", env=dict(os.environ))
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "state.json.lock" in proc.stderr, proc.stderr
    assert not (tmp_path / "ran").exists()


def test_a_closed_stdout_never_blocks_the_command_and_the_log_gets_everything(tmp_path, quiet_env):
    """`migexport run ... | head -1`: stdout goes away, the command runs on, the log has all of it."""
    log = tmp_path / "migration.log"
    argv = [*migexport_argv(), "run", "--id", "m1", "--log-file", str(log)]
    argv += ["--state-file", str(tmp_path / "state.json"), "--", "sh", "-c", f"{NOISY}; echo DONE; exit 3"]
    proc = subprocess.Popen(argv, env=quiet_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "line 0 of the migration output, padded to sixty bytes\n"
        proc.stdout.close()  # like head -1
        assert proc.wait(timeout=30) == 3
    finally:
        if proc.poll() is None:
            proc.terminate()  # run forwards it to the command's group
            proc.wait(timeout=15)
    warnings = proc.stderr.read().splitlines()
    assert len(warnings) == 1 and "cannot write the command's output to stdout" in warnings[0], warnings
    text = log.read_text()
    assert text.count("\nline ") == LINES and "\nDONE\n" in text and "failed, exit code 3" in text
    assert state(tmp_path)["status"] == "failed"
