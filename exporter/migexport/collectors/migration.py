"""The migration itself: its state (from the file `migexport run` writes) and its database session.

State: in progress, start/end times, failed, timed out, time budget, and whether the watch window
(from the start until `watch_window` after the end) is active; every alert keys on that last one.

Session: the migration's backend is recognised by its application_name. The sessions it blocks,
directly or through the queue behind it, are counted from the same pg_blocking_pids() graph as the
locks collector's (no second lock-manager pass): an ALTER TABLE waiting behind an old reader with
3 readers queued behind it blocks 3.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from migexport.collectors.base import Collector, Context
from migexport.metrics import MetricSpec, Sample
from migexport.state import StateError, read_state

log = logging.getLogger(__name__)

MIGRATION_PIDS_SQL = """
SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()
"""

LABELS = ("migration_id",)


def _spec(name: str, help_text: str) -> MetricSpec:
    return MetricSpec(name, help_text, labels=LABELS, per_target=False)


IN_PROGRESS = _spec("migexport_migration_in_progress", "1 while `migexport run` runs the migration command.")
START = _spec("migexport_migration_start_timestamp_seconds", "When the migration command started (Unix time).")
END = _spec(
    "migexport_migration_end_timestamp_seconds", "When the migration command ended (Unix time); absent while running."
)
FAILED = _spec("migexport_migration_failed", "1 if the migration command exited non-zero or timed out.")
TIMED_OUT = _spec("migexport_migration_timed_out", "1 if the migration command was killed at its time limit.")
EXIT_CODE = _spec("migexport_migration_exit_code", "Exit status of the migration command; absent while running.")
BUDGET = _spec("migexport_migration_time_budget_seconds", "The migration's time limit (checklist: 30 min).")
WATCH = _spec(
    "migexport_migration_watch_active",
    "1 from the migration's start until the watch window after its end has passed; alerts fire only then.",
)
STATE_OK = _spec("migexport_migration_state_readable", "0 if the state file exists but cannot be read or understood.")
BLOCKED = MetricSpec(
    "migexport_migration_blocked_sessions",
    "Sessions transitively blocked by the migration's database session (recognised by application_name).",
    labels=LABELS,
)
SESSION = MetricSpec(
    "migexport_migration_session_connected",
    "Number of database sessions with the migration's application_name.",
    labels=LABELS,
)
SESSION_WAIT = MetricSpec(
    "migexport_migration_lock_wait_seconds",
    "How long the migration's session has waited for a lock (0 when it is not waiting).",
    labels=LABELS,
)


class MigrationStateSource:
    """Reads the state file at every scrape: a few hundred bytes, and always current."""

    specs = (IN_PROGRESS, START, END, FAILED, TIMED_OUT, EXIT_CODE, BUDGET, WATCH, STATE_OK)

    def __init__(self, state_path: Path, migration_id: str, time_budget_seconds: float) -> None:
        self.state_path = state_path
        self.migration_id = migration_id
        self.time_budget_seconds = time_budget_seconds
        self._last_error: str | None = None

    def samples(self) -> list[Sample]:
        labels = {"migration_id": self.migration_id}
        try:
            state = read_state(self.state_path)
            readable = 1
            self._note_error(None)
        except StateError as exc:
            state, readable = None, 0
            self._note_error(str(exc))
        if state is not None and state.migration_id != self.migration_id:
            # A state file of another migration: not this one's state.
            self._note_error(
                f"{self.state_path}: belongs to migration {state.migration_id!r}, not {self.migration_id!r}; ignored"
            )
            state = None
        out = [STATE_OK.sample(readable, **labels)]
        if state is None:
            return [
                *out,
                IN_PROGRESS.sample(0, **labels),
                FAILED.sample(0, **labels),
                TIMED_OUT.sample(0, **labels),
                WATCH.sample(0, **labels),
                BUDGET.sample(self.time_budget_seconds, **labels),
            ]
        out += [
            IN_PROGRESS.sample(int(state.in_progress), **labels),
            START.sample(state.started_at, **labels),
            FAILED.sample(int(state.failed), **labels),
            TIMED_OUT.sample(int(state.timed_out), **labels),
            BUDGET.sample(state.time_budget_seconds, **labels),
            WATCH.sample(int(state.watch_active(time.time())), **labels),
        ]
        if state.ended_at is not None:
            out.append(END.sample(state.ended_at, **labels))
        if state.exit_code is not None:
            out.append(EXIT_CODE.sample(state.exit_code, **labels))
        return out

    def _note_error(self, error: str | None) -> None:
        if error != self._last_error and error is not None:
            log.warning("migration state: %s", error)
        self._last_error = error


class MigrationSessionCollector(Collector):
    """Runs on the migration's target only, after the locks collector."""

    name = "migration"
    specs = (BLOCKED, SESSION, SESSION_WAIT)

    def __init__(self, migration_id: str, application_name: str) -> None:
        super().__init__()
        self.migration_id = migration_id
        self.application_name = application_name

    def collect(self, ctx: Context) -> list[Sample]:
        if ctx.lock_graph is None:
            raise RuntimeError("the locks collector did not run or failed in this pass")
        pids = {pid for (pid,) in ctx.query(MIGRATION_PIDS_SQL, (self.application_name,))}
        blocked: set[int] = set()
        for pid in pids:
            blocked |= ctx.lock_graph.blocked_by(pid)
        waits = [w.wait_seconds for w in ctx.lock_waiters if w.pid in pids]
        labels = {"migration_id": self.migration_id}
        return [
            BLOCKED.sample(len(blocked - pids), **labels),
            SESSION.sample(len(pids), **labels),
            SESSION_WAIT.sample(max(waits, default=0.0), **labels),
        ]
