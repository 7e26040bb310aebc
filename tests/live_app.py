"""An application workload for the live migration test: a small OLTP service on the test primary.

`LiveApp` runs `workers` threads, each on its own connection, doing short transactions at a steady rate
against `app_orders` (about 200k rows, `customer` indexed), plus one thread that reads from the replica,
and serves a health URL on 127.0.0.1. It behaves like an application, not like a test: it counts its
errors by SQLSTATE, reconnects when its connection breaks, and keeps going.

Every transaction starts with the key query, the customer's orders (`KEY_QUERY`, an index scan on
`app_orders_customer_idx`; a sequential scan of the whole table without it), then either stops there
(browsing), places an order (INSERT) or pays one of the customer's orders (UPDATE by primary key). A
share of transactions (`rollback_share`, 3 %) is rolled back on purpose: the business said no.

A small, steady share of the writes carries an amount <= 0 (free promotional orders and credit notes,
`nonpositive_share` of new orders and of the pre-filled rows), so a migration that adds
`CHECK (amount > 0)` makes that share of the application's writes fail: the error rate the database
sees rises well beyond its noise.

Everything is bounded: connections have connect and statement timeouts, and the app stops by itself
after `max_seconds` even if nobody calls `stop()`.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg

TABLE = "app_orders"
CUSTOMER_INDEX = "app_orders_customer_idx"

SCHEMA_SQL = f"""
DROP TABLE IF EXISTS {TABLE};
CREATE TABLE {TABLE} (
    id bigserial PRIMARY KEY,
    customer int NOT NULL,
    status text NOT NULL,
    amount numeric(10, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""

# Pre-filled orders: customers 1..%(customers)s, the same amount distribution as new orders.
FILL_SQL = f"""
INSERT INTO {TABLE} (customer, status, amount, created_at)
SELECT 1 + floor(random() * %(customers)s)::int,
       (ARRAY['new', 'paid', 'shipped'])[1 + floor(random() * 3)::int],
       CASE WHEN r < %(nonpositive)s / 2 THEN 0
            WHEN r < %(nonpositive)s THEN -round((1 + random() * 50)::numeric, 2)
            ELSE round((1 + random() * 200)::numeric, 2) END,
       now() - random() * interval '30 days'
FROM (SELECT random() AS r FROM generate_series(1, %(rows)s)) AS g
"""

INDEX_SQL = f"CREATE INDEX {CUSTOMER_INDEX} ON {TABLE} (customer)"

# The application's key query: a customer's orders. Explicit columns, never `*`: a prepared `SELECT *`
# breaks ("cached plan must not change result type") when a migration adds a column.
KEY_QUERY = f"SELECT id, status, amount, created_at FROM {TABLE} WHERE customer = %s"
INSERT_SQL = f"INSERT INTO {TABLE} (customer, status, amount) VALUES (%s, 'new', %s)"
UPDATE_SQL = f"UPDATE {TABLE} SET status = 'paid' WHERE id = %s"


def create_schema(dsn: str, rows: int = 200_000, customers: int = 10_000, nonpositive_share: float = 0.08) -> None:
    """(Re)create `app_orders` with `rows` orders, its customer index, and fresh planner statistics."""
    with psycopg.connect(dsn, autocommit=True, application_name="live-app-setup", connect_timeout=10) as conn:
        conn.execute(SCHEMA_SQL)
        conn.execute(FILL_SQL, {"customers": customers, "nonpositive": nonpositive_share, "rows": rows})
        conn.execute(INDEX_SQL)
        conn.execute(f"VACUUM ANALYZE {TABLE}")


def order_amount(rng: random.Random, nonpositive_share: float) -> float:
    """A new order's amount: mostly positive; 0 for a free promotional order, negative for a credit note."""
    r = rng.random()
    if r < nonpositive_share / 2:
        return 0.0
    if r < nonpositive_share:
        return -round(rng.uniform(1, 50), 2)
    return round(rng.uniform(1, 200), 2)


class _BusinessRollback(Exception):
    pass


@dataclass
class AppStats:
    """What the application did, by outcome. Read a consistent copy with `LiveApp.stats()`."""

    commits: int = 0
    business_rollbacks: int = 0
    errors: Counter[str] = field(default_factory=Counter)  # by SQLSTATE ("connect" when connecting failed)
    reconnects: int = 0
    key_query_seconds: float = 0.0  # total time in the key query, for its mean as the app sees it
    key_queries: int = 0
    replica_reads: int = 0
    replica_errors: Counter[str] = field(default_factory=Counter)

    def copy(self) -> AppStats:
        return AppStats(
            self.commits,
            self.business_rollbacks,
            Counter(self.errors),
            self.reconnects,
            self.key_query_seconds,
            self.key_queries,
            self.replica_reads,
            Counter(self.replica_errors),
        )

    def since(self, earlier: AppStats) -> dict[str, Any]:
        """The counts between `earlier` and this copy, with the error ratio and key-query mean."""
        commits = self.commits - earlier.commits
        rollbacks = self.business_rollbacks - earlier.business_rollbacks
        errors = {k: v - earlier.errors.get(k, 0) for k, v in self.errors.items() if v - earlier.errors.get(k, 0)}
        transactions = commits + rollbacks + sum(errors.values())
        queries = self.key_queries - earlier.key_queries
        return {
            "transactions": transactions,
            "commits": commits,
            "business_rollbacks": rollbacks,
            "errors": errors,
            "error_ratio": (rollbacks + sum(errors.values())) / transactions if transactions else None,
            "key_query_mean_seconds": (self.key_query_seconds - earlier.key_query_seconds) / queries
            if queries
            else None,
            "reconnects": self.reconnects - earlier.reconnects,
            "replica_reads": self.replica_reads - earlier.replica_reads,
        }


def _sqlstate(exc: psycopg.Error) -> str:
    return exc.sqlstate or type(exc).__name__


class LiveApp:
    """The application. Use as a context manager (started on entry, stopped on exit)."""

    def __init__(
        self,
        primary_dsn: str,
        replica_dsn: str | None = None,
        workers: int = 4,
        rate_per_worker: float = 30.0,
        replica_rate: float = 10.0,
        rollback_share: float = 0.03,
        nonpositive_share: float = 0.08,
        browse_share: float = 0.5,
        insert_share: float = 0.3,
        customers: int = 10_000,
        healthy_within_seconds: float = 3.0,
        statement_timeout_seconds: float = 5.0,
        max_seconds: float = 900.0,
    ) -> None:
        self.primary_dsn = primary_dsn
        self.replica_dsn = replica_dsn
        self.workers = workers
        self.interval = 1.0 / rate_per_worker
        self.replica_interval = 1.0 / replica_rate
        self.rollback_share = rollback_share
        self.nonpositive_share = nonpositive_share
        self.browse_share = browse_share
        self.insert_share = insert_share
        self.customers = customers
        self.healthy_within = healthy_within_seconds
        self.options = f"-c statement_timeout={round(statement_timeout_seconds * 1000)}"
        self.max_seconds = max_seconds
        self._stats = AppStats()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_success: list[float] = []  # per worker, monotonic
        self._started = 0.0
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> LiveApp:
        self._started = time.monotonic()
        self._last_success = [0.0] * self.workers
        for i in range(self.workers):
            self._spawn(self._worker, i, f"live-app-{i}")
        if self.replica_dsn:
            self._spawn(self._replica_reader, 0, "live-app-replica")
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._spawn(lambda _i: self._server.serve_forever(poll_interval=0.2), 0, "live-app-http")  # type: ignore[union-attr]
        # Bounded: stops by itself even if nobody calls stop().
        self._spawn(lambda _i: self._stop.wait(self.max_seconds) or self._shutdown_http(), 0, "live-app-deadline")
        return self

    def stop(self) -> None:
        self._stop.set()
        self._shutdown_http()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> LiveApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, fn: Any, arg: int, name: str) -> None:
        thread = threading.Thread(target=fn, args=(arg,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _shutdown_http(self) -> None:
        self._stop.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    # -- what it did -----------------------------------------------------------------------------

    def stats(self) -> AppStats:
        with self._lock:
            return self._stats.copy()

    def healthy(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while every worker has completed a transaction within `healthy_within` seconds."""
        now = time.monotonic()
        ages = [now - t if t else None for t in self._last_success]
        ok = not self._stop.is_set() and bool(ages) and all(a is not None and a < self.healthy_within for a in ages)
        return ok, {"healthy": ok, "seconds_since_success": [None if a is None else round(a, 3) for a in ages]}

    @property
    def health_url(self) -> str:
        assert self._server is not None, "app not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/healthz"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/healthz":
                    self.send_error(404)
                    return
                ok, detail = app.healthy()
                body = json.dumps(detail).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    # -- the workers -----------------------------------------------------------------------------

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() - self._started < self.max_seconds

    def _pace(self, next_at: float, interval: float) -> float:
        """Sleep until `next_at`; a worker that fell behind (slow queries) does not burst to catch up."""
        now = time.monotonic()
        if next_at > now:
            self._stop.wait(next_at - now)
            return next_at + interval
        return max(next_at + interval, now)

    def _connect(self, dsn: str, name: str) -> psycopg.Connection | None:
        try:
            return psycopg.connect(dsn, autocommit=True, application_name=name, connect_timeout=5, options=self.options)
        except psycopg.Error:
            with self._lock:
                self._stats.errors["connect"] += 1
            self._stop.wait(0.5)
            return None

    def _worker(self, i: int) -> None:
        rng = random.Random(i)
        conn: psycopg.Connection | None = None
        next_at = time.monotonic()
        try:
            while self._running():
                if conn is None or conn.closed or conn.broken:
                    if conn is not None:
                        conn.close()
                        with self._lock:
                            self._stats.reconnects += 1
                    conn = self._connect(self.primary_dsn, "live-app")
                    if conn is None:
                        continue
                next_at = self._pace(next_at, self.interval)
                if not self._running():
                    break
                try:
                    outcome, key_seconds = self._transaction(conn, rng)
                except psycopg.Error as exc:
                    with self._lock:
                        self._stats.errors[_sqlstate(exc)] += 1
                    continue
                with self._lock:
                    self._stats.key_queries += 1
                    self._stats.key_query_seconds += key_seconds
                    if outcome == "commit":
                        self._stats.commits += 1
                    else:
                        self._stats.business_rollbacks += 1
                self._last_success[i] = time.monotonic()
        finally:
            if conn is not None:
                conn.close()

    def _transaction(self, conn: psycopg.Connection, rng: random.Random) -> tuple[str, float]:
        customer = rng.randint(1, self.customers)
        kind = rng.random()
        roll_back = rng.random() < self.rollback_share
        key_seconds = 0.0
        try:
            with conn.transaction():
                started = time.perf_counter()
                orders = conn.execute(KEY_QUERY, (customer,)).fetchall()
                key_seconds = time.perf_counter() - started
                if kind < self.browse_share:
                    pass
                elif kind < self.browse_share + self.insert_share:
                    conn.execute(INSERT_SQL, (customer, order_amount(rng, self.nonpositive_share)))
                elif orders:
                    conn.execute(UPDATE_SQL, (rng.choice(orders)[0],))
                if roll_back:
                    raise _BusinessRollback  # e.g. out of stock: the application says no
        except _BusinessRollback:
            return "rollback", key_seconds
        return "commit", key_seconds

    def _replica_reader(self, _i: int) -> None:
        rng = random.Random(1000)
        conn: psycopg.Connection | None = None
        next_at = time.monotonic()
        try:
            while self._running():
                if conn is None or conn.closed or conn.broken:
                    if conn is not None:
                        conn.close()
                    conn = self._connect(self.replica_dsn or "", "live-app-replica")
                    if conn is None:
                        continue
                next_at = self._pace(next_at, self.replica_interval)
                try:
                    conn.execute(KEY_QUERY, (rng.randint(1, self.customers),)).fetchall()
                    with self._lock:
                        self._stats.replica_reads += 1
                except psycopg.Error as exc:
                    with self._lock:
                        self._stats.replica_errors[_sqlstate(exc)] += 1
        finally:
            if conn is not None:
                conn.close()
