"""The migration itself: its state (from the file `migexport run` writes) and its database session.

State: in progress, start/end times, failed, timed out, lost (the state says running but its `run` is
gone), time budget, and whether the watch window (from the start until `watch_window` after the end)
is active; every alert keys on that last one. The series carry the id of the migration in the state
file (the one `run` ran), so every migration series of one moment has the same `migration_id`.

Session: the migration's backend is recognised by its application_name, in the pass's one read of
pg_stat_activity. The sessions it blocks, directly or through the queue behind it, are counted from
the same pg_blocking_pids() graph as the locks collector's (no second lock-manager pass): an ALTER
TABLE waiting behind an old reader with 3 readers queued behind it blocks 3.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from migexport.collectors.activity import ActivityPart
from migexport.collectors.base import Collector, Context
from migexport.collectors.locks import lock_snapshot, locks_part
from migexport.metrics import MetricSpec, Sample
from migexport.state import MigrationState, StateError, read_state, this_machine

log = logging.getLogger(__name__)

# The migration's sessions, listed by the pass's one scan of the sessions (collectors.activity).
MIGRATION_PIDS_AGGREGATE = (
    "array_agg(pid) FILTER (WHERE application_name = %(migration_application_name)s AND pid <> pg_backend_pid())"
    " AS migration_pids"
)
MIGRATION_PIDS_SELECT = "SELECT array_to_json(migration_pids) FROM a"

LABELS = ("migration_id",)


def _spec(name: str, help_text: str) -> MetricSpec:
    return MetricSpec(name, help_text, labels=LABELS, per_target=False)


IN_PROGRESS = _spec(
    "migexport_migration_in_progress",
    "1 while `migexport run` runs the migration command (0 once that run is lost, see migexport_migration_lost).",
)
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
LOST = _spec(
    "migexport_migration_lost",
    "1 if the state says running but its `migexport run` is gone (killed, OOM, reboot) without recording an end: "
    "nobody enforces the time limit any more. Check whether the command (command_pid in the state file) and its "
    "database session are still running, end them or let them finish, then start the next run.",
)
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
    """Exports whatever migration the state file holds, labelled with that migration's id, so a
    `run --id hotfix-7` pages as hotfix-7 even when the config says another id; without a readable
    state file the series carry the config's id. The file is read again whenever it changes (it is
    replaced by rename, so its inode and ctime change), at most once per call."""

    specs = (IN_PROGRESS, START, END, FAILED, TIMED_OUT, EXIT_CODE, BUDGET, WATCH, STATE_OK, LOST)

    def __init__(self, state_path: Path, migration_id: str, time_budget_seconds: float) -> None:
        self.state_path = state_path
        self.migration_id = migration_id
        self.time_budget_seconds = time_budget_seconds
        self.machine = this_machine()
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._state: MigrationState | None = None
        self._error: str | None = None
        self._last_error: str | None = None
        self._lost_reported: tuple[str, float] | None = None

    def _load(self) -> tuple[MigrationState | None, str | None]:
        """The current state (or None) and the reason it could not be read (or None)."""
        with self._lock:
            try:
                st = self.state_path.stat()
                stamp: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            except FileNotFoundError:
                stamp = ()
            except OSError:
                stamp = None  # cannot even stat it: read_state() says why, every time
            if stamp is None or stamp != self._stamp:
                try:
                    self._state, self._error = read_state(self.state_path), None
                except StateError as exc:
                    # Never the previous state: a broken file must not keep showing stale values.
                    self._state, self._error = None, str(exc)
                self._stamp = stamp
            self._note_error(self._error)
            return self._state, self._error

    def current_migration_id(self) -> str:
        """The id every migration series carries now: the state file's migration, else the config's."""
        state, _ = self._load()
        return state.migration_id if state is not None else self.migration_id

    def samples(self) -> list[Sample]:
        state, error = self._load()
        labels = {"migration_id": state.migration_id if state is not None else self.migration_id}
        out = [STATE_OK.sample(0 if error else 1, **labels)]
        if state is None:
            return [
                *out,
                IN_PROGRESS.sample(0, **labels),
                FAILED.sample(0, **labels),
                TIMED_OUT.sample(0, **labels),
                LOST.sample(0, **labels),
                WATCH.sample(0, **labels),
                BUDGET.sample(self.time_budget_seconds, **labels),
            ]
        now = time.time()
        lost = state.lost(now, self.machine)
        out += [
            # A lost run is not "in progress" (nobody runs it any more) but stays watched: its command
            # may still be running, orphaned, without its time limit.
            IN_PROGRESS.sample(int(state.in_progress and not lost), **labels),
            LOST.sample(int(lost), **labels),
            START.sample(state.started_at, **labels),
            FAILED.sample(int(state.failed), **labels),
            TIMED_OUT.sample(int(state.timed_out), **labels),
            BUDGET.sample(state.time_budget_seconds, **labels),
            WATCH.sample(int(state.watch_active(now)), **labels),
        ]
        if state.ended_at is not None:
            out.append(END.sample(state.ended_at, **labels))
        if state.exit_code is not None:
            out.append(EXIT_CODE.sample(state.exit_code, **labels))
        self._note_lost(state, lost)
        return out

    def _note_error(self, error: str | None) -> None:
        """One log line per change of the problem, not one per scrape."""
        if error != self._last_error:
            if error is not None:
                log.warning("migration state: %s", error)
            elif self._last_error is not None:
                log.info("migration state: %s readable again", self.state_path)
        self._last_error = error

    def _note_lost(self, state: MigrationState, lost: bool) -> None:
        key = (state.migration_id, state.started_at)
        if lost and self._lost_reported != key:
            log.warning(
                "migration %s: its `migexport run` (pid %s on %s) is gone without recording an end; "
                "its command (process group %s) may still be running without a time limit",
                state.migration_id,
                state.pid,
                state.host,
                state.command_pid,
            )
        self._lost_reported = key if lost else None


class MigrationSessionCollector(Collector):
    """Runs on the migration's target only."""

    name = "migration"
    needs_all_stats = True
    specs = (BLOCKED, SESSION, SESSION_WAIT)

    def __init__(self, current_migration_id: Callable[[], str], application_name: str) -> None:
        super().__init__()
        # A callable, not a fixed id: the migration in the state file (MigrationStateSource) may change
        # while the exporter runs, and every migration series must carry the same id.
        self.current_migration_id = current_migration_id
        self.application_name = application_name

    def activity_parts(self, version_num: int) -> tuple[ActivityPart, ...]:
        return (self._pids_part(), locks_part(version_num))

    def _pids_part(self) -> ActivityPart:
        return ActivityPart(
            "migration_sessions",
            MIGRATION_PIDS_SELECT,
            params={"migration_application_name": self.application_name},
            aggregates=(MIGRATION_PIDS_AGGREGATE,),
        )

    def collect(self, ctx: Context) -> list[Sample]:
        pids = set(ctx.activity(self._pids_part()) or [])
        locks = lock_snapshot(ctx)
        blocked: set[int] = set()
        for pid in pids:
            blocked |= locks.graph.blocked_by(pid)
        waits = [w.wait_seconds for w in locks.waiters if w.pid in pids]
        labels = {"migration_id": self.current_migration_id()}
        return [
            BLOCKED.sample(len(blocked - pids), **labels),
            SESSION.sample(len(pids), **labels),
            SESSION_WAIT.sample(max(waits, default=0.0), **labels),
        ]
