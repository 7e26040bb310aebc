"""The migration's state, shared by `migexport run` (writer) and `migexport serve` (reader).

A small JSON file, replaced atomically (write a temp file in the same directory, fsync, rename), so
the reader sees the old state or the new one, never half of one. The reader is tolerant: a missing
file means "no migration yet"; any other bytes are either a state or one StateError line (a file
edited by hand, truncated by a full disk, or written by something else must never crash `serve`).

While the command runs, `run` refreshes `heartbeat_at` every HEARTBEAT_INTERVAL_SECONDS and records
where it runs (host name, boot id, pid namespace, pid). A state that says "running" although its
writer is gone (SIGKILL, OOM kill, reboot) is *lost*: nobody enforces the time limit any more and
nobody will write the end, so the reader must say so instead of showing "running" forever.
"""

from __future__ import annotations

import errno
import json
import math
import os
import socket
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from migexport import strictjson

FORMAT = "migexport-state"
VERSION = 1

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
STATUSES = (RUNNING, SUCCEEDED, FAILED, TIMED_OUT)

# How often `run` rewrites the state while the command runs; the reader calls a run lost when its
# heartbeat is older than HEARTBEAT_MISSES intervals (a slow disk may delay one write, not three).
HEARTBEAT_INTERVAL_SECONDS = 5.0
HEARTBEAT_MISSES = 3

# A state file is a few hundred bytes; anything much larger is not ours, and reading it at every
# scrape must stay cheap.
MAX_STATE_BYTES = 64 * 1024
# Exit codes and pids beyond this are not from a real process (and os.kill() overflows on them).
MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class Machine:
    """Where a process runs: its pid means something to a reader only on the same machine, same boot
    and same pid namespace (two containers of one Kubernetes pod share the host name, not the pids)."""

    host: str
    boot_id: str | None = None
    pid_namespace: str | None = None

    def same_process_space(self, other: Machine) -> bool:
        if self.host != other.host:
            return False
        # Unknown on either side (not Linux): trust the host name alone.
        boot = self.boot_id is None or other.boot_id is None or self.boot_id == other.boot_id
        ns = self.pid_namespace is None or other.pid_namespace is None or self.pid_namespace == other.pid_namespace
        return boot and ns


def this_machine() -> Machine:
    boot_id: str | None
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        boot_id = None
    try:
        pid_ns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return Machine(socket.gethostname(), boot_id, pid_ns)


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (a killed `run` whose parent has not reaped it
    yet is dead for our purposes). Another user's process counts as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OverflowError:
        return False
    try:
        # The state letter follows the command name, which is in parentheses and may contain spaces.
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass(frozen=True)
class MigrationState:
    migration_id: str
    status: str
    started_at: float
    time_budget_seconds: float
    watch_window_seconds: float
    ended_at: float | None = None
    exit_code: int | None = None
    pid: int | None = None
    # Written by `run` from this version on; absent in older files.
    host: str | None = None
    user: str | None = None  # who ran it (the login name `run` ran as): the report's "ran by"
    boot_id: str | None = None
    pid_namespace: str | None = None
    heartbeat_at: float | None = None
    heartbeat_interval_seconds: float | None = None
    command_pid: int | None = None  # also the command's process group: `kill -- -PID` ends all of it
    # What the time limit or a signal did on the server: {"terminated": N, "remaining": M, "error": "..."}.
    server_cancel: dict[str, Any] | None = field(default=None)
    # The checks `run` did around the command (summaries; the whole reports are in the checks file):
    # {"result": "go"|"no-go", "at": N, "failed": "a, b", "warned": "c"} and
    # {"result": "passed"|"failed"|"error", "at": N, "failed": "...", "integrity": "3/4"}.
    preflight: dict[str, Any] | None = field(default=None)
    verify: dict[str, Any] | None = field(default=None)
    # The first write to the migration log that failed (disk full, permission...): the log is incomplete
    # from then on; the command's output went on to stdout.
    log_error: str | None = None

    @property
    def in_progress(self) -> bool:
        return self.status == RUNNING

    @property
    def failed(self) -> bool:
        return self.status in (FAILED, TIMED_OUT)

    @property
    def timed_out(self) -> bool:
        return self.status == TIMED_OUT

    def watch_active(self, now: float) -> bool:
        """From the start until the watch window after the end has passed (forever while running or lost)."""
        if self.in_progress:
            return True
        return self.ended_at is not None and now < self.ended_at + self.watch_window_seconds

    def lost(self, now: float, reader: Machine) -> bool:
        """The state says running but its `run` is gone: on the same machine its pid is dead; anywhere,
        its heartbeat has stopped (which also catches a reused pid and a stopped `run`)."""
        if not self.in_progress:
            return False
        if self.pid is not None and self.host is not None:
            writer = Machine(self.host, self.boot_id, self.pid_namespace)
            if writer.same_process_space(reader) and not pid_alive(self.pid):
                return True
        if self.heartbeat_at is None:
            return False  # an older `run` that wrote no heartbeat: cannot tell
        interval = self.heartbeat_interval_seconds or HEARTBEAT_INTERVAL_SECONDS
        return now - self.heartbeat_at > HEARTBEAT_MISSES * interval


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` so a reader sees the old content or the new one, never half.

    The file is created with `mode` masked by the process umask (open(2) applies it), not mkstemp's
    0600: a `serve` running as another user must be able to read the state, baseline and rules, and a
    user who wants them private says so with their umask.

    Only a regular file is replaced: a device, directory, pipe or socket at `path` is an OSError (a
    `--force` included). A symlink keeps pointing where it did: its target gets the new content."""
    if path.is_symlink():
        path = Path(os.path.realpath(path))
        if not path.parent.is_dir():
            raise OSError(errno.ENOENT, f"the symlink's target directory {path.parent} does not exist")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file: migexport replaces only regular files")
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_state(path: Path, state: MigrationState) -> None:
    write_atomic(path, json.dumps({"format": FORMAT, "version": VERSION, **asdict(state)}, indent=2) + "\n")


class StateError(ValueError):
    pass


def _parse(path: Path, data: bytes) -> Any:
    try:
        return strictjson.loads(data)
    except strictjson.JsonRefused as exc:
        raise StateError(f"{path}: {exc}: not a migexport state file") from None


class _Fields:
    """Typed access to the decoded object: each field is checked for its type and range, so what
    reaches the metrics is a finite number or a printable string, or the file is refused."""

    def __init__(self, path: Path, raw: dict[str, Any]) -> None:
        self.path, self.raw = path, raw

    def bad(self, key: str, why: str) -> StateError:
        return StateError(f"{self.path}: field {key!r} {why}")

    def text(self, key: str, required: bool = False, max_len: int = 256) -> str | None:
        value = self.raw.get(key)
        if value is None:
            if required:
                raise self.bad(key, "is missing")
            return None
        if not isinstance(value, str) or not value or len(value) > max_len:
            raise self.bad(key, f"must be a non-empty string of at most {max_len} characters")
        # Lone surrogates ("\ud800") would fail the UTF-8 encoding of the whole /metrics page.
        if not value.isprintable() or not _encodable(value):
            raise self.bad(key, "must be printable text")
        return value

    def number(self, key: str, required: bool = False, minimum: float = 0.0) -> float | None:
        value = self.raw.get(key)
        if value is None:
            if required:
                raise self.bad(key, "is missing")
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.bad(key, f"must be a number, not {type(value).__name__}")
        if not math.isfinite(value) or value < minimum:
            raise self.bad(key, f"must be a finite number >= {minimum:g}")
        return float(value)

    def integer(self, key: str, minimum: int = 0) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
            raise self.bad(key, f"must be an integer between {minimum} and {MAX_INT}")
        return value

    def record(self, key: str) -> dict[str, Any] | None:
        """A flat object of small integers and printable strings (server_cancel)."""
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, dict) or len(value) > 16:
            raise self.bad(key, "must be an object of at most 16 fields")
        inner = _Fields(self.path, value)
        out: dict[str, Any] = {}
        for name, item in value.items():
            if isinstance(item, int) and not isinstance(item, bool):
                out[name] = inner.integer(name)
            elif item is not None:
                out[name] = inner.text(name, max_len=1000)
            else:
                out[name] = None
        return out


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_bytes(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_STATE_BYTES:
        raise StateError(f"{path}: larger than {MAX_STATE_BYTES} bytes: not a migexport state file")
    return data


def read_state(path: Path) -> MigrationState | None:
    """None when there is no state file; StateError (one line) for anything that is not a valid state."""
    data = _read_bytes(path)
    if data is None:
        return None
    raw = _parse(path, data)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StateError(f"{path}: not a migexport state file")
    if raw.get("version") != VERSION or isinstance(raw.get("version"), bool):
        raise StateError(f"{path}: state file version {str(raw.get('version'))[:20]!r}, expected {VERSION}")
    f = _Fields(path, raw)
    status = f.text("status", required=True)
    if status not in STATUSES:
        raise StateError(f"{path}: unknown status {status!r}")
    return MigrationState(
        migration_id=f.text("migration_id", required=True, max_len=200) or "",
        status=status,
        started_at=f.number("started_at", required=True) or 0.0,
        time_budget_seconds=f.number("time_budget_seconds", required=True) or 0.0,
        watch_window_seconds=f.number("watch_window_seconds", required=True) or 0.0,
        ended_at=f.number("ended_at"),
        exit_code=f.integer("exit_code", minimum=-MAX_INT),
        pid=f.integer("pid", minimum=1),
        host=f.text("host"),
        user=f.text("user"),
        boot_id=f.text("boot_id"),
        pid_namespace=f.text("pid_namespace"),
        heartbeat_at=f.number("heartbeat_at"),
        heartbeat_interval_seconds=f.number("heartbeat_interval_seconds"),
        command_pid=f.integer("command_pid", minimum=1),
        server_cancel=f.record("server_cancel"),
        preflight=f.record("preflight"),
        verify=f.record("verify"),
        log_error=f.text("log_error", max_len=1000),
    )
