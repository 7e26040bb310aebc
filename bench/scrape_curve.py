"""The cost curve of a scrape: migexport against postgres_exporter as client sessions grow.

Run by hand: `python bench/scrape_curve.py [--points 100,400,500,2000,5000] [--rounds 30]
[--statements 5000] [--breakdown] [--gap-ms 0]`. It prints figures and asserts nothing about timing.
It needs what bench/scrape_load.py needs (PostgreSQL server binaries, `prometheus-postgres-exporter`
on PATH, migexport installed in this interpreter).

One throwaway primary (127.0.0.1, removed at the end) holds, at every point:
- N client sessions: a quarter of them a lock queue on `bench_t` (one open transaction that read the
  table, the root; an `ALTER TABLE` waiting for ACCESS EXCLUSIVE behind it; the rest readers queued
  behind the ALTER), a tenth of the others idle in transaction, the rest idle;
- 5,000 pg_stat_statements entries with long texts (about 2 kB each), so a reader of the `query`
  column would read a ~10 MB text file on every scrape.

Both exporters run as subprocesses, each as a role of its own with pg_monitor (so pg_stat_statements
tells their statements apart). At every point, after warm-up scrapes, they are scraped in interleaved
rounds (migexport then postgres_exporter, then the other way round; back to back, or each after
`--gap-ms` of idle time), and the script prints per exporter: median, p95 and maximum wall time of a
scrape, the ratio of the medians, the database time of the exporter's own statements per scrape
(execution + planning, from pg_stat_statements with track_planning on), the statements per scrape
(round trips), and RSS. The floors beside them are the database time of the reads alone at that
point: one pass over pg_stat_activity, the exact lock graph (pg_locks and pg_blocking_pids() per
waiter), and pg_stat_statements' sums; "ratio at floor" is the least a scrape of migexport's design
could take (the pass's two reads on one session, the sums on the other, nothing else) over
postgres_exporter's median: an exporter that reads these views cannot go under it. migexport's lock
figures are checked against the queue it was given: exact at every point, or the line says so.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import math
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import pq
from scrape_load import POSTGRES_EXPORTER, ExporterProc, metric_values, start_exporter, wait_answering

import migexport
from migexport import localpg

POINTS = (100, 400, 500, 2000, 5000)
ROUNDS = 30
WARMUP = 3
STATEMENTS = 5000
APP_PREFIX = "bench-"
MIGRATION_APP = f"{APP_PREFIX}ddl"  # the ALTER's application_name: migexport watches it as the migration
ROLES = {"migexport": "bench_migexport", "postgres_exporter": "bench_pge"}
SERVER_SETTINGS = {
    "max_connections": str(max(POINTS) + 100),
    "pg_stat_statements.max": "10000",
    "pg_stat_statements.track_planning": "on",
}
SCRAPE_TIMEOUT_S = 30.0


# -- raw sessions: thousands of them, no thread each -------------------------------------------------


def open_raw(dsn: str) -> pq.PGconn:
    conn = pq.PGconn.connect(dsn.encode())
    if conn.status != pq.ConnStatus.OK:
        raise RuntimeError(f"connect failed: {conn.get_error_message()}")
    return conn


def run_raw(conn: pq.PGconn, sql: str) -> None:
    res = conn.exec_(sql.encode())
    if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        raise RuntimeError(f"{sql!r}: {res.error_message.decode(errors='replace')}")


def drain(conn: pq.PGconn) -> None:
    """Wait for the results of a query sent with send_query (a queued one ends once the root is gone)."""
    while conn.get_result() is not None:
        pass


@dataclass
class Sessions:
    dsn: str
    idle: list[pq.PGconn] = field(default_factory=list)
    idle_in_tx: list[pq.PGconn] = field(default_factory=list)
    queue: list[pq.PGconn] = field(default_factory=list)  # root first, then the ALTER, then the readers

    def count(self) -> int:
        return len(self.idle) + len(self.idle_in_tx) + len(self.queue)

    def open_many(self, n: int, app: str) -> list[pq.PGconn]:
        dsn = f"{self.dsn} application_name={app}"
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(lambda _: open_raw(dsn), range(n)))

    def shape(self, total: int, monitor: psycopg.Connection) -> None:
        """`total` client sessions: a queue of a quarter of them, a tenth of the rest idle in transaction."""
        self.release_queue()
        queue = max(3, total // 4)
        in_tx = (total - queue) // 10
        idle = total - queue - in_tx
        if len(self.idle_in_tx) < in_tx:
            for conn in self.open_many(in_tx - len(self.idle_in_tx), f"{APP_PREFIX}idle-in-tx"):
                run_raw(conn, "BEGIN")
                run_raw(conn, "SELECT 1")  # a transaction that stays open, holding no table lock
                self.idle_in_tx.append(conn)
        if len(self.idle) < idle:
            self.idle += self.open_many(idle - len(self.idle), f"{APP_PREFIX}idle")
        root, ddl = self.open_many(1, f"{APP_PREFIX}root")[0], self.open_many(1, MIGRATION_APP)[0]
        readers = self.open_many(queue - 2, f"{APP_PREFIX}reader")
        run_raw(root, "BEGIN")
        run_raw(root, "SELECT * FROM bench_t LIMIT 1")
        self.queue = [root, ddl]
        ddl.send_query(b"ALTER TABLE bench_t ADD COLUMN IF NOT EXISTS x int")
        wait_until(lambda: waiting(monitor) >= 1, "the ALTER to queue behind the root")
        for reader in readers:
            reader.send_query(b"SELECT count(*) FROM bench_t")
            self.queue.append(reader)
        wait_until(lambda: waiting(monitor) >= queue - 1, f"{queue - 1} sessions to wait on a Lock")

    def release_queue(self) -> None:
        if not self.queue:
            return
        root, *queued = self.queue
        run_raw(root, "ROLLBACK")
        for conn in queued:
            drain(conn)
        for conn in self.queue:
            conn.finish()
        self.queue = []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.release_queue()
        for conn in [*self.idle, *self.idle_in_tx]:
            conn.finish()


def waiting(monitor: psycopg.Connection) -> int:
    sql = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name LIKE %s"
    return int(monitor.execute(sql, (APP_PREFIX + "%",)).fetchone()[0])  # type: ignore[index]


def wait_until(check, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- the database ------------------------------------------------------------------------------------


def prepare(cluster: localpg.LocalCluster, statements: int = STATEMENTS) -> None:
    with cluster.connect(application_name=f"{APP_PREFIX}setup") as conn:
        conn.execute("CREATE TABLE bench_t (id int PRIMARY KEY, payload text)")
        conn.execute("INSERT INTO bench_t SELECT g, md5(g::text) FROM generate_series(1, 10000) g")
        conn.execute("ANALYZE bench_t")
        for role in ROLES.values():
            conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE pg_monitor")
        conn.execute("SELECT pg_stat_statements_reset()")
        fill_statements(conn, statements)


def fill_statements(conn: psycopg.Connection, statements: int) -> None:
    """`statements` distinct entries: the count of OR terms and of IS NOT NULL tests differ (both are in
    the query's fingerprint); a long alias (kept in the text, not in the fingerprint) makes each ~2 kB."""
    alias = "a_column_alias_long_enough_to_make_the_statement_text_a_realistic_size_" * 24
    ors, ands = 100, math.ceil(statements / 100)
    for n in range(statements):
        a, b = n % ors + 1, n // ors + 1
        where = " OR ".join(f"id = {i}" for i in range(a))
        tests = " AND ".join(["payload IS NOT NULL"] * b)
        conn.execute(f'SELECT id AS "{alias[:1900]}" FROM bench_t WHERE ({where}) AND {tests}')
    assert ands * ors >= statements


def statement_totals(conn: psycopg.Connection) -> dict[str, tuple[float, float]]:
    """Per exporter role: (calls, execution + planning milliseconds) so far."""
    rows = conn.execute(
        "SELECT r.rolname, sum(s.calls)::float8, sum(s.total_exec_time + s.total_plan_time)::float8 "
        "FROM pg_stat_statements(false) s JOIN pg_roles r ON r.oid = s.userid "
        "WHERE r.rolname = ANY(%s) GROUP BY 1",
        (list(ROLES.values()),),
    ).fetchall()
    by_role = {role: (calls, ms) for role, calls, ms in rows}
    return {name: by_role.get(role, (0.0, 0.0)) for name, role in ROLES.items()}


def statement_breakdown(conn: psycopg.Connection) -> dict[str, tuple[float, float, float]]:
    """migexport's statements, by text: (calls, execution ms, planning ms) so far."""
    rows = conn.execute(
        "SELECT s.query, s.calls::float8, s.total_exec_time, s.total_plan_time "
        "FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid WHERE r.rolname = %s",
        (ROLES["migexport"],),
    ).fetchall()
    return {" ".join(q.split()): (calls, exec_ms, plan_ms) for q, calls, exec_ms, plan_ms in rows}


def print_breakdown(before: dict, after: dict, rounds: int) -> None:
    print("    migexport's statements per scrape: calls, exec ms, plan ms, text")
    deltas = []
    for text, (calls, exec_ms, plan_ms) in after.items():
        c0, e0, p0 = before.get(text, (0.0, 0.0, 0.0))
        deltas.append(((exec_ms - e0) / rounds, (plan_ms - p0) / rounds, (calls - c0) / rounds, text))
    for exec_ms, plan_ms, calls, text in sorted(deltas, reverse=True):
        if calls:
            print(f"    {calls:5.2f} {exec_ms:7.2f} {plan_ms:6.2f}  {text[:110]}")


def db_ms(conn: psycopg.Connection, query: str, repeat: int = 9) -> float:
    """Database time (planning + execution) of `query`, the median of `repeat` runs."""
    times = []
    for _ in range(repeat):
        plan = conn.execute(f"EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON) {query}").fetchall()
        timed = [r[0] for r in plan if r[0].startswith(("Planning", "Execution"))]
        total = sum(float(line.split(":")[1].split()[0]) for line in timed)
        times.append(total)
    return statistics.median(times)


# The floors of a scrape: what PostgreSQL spends on the reads themselves, before anyone aggregates a row.
# One pass over the sessions: the function builds every session's row (and, per row, looks the backend
# up in the process array, so it grows with the square of the sessions).
FLOOR_ACTIVITY = "SELECT count(*) FROM pg_stat_activity"
# The exact lock graph: pg_locks once, pg_blocking_pids() once per waiter (each call copies the wait
# queue it is in, so a queue of q waiters costs in q²).
FLOOR_LOCK_GRAPH = "SELECT count(pg_blocking_pids(pid)) FROM pg_locks WHERE NOT granted"
# The statement sums: the function builds a row per entry, text or not.
FLOOR_SUMS = "SELECT count(*) FROM pg_stat_statements(false)"


# -- the exporters -----------------------------------------------------------------------------------


def compile_package() -> None:
    """Bytecode for migexport's modules, as `pip install` writes it: an editable install run with
    PYTHONDONTWRITEBYTECODE compiles every module from source at each start, and the compiler's
    garbage adds about 1.5 MiB to the RSS this script reports."""
    compileall.compile_dir(str(Path(migexport.__file__).parent), quiet=1)


def start_migexport(cluster: localpg.LocalCluster, workdir: Path) -> ExporterProc:
    """`migexport serve`, as its own role, with the queue's ALTER named as the migration's session."""
    config = workdir / "migexport.yml"
    config.write_text(
        "targets:\n"
        f"  bench: {{dsn: 'host=127.0.0.1 port={cluster.port} dbname=postgres user={ROLES['migexport']}'}}\n"
        "migration:\n"
        "  target: bench\n"
        f"  session_application_name: {MIGRATION_APP}\n"
        f"  state_file: {workdir / 'state.json'}\n"
    )
    port = localpg.free_port()
    argv = [sys.executable, "-c", "from migexport.cli import main; main()", "serve", "-c", str(config)]
    argv += ["--listen", f"127.0.0.1:{port}"]
    return start_exporter("migexport", argv, port, workdir, dict(os.environ))


def start_both(cluster: localpg.LocalCluster, workdir: Path) -> dict[str, ExporterProc]:
    out = {"migexport": start_migexport(cluster, workdir)}
    pge_port = localpg.free_port()
    pge_env = {
        **os.environ,
        "DATA_SOURCE_NAME": (
            f"postgresql://{ROLES['postgres_exporter']}@127.0.0.1:{cluster.port}/postgres?sslmode=disable"
        ),
    }
    pge_argv = [POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{pge_port}", "--log.level=warn"]
    out["postgres_exporter"] = start_exporter("postgres_exporter", pge_argv, pge_port, workdir, pge_env)
    return out


def scrape(url: str) -> tuple[float, str]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:
        body = resp.read().decode("utf-8", errors="replace")
    return time.perf_counter() - started, body


def rss_mib(exp: ExporterProc, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{exp.proc.pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class Point:
    sessions: int
    queue: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    db_ms: dict[str, float] = field(default_factory=dict)  # per scrape
    statements: dict[str, float] = field(default_factory=dict)  # per scrape
    rss: dict[str, float] = field(default_factory=dict)
    floor_activity_ms: float = 0.0
    floor_lock_graph_ms: float = 0.0
    floor_sums_ms: float = 0.0
    lock_check: str = ""


def measure(
    point: Point,
    exporters: dict[str, ExporterProc],
    monitor: psycopg.Connection,
    rounds: int,
    breakdown: bool,
    gap_seconds: float = 0.0,
) -> None:
    names = list(exporters)
    for name in names:
        for _ in range(WARMUP):
            scrape(exporters[name].url)
    detail = statement_breakdown(monitor) if breakdown else {}
    before = statement_totals(monitor)
    bodies: dict[str, str] = {}
    for i in range(rounds):
        for name in names if i % 2 == 0 else reversed(names):
            # With a gap, each scrape starts on a machine at rest, as with Prometheus' interval: neither
            # exporter's work after its answer (a Go collector's garbage collection, say) lands in the
            # other's scrape.
            time.sleep(gap_seconds)
            seconds, bodies[name] = scrape(exporters[name].url)
            point.seconds.setdefault(name, []).append(seconds)
    after = statement_totals(monitor)
    if breakdown:
        print_breakdown(detail, statement_breakdown(monitor), rounds)
    for name in names:
        point.statements[name] = (after[name][0] - before[name][0]) / rounds
        point.db_ms[name] = (after[name][1] - before[name][1]) / rounds
        point.rss[name] = rss_mib(exporters[name])
    point.floor_activity_ms = db_ms(monitor, FLOOR_ACTIVITY)
    point.floor_lock_graph_ms = db_ms(monitor, FLOOR_LOCK_GRAPH)
    point.floor_sums_ms = db_ms(monitor, FLOOR_SUMS)
    point.lock_check = lock_check(bodies["migexport"], point.queue)


def lock_check(body: str, queue: int) -> str:
    """migexport's lock figures against the queue it was given: root + ALTER + readers."""
    wanted = {
        "migexport_lock_waiting_sessions": queue - 1,
        "migexport_lock_max_blocked_by_one_session": queue - 1,
        "migexport_lock_blocking_root_sessions": 1,
        "migexport_migration_blocked_sessions": queue - 2,
        "migexport_up": 1,
    }
    got = metric_values(body, set(wanted))
    wrong = []
    for name, value in wanted.items():
        values = [v for _labels, v in got.get(name, [])]
        if values != [value]:
            wrong.append(f"{name}={values} (want {value})")
    return "exact" if not wrong else "WRONG: " + ", ".join(wrong)


def floor_ms(p: Point) -> float:
    """The least a scrape of migexport's design can take: the pass (sessions, then the lock graph) on
    one session while the statement sums run on the other, with nothing else (no aggregation, no
    round trip, no Python, no HTTP)."""
    return max(p.floor_activity_ms + p.floor_lock_graph_ms, p.floor_sums_ms)


def print_point(p: Point) -> None:
    mig, pge = p.seconds["migexport"], p.seconds["postgres_exporter"]
    ratio = statistics.median(mig) / statistics.median(pge)
    floor_ratio = floor_ms(p) / (statistics.median(pge) * 1000)
    db_share = p.db_ms["migexport"] / (statistics.median(mig) * 1000)
    print(
        f"{p.sessions:>6} {p.queue:>5} | "
        f"{statistics.median(mig) * 1000:7.1f} {p95(mig) * 1000:7.1f} {max(mig) * 1000:7.1f} | "
        f"{statistics.median(pge) * 1000:7.1f} {p95(pge) * 1000:7.1f} {max(pge) * 1000:7.1f} | {ratio:5.2f} | "
        f"{p.db_ms['migexport']:6.1f} {db_share:5.0%} {p.statements['migexport']:4.1f} | "
        f"{p.db_ms['postgres_exporter']:6.1f} {p.statements['postgres_exporter']:5.1f} | "
        f"{p.floor_activity_ms:6.2f} {p.floor_lock_graph_ms:6.2f} {p.floor_sums_ms:5.2f} {floor_ratio:5.2f} | "
        f"{p.rss['migexport']:5.1f} {p.rss['postgres_exporter']:5.1f} | {p.lock_check}",
        flush=True,
    )


HEADER = (
    "sessions queue | migexport ms            | postgres_exporter ms    | ratio | migexport db    stmts | "
    "pge db  stmts | floor: activity lockgraph sums ratio | RSS MiB mig pge | lock counts\n"
    "               |  median     p95     max |  median     p95     max |  of   | ms/scrape share  /scr | "
    "ms/scr  /scr  | ms     ms        ms    at floor |                 |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default=",".join(map(str, POINTS)), help="client sessions per point")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved scrapes of each exporter per point")
    parser.add_argument("--statements", type=int, default=STATEMENTS, help="distinct pg_stat_statements entries")
    parser.add_argument("--breakdown", action="store_true", help="print migexport's statements at every point")
    parser.add_argument(
        "--gap-ms", type=float, default=0.0, help="idle time before each scrape (default 0: back to back)"
    )
    args = parser.parse_args()
    points = sorted(int(p) for p in args.points.split(","))
    if shutil.which(POSTGRES_EXPORTER) is None:
        sys.exit(f"{POSTGRES_EXPORTER} not found on PATH (Debian: apt-get install prometheus-postgres-exporter)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, max(points) + 1000)), hard))
    started = time.monotonic()
    compile_package()
    workdir = Path(tempfile.mkdtemp(prefix="migexport-curve-"))
    settings = {**SERVER_SETTINGS, "max_connections": str(max(points) + 100)}
    exporters: dict[str, ExporterProc] = {}
    try:
        with localpg.local_setup(replicas=0, settings=settings, prefix="migexport-curve-pg-") as setup:
            cluster = setup.primary
            t0 = time.monotonic()
            prepare(cluster, args.statements)
            print(f"{args.statements} statements in pg_stat_statements, set up in {time.monotonic() - t0:.0f} s")
            sessions = Sessions(cluster.dsn())
            with cluster.connect(application_name=f"{APP_PREFIX}monitor") as monitor:
                try:
                    exporters = start_both(cluster, workdir)
                    for exp in exporters.values():
                        wait_answering(exp)
                    print(f"{args.rounds} interleaved rounds per point after {WARMUP} warm-up scrapes each\n")
                    print(HEADER, flush=True)
                    for total in points:
                        sessions.shape(total, monitor)
                        point = Point(total, len(sessions.queue))
                        measure(point, exporters, monitor, args.rounds, args.breakdown, args.gap_ms / 1000)
                        print_point(point)
                    for name, exp in exporters.items():
                        print(f"{name}: peak RSS {rss_mib(exp, 'VmHWM'):.1f} MiB")
                finally:
                    for exp in exporters.values():
                        exp.stop()
                    sessions.close()
    finally:
        for exp in exporters.values():
            exp.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\ntotal runtime {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
