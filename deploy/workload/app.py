"""The demo stack's application: a small, steady workload on the primary, plus a health endpoint.

Runs in the migexport image (python + psycopg): `entrypoint: python /app/app.py` in docker-compose.yml.
Each worker loops: insert an order, read recent orders, update one; with APP_ERROR_RATE a share of
transactions roll back (the error ratio migexport watches). GET /healthz answers 200 while the last
transaction of every worker succeeded within APP_HEALTH_MAX_AGE seconds, else 503: the `apps:` check of
deploy/migexport.yml. A migration that holds a lock on shop.orders makes the workers wait, and the
health check fail, which is what the stack is there to show.

Environment: APP_DSN (without password), APP_PASSWORD_FILE, APP_WORKERS (4), APP_RATE (transactions
per second per worker, 5), APP_ERROR_RATE (0.0), APP_HEALTH_PORT (8080), APP_HEALTH_MAX_AGE (10).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg

log = logging.getLogger("app")


class SimulatedError(Exception):
    """A business error: the application rolls its transaction back (APP_ERROR_RATE)."""


def conninfo() -> str:
    dsn = os.environ.get("APP_DSN", "host=primary dbname=app user=app application_name=app")
    password_file = os.environ.get("APP_PASSWORD_FILE", "/run/secrets/app_password")
    if password_file and os.path.exists(password_file):
        with open(password_file, encoding="utf-8") as f:
            return psycopg.conninfo.make_conninfo(dsn, password=f.read().strip())
    return dsn


class Health:
    def __init__(self, workers: int) -> None:
        self.lock = threading.Lock()
        self.last_ok = dict.fromkeys(range(workers), 0.0)

    def ok(self, worker: int) -> None:
        with self.lock:
            self.last_ok[worker] = time.monotonic()

    def healthy(self, max_age: float) -> bool:
        now = time.monotonic()
        with self.lock:
            return all(now - t <= max_age for t in self.last_ok.values())


def one_transaction(conn: psycopg.Connection, error_rate: float) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO shop.orders (customer_id, amount_cents) VALUES (%s, %s)",
            (random.randint(1, 1000), random.randint(100, 10000)),
        )
        conn.execute(
            "SELECT id, amount_cents FROM shop.orders"
            " WHERE customer_id = %s AND created_at > now() - interval '1 hour'",
            (random.randint(1, 1000),),
        ).fetchall()
        conn.execute(
            "UPDATE shop.orders SET amount_cents = amount_cents + 1 WHERE id = (SELECT max(id) FROM shop.orders)"
        )
        if random.random() < error_rate:
            raise SimulatedError("simulated application error")


def worker(index: int, health: Health, rate: float, error_rate: float, stop: threading.Event) -> None:
    conn: psycopg.Connection | None = None
    while not stop.is_set():
        started = time.monotonic()
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(conninfo(), connect_timeout=5)
            one_transaction(conn, error_rate)
            health.ok(index)
        except SimulatedError:
            health.ok(index)  # a rollback the application chose: the database answered
        except psycopg.Error as exc:
            log.warning("worker %d: %s", index, str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            if conn is not None:
                conn.close()
            conn = None
            stop.wait(1)
        stop.wait(max(0.0, 1.0 / rate - (time.monotonic() - started)))


def serve_health(health: Health, port: int, max_age: float) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/healthz":
                self.send_response(404)
                self.end_headers()
                return
            good = health.healthy(max_age)
            body = b"ok\n" if good else b"unhealthy: a worker has not completed a transaction\n"
            self.send_response(200 if good else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    workers = int(os.environ.get("APP_WORKERS", "4"))
    rate = float(os.environ.get("APP_RATE", "5"))
    error_rate = float(os.environ.get("APP_ERROR_RATE", "0"))
    max_age = float(os.environ.get("APP_HEALTH_MAX_AGE", "10"))
    health = Health(workers)
    serve_health(health, int(os.environ.get("APP_HEALTH_PORT", "8080")), max_age)
    stop = threading.Event()
    threads = [
        threading.Thread(target=worker, args=(i, health, rate, error_rate, stop), daemon=True) for i in range(workers)
    ]
    for t in threads:
        t.start()
    log.info("%d workers, %.1f transactions/s each, error rate %.3f; health on /healthz", workers, rate, error_rate)
    # PID 1 in its container: SIGTERM (docker stop) has no default action there.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        stop.set()
    for t in threads:
        t.join(timeout=5)


if __name__ == "__main__":
    main()
