"""The migration's state, shared by `migexport run` (writer) and `migexport serve` (reader).

A small JSON file, replaced atomically (write a temp file in the same directory, fsync, rename), so
the reader sees the old state or the new one, never half of one. The reader is tolerant: a missing
file means "no migration yet", a broken one is reported and treated the same.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

FORMAT = "migexport-state"
VERSION = 1

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
STATUSES = (RUNNING, SUCCEEDED, FAILED, TIMED_OUT)


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
        """From the start until the watch window after the end has passed."""
        if self.in_progress:
            return True
        return self.ended_at is not None and now < self.ended_at + self.watch_window_seconds


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_state(path: Path, state: MigrationState) -> None:
    write_atomic(path, json.dumps({"format": FORMAT, "version": VERSION, **asdict(state)}, indent=2) + "\n")


class StateError(ValueError):
    pass


def read_state(path: Path) -> MigrationState | None:
    """None when there is no state file; StateError (one line) when it cannot be understood."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"{path}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise StateError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise StateError(f"{path}: not a migexport state file")
    if raw.get("version") != VERSION:
        raise StateError(f"{path}: state file version {raw.get('version')!r}, expected {VERSION}")
    try:
        state = MigrationState(
            migration_id=str(raw["migration_id"]),
            status=str(raw["status"]),
            started_at=float(raw["started_at"]),
            time_budget_seconds=float(raw["time_budget_seconds"]),
            watch_window_seconds=float(raw["watch_window_seconds"]),
            ended_at=None if raw.get("ended_at") is None else float(raw["ended_at"]),
            exit_code=None if raw.get("exit_code") is None else int(raw["exit_code"]),
            pid=None if raw.get("pid") is None else int(raw["pid"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{path}: missing or invalid field {exc}") from None
    if state.status not in STATUSES:
        raise StateError(f"{path}: unknown status {state.status!r}")
    return state
