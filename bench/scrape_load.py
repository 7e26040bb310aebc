"""Scrape cost of migexport vs. postgres_exporter on a busy server with a DDL lock queue.

Run by hand: `python bench/scrape_load.py`. It prints figures and asserts nothing about timing.

What it sets up on a throwaway local primary (127.0.0.1 only, removed at the end):
- 400 ordinary client sessions: 300 idle, 100 idle in transaction (after `SELECT 1`, so they hold no
  lock on the benchmark table);
- beside those, a 100-session lock queue on `bench_t`: one open transaction that read the table (the
  root), an `ALTER TABLE ... ADD COLUMN` waiting for ACCESS EXCLUSIVE behind it, and 98 readers queued
  behind the ALTER. That is the shape of a migration gone wrong, and 99 sessions wait on a Lock.

Both exporters are started as subprocesses against that server, first scraped with no load (baseline),
then scraped again with the load in place. Whether either exporter's own sessions ever waited on a
heavyweight lock is checked two ways: a thread sampling pg_stat_activity during the scrapes, and the
server log (log_lock_waits with a short deadlock_timeout, which cannot miss a wait longer than that).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from migexport import localpg

IDLE_SESSIONS = 300
IDLE_IN_TX_SESSIONS = 100
QUEUE_READERS = 98  # + the root + the ALTER = a 100-session queue
SCRAPES = 30
SCRAPE_TIMEOUT_S = 30.0
SAMPLE_INTERVAL_S = 0.005  # pg_stat_activity sampling while scraping; lock waits can be short
# The server logs every lock wait longer than deadlock_timeout (log_lock_waits), with the session's
# application_name and client address in the prefix: a check that cannot miss a wait the way sampling
# can. 50 ms is below migexport's lock_timeout (100 ms), so even its cancelled waits are logged.
SERVER_SETTINGS = {
    "max_connections": "600",
    "log_lock_waits": "on",
    "deadlock_timeout": "'50ms'",
    "log_line_prefix": "'%m [%p] app=%a client=%r '",
}
BENCH_APP_PREFIX = "bench-"  # application_name prefix of every session this script opens itself
POSTGRES_EXPORTER = "prometheus-postgres-exporter"


# -- the load ---------------------------------------------------------------------------------------


@dataclass
class Blocked:
    """A statement expected to block, running on its own connection in its own thread."""

    conn: psycopg.Connection
    thread: threading.Thread
    error: BaseException | None = None


def run_blocking(cluster: localpg.LocalCluster, sql: str, app: str) -> Blocked:
    # Connect in the caller's thread so a connection failure surfaces here, not silently in a thread.
    conn = cluster.connect(application_name=app)
    blocked = Blocked(conn=conn, thread=threading.Thread(target=lambda: None))

    def run() -> None:
        try:
            conn.execute(sql)
        except BaseException as exc:  # kept for the report; the thread must not die silently
            blocked.error = exc

    blocked.thread = threading.Thread(target=run, name=f"{app}-{conn.info.backend_pid}", daemon=True)
    blocked.thread.start()
    return blocked


@dataclass
class Load:
    idle: list[psycopg.Connection] = field(default_factory=list)
    idle_in_tx: list[psycopg.Connection] = field(default_factory=list)
    root: psycopg.Connection | None = None
    queue: list[Blocked] = field(default_factory=list)  # the ALTER first, then the readers

    def release(self) -> list[str]:
        """Roll back the root (which lets the ALTER and then the readers run), join, close everything."""
        problems: list[str] = []
        if self.root is not None:
            with contextlib.suppress(psycopg.Error):
                self.root.rollback()
            self.root.close()
            self.root = None
        for blocked in self.queue:
            blocked.thread.join(timeout=30)
            if blocked.thread.is_alive():
                problems.append(f"{blocked.thread.name} still running after 30 s")
            elif blocked.error is not None:
                problems.append(f"{blocked.thread.name}: {type(blocked.error).__name__}: {blocked.error}")
            blocked.conn.close()
        self.queue.clear()
        for conn in [*self.idle, *self.idle_in_tx]:
            conn.close()
        self.idle.clear()
        self.idle_in_tx.clear()
        return problems


def create_table(cluster: localpg.LocalCluster) -> None:
    with cluster.connect(application_name=f"{BENCH_APP_PREFIX}setup") as conn:
        conn.execute("CREATE TABLE bench_t (id int PRIMARY KEY, payload text)")
        conn.execute("INSERT INTO bench_t SELECT g, md5(g::text) FROM generate_series(1, 10000) g")
        conn.execute("ANALYZE bench_t")


def lock_waiters(monitor: psycopg.Connection) -> int:
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND application_name LIKE %s",
        (BENCH_APP_PREFIX + "%",),
    ).fetchone()
    return int(row[0]) if row else 0


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def open_load(cluster: localpg.LocalCluster, monitor: psycopg.Connection, load: Load) -> None:
    """Fill `load` step by step, so that the caller's cleanup can release whatever got opened."""
    for _ in range(IDLE_SESSIONS):
        load.idle.append(cluster.connect(application_name=f"{BENCH_APP_PREFIX}idle"))
    for _ in range(IDLE_IN_TX_SESSIONS):
        conn = cluster.connect(application_name=f"{BENCH_APP_PREFIX}idle-in-tx", autocommit=False)
        conn.execute("SELECT 1")  # opens a transaction that stays open, holding no table lock
        load.idle_in_tx.append(conn)

    # The root: an open transaction holding ACCESS SHARE on bench_t, never committed until release().
    load.root = cluster.connect(application_name=f"{BENCH_APP_PREFIX}root", autocommit=False)
    load.root.execute("SELECT * FROM bench_t LIMIT 1").fetchall()
    # The migration: must queue for ACCESS EXCLUSIVE behind the root before the readers arrive,
    # otherwise the readers would simply share the lock with the root and not wait at all.
    load.queue.append(run_blocking(cluster, "ALTER TABLE bench_t ADD COLUMN x int", f"{BENCH_APP_PREFIX}ddl"))
    wait_until(lambda: lock_waiters(monitor) >= 1, "the ALTER TABLE to wait on its lock")
    for _ in range(QUEUE_READERS):
        load.queue.append(run_blocking(cluster, "SELECT count(*) FROM bench_t", f"{BENCH_APP_PREFIX}reader"))
    wait_until(lambda: lock_waiters(monitor) >= 1 + QUEUE_READERS, "the readers to queue behind the ALTER")


# -- the exporters ----------------------------------------------------------------------------------


@dataclass
class ExporterProc:
    name: str
    proc: subprocess.Popen[bytes]
    url: str
    stderr_path: Path

    def rss_kib(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return None

    def stderr_tail(self, lines: int = 20) -> list[str]:
        try:
            return self.stderr_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_exporter(name: str, argv: list[str], port: int, logdir: Path, env: dict[str, str]) -> ExporterProc:
    # stderr goes to a file, not a pipe: nobody reads a pipe while we scrape, and a full one would block.
    stderr_path = logdir / f"{name}.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env)
    return ExporterProc(name, proc, f"http://127.0.0.1:{port}/metrics", stderr_path)


def wait_answering(exp: ExporterProc, timeout: float = 60) -> None:
    """Until /metrics answers 200 (this first scrape also warms up the exporter's DB connection)."""
    deadline = time.monotonic() + timeout
    while True:
        if exp.proc.poll() is not None:
            tail = "\n  ".join(exp.stderr_tail())
            raise RuntimeError(f"{exp.name} exited with {exp.proc.returncode}:\n  {tail}")
        try:
            with urllib.request.urlopen(exp.url, timeout=SCRAPE_TIMEOUT_S) as resp:
                if resp.status == 200:
                    resp.read()
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{exp.name} did not answer {exp.url} within {timeout:.0f} s")
        time.sleep(0.2)


def start_exporters(cluster: localpg.LocalCluster, logdir: Path, exporters: list[ExporterProc]) -> None:
    """Append each exporter as soon as it is spawned, so the caller's cleanup stops it whatever fails next."""
    # The interpreter running this script has migexport installed; `python -m migexport.cli` would not
    # run main(), so call it explicitly. This also makes the PID ours, not a pyenv shim's.
    mig_port = localpg.free_port()
    mig_argv = [sys.executable, "-c", "from migexport.cli import main; main()", "serve"]
    mig_argv += ["--target", f"bench={cluster.dsn()}", "--listen", f"127.0.0.1:{mig_port}"]
    exporters.append(start_exporter("migexport", mig_argv, mig_port, logdir, dict(os.environ)))

    pge_port = localpg.free_port()
    pge_env = {
        **os.environ,
        "DATA_SOURCE_NAME": f"postgresql://postgres@127.0.0.1:{cluster.port}/postgres?sslmode=disable",
    }
    pge_argv = [POSTGRES_EXPORTER, f"--web.listen-address=127.0.0.1:{pge_port}", "--log.level=warn"]
    exporters.append(start_exporter("postgres_exporter", pge_argv, pge_port, logdir, pge_env))


# -- telling the exporters' sessions apart ----------------------------------------------------------


def local_tcp_ports(pid: int) -> set[int]:
    """Local ports of the IPv4 TCP sockets process `pid` holds: its client_port in pg_stat_activity.

    postgres_exporter (lib/pq) sets no application_name, so its sessions are found by their sockets.
    """
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class SessionSeen:
    exporter: str
    pid: int
    application_name: str
    lock_waits: int = 0  # samples in which this session waited on a heavyweight lock
    lock_wait_queries: set[str] = field(default_factory=set)


class ActivitySampler:
    """Samples pg_stat_activity while the scrapes run and attributes sessions to the exporters."""

    SQL = """
        SELECT pid, coalesce(application_name, ''), client_port, coalesce(wait_event_type, ''),
               left(coalesce(query, ''), 80)
        FROM pg_stat_activity
        WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
          AND coalesce(application_name, '') NOT LIKE %s
    """

    def __init__(self, cluster: localpg.LocalCluster, exporters: list[ExporterProc]) -> None:
        self.conn = cluster.connect(application_name=f"{BENCH_APP_PREFIX}sampler")
        self.exporters = exporters
        self.seen: dict[int, SessionSeen] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="activity-sampler", daemon=True)

    def owner(self, app: str, client_port: int | None, ports: dict[str, set[int]]) -> str:
        if app == "migexport":
            return "migexport"
        for name, owned in ports.items():
            if client_port is not None and client_port in owned:
                return name
        return "other"

    def sample_once(self) -> None:
        rows = self.conn.execute(self.SQL, (BENCH_APP_PREFIX + "%",)).fetchall()
        self.samples += 1
        for pid, app, client_port, wait_type, query in rows:
            seen = self.seen.get(pid)
            if seen is None:
                # Reading /proc is the slow part of a sample: do it only for sessions not seen before.
                ports = {e.name: local_tcp_ports(e.proc.pid) for e in self.exporters}
                seen = self.seen[pid] = SessionSeen(self.owner(app, client_port, ports), pid, app)
            if wait_type == "Lock":
                seen.lock_waits += 1
                seen.lock_wait_queries.add(" ".join(query.split()))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            try:
                self.sample_once()
            except psycopg.Error as exc:
                print(f"  (sampler: {type(exc).__name__}: {exc})")
                return

    @contextlib.contextmanager
    def running(self) -> Iterator[ActivitySampler]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="activity-sampler", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(timeout=10)

    def close(self) -> None:
        self.conn.close()


# -- scraping and reporting -------------------------------------------------------------------------


@dataclass
class ScrapeRun:
    seconds: list[float] = field(default_factory=list)  # every attempt, failures included
    failures: list[str] = field(default_factory=list)
    last_body: str = ""


def scrape_n(url: str, n: int) -> ScrapeRun:
    run = ScrapeRun()
    for i in range(n):
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:
                body = resp.read().decode("utf-8", errors="replace")
            run.last_body = body
        except TimeoutError:
            run.failures.append(f"scrape {i + 1}: timeout after {SCRAPE_TIMEOUT_S:.0f} s")
        except urllib.error.URLError as exc:
            kind = "timeout" if isinstance(exc.reason, TimeoutError) else "error"
            run.failures.append(f"scrape {i + 1}: {kind}: {exc.reason}")
        except (ConnectionError, OSError) as exc:
            run.failures.append(f"scrape {i + 1}: error: {type(exc).__name__}: {exc}")
        run.seconds.append(time.perf_counter() - started)
    return run


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def body_counts(body: str) -> tuple[int, int]:
    lines = body.splitlines()
    series = sum(1 for line in lines if line.strip() and not line.startswith("#"))
    return len(lines), series


def metric_values(body: str, names: set[str]) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name in names:
                found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def report_run(phase: str, exp: ExporterProc, run: ScrapeRun) -> None:
    ms = [s * 1000 for s in run.seconds]
    lines, series = body_counts(run.last_body)
    rss = exp.rss_kib()
    print(
        f"  {exp.name:<18} {phase:<8} n={len(ms)} ok={len(ms) - len(run.failures)} "
        f"median={statistics.median(ms):7.1f} ms  p90={nearest_rank(ms, 0.9):7.1f} ms  "
        f"max={max(ms):7.1f} ms  lines={lines} series={series} bytes={len(run.last_body)} "
        f"rss={rss / 1024 if rss else float('nan'):.1f} MiB"
    )
    for failure in run.failures:
        print(f"    {failure}")


def report_exporter_view(runs: dict[str, ScrapeRun]) -> None:
    wanted = {
        "migexport_up",
        "migexport_lock_waiting_sessions",
        "migexport_lock_max_blocked_by_one_session",
        "migexport_lock_blocking_root_sessions",
        "migexport_scrape_duration_seconds",
        "migexport_collector_success",
    }
    mig = metric_values(runs["migexport"].last_body, wanted)
    print("  migexport's view (last scrape under load):")
    for name in sorted(wanted):
        for labels, value in mig.get(name, []):
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "target")
            print(f"    {name}{'{' + shown + '}' if shown else ''} = {value:g}")
    pge = metric_values(runs["postgres_exporter"].last_body, {"pg_up", "pg_locks_count"})
    print("  postgres_exporter's view (last scrape under load):")
    for _labels, value in pge.get("pg_up", []):
        print(f"    pg_up = {value:g}")
    for labels, value in pge.get("pg_locks_count", []):
        if labels.get("datname") == "postgres" and value:
            print(f"    pg_locks_count{{datname=postgres,mode={labels.get('mode')}}} = {value:g}")


def report_sessions(sampler: ActivitySampler) -> None:
    print(
        f"  exporter sessions seen in pg_stat_activity ({sampler.samples} samples, every "
        f"{SAMPLE_INTERVAL_S * 1000:.0f} ms):"
    )
    for exporter in ("migexport", "postgres_exporter", "other"):
        sessions = [s for s in sampler.seen.values() if s.exporter == exporter]
        if not sessions and exporter == "other":
            continue
        apps = sorted({repr(s.application_name) for s in sessions})
        waits = sum(s.lock_waits for s in sessions)
        waiting = [s for s in sessions if s.lock_waits]
        print(
            f"    {exporter:<18} sessions={len(sessions)} application_name={', '.join(apps) or '-'} "
            f"lock-wait samples={waits} sessions that waited on a Lock={len(waiting)}"
        )
        for s in waiting:
            print(f"      pid {s.pid}: {s.lock_waits} samples waiting; {sorted(s.lock_wait_queries)}")


def final_lock_check(monitor: psycopg.Connection) -> None:
    """The point-in-time check after the scrapes, as the sampler may in theory miss a very short wait."""
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migexport' AND wait_event_type = 'Lock'"
    ).fetchone()
    print(f"  after the scrapes: migexport sessions waiting on a Lock now = {row[0] if row else '?'}")


def server_log_findings(logfile: Path) -> None:
    """Lock waits, lock timeouts and errors the server logged, over the whole run, for the exporters."""
    text = logfile.read_text(errors="replace")
    markers = ("still waiting for", "acquired", "lock timeout", "ERROR:", "FATAL:")
    hits = [
        line for line in text.splitlines() if f"app={BENCH_APP_PREFIX}" not in line and any(m in line for m in markers)
    ]
    # A control that the check works: the queue's own sessions did wait, so their waits must be logged.
    control = sum(1 for line in text.splitlines() if f"app={BENCH_APP_PREFIX}" in line and "still waiting" in line)
    print(
        f"  server log, whole run (log_lock_waits, deadlock_timeout 50 ms): lock-wait/error lines from "
        f"exporter sessions: {len(hits)}; control, 'still waiting' lines from the queue's sessions: {control}"
    )
    for line in hits[:20]:
        print(f"    {line}")


def server_sessions(monitor: psycopg.Connection) -> str:
    rows = monitor.execute(
        "SELECT coalesce(state, '(none)'), coalesce(wait_event_type, ''), count(*) FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    return ", ".join(f"{state}{'/' + wait if wait else ''}={n}" for state, wait, n in rows)


def report_stderr(exp: ExporterProc) -> None:
    """An exporter's warnings and errors (its info lines are routine), so a misbehaving one shows."""
    tail = [line for line in exp.stderr_tail(200) if "level=info" not in line and " INFO " not in line]
    if tail:
        print(f"\n{exp.name} stderr (warnings and errors):")
        for line in tail[-20:]:
            print(f"  {line}")


def measure(phase: str, exporters: list[ExporterProc], sampler: ActivitySampler) -> dict[str, ScrapeRun]:
    runs: dict[str, ScrapeRun] = {}
    with sampler.running():
        for exp in exporters:
            runs[exp.name] = scrape_n(exp.url, SCRAPES)
    for exp in exporters:
        report_run(phase, exp, runs[exp.name])
    return runs


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    if shutil.which(POSTGRES_EXPORTER) is None:
        sys.exit(f"{POSTGRES_EXPORTER} not found on PATH (Debian: apt-get install prometheus-postgres-exporter)")
    started = time.monotonic()
    logdir = Path(tempfile.mkdtemp(prefix="migexport-bench-"))
    exporters: list[ExporterProc] = []
    load = Load()
    sampler: ActivitySampler | None = None
    print(f"scrape_load: {SCRAPES} sequential scrapes per exporter per phase, timeout {SCRAPE_TIMEOUT_S:.0f} s")
    try:
        with localpg.local_setup(replicas=0, settings=SERVER_SETTINGS, prefix="migexport-bench-pg-") as setup:
            cluster = setup.primary
            create_table(cluster)
            with cluster.connect(application_name=f"{BENCH_APP_PREFIX}monitor") as monitor:
                try:
                    start_exporters(cluster, logdir, exporters)
                    for exp in exporters:
                        wait_answering(exp)
                    sampler = ActivitySampler(cluster, exporters)

                    print(f"\nbaseline (no load): server sessions: {server_sessions(monitor)}")
                    measure("baseline", exporters, sampler)

                    t0 = time.monotonic()
                    open_load(cluster, monitor, load)
                    print(
                        f"\nunder load: {IDLE_SESSIONS} idle + {IDLE_IN_TX_SESSIONS} idle-in-transaction "
                        f"sessions, and beside them a {2 + QUEUE_READERS}-session lock queue on bench_t "
                        f"(root + ALTER + {QUEUE_READERS} readers); set up in {time.monotonic() - t0:.1f} s"
                    )
                    print(f"  waiting on a Lock before measuring: {lock_waiters(monitor)}")
                    print(f"  server sessions: {server_sessions(monitor)}")
                    sampler.seen.clear()
                    sampler.samples = 0
                    runs = measure("load", exporters, sampler)
                    print(f"  waiting on a Lock after measuring: {lock_waiters(monitor)}")
                    report_exporter_view(runs)
                    report_sessions(sampler)
                    final_lock_check(monitor)
                    server_log_findings(cluster.logfile)
                finally:
                    for exp in exporters:
                        exp.stop()
                    if sampler is not None:
                        sampler.close()
                    problems = load.release()
                    for problem in problems:
                        print(f"  cleanup: {problem}")
    finally:
        for exp in exporters:
            exp.stop()
            report_stderr(exp)
        shutil.rmtree(logdir, ignore_errors=True)
        print(f"\ntotal runtime {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
