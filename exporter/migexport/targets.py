"""One watched database: its connection, its session settings, and collection with a deadline.

Observer safety lives here:
- one connection per target, reused across scrapes and opened again only after it breaks;
- every session is read-only, autocommit, with a short lock_timeout and statement_timeout, its own
  application_name, JIT off (JIT compile time on catalog queries is pure overhead);
- at most one collection per target runs at a time: scrapes that arrive while one is running wait for
  its result instead of sending their own queries (single flight);
- a scrape waits at most until its deadline; a collection still running then is reported as down
  (`migexport_up 0`) and asked to cancel, and the next scrape joins it rather than piling up another.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from migexport.collectors.base import CAN_READ_ALL_STATS_SQL, MARKER, Collector, Context, ServerInfo
from migexport.dsn import Target, password_of, redact
from migexport.metrics import Sample
from migexport.own import OwnTransactions, SessionLedger

log = logging.getLogger(__name__)

SERVER_SQL = """
SELECT current_setting('server_version_num')::int, pg_is_in_recovery(), current_database()
"""
# The same, and who we are and whether we see other sessions: one statement per collection pass.
WORKER_SERVER_SQL = SERVER_SQL.rstrip() + f", current_user::text, {CAN_READ_ALL_STATS_SQL}\n"


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


class TargetWorker:
    def __init__(
        self,
        target: Target,
        collectors: Callable[[], list[Collector]],
        session: SessionSettings | None = None,
    ) -> None:
        self.target = target
        self.session = session or SessionSettings()
        self._collectors = collectors()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"migexport-{target.name}")
        self._lock = threading.Lock()
        self._inflight: Future[Snapshot] | None = None
        self._conn: psycopg.Connection | None = None
        # Our own transactions on this target, scrapes and probes, kept out of the exported counters.
        self.own = OwnTransactions()
        self._ledger: SessionLedger | None = None  # of self._conn
        self._secret = password_of(target.dsn) or ""
        self._was_up: bool | None = None
        self._collector_was_ok: dict[str, bool] = {}
        self._could_read_all_stats: bool | None = None
        # Self-observation counters, read by the exposition.
        self.queries_total = 0
        self.timeouts_total = 0
        self.connects_total = 0

    @property
    def name(self) -> str:
        return self.target.name

    def collectors(self) -> list[Collector]:
        return list(self._collectors)

    # -- scraping -----------------------------------------------------------------------------------
    def snapshot(self, deadline: float) -> Snapshot:
        """The result of the running collection, or of a new one; down if not ready by `deadline`."""
        started = time.monotonic()
        with self._lock:
            future = self._inflight
            if future is None or future.done():
                future = self._executor.submit(self._collect_once)
                self._inflight = future
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            self.timeouts_total += 1
            self._cancel_running_query()
            self._note_up(False, "collection did not finish before the scrape deadline")
            return Snapshot(self.name, up=False, duration_seconds=time.monotonic() - started, timed_out=True)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing connection of %s failed", self.name)

    # -- one collection pass (runs on the target's own thread) ------------------------------------
    def _collect_once(self) -> Snapshot:
        started = time.monotonic()
        snap = Snapshot(self.name, up=False, duration_seconds=0.0)
        try:
            conn = self._connection()
            if self._ledger is None:
                self._ledger = SessionLedger(self.own, conn.info.server_version)
            self._ledger.ending(ok=True)  # the server-info statement
            server = self._server_info(conn)
            ctx = Context(self.name, conn, server, self._ledger)
            self.queries_total += 1
        except psycopg.Error as exc:
            self._drop_connection()
            self._note_up(False, self._describe(exc))
            snap.duration_seconds = time.monotonic() - started
            return snap
        snap.server = ctx.server
        snap.up = True
        for collector in self._collectors:
            if not collector.applies(ctx.server):
                continue
            if collector.needs_all_stats and not ctx.server.can_read_all_stats:
                # Said once for all of them by _note_visibility; a GRANT later logs "recovered".
                self._collector_was_ok[collector.name] = False
                snap.collector_success[collector.name] = False
                snap.collector_duration[collector.name] = 0.0
                continue
            t0 = time.monotonic()
            queries_before = ctx.queries
            try:
                snap.samples.extend(collector.collect_cached(ctx))
                ok = True
            except psycopg.Error as exc:
                ok = False
                if conn.broken or conn.closed:
                    # The session is gone (server restart, backend terminated): this pass is void.
                    self._drop_connection()
                    snap.up = False
                    snap.samples.clear()
                    snap.collector_success.clear()
                    self._note_up(False, self._describe(exc))
                    break
                self._note_collector(collector.name, False, self._describe(exc))
            except Exception as exc:
                ok = False
                log.debug("collector %s failed", collector.name, exc_info=True)
                self._note_collector(collector.name, False, f"{type(exc).__name__}: {self._describe(exc)}")
            finally:
                self.queries_total += ctx.queries - queries_before
            if ok:
                self._note_collector(collector.name, True, "")
            snap.collector_success[collector.name] = ok
            snap.collector_duration[collector.name] = time.monotonic() - t0
        if snap.up:
            self._note_up(True, "")
        snap.duration_seconds = time.monotonic() - started
        return snap

    def _connection(self) -> psycopg.Connection:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self._drop_connection()
        self.connects_total += 1
        self._conn = connect(self.target, self.session)
        self._ledger = None  # a new session: its own count, starting with its connection's commit
        return self._conn

    def _server_info(self, conn: psycopg.Connection) -> ServerInfo:
        with conn.cursor() as cur:
            cur.execute(MARKER + WORKER_SERVER_SQL)
            version_num, in_recovery, database, user, can_read_all_stats = cur.fetchone()  # type: ignore[misc]
        server = ServerInfo(version_num, in_recovery, database, bool(can_read_all_stats))
        self._note_visibility(user, server)
        return server

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("closing broken connection of %s failed", self.name)

    def _cancel_running_query(self) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return
        # cancel() opens a short side connection to the postmaster; never let it stall the scrape.
        threading.Thread(target=self._cancel, args=(conn,), daemon=True).start()

    def _cancel(self, conn: psycopg.Connection) -> None:
        try:
            conn.cancel()
        except Exception:
            log.debug("cancel request for %s failed", self.name)

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
