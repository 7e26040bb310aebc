"""One watched database: its connection, its session settings, and collection with a deadline.

Observer safety lives here:
- two connections per target, reused across scrapes and opened again only after they break: the
  pass's, and one for the statement sums, read at the same time (see TargetWorker);
- every session is read-only, autocommit, with a short lock_timeout and statement_timeout, its own
  application_name, JIT off (JIT compile time on catalog queries is pure overhead);
- at most one collection per target runs at a time: scrapes that arrive while one is running wait for
  its result instead of sending their own queries (single flight);
- a scrape waits at most until its deadline; a collection still running then is reported as down
  (`migexport_up 0`) and asked to cancel, and the next scrape joins it rather than piling up another.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from migexport.collectors.activity import read as read_activity
from migexport.collectors.base import CAN_READ_ALL_STATS_SQL, Collector, Context, PreparedStatements, ServerInfo
from migexport.dsn import Target, password_of, redact
from migexport.metrics import Sample
from migexport.own import FLUSH_EXPR, OwnTransactions, SessionLedger

log = logging.getLogger(__name__)

SERVER_COLUMNS = ("current_setting('server_version_num')::int", "pg_is_in_recovery()", "current_database()")
SERVER_SQL = "SELECT " + ", ".join(SERVER_COLUMNS)
# The head of a pass's first statement: the same, who we are and whether we see other sessions. The
# pass's activity parts follow it in that statement (collectors.activity), and on PostgreSQL 15+ it
# makes the server publish our transactions so far (own.FLUSH_EXPR) for the transactions collector.
PASS_HEAD = (*SERVER_COLUMNS, "current_user::text", CAN_READ_ALL_STATS_SQL)


@dataclass(frozen=True)
class SessionSettings:
    application_name: str = "migexport"
    lock_timeout_ms: int = 100
    statement_timeout_ms: int = 2000
    connect_timeout_s: int = 3

    def __post_init__(self) -> None:
        # PostgreSQL takes whole milliseconds up to INT_MAX, and 0 means no timeout at all: a value
        # rounded down to 0 from 0.4ms would turn off the very protection it was meant to set.
        for name in ("lock_timeout_ms", "statement_timeout_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2147483647:
                raise ValueError(f"{name.removesuffix('_ms')}: must be from 1ms to 2147483647ms, got {value!r}")

    def options(self) -> str:
        return " ".join(
            [
                f"-c lock_timeout={self.lock_timeout_ms}",
                f"-c statement_timeout={self.statement_timeout_ms}",
                "-c default_transaction_read_only=on",
                "-c idle_in_transaction_session_timeout=10000",
                "-c jit=off",
            ]
        )


def connect(target: Target, session: SessionSettings) -> psycopg.Connection:
    """An observer-safe session to `target`: autocommit, read-only, short timeouts, our name."""
    params = conninfo_to_dict(target.dsn)
    options = f"{params.get('options', '')} {session.options()}".strip()
    params.update(
        application_name=session.application_name,
        options=options,
        connect_timeout=str(session.connect_timeout_s),
        # Detect a dead peer instead of waiting on a half-open TCP connection forever.
        keepalives="1",
        keepalives_idle="10",
        keepalives_interval="5",
        keepalives_count="3",
    )
    return psycopg.connect(make_conninfo(**params), autocommit=True, prepare_threshold=None)


@dataclass
class Snapshot:
    """What one collection pass learned about one target."""

    target: str
    up: bool
    duration_seconds: float
    samples: list[Sample] = field(default_factory=list)
    collector_success: dict[str, bool] = field(default_factory=dict)
    collector_duration: dict[str, float] = field(default_factory=dict)
    server: ServerInfo | None = None
    timed_out: bool = False


def _merge(snap: Snapshot, part: Snapshot) -> None:
    """What the second session collected, into the pass's snapshot."""
    snap.samples.extend(part.samples)
    snap.collector_success.update(part.collector_success)
    snap.collector_duration.update(part.collector_duration)


# The pass stops waiting for its second session this long before the scrape's deadline, to answer in time.
BESIDE_MARGIN_SECONDS = 0.1
# The pass waits at most this long for the second session's thread to start.
BESIDE_START_WAIT_SECONDS = 0.05


class _Session:
    """One connection of a worker: opened on first use and again only after it breaks, with the count
    of our own transactions on it (a new connection starts its own, with its connection's commit)."""

    def __init__(self, target: Target, settings: SessionSettings, own: OwnTransactions) -> None:
        self.target = target
        self.settings = settings
        self.own = own
        self.conn: psycopg.Connection | None = None
        self.ledger: SessionLedger | None = None
        self.prepared: PreparedStatements | None = None
        self.connects = 0
        self.queries = 0  # statements sent on this session, counted only by the thread that uses it

    def connection(self) -> tuple[psycopg.Connection, SessionLedger]:
        if self.conn is not None and self.ledger is not None and not self.conn.closed and not self.conn.broken:
            return self.conn, self.ledger
        self.drop()
        self.connects += 1
        self.conn = connect(self.target, self.settings)
        # Only the statements a scrape repeats are prepared, where Context.query is asked to: never by
        # psycopg's count of executions, which would prepare outside a pipeline (see Context.query).
        self.conn.prepare_threshold = sys.maxsize
        self.ledger = SessionLedger(self.own, self.conn.info.server_version)
        self.prepared = PreparedStatements()
        return self.conn, self.ledger

    def broken(self) -> bool:
        return self.conn is None or self.conn.broken or self.conn.closed

    def drop(self) -> None:
        conn, self.conn, self.ledger, self.prepared = self.conn, None, None, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing the connection of %s failed", self.target.name)

    def cancel(self) -> None:
        conn = self.conn
        if conn is None or conn.closed:
            return
        # cancel() opens a short side connection to the postmaster; never let it stall the scrape.
        threading.Thread(target=self._cancel, args=(conn,), daemon=True).start()

    def _cancel(self, conn: psycopg.Connection) -> None:
        try:
            conn.cancel()
        except Exception:
            log.debug("cancel request for %s failed", self.target.name)


class TargetWorker:
    """Collects one target. The pass runs on the worker's own thread and session; collectors marked
    `beside_the_pass` (pg_stat_statements' sums, whose cost grows with the number of statements rather
    than sessions) run at the same time on a second session and thread, so a scrape waits for the
    longer of the two instead of their sum."""

    def __init__(
        self,
        target: Target,
        collectors: Callable[[], list[Collector]],
        session: SessionSettings | None = None,
    ) -> None:
        self.target = target
        self.session = session or SessionSettings()
        made = collectors()
        self._collectors = [c for c in made if not c.beside_the_pass]
        self._beside = [c for c in made if c.beside_the_pass]
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"migexport-{target.name}")
        self._beside_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"migexport-{target.name}-2")
        self._lock = threading.Lock()
        self._inflight: Future[Snapshot] | None = None
        self._beside_inflight: Future[Snapshot] | None = None
        # How long the last pass's first statement and the second session's part took: the longer starts first.
        self._pass_seconds = 0.0
        self._beside_seconds = 0.0
        # Our own transactions on this target, scrapes and probes, kept out of the exported counters.
        self.own = OwnTransactions()
        self._main = _Session(target, self.session, self.own)
        self._second = _Session(target, self.session, self.own)
        self._secret = password_of(target.dsn) or ""
        self._was_up: bool | None = None
        self._collector_was_ok: dict[str, bool] = {}
        self._could_read_all_stats: bool | None = None
        # Self-observation counter, read by the exposition (with queries_total and connects_total).
        self.timeouts_total = 0

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def connects_total(self) -> int:
        return self._main.connects + self._second.connects

    @property
    def queries_total(self) -> int:
        return self._main.queries + self._second.queries

    def collectors(self) -> list[Collector]:
        return [*self._collectors, *self._beside]

    # -- scraping -----------------------------------------------------------------------------------
    def snapshot(self, deadline: float) -> Snapshot:
        """The result of the running collection, or of a new one; down if not ready by `deadline`."""
        return self.finish(self.begin(deadline), deadline)

    def begin(self, deadline: float) -> Future[Snapshot]:
        """The running collection, or a new one (scrapes that arrive meanwhile share it), which gives
        up on the second session's part at `deadline` rather than miss it."""
        with self._lock:
            future = self._inflight
            if future is None or future.done():
                future = self._executor.submit(self._collect_once, deadline)
                self._inflight = future
            return future

    def finish(self, future: Future[Snapshot], deadline: float) -> Snapshot:
        started = time.monotonic()
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            self.timeouts_total += 1
            self._main.cancel()
            self._second.cancel()
            self._note_up(False, "collection did not finish before the scrape deadline")
            return Snapshot(self.name, up=False, duration_seconds=time.monotonic() - started, timed_out=True)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._beside_executor.shutdown(wait=False, cancel_futures=True)
        self._main.drop()
        self._second.drop()

    # -- one collection pass (runs on the target's own thread) ------------------------------------
    def _collect_once(self, deadline: float = float("inf")) -> Snapshot:
        started = time.monotonic()
        snap = Snapshot(self.name, up=False, duration_seconds=0.0)
        beside, not_counted = self._start_beside()
        try:
            conn, ledger = self._main.connection()
            opened = time.monotonic()
            ctx = self._open_pass(conn, ledger, not_counted)
            self._pass_seconds = time.monotonic() - opened
        except psycopg.Error as exc:
            self._main.drop()
            self._note_up(False, self._describe(exc))
            snap.duration_seconds = time.monotonic() - started
            return snap
        snap.server = ctx.server
        snap.up = True
        for collector in self._collectors:
            if collector.reads_own_transactions and beside is not None:
                # The other session's statements published our transactions as they ended: read the
                # server's counters only after them, so that what is subtracted is in what is read.
                _merge(snap, self._beside_result(beside, deadline))
                beside = None
            if not self._run(collector, ctx, snap, self._main):
                return snap  # the session is gone: this pass is void
        if beside is not None:
            _merge(snap, self._beside_result(beside, deadline))
        self._note_up(True, "")
        snap.duration_seconds = time.monotonic() - started
        return snap

    def _start_beside(self) -> tuple[Future[Snapshot] | None, list[int]]:
        """The second session's work, started now, and its backend's pid: connected here, before the
        pass reads the sessions, so that the pass knows which session not to count. Not started
        while an earlier pass's is still running (a hung backend): its collectors fail instead."""
        if not self._beside:
            return None, []
        if self._beside_inflight is not None and not self._beside_inflight.done():
            return self._beside_failed("the second session is still busy with an earlier pass"), []
        try:
            conn, _ = self._second.connection()
            pid = conn.info.backend_pid
        except psycopg.Error as exc:
            self._second.drop()
            return self._beside_failed(self._describe(exc)), []
        started = threading.Event()
        self._beside_inflight = self._beside_executor.submit(self._collect_beside, started)
        if self._beside_seconds > self._pass_seconds:
            # The longer part goes first. Left to the interpreter's lock, the second thread may wait for
            # the pass's first round trip to start its statement: at 400 sessions and 5,000 statements the
            # sums started 0.2 or 1.2 ms after the pass, and scrapes took 1.0-1.2 ms longer (median).
            # At 2,000 sessions the pass is the longer, and waiting for the sums to start cost it 0.7 ms.
            started.wait(BESIDE_START_WAIT_SECONDS)
        return self._beside_inflight, [pid]

    def _beside_failed(self, why: str) -> Future[Snapshot]:
        failed = Snapshot(self.name, up=True, duration_seconds=0.0)
        for collector in self._beside:
            self._note_collector(collector.name, False, why)
            failed.collector_success[collector.name] = False
            failed.collector_duration[collector.name] = 0.0
        done: Future[Snapshot] = Future()
        done.set_result(failed)
        return done

    def _beside_result(self, beside: Future[Snapshot], deadline: float) -> Snapshot:
        """The second session's part, or its collectors failed if it is not done a moment before the
        scrape's deadline: a stuck second session must not take the target down with it."""
        left = deadline - time.monotonic() - BESIDE_MARGIN_SECONDS
        try:
            return beside.result(timeout=max(0.0, left) if math.isfinite(left) else None)
        except FutureTimeout:
            self._second.cancel()
            return self._beside_failed("no answer before the scrape deadline").result()

    def _collect_beside(self, started: threading.Event) -> Snapshot:
        started.set()  # the pass resumes once this thread blocks on its first round trip
        t0 = time.monotonic()
        part = Snapshot(self.name, up=True, duration_seconds=0.0)
        conn, ledger = self._second.connection()
        server = ServerInfo(conn.info.server_version, False, conn.info.dbname)
        ctx = Context(self.name, conn, server, ledger, prepared=self._second.prepared)
        for collector in self._beside:
            self._run(collector, ctx, part, self._second)
        self._beside_seconds = time.monotonic() - t0
        return part

    def _run(self, collector: Collector, ctx: Context, snap: Snapshot, session: _Session) -> bool:
        """One collector into `snap`; False when the session broke under it (then `snap` is down and
        empty if it is the pass's own session)."""
        if not collector.applies(ctx.server):
            return True
        if collector.needs_all_stats and not ctx.server.can_read_all_stats:
            # Said once for all of them by _note_visibility; a GRANT later logs "recovered".
            self._collector_was_ok[collector.name] = False
            snap.collector_success[collector.name] = False
            snap.collector_duration[collector.name] = 0.0
            return True
        t0 = time.monotonic()
        queries_before = ctx.queries
        ok = False
        try:
            snap.samples.extend(collector.collect_cached(ctx))
            ok = True
        except psycopg.Error as exc:
            if session.broken():
                # The session is gone (server restart, backend terminated).
                session.drop()
                if session is self._main:
                    snap.up = False
                    snap.samples.clear()
                    snap.collector_success.clear()
                    self._note_up(False, self._describe(exc))
                    return False
            self._note_collector(collector.name, False, self._describe(exc))
        except Exception as exc:
            log.debug("collector %s failed", collector.name, exc_info=True)
            self._note_collector(collector.name, False, f"{type(exc).__name__}: {self._describe(exc)}")
        finally:
            session.queries += ctx.queries - queries_before
        if ok:
            self._note_collector(collector.name, True, "")
        snap.collector_success[collector.name] = ok
        snap.collector_duration[collector.name] = time.monotonic() - t0
        return True

    def _open_pass(self, conn: psycopg.Connection, ledger: SessionLedger, not_counted: list[int]) -> Context:
        """The pass's first statement: the server's facts and every collector's share of the one read
        of pg_stat_activity, which the collectors then take from the Context without a query.

        If that read fails while the session lives (a lock_timeout on a catalog, say), the server's
        facts are read alone: the target is up, the collectors that derive from the activity read
        fail with its error, and the others run."""
        version = conn.info.server_version  # known from the connection, before any query
        parts = [part for c in self._collectors for part in c.activity_parts(version)]
        head = (*PASS_HEAD, FLUSH_EXPR) if ledger.can_flush else PASS_HEAD
        server = ServerInfo(version, False, conn.info.dbname)
        ctx = Context(self.name, conn, server, ledger, parts, self._main.prepared)
        try:
            try:
                values, activity = read_activity(ctx, ctx.activity_parts, head, not_counted)
            except psycopg.Error as exc:
                if conn.broken or conn.closed or not parts:
                    raise
                ctx.activity_error = self._describe(exc)
                values, activity = read_activity(ctx, [], head)
        finally:
            self._main.queries += ctx.queries
        version_num, in_recovery, database, user, can_read_all_stats = values[:5]
        ctx.server = ServerInfo(version_num, in_recovery, database, bool(can_read_all_stats))
        ctx.preload(activity)
        ctx.own_published = ledger.can_flush
        ctx.queries = 0  # counted above; the collectors' statements are counted as they run
        self._note_visibility(user, ctx.server)
        return ctx

    # -- logging on state changes only, so a down database does not flood the log --------------------
    def _describe(self, exc: BaseException) -> str:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return redact(first_line, secrets=(self._secret,))

    def _note_up(self, up: bool, why: str) -> None:
        if self._was_up is not up:
            if up:
                log.info("target %s: up", self.name)
            else:
                log.warning("target %s: down: %s", self.name, why)
        self._was_up = up

    def _note_visibility(self, user: str, server: ServerInfo) -> None:
        """Said at the first connection and when it changes (a GRANT or REVOKE meanwhile)."""
        if self._could_read_all_stats is server.can_read_all_stats:
            return
        self._could_read_all_stats = server.can_read_all_stats
        if server.can_read_all_stats:
            log.info("target %s: role %s can see every session's activity (pg_read_all_stats)", self.name, user)
            return
        blind = sorted(c.name for c in self._collectors if c.needs_all_stats and c.applies(server))
        log.warning(
            "target %s: role %s cannot see other sessions' activity (it lacks pg_read_all_stats): the %s "
            "collectors would read low (no lock waits, connections without state), so they are not run and "
            "report migexport_collector_success 0; GRANT pg_monitor TO %s",
            self.name,
            user,
            ", ".join(blind),
            user,
        )

    def _note_collector(self, collector: str, ok: bool, why: str) -> None:
        if self._collector_was_ok.get(collector, True) is not ok:
            if ok:
                log.info("target %s: collector %s recovered", self.name, collector)
            else:
                log.warning("target %s: collector %s failed: %s", self.name, collector, why)
        self._collector_was_ok[collector] = ok
