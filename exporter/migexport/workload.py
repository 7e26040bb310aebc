"""A small, steady application-like workload for the demo and the benchmarks.

Each worker thread holds one connection and runs short transactions against a `demo_orders` table:
inserts and point reads, with a given share rolled back on purpose.
"""

from __future__ import annotations

import random
import threading
import time

import psycopg

SETUP_SQL = """
CREATE TABLE IF NOT EXISTS demo_orders (
    id bigserial PRIMARY KEY,
    customer int NOT NULL,
    amount numeric(10, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
)
"""


class Workload:
    def __init__(self, dsn: str, workers: int = 2, rate_per_worker: float = 20.0, rollback_share: float = 0.05) -> None:
        self.dsn = dsn
        self.workers = workers
        self.interval = 1.0 / rate_per_worker
        self.rollback_share = rollback_share
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Workload:
        with psycopg.connect(self.dsn, autocommit=True, application_name="migexport-demo-setup") as conn:
            conn.execute(SETUP_SQL)
        for i in range(self.workers):
            thread = threading.Thread(target=self._run, name=f"workload-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _run(self) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, application_name="migexport-demo-app") as conn:
                    while not self._stop.wait(self.interval):
                        with conn.transaction(force_rollback=rng.random() < self.rollback_share):
                            conn.execute(
                                "INSERT INTO demo_orders (customer, amount) VALUES (%s, %s)",
                                (rng.randint(1, 1000), rng.randint(100, 99999) / 100),
                            )
                            conn.execute(
                                "SELECT count(*) FROM demo_orders WHERE customer = %s",
                                (rng.randint(1, 1000),),
                            )
            except psycopg.Error:
                # The demo survives a restarted or blocked database, like an application would.
                self._stop.wait(1.0)
            time.sleep(0)
