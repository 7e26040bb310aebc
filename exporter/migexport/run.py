"""`migexport run -- COMMAND...`: the checklist's execution step, done so the exporter can see it.

    echo "Migration started at $(date)" >> migration.log
    timeout 30m npm run migrate:production 2>&1 | tee -a migration.log

plus what that line cannot do: the time limit kills the command's whole process group (not just the
shell), SIGINT/SIGTERM reach the command, the exit status is the command's own (124 on timeout, as
with timeout(1)), and the state (running, succeeded, failed, timed out) is published to the state
file that `migexport serve` reads.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TextIO

from migexport.state import (
    FAILED,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    MigrationState,
    StateError,
    read_state,
    write_state,
)

EXIT_TIMED_OUT = 124  # what timeout(1) returns
EXIT_NOT_FOUND = 127
KILL_GRACE_SECONDS = 5.0


class RunError(RuntimeError):
    """The migration could not be started; the message is one printable line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%a %b %d %H:%M:%S %Z %Y")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_not_running(state_path: Path) -> None:
    """Refuse to start while the state file says another migration is running in a live process."""
    try:
        state = read_state(state_path)
    except StateError:
        return  # a broken state file is replaced by this run's state
    if state and state.in_progress and state.pid and state.pid != os.getpid() and _pid_alive(state.pid):
        raise RunError(f"migration {state.migration_id!r} is still running (pid {state.pid}, state file {state_path})")


def _copy_output(source, log: TextIO, echo: Callable[[str], None]) -> None:
    """Tee the command's combined output to the log (flushed per line) and our stdout."""
    for raw in iter(source.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        log.write(line)
        log.flush()
        echo(line)


def _kill_group(pgid: int, proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_SECONDS)
    # Children may outlive the leader: SIGKILL whatever is left in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


def run_migration(
    command: list[str],
    migration_id: str,
    time_budget_seconds: float,
    watch_window_seconds: float,
    log_path: Path,
    state_path: Path,
    echo: Callable[[str], None] = lambda s: (sys.stdout.write(s), sys.stdout.flush()),
) -> int:
    if not command:
        raise RunError("no command given: migexport run [OPTIONS] -- COMMAND [ARGS...]")
    check_not_running(state_path)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
    except OSError as exc:
        raise RunError(f"cannot open migration log {log_path}: {exc.strerror}") from None

    started = time.time()

    def publish(status: str, ended: float | None = None, code: int | None = None) -> None:
        write_state(
            state_path,
            MigrationState(
                migration_id=migration_id,
                status=status,
                started_at=started,
                time_budget_seconds=time_budget_seconds,
                watch_window_seconds=watch_window_seconds,
                ended_at=ended,
                exit_code=code,
                pid=os.getpid(),
            ),
        )

    try:
        log.write(f"Migration started at {_stamp(started)}\n")
        log.write(f"migration {migration_id}: {shlex.join(command)} (time limit {time_budget_seconds:g}s)\n")
        log.flush()
        publish(RUNNING)
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so the time limit can end all of it
            )
        except OSError as exc:
            ended = time.time()
            log.write(f"cannot start {command[0]}: {exc.strerror}\n")
            log.write(f"Migration ended at {_stamp(ended)}: failed, exit code {EXIT_NOT_FOUND}\n")
            publish(FAILED, ended, EXIT_NOT_FOUND)
            raise RunError(f"cannot start {command[0]!r}: {exc.strerror}", EXIT_NOT_FOUND) from None

        forwarded: list[int] = []

        def forward(signum: int, _frame: object) -> None:
            forwarded.append(signum)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        copier = threading.Thread(target=_copy_output, args=(proc.stdout, log, echo), daemon=True)
        copier.start()
        timed_out = False
        try:
            try:
                proc.wait(timeout=max(0.0, started + time_budget_seconds - time.time()))
            except subprocess.TimeoutExpired:
                timed_out = True
                log.write(f"time limit of {time_budget_seconds:g}s reached: killing the process group\n")
                log.flush()
                _kill_group(proc.pid, proc)
            # A grandchild that escaped the group may still hold the pipe open: do not wait forever.
            copier.join(timeout=KILL_GRACE_SECONDS)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

        rc = proc.returncode
        code = EXIT_TIMED_OUT if timed_out else (128 - rc if rc < 0 else rc)
        status = TIMED_OUT if timed_out else (SUCCEEDED if code == 0 else FAILED)
        ended = time.time()
        note = f" after signal {forwarded[0]}" if forwarded else ""
        log.write(
            f"Migration ended at {_stamp(ended)}: {status.replace('_', ' ')}{note}, exit code {code}, "
            f"duration {ended - started:.1f}s\n"
        )
        log.flush()
        publish(status, ended, code)
        return code
    finally:
        log.close()
