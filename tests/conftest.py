"""Real PostgreSQL for the tests: one primary + streaming replica per test session.

The clusters are started once (pg_stat_statements preloaded) in a temp directory and removed at the
end. The exporter connects as `migexport_monitor`, a pg_monitor member with a connection limit, the
role we recommend in production: the tests prove it is enough.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from migexport import localpg
from migexport.dsn import Target
from migexport.service import Exporter, ServeSettings
from migexport.targets import SessionSettings

MONITOR_ROLE = "migexport_monitor"
# Each visit of an autovacuum worker to a database commits 2 transactions there, even with nothing to do
# (measured on PostgreSQL 15 and 18, naptime 2 s: +2 at every visit). The launcher reschedules every
# database whenever one appears, and the suite creates one per test, so two visits can fall in a few
# seconds: counts of "nobody but autovacuum" allow two visits.
AUTOVACUUM_COMMITS_PER_VISIT = 2
BACKGROUND_COMMITS = 2 * AUTOVACUUM_COMMITS_PER_VISIT
INSTALL_HINT = (
    "PostgreSQL server binaries are needed for the tests: run 'bash scripts/test.sh' "
    "(it installs them) or 'apt-get install -y postgresql'"
)


def pytest_report_header(config: pytest.Config) -> str:
    """Which PostgreSQL the suite runs against (MIGEXPORT_PG_VERSION / MIGEXPORT_PG_BINDIR choose it)."""
    try:
        bindir = localpg.find_bindir()
        return f"postgresql: {localpg.bindir_version(bindir)} from {bindir}"
    except localpg.LocalPgError as exc:
        return f"postgresql: not found ({exc})"


def server_version_num(cluster: localpg.LocalCluster) -> int:
    with cluster.connect() as conn:
        return int(conn.execute("SELECT current_setting('server_version_num')").fetchone()[0])


@pytest.fixture(scope="session")
def pg() -> Iterator[localpg.LocalSetup]:
    try:
        localpg.find_bindir()
    except localpg.LocalPgError as exc:
        pytest.fail(f"{exc}\n{INSTALL_HINT}", pytrace=False)
    with localpg.local_setup(replicas=1, prefix="migexport-test-") as setup:
        with setup.primary.connect() as conn:
            conn.execute(exporter_role_sql(MONITOR_ROLE))  # the README's recipe, nothing else
        yield setup


def monitor_dsn(cluster: localpg.LocalCluster, dbname: str = "postgres") -> str:
    return cluster.dsn(dbname=dbname, user=MONITOR_ROLE)


Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str, timeout: float = 10) -> Metrics:
    with urllib.request.urlopen(url + "/metrics", timeout=timeout) as resp:
        text = resp.read().decode()
    out: Metrics = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    if key not in metrics:
        have = sorted(dict(lbl) for (n, lbl) in metrics if n == name)
        raise AssertionError(f"{name}{labels} not exported; series present: {have}")
    return metrics[key]


def series(metrics: Metrics, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in metrics.items() if n == name}


@pytest.fixture
def start_exporter() -> Iterator[Callable[..., Exporter]]:
    """Start an exporter on 127.0.0.1 (ephemeral port) for the given targets; stopped after the test.
    Keyword arguments are further ServeSettings fields (migration, state_path, probes, ...)."""
    started: list[Exporter] = []

    def start(
        *targets: Target, scrape_timeout: float = 5.0, session: SessionSettings | None = None, **more
    ) -> Exporter:
        settings = ServeSettings(
            targets=list(targets),
            host="127.0.0.1",
            port=0,
            scrape_timeout_seconds=scrape_timeout,
            session=session or SessionSettings(),
            **more,
        )
        exporter = Exporter(settings).start()
        started.append(exporter)
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Blocked:
    """A statement running in its own thread and connection, expected to block on a lock."""

    conn: psycopg.Connection
    thread: threading.Thread
    error: list[BaseException]

    @property
    def pid(self) -> int:
        return self.conn.info.backend_pid


def run_blocking(cluster: localpg.LocalCluster, sql: str, app: str = "test-client", **kw) -> Blocked:
    conn = cluster.connect(application_name=app, **kw)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            conn.execute(sql)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return Blocked(conn, thread, errors)


def require_binary(name: str, package: str) -> str:
    """The path of a tool the tests need; fail (never skip) with how to install it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is needed for this test: run 'bash scripts/test.sh' (it installs it) or "
            f"'apt-get install -y {package}'",
            pytrace=False,
        )
    return path


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen

    def query(self, expr: str) -> list[dict]:
        with urllib.request.urlopen(
            self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10
        ) as resp:
            return json.load(resp)["data"]["result"]


@contextlib.contextmanager
def running(argv: list[str], log_path: Path, ready_url: str, what: str) -> Iterator[subprocess.Popen]:
    """A server process that is ready (its ready_url answers 200) for the body, stopped after it."""
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _ready(ready_url) or proc.poll() is not None, timeout=30, what=f"{what} to start")
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited: {log_path.read_text()[-2000:]}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextlib.contextmanager
def prometheus_server(tmp: Path, config: str = "global: {}\n") -> Iterator[PrometheusServer]:
    """A real Prometheus on 127.0.0.1 with the given configuration, stopped on exit."""
    binary = require_binary("prometheus", "prometheus")
    (tmp / "prometheus.yml").write_text(config)
    url = f"http://127.0.0.1:{localpg.free_port()}"
    argv = [
        binary,
        f"--config.file={tmp / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp / 'prometheus-data'}",
        f"--web.listen-address={url.removeprefix('http://')}",
    ]
    with running(argv, tmp / "prometheus.log", url + "/-/ready", "prometheus") as proc:
        yield PrometheusServer(url, proc)


ALERTMANAGER_CONFIG = Path(__file__).resolve().parent.parent / "rules" / "alertmanager.yml"


def quick_alertmanager_config(tmp: Path, webhook_url: str) -> Path:
    """The shipped rules/alertmanager.yml with one-second grouping and its webhooks sent to `webhook_url`
    (same last path segment: /page, /notify)."""
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())

    def quick(route: dict) -> None:
        route.update(group_wait="1s", group_interval="1s", repeat_interval="1h")
        for child in route.get("routes", []):
            quick(child)

    quick(config["route"])
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url + "/" + hook["url"].rsplit("/", 1)[1]
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def alertmanager_server(tmp: Path, config: Path) -> Iterator[str]:
    """A real Alertmanager on 127.0.0.1 (no clustering); yields its URL."""
    binary = require_binary("prometheus-alertmanager", "prometheus-alertmanager")
    url = f"http://127.0.0.1:{localpg.free_port()}"
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.path={tmp / 'alertmanager-data'}",
        f"--web.listen-address={url.removeprefix('http://')}",
        "--cluster.listen-address=",
    ]
    with running(argv, tmp / "alertmanager.log", url + "/-/ready", "alertmanager"):
        yield url


@dataclass
class WebhookRecorder:
    """What Alertmanager POSTs, by path."""

    url: str = ""
    posts: list[tuple[str, dict]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self, path: str | None = None, status: str | None = None) -> list[dict]:
        with self.lock:
            return [
                a
                for p, body in self.posts
                if path in (None, p)
                for a in body.get("alerts", [])
                if status in (None, a.get("status"))
            ]

    def firing(self, path: str | None = None) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for alert in self.alerts(path, "firing"):
            out.setdefault(alert["labels"]["alertname"], []).append(alert)
        return out


@contextlib.contextmanager
def webhook_recorder() -> Iterator[WebhookRecorder]:
    recorder = WebhookRecorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with recorder.lock:
                recorder.posts.append((self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@dataclass
class DdlQueue:
    root_pid: int
    alter: Blocked
    readers: list[Blocked]


@contextlib.contextmanager
def ddl_lock_queue(cluster: localpg.LocalCluster, table: str, alter_app: str, readers: int = 3) -> Iterator[DdlQueue]:
    """The migration hazard, for real: an open transaction that read `table`, an ALTER TABLE (from
    application_name `alter_app`) waiting for ACCESS EXCLUSIVE behind it, and `readers` readers queued
    behind the ALTER. Released (the root rolls back, everyone finishes) on exit."""
    with cluster.connect() as setup:
        setup.execute(f"DROP TABLE IF EXISTS {table}")
        setup.execute(f"CREATE TABLE {table} (id int)")
        setup.execute(f"INSERT INTO {table} SELECT generate_series(1, 100)")

    def waiting() -> int:
        with cluster.connect() as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                (f"%{table}%",),
            ).fetchone()[0]

    root = cluster.connect(application_name="test-old-reader")
    root.execute("BEGIN")
    root.execute(f"SELECT count(*) FROM {table}")
    blocked = [run_blocking(cluster, f"ALTER TABLE {table} ADD COLUMN extra int", app=alter_app)]
    try:
        wait_for(lambda: waiting() == 1, what="ALTER TABLE to wait")
        blocked += [run_blocking(cluster, f"SELECT count(*) FROM {table}", app="test-app") for _ in range(readers)]
        wait_for(lambda: waiting() == 1 + readers, what="the readers to queue behind the ALTER")
        yield DdlQueue(root.info.backend_pid, blocked[0], blocked[1:])
    finally:
        root.execute("ROLLBACK")
        root.close()
        join_and_close(blocked)
    assert not any(b.error for b in blocked), [b.error for b in blocked]


def join_and_close(blocked: list[Blocked]) -> None:
    """After their blocker has gone: wait for each statement to end and close its connection."""
    for b in blocked:
        b.thread.join(timeout=10)
        b.conn.close()


README = Path(__file__).resolve().parent.parent / "README.md"


def exporter_role_sql(name: str) -> str:
    """The README's role recipe for the exporter ("Running it in production", Role: the ```sql block
    that makes a pg_monitor member), for the role `name`: the suite's exporter runs as exactly that."""
    blocks = re.findall(r"```sql\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    recipes = [b for b in blocks if "IN ROLE pg_monitor" in b]
    assert len(recipes) == 1, f"README.md: expected one exporter role recipe, found {len(recipes)}"
    sql = "\n".join(line.strip() for line in recipes[0].splitlines() if line.strip())
    assert sql.count("CREATE ROLE migexport ") == 1, sql
    return sql.replace("CREATE ROLE migexport ", f"CREATE ROLE {name} ")
