"""`migexport run -- COMMAND...`: the checklist's execution step, done so the exporter can see it.

    echo "Migration started at $(date)" >> migration.log
    timeout 30m npm run migrate:production 2>&1 | tee -a migration.log

plus what that line cannot do: the time limit kills the command's whole process group (not just the
shell) and ends the migration's sessions on the database server too, SIGINT/SIGTERM/SIGHUP reach the
command (and end its sessions), the exit status is the command's own (124 on timeout, as with
timeout(1)), and the state (running, succeeded, failed, timed out) is published to the state file
that `migexport serve` reads, with a heartbeat so that a `run` killed without a trace is seen as lost.

It also survives its environment: a log that cannot be written (disk full, quota, permission) never
stops or blocks the command (its output goes on to stdout, the failure is said once and recorded in
the state), and an exclusive lock next to the state file makes two runs of one state file impossible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import getpass
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors

from migexport.checks.result import Report, Status, render_table
from migexport.dsn import TargetError, password_of, redact, redact_command, resolve_source, validate_dsn
from migexport.state import (
    FAILED,
    HEARTBEAT_INTERVAL_SECONDS,
    RUNNING,
    SUCCEEDED,
    TIMED_OUT,
    MigrationState,
    StateError,
    pid_alive,
    read_state,
    this_machine,
    write_state,
)

EXIT_TIMED_OUT = 124  # what timeout(1) returns
EXIT_NO_GO = 1  # preflight said no-go: the command did not start
EXIT_VERIFY_FAILED = 3  # the command succeeded, the verification after it failed
# After the watch window closes, how long `run --report` waits more: Prometheus' last evaluation of the
# window (rules every 15 s by default) must have happened.
REPORT_MARGIN_SECONDS = 20.0
EXIT_NOT_FOUND = 127
KILL_GRACE_SECONDS = 5.0
END_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Strings recorded in the state file are cut to this (the reader refuses longer ones).
MAX_RECORDED_TEXT = 500
# The copier reads the command's output in lines of at most this many bytes (a command that writes
# megabytes without a newline must not grow a line in memory).
COPY_LINE_MAX = 64 * 1024
LOCK_SUFFIX = ".lock"


class RunError(RuntimeError):
    """The migration could not be started; the message is one printable line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _stamp(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().strftime("%a %b %d %H:%M:%S %Z %Y")


# --- The server side: the migration's statements end with the run -------------------------------
#
# Killing the client is not enough. A backend waiting for a lock does not notice that its client is
# gone (it only finds out when it next talks to it), so an ALTER TABLE queued behind an open reader
# stays in the lock queue, keeps every later reader waiting behind it, and commits when the reader
# ends: the "timed out" migration is applied after all. Cancelling its statement is not enough either:
# pg_cancel_backend() ends the statement, but a transaction the migration opened stays open, idle and
# holding its locks, until the server notices the dead client. pg_terminate_backend() ends the session:
# its transaction rolls back, its locks are released and it leaves the lock queue at once. The client
# is being killed anyway, so there is nothing left that terminating could take from it.

CONTROL_APPLICATION_NAME = "migexport-run"
CONTROL_CONNECT_TIMEOUT_SECONDS = 3
# The control session must never wait long itself: it reads pg_stat_activity and signals backends,
# which take no lock on user tables, but a hung server must not hold the end of the run.
CONTROL_SETTINGS_SQL = "SET lock_timeout = '2s'; SET statement_timeout = '5s'"
# How long terminated backends get to leave pg_stat_activity before they count as remaining.
TERMINATE_WAIT_SECONDS = 5.0
LOCK_TIMEOUT_ADVICE = "5s"  # the checklist's migration tools use 0.5-10 s

# Its sessions: by application_name, and by role when the migration has a role of its own. Only client
# backends (not walsenders or background workers), never our own.
MIGRATION_SESSIONS_SQL = """
SELECT pid FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'
  AND (application_name = %(app)s OR (%(role)s <> '' AND usename = %(role)s))
"""
# reset_val: what a session of this role gets from the server, role, database and PGOPTIONS, before
# (and unchanged by) our own SETs.
LOCK_TIMEOUT_SQL = "SELECT current_user::text, reset_val::bigint FROM pg_settings WHERE name = 'lock_timeout'"
LIBPQ_ENV = ("PGSERVICE", "PGHOST", "PGHOSTADDR", "PGPORT", "PGUSER", "PGDATABASE")


@dataclass(frozen=True)
class ServerSide:
    """How `run` recognises the migration's sessions and reaches the server to end them."""

    application_name: str = "migration"
    role: str = ""
    # A DSN source (libpq string or URI, env:VAR, file:PATH); empty: the libpq environment (PG*
    # variables), i.e. the server the migration command itself connects to.
    control_dsn: str = ""


class ControlError(RuntimeError):
    """The control session could not do its work; the message is one line without a password."""


class ServerControl:
    """One session of our own (application_name migexport-run), opened at the start and kept, so
    that at the time limit a server whose connection slots have filled up behind the migration's
    lock queue still has one for us; reopened if it was lost in between."""

    def __init__(self, server: ServerSide, environ: Mapping[str, str] = os.environ) -> None:
        self.server = server
        if server.control_dsn:
            try:
                self.conninfo = resolve_source("migration.control_dsn", server.control_dsn, environ)
                validate_dsn("migration.control_dsn", self.conninfo)
            except TargetError as exc:
                raise RunError(f"control DSN: {exc}") from None
            self.where = f"control DSN {redact(self.conninfo)!r}"
        else:
            self.conninfo = ""  # libpq reads PGHOST, PGPORT, PGUSER, PGPASSWORD, PGSERVICE...
            given = [f"{k}={environ[k]}" for k in LIBPQ_ENV if environ.get(k)]
            self.where = f"the libpq environment ({', '.join(given) or 'no PG* variables: libpq defaults'})"
        self.secrets = tuple(s for s in (password_of(self.conninfo), environ.get("PGPASSWORD")) if s)
        self.conn: psycopg.Connection | None = None

    def _clean(self, exc: BaseException) -> str:
        lines = str(exc).strip().splitlines()
        return redact(lines[0] if lines else type(exc).__name__, self.secrets)

    def connect(self) -> psycopg.Connection:
        if self.conn is not None and not self.conn.closed:
            return self.conn
        try:
            conn = psycopg.connect(
                self.conninfo,
                autocommit=True,
                connect_timeout=CONTROL_CONNECT_TIMEOUT_SECONDS,
                application_name=CONTROL_APPLICATION_NAME,
            )
        except psycopg.Error as exc:
            raise ControlError(f"cannot connect via {self.where}: {self._clean(exc)}") from None
        try:
            conn.execute(CONTROL_SETTINGS_SQL)
        except psycopg.Error as exc:
            conn.close()
            raise ControlError(f"cannot set up the control session via {self.where}: {self._clean(exc)}") from None
        self.conn = conn
        return conn

    def lock_timeout_warning(self) -> str | None:
        """What the migration's sessions get, if they connect the way we do (same environment)."""
        try:
            conn = self.connect()
            user, lock_timeout_ms = conn.execute(LOCK_TIMEOUT_SQL).fetchone()  # type: ignore[misc]
        except psycopg.Error as exc:
            self.close()
            raise ControlError(f"query via {self.where} failed: {self._clean(exc)}") from None
        if lock_timeout_ms:
            return None
        role = self.server.role or user
        return (
            f"lock_timeout is 0 for user {user} (via {self.where}): an ALTER TABLE queued behind a long "
            f"transaction blocks the application behind it until that transaction ends; set one, e.g. "
            f"ALTER ROLE {role} SET lock_timeout = '{LOCK_TIMEOUT_ADVICE}' (migration tools use 0.5-10 s)"
        )

    def find_sessions(self) -> list[int]:
        params = {"app": self.server.application_name, "role": self.server.role}
        return [pid for (pid,) in self._query(MIGRATION_SESSIONS_SQL, params)]

    def _query(self, sql: str, params: dict[str, Any] | tuple[Any, ...]) -> list[tuple[Any, ...]]:
        for attempt in (1, 2):
            conn = self.connect()
            try:
                return conn.execute(sql, params).fetchall()
            except psycopg.OperationalError as exc:
                # The session kept since the start may be gone (server restart, idle_session_timeout).
                self.close()
                if attempt == 2:
                    raise ControlError(f"lost the control session via {self.where}: {self._clean(exc)}") from None
            except psycopg.Error as exc:
                raise ControlError(f"reading pg_stat_activity failed: {self._clean(exc)}") from None
        raise AssertionError("unreachable")

    def terminate(self, pids: list[int]) -> tuple[set[int], str | None]:
        """pg_terminate_backend() each one: (the pids it ended, the first refusal)."""
        ended: set[int] = set()
        error = None
        conn = self.connect()
        for pid in pids:
            try:
                row = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
            except psycopg.errors.InsufficientPrivilege as exc:
                # Another role's backend needs pg_signal_backend; a superuser's cannot be signalled at all.
                error = error or (
                    f"not allowed to terminate backend {pid} as {conn.info.user}: {self._clean(exc)} "
                    f"(connect as the migration's role, or GRANT pg_signal_backend TO {conn.info.user})"
                )
                continue
            except psycopg.Error as exc:
                raise ControlError(f"pg_terminate_backend({pid}) failed: {self._clean(exc)}") from None
            if row and row[0]:  # false: it was gone already
                ended.add(pid)
        return ended, error

    def end_sessions(self) -> tuple[int, int, str | None]:
        """Terminate the migration's sessions and wait for them to go: (terminated, remaining, error).
        Remaining counts every matching session at the end, one that connected meanwhile included."""
        ended, error = self.terminate(self.find_sessions())
        deadline = time.monotonic() + TERMINATE_WAIT_SECONDS
        left = self.find_sessions()
        while ended & set(left) and time.monotonic() < deadline:
            time.sleep(0.1)
            left = self.find_sessions()
        return len(ended), len(left), error

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None


# --- The run -------------------------------------------------------------------------------------


# --- One run per state file ----------------------------------------------------------------------
#
# Reading the state file and then writing "running" is not atomic: two runs started together both
# read "not running" and both start. An flock() on a file next to the state file (the state file itself
# is replaced by rename at every write, so its inode changes) is taken without waiting before anything
# else and held until the run's end is recorded: the second run fails at once. The kernel drops the
# lock when its holder dies however it dies, so a lock file left behind by a killed run blocks nobody;
# it is never deleted (deleting a lock file lets a third run lock a new inode while the first holds the
# old one). The lock file holds the holder's pid and host, to name it before its state is written.


def lock_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + LOCK_SUFFIX)


class RunLock:
    """The exclusive lock of a state file for one run's life; acquire() or RunError naming the holder."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, state_path: Path) -> RunLock:
        path = lock_path(state_path)
        flags = os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | flags, 0o644)
            except PermissionError:  # another user's lock file: locking needs no write access
                fd = os.open(path, os.O_RDONLY | flags, 0o644)
        except OSError as exc:
            raise RunError(f"cannot open the lock file {path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RunError(f"the lock file {path} is not a regular file: move it away")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(state_path, fd)
            os.close(fd)
            raise RunError(holder) from None
        except OSError as exc:  # e.g. ENOLCK: a filesystem without locks cannot keep two runs apart
            os.close(fd)
            raise RunError(
                f"cannot lock {path}: {exc.strerror or exc} (put the state file on a filesystem with locks)"
            ) from None
        machine = this_machine()
        holder_record = {"pid": os.getpid(), "host": machine.host, "since": int(time.time())}
        with contextlib.suppress(OSError):  # naming ourselves is a courtesy, not a condition
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_record) + "\n").encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = -1


def _lock_holder(state_path: Path, fd: int) -> str:
    """The one line for a run refused by the lock: the holder as the state file names it, else as the
    lock file does (a run still in its preflight has not written its state yet)."""
    try:
        state = read_state(state_path)
    except StateError:
        state = None
    if state is not None and state.in_progress:
        where = f"pid {state.pid} on {state.host}" if state.host else f"pid {state.pid}"
        return f"migration {state.migration_id!r} is still running ({where}, state file {state_path})"
    who = "holder unknown"
    deadline = time.monotonic() + 1.0  # the holder writes its name just after it took the lock
    while time.monotonic() < deadline:
        try:
            raw = json.loads(os.pread(fd, 512, 0))
            who = f"pid {int(raw['pid'])} on {str(raw['host'])[:100]} since {_stamp(float(raw['since']))}"
            break
        except (OSError, ValueError, TypeError, KeyError):
            time.sleep(0.02)
    return (
        f"another migexport run of state file {state_path} is still running ({who}; it holds "
        f"{lock_path(state_path)} and has not started its command yet)"
    )


def check_not_running(state_path: Path) -> str | None:
    """Refuse to start while the state file says another migration is running and its `run` is alive
    (here: its pid; elsewhere: its heartbeat). A lost one is replaced: returns the warning to give."""
    try:
        state = read_state(state_path)
    except StateError:
        return None  # a broken state file is replaced by this run's state
    if state is None or not state.in_progress or state.pid == os.getpid():
        return None
    if state.host is None and state.heartbeat_at is None:
        alive = state.pid is not None and pid_alive(state.pid)  # written by an older `run`
    else:
        alive = not state.lost(time.time(), this_machine())
    where = f"pid {state.pid} on {state.host}" if state.host else f"pid {state.pid}"
    if alive:
        raise RunError(f"migration {state.migration_id!r} is still running ({where}, state file {state_path})")
    return (
        f"the previous run of migration {state.migration_id!r} ({where}) ended without recording its end; "
        f"its command (process group {state.command_pid}) may still be running"
    )


class _Log:
    """The migration log, appended line by line without buffering. A write that fails (disk full, quota,
    permission, I/O error) never stops the migration: the failure is said once (stderr, and to
    `on_failure`, which records it in the state), later lines are left out of the log (they still reach
    stdout), and at close one line says what is missing, if the disk takes it by then."""

    def __init__(self, path: Path, fd: int, warn: Callable[[str], None]) -> None:
        self.path, self.fd, self.warn = path, fd, warn
        self.lock = threading.Lock()
        self.error: str | None = None  # the first failure, as recorded in the state
        self.failed_at: float | None = None
        self.dropped = 0  # lines left out since
        self.on_failure: Callable[[str], None] | None = None

    @classmethod
    def open(cls, path: Path, warn: Callable[[str], None]) -> _Log:
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path, os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666), warn)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def write(self, text: str) -> None:
        with self.lock:
            if self.error is not None:
                self.dropped += text.count("\n") or 1
                return
            try:
                self._write_all(text.encode("utf-8", errors="replace"))
                return
            except OSError as exc:
                self.failed_at = time.time()
                self.error = f"cannot write the migration log {self.path}: {exc.strerror or exc} (errno {exc.errno})"
                self.dropped += max(text.count("\n"), 1)
        # Outside the lock: the callbacks write the state and stderr, never this log.
        with contextlib.suppress(Exception):
            self.warn(f"warning: {self.error}; the command's output goes on to stdout only")
        if self.on_failure is not None:
            with contextlib.suppress(Exception):
                self.on_failure(self.error)

    def flush(self) -> None:
        """Nothing is buffered (TextIO compatibility)."""

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.error is not None and self.failed_at is not None:
            with contextlib.suppress(OSError):  # the disk may have room again: explain the gap
                self._write_all(
                    f"[migexport: this log is incomplete: {self.dropped} line(s) from {_stamp(self.failed_at)} on "
                    f"were not written ({self.error})]\n".encode("utf-8", errors="replace")
                )
        os.close(self.fd)
        self.fd = -1


def _copy_output(source, log: _Log, echo: Callable[[str], None], warn: Callable[[str], None]) -> None:
    """Tee the command's combined output to the log and our stdout. The pipe is drained whatever happens
    to either: a command whose pipe fills up blocks on its next write until the time limit."""
    echoing = True
    try:
        for raw in iter(lambda: source.readline(COPY_LINE_MAX), b""):
            line = raw.decode("utf-8", errors="replace")
            log.write(line)  # never raises
            if echoing:
                try:
                    echo(line)
                except (OSError, ValueError) as exc:  # stdout closed (| head), or its disk full
                    echoing = False
                    reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                    warn(f"warning: cannot write the command's output to stdout: {reason}; it goes on to the log only")
    except Exception:  # whatever went wrong here, the command must not block on a full pipe
        with contextlib.suppress(Exception):
            while source.read(COPY_LINE_MAX):
                pass


def _kill_group(pgid: int, proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=KILL_GRACE_SECONDS)
    # Children may outlive the leader: SIGKILL whatever is left in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()


@dataclass(frozen=True)
class Around:
    """What `run` does before and after the command; each step None when skipped. The steps record
    their own results (checks file, snapshot file); `run` logs them, gates on them and keeps a summary
    in the state file."""

    preflight: Callable[[], Report] | None = None  # before anything: a no-go refuses to start
    snapshot: Callable[[], str] | None = None  # the affected tables before the command: a summary line
    verify: Callable[[], Report] | None = None  # after a command that succeeded
    # After the watch window: write the report (given the run's start, to name the files); its paths.
    report: Callable[[float], list[Path]] | None = None


def _summary(report: Report, good: str, bad: str) -> dict[str, Any]:
    failed = [c.check + (f"({c.table})" if c.table else "") for c in report.checks if c.status is Status.FAIL]
    warned = [c.check + (f"({c.table})" if c.table else "") for c in report.checks if c.status is Status.WARN]
    out: dict[str, Any] = {"result": good if report.ok else bad, "at": int(report.at)}
    # Only non-empty texts: the state reader refuses empty strings.
    if failed:
        out["failed"] = _clip(", ".join(failed))
    if warned:
        out["warned"] = _clip(", ".join(warned))
    if report.integrity_total:
        out["integrity"] = f"{report.integrity_passed}/{report.integrity_total}"
    return out


class _StateWriter:
    """Publishes the state; while running, a thread rewrites it every HEARTBEAT_INTERVAL_SECONDS so a
    reader can tell a live run from one that was killed without a trace. After end() nothing else is
    written (a late heartbeat must not turn a finished run back into a running one)."""

    def __init__(self, path: Path, base: MigrationState, warn: Callable[[str], None]) -> None:
        self.path, self.base, self.warn = path, base, warn
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ended = False
        self.thread = threading.Thread(target=self._beat, name="migexport-heartbeat", daemon=True)

    def publish(self, final: bool = False, **changes: Any) -> None:
        with self.lock:
            if self.ended:
                return
            self.base = dataclasses.replace(self.base, **changes)
            self.ended = final
            write_state(self.path, dataclasses.replace(self.base, heartbeat_at=time.time()))

    def start_heartbeat(self) -> None:
        self.thread.start()

    def _beat(self) -> None:
        failing = False
        while not self.stopped.wait(HEARTBEAT_INTERVAL_SECONDS):
            try:
                self.publish()
                failing = False
            except OSError as exc:
                if not failing:  # once per outage, not every 5 s
                    self.warn(
                        f"cannot refresh the state file {self.path}: {exc.strerror}; serve will call this run lost"
                    )
                failing = True

    def end(self, **changes: Any) -> None:
        """Record the end. A state file that cannot be written (its disk full too) is said, not raised:
        the command is over and its exit status is what matters now."""
        self.stopped.set()
        try:
            self.publish(final=True, **changes)
        except OSError as exc:
            with self.lock:
                self.ended = True
            self.warn(
                f"cannot record the end in the state file {self.path}: {exc.strerror}; serve will call this run lost"
            )

    def note(self, **changes: Any) -> None:
        """Record something that happened meanwhile (a log failure), running or ended; never raises."""
        try:
            if self.ended:
                self.amend(**changes)
            else:
                self.publish(**changes)
        except OSError as exc:
            self.warn(f"cannot update the state file {self.path}: {exc.strerror}")

    def amend(self, **changes: Any) -> None:
        """After the end: add what came later (the verification) without touching the rest."""
        with self.lock:
            self.base = dataclasses.replace(self.base, **changes)
            write_state(self.path, self.base)


def _clip(text: str | None) -> str | None:
    return None if text is None else text[:MAX_RECORDED_TEXT]


def _warn(line: str) -> None:
    print(f"migexport: {line}", file=sys.stderr, flush=True)


def _echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


class _Run:
    """One run of the command: the order of its steps is the point (see run_migration)."""

    def __init__(
        self,
        command: list[str],
        base: MigrationState,
        log: _Log,
        state_path: Path,
        control: ServerControl | None,
        echo: Callable[[str], None],
        warn: Callable[[str], None],
    ) -> None:
        self.command, self.base, self.log, self.control = command, base, log, control
        self.echo, self.warn = echo, warn
        self.writer = _StateWriter(state_path, base, self.say_warning)
        log.on_failure = lambda error: self.writer.note(log_error=_clip(error))
        self.forwarded: list[int] = []
        self.proc: subprocess.Popen | None = None
        self.cancel: dict[str, Any] | None = None  # what ending the sessions on the server did

    def say(self, line: str, stderr: bool = False) -> None:
        self.log.write(line + "\n")
        self.log.flush()
        if stderr:
            self.warn(line)

    def say_warning(self, line: str) -> None:
        self.say(f"warning: {line}", stderr=True)

    def on_signal(self, signum: int, _frame: object) -> None:
        self.forwarded.append(signum)
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def check_server(self) -> None:
        """Before the command: reach the server the way the cancel will, and check its lock_timeout."""
        if self.control is None:
            return
        try:
            warning = self.control.lock_timeout_warning()
        except ControlError as exc:
            self.say_warning(
                f"cannot check lock_timeout: {exc}; carrying on (at the time limit or on a signal, ending the "
                f"migration's sessions on the server will work only if this connection does by then)"
            )
            return
        if warning:
            self.say_warning(warning)

    def cannot_start(self, reason: str | None) -> RunError:
        ended = time.time()
        self.say(f"cannot start {self.command[0]}: {reason}")
        self.say(f"Migration ended at {_stamp(ended)}: failed, exit code {EXIT_NOT_FOUND}")
        self.writer.end(status=FAILED, ended_at=ended, exit_code=EXIT_NOT_FOUND)
        return RunError(f"cannot start {self.command[0]!r}: {reason}", EXIT_NOT_FOUND)

    def spawn(self) -> subprocess.Popen:
        try:
            proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so the time limit can end all of it
            )
        except OSError as exc:
            raise self.cannot_start(exc.strerror) from None
        self.proc = proc
        if self.forwarded:  # a signal came while we were starting it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, self.forwarded[0])
        return proc

    def wait(self, proc: subprocess.Popen) -> bool:
        """Until the command ends (False) or its time limit (True). After a signal, the migration's
        sessions are ended on the server at once, while the command handles the signal."""
        deadline = self.base.started_at + self.base.time_budget_seconds
        while True:
            left = deadline - time.time()
            if left <= 0:
                return True
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(left, 0.2))
                return False
            if self.forwarded and self.cancel is None:
                self.end_on_server(signal.Signals(self.forwarded[0]).name)

    def end_on_server(self, reason: str) -> None:
        if self.control is None:
            return
        try:
            terminated, remaining, error = self.control.end_sessions()
        except ControlError as exc:
            terminated, remaining, error = 0, None, str(exc)
        before = self.cancel or {"reason": reason, "terminated": 0}
        # Terminations add up over the passes; what is left, and why, is what the last pass found.
        self.cancel = {
            "reason": before["reason"],
            "via": _clip(self.control.where),
            "terminated": before["terminated"] + terminated,
            "remaining": remaining,
            "error": _clip(error),
        }

    def report_server(self) -> None:
        c = self.cancel
        if c is None:
            return
        if c["error"] is None and c["remaining"] == 0:
            self.say(f"server: ended {c['terminated']} session(s) of the migration ({c['reason']}); none left")
            return
        problem = c["error"] or f"{c['remaining']} session(s) still there"
        who = f"application_name {self.control.server.application_name!r}" if self.control else "its sessions"
        if self.control and self.control.server.role:
            who += f" or usename {self.control.server.role!r}"
        self.say(
            f"error: ending the migration's sessions on the server failed ({c['reason']}): {problem}; "
            f"ended {c['terminated']}. Its statements may still run or wait for a lock there: "
            f"look for {who} in pg_stat_activity",
            stderr=True,
        )

    def finish(self, proc: subprocess.Popen, timed_out: bool) -> int:
        rc = proc.returncode
        code = EXIT_TIMED_OUT if timed_out else (128 - rc if rc < 0 else rc)
        status = TIMED_OUT if timed_out else (SUCCEEDED if code == 0 else FAILED)
        ended = time.time()
        self.report_server()
        sig = self.forwarded[0] if self.forwarded else None
        note = f" after signal {sig} ({signal.Signals(sig).name})" if sig else ""
        self.say(
            f"Migration ended at {_stamp(ended)}: {status.replace('_', ' ')}{note}, exit code {code}, "
            f"duration {ended - self.base.started_at:.1f}s"
        )
        self.writer.end(status=status, ended_at=ended, exit_code=code, server_cancel=self.cancel)
        return code

    def verify(self, verify: Callable[[], Report]) -> int:
        """After a command that succeeded: verify, log the table, amend the state; 3 when it failed or
        could not run."""
        try:
            report = verify()
        except Exception as exc:  # the migration is done but nothing vouches for it: say so, exit 3
            self.say(f"verify could not run: {redact(str(exc))[:MAX_RECORDED_TEXT]}", stderr=True)
            self.writer.amend(verify={"result": "error", "at": int(time.time())})
            return EXIT_VERIFY_FAILED
        self.say(f"Verify at {_stamp(report.at)}:\n{render_table(report.checks)}")
        self.echo(f"Verify at {_stamp(report.at)}:\n{render_table(report.checks)}\n")
        summary = _summary(report, "passed", "failed")
        self.writer.amend(verify=summary)
        if report.ok:
            return 0
        self.say(f"verify: FAILED ({summary.get('failed', '')}): exit code {EXIT_VERIFY_FAILED}", stderr=True)
        return EXIT_VERIFY_FAILED

    def report_after_window(self, report: Callable[[float], list[Path]]) -> None:
        """Wait for the watch window to close (a signal ends the wait early), then write the report. The
        migration is over: a report that cannot be written is a warning, not a change of exit code."""
        ended = self.writer.base.ended_at or time.time()
        closes = ended + self.base.watch_window_seconds + REPORT_MARGIN_SECONDS
        self.say(f"report: written when the watch window closes, at {_stamp(closes)} (Ctrl-C: now)")
        self.echo(f"report: written when the watch window closes, at {_stamp(closes)} (Ctrl-C: now)\n")
        stop = threading.Event()
        handlers = {s: signal.signal(s, lambda *_: stop.set()) for s in END_SIGNALS}
        try:
            stop.wait(max(0.0, closes - time.time()))
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        if stop.is_set():
            self.say("report: the wait was interrupted: the report covers the window up to now")
        try:
            paths = report(self.base.started_at)
        except Exception as exc:  # e.g. Prometheus unreachable: say so, keep the exit code
            self.say_warning(f"report not written: {redact(str(exc))[:MAX_RECORDED_TEXT]}")
            return
        line = "report: " + ", ".join(str(p) for p in paths)
        self.say(line)
        self.echo(line + "\n")

    def execute(self, previous: str | None, snapshot_note: str | None = None) -> int:
        self.say(f"Migration started at {_stamp(self.base.started_at)}")
        self.say(
            f"migration {self.base.migration_id}: {redact_command(self.command)} "
            f"(time limit {self.base.time_budget_seconds:g}s)"
        )
        if snapshot_note:
            self.say(f"snapshot: {snapshot_note}")
        if previous:
            self.say_warning(previous)
        try:
            self.writer.publish()
        except OSError as exc:
            raise RunError(f"cannot write the state file {self.writer.path}: {exc.strerror}") from None
        if shutil.which(self.command[0]) is None:  # before reaching for the server on its behalf
            raise self.cannot_start(f"{os.strerror(errno.ENOENT)} (or not executable)")
        handlers = {s: signal.signal(s, self.on_signal) for s in END_SIGNALS}
        try:
            self.check_server()
            proc = self.spawn()
            copier = threading.Thread(
                target=_copy_output, args=(proc.stdout, self.log, self.echo, self.warn), daemon=True
            )
            copier.start()
            try:
                self.writer.note(command_pid=proc.pid)
                self.writer.start_heartbeat()
                timed_out = self.wait(proc)
                if timed_out:
                    self.say(
                        f"time limit of {self.base.time_budget_seconds:g}s reached: ending the migration's "
                        f"sessions on the server, then killing the process group"
                    )
                    self.end_on_server("time limit")
                    _kill_group(proc.pid, proc)
                if timed_out or self.forwarded:
                    # Again once the client is gone: a tool that reconnected in between must not stay behind.
                    self.end_on_server("time limit" if timed_out else signal.Signals(self.forwarded[0]).name)
            except BaseException as exc:
                # Whatever failed here, the command must not outlive its supervisor, and the state must
                # not say "running" for ever.
                if proc.poll() is None:
                    _kill_group(proc.pid, proc)
                rc = proc.returncode
                self.writer.end(status=FAILED, ended_at=time.time(), exit_code=None if rc is None else abs(rc))
                self.say(f"error: run failed while the command ran: {type(exc).__name__}: {redact(str(exc))[:200]}")
                raise
            # A grandchild that escaped the group may still hold the pipe open: do not wait forever.
            copier.join(timeout=KILL_GRACE_SECONDS)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        return self.finish(proc, timed_out)


def _log_lines(log: _Log, echo: Callable[[str], None], text: str) -> None:
    log.write(text + "\n")
    log.flush()
    echo(text + "\n")


def _preflight(around: Around, log: _Log, echo: Callable[[str], None]) -> dict[str, Any] | None:
    """The go / no-go before anything starts: the table into the log (and on screen); RunError on no-go."""
    if around.preflight is None:
        return None
    report = around.preflight()
    _log_lines(log, echo, f"Preflight at {_stamp(report.at)}:\n{render_table(report.checks)}")
    summary = _summary(report, "go", "no-go")
    if not report.ok:
        failed = summary.get("failed", "")
        _log_lines(log, echo, f"preflight: no-go (FAIL: {failed}): the command was not started")
        raise RunError(f"preflight: no-go (FAIL: {failed}); fix them, or run with --skip-preflight", EXIT_NO_GO)
    return summary


def _snapshot(around: Around, log: _Log, warn: Callable[[str], None]) -> str | None:
    """The affected tables before the command. Without it verify can still check validity, so a failure
    is a warning, not a reason to hold the migration."""
    if around.snapshot is None:
        return None
    try:
        return around.snapshot()
    except Exception as exc:  # a check library's failure must not stop the migration it guards
        line = f"warning: snapshot of the affected tables failed: {redact(str(exc))[:MAX_RECORDED_TEXT]}"
        log.write(line + "\n")
        warn(line)
        return None


def _login_name() -> str | None:
    """Who runs the migration, for the record (a container's uid may have no name: then none)."""
    try:
        return getpass.getuser()[:MAX_RECORDED_TEXT] or None
    except (KeyError, OSError):
        return None


def run_migration(
    command: list[str],
    migration_id: str,
    time_budget_seconds: float,
    watch_window_seconds: float,
    log_path: Path,
    state_path: Path,
    server: ServerSide | None = None,
    echo: Callable[[str], None] = _echo,
    warn: Callable[[str], None] = _warn,
    environ: Mapping[str, str] = os.environ,
    around: Around = Around(),
) -> int:
    """Run the command under its time limit; returns its exit status (124 at the time limit).

    At the time limit: end the migration's sessions on the server, kill the process group, end any
    session left, then record the end. On SIGINT/SIGTERM/SIGHUP: forward it to the command, end the
    sessions on the server, wait for the command, end any session left, record the end. `server`
    None: nothing is done on the server (no way to reach it).

    Around the command (`around`): the fast preflight first (a no-go exits 1 before anything starts),
    the snapshot of the affected tables, and after a command that succeeded the verification (a failed
    one exits 3); each logged, summarised in the state file."""
    if not command:
        raise RunError("no command given: migexport run [OPTIONS] -- COMMAND [ARGS...]")
    lock = RunLock.acquire(state_path)  # before anything: a second run stops here, at once
    try:
        return _run_locked(
            command,
            migration_id,
            time_budget_seconds,
            watch_window_seconds,
            log_path,
            state_path,
            server,
            echo,
            warn,
            environ,
            around,
            lock,
        )
    finally:
        lock.release()


def _run_locked(
    command: list[str],
    migration_id: str,
    time_budget_seconds: float,
    watch_window_seconds: float,
    log_path: Path,
    state_path: Path,
    server: ServerSide | None,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
    environ: Mapping[str, str],
    around: Around,
    lock: RunLock,
) -> int:
    previous = check_not_running(state_path)
    control = ServerControl(server, environ) if server is not None else None  # a bad DSN stops us here
    try:
        log = _Log.open(log_path, warn)
    except OSError as exc:
        raise RunError(f"cannot open migration log {log_path}: {exc.strerror}") from None
    try:
        preflight = _preflight(around, log, echo)
        snapshot_note = _snapshot(around, log, warn)
    except BaseException:
        log.close()
        raise
    machine = this_machine()
    base = MigrationState(
        migration_id=migration_id,
        status=RUNNING,
        started_at=time.time(),
        time_budget_seconds=time_budget_seconds,
        watch_window_seconds=watch_window_seconds,
        pid=os.getpid(),
        host=machine.host,
        user=_login_name(),
        boot_id=machine.boot_id,
        pid_namespace=machine.pid_namespace,
        heartbeat_interval_seconds=HEARTBEAT_INTERVAL_SECONDS,
        preflight=preflight,
        log_error=_clip(log.error),
    )
    try:
        run = _Run(command, base, log, state_path, control, echo, warn)
        code = run.execute(previous, snapshot_note)
        code = run.verify(around.verify) if code == 0 and around.verify else code
        # The state is final: the next migration may start while this one waits for its report.
        lock.release()
        if around.report:
            run.report_after_window(around.report)
        return code
    finally:
        if control is not None:
            control.close()
        log.close()
