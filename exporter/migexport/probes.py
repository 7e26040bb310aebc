"""Key business queries and application health checks, run on their own schedule.

A probe runs its SQL in a READ ONLY transaction with its own statement_timeout, on a connection of
its own per target (one, shared by that target's probes, so a slow probe never delays a scrape and
probes never multiply connections). A health check is an HTTP GET that must answer 2xx in time.

`run_probe()` is shared with `migexport baseline`, which times the same queries the same way.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import psycopg
from prometheus_client import CollectorRegistry, Gauge, Histogram

from migexport.collectors.base import MARKER
from migexport.config import App, Probe
from migexport.dsn import Target, password_of, redact
from migexport.targets import SessionSettings, connect

log = logging.getLogger(__name__)

# Key queries are expected in the milliseconds to seconds range.
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    seconds: float
    error: str = ""


def run_probe(conn: psycopg.Connection, probe: Probe) -> ProbeResult:
    """Run one probe in a read-only transaction with its own statement timeout.

    Every statement carries the MARKER, BEGIN and COMMIT included, so pg_stat_statements sums leave
    the probes out just like the exporter's own queries. `conn` must be in autocommit mode.
    """
    started = time.perf_counter()
    try:
        conn.execute(MARKER + "BEGIN READ ONLY")
        try:
            conn.execute(
                MARKER + "SELECT set_config('statement_timeout', %s, true)",
                (str(round(probe.timeout_seconds * 1000)),),
            )
            cur = conn.execute(MARKER + probe.sql)
            if cur.description is not None:
                cur.fetchall()  # the time to receive the rows is part of the query's latency
            conn.execute(MARKER + "COMMIT")
        except psycopg.Error:
            if not conn.broken and not conn.closed:
                conn.execute(MARKER + "ROLLBACK")
            raise
        return ProbeResult(True, time.perf_counter() - started)
    except psycopg.Error as exc:
        text = str(exc).strip()
        return ProbeResult(False, time.perf_counter() - started, text.splitlines()[0] if text else "error")


def check_app(app: App) -> ProbeResult:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(app.url, timeout=app.timeout_seconds) as resp:
            ok = 200 <= resp.status < 300
            return ProbeResult(ok, time.perf_counter() - started, "" if ok else f"HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        return ProbeResult(False, time.perf_counter() - started, f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return ProbeResult(False, time.perf_counter() - started, str(reason))


class ProbeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "migexport_probe_duration_seconds",
            "Duration of a key business query probe (failed runs included).",
            ["target", "probe"],
            buckets=PROBE_BUCKETS,
            registry=registry,
        )
        self.success = Gauge(
            "migexport_probe_success",
            "1 if the probe's last run succeeded, 0 if it failed or timed out.",
            ["target", "probe"],
            registry=registry,
        )
        self.app_up = Gauge(
            "migexport_app_health_up",
            "1 if the application's health URL answered 2xx in time at the last check.",
            ["app"],
            registry=registry,
        )
        self.app_duration = Gauge(
            "migexport_app_health_duration_seconds",
            "Duration of the last application health check.",
            ["app"],
            registry=registry,
        )


class _Changes:
    """Logs a check when it starts failing and when it recovers, not at every run."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def note(self, what: str, ok: bool, error: str) -> None:
        if not ok and what not in self.failing:
            log.warning("%s failed: %s", what, error)
            self.failing.add(what)
        elif ok and what in self.failing:
            log.info("%s recovered", what)
            self.failing.discard(what)


class _Every:
    """Fixed-rate scheduling that does not drift with the time each run takes."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next = time.monotonic()

    def due(self, now: float) -> bool:
        if now < self.next:
            return False
        self.next = max(self.next + self.interval, now)
        return True


class ProbeRunner:
    """One thread per target with probes, and one for application health checks."""

    def __init__(
        self,
        targets: dict[str, Target],
        probes: tuple[Probe, ...],
        apps: tuple[App, ...],
        metrics: ProbeMetrics,
        session: SessionSettings,
    ) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics = metrics
        self.session = session
        by_target: dict[str, list[Probe]] = {}
        for probe in probes:
            by_target.setdefault(probe.target, []).append(probe)
            # Present from the start: a probe that never ran is not a probe that succeeded.
            metrics.success.labels(probe.target, probe.name).set(0)
        for name, target_probes in by_target.items():
            self._threads.append(
                threading.Thread(
                    target=self._probe_loop,
                    args=(targets[name], target_probes),
                    daemon=True,
                    name=f"migexport-probes-{name}",
                )
            )
        if apps:
            for app in apps:
                metrics.app_up.labels(app.name).set(0)
            self._threads.append(
                threading.Thread(target=self._app_loop, args=(apps,), daemon=True, name="migexport-apps")
            )

    def start(self) -> ProbeRunner:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _probe_loop(self, target: Target, probes: list[Probe]) -> None:
        schedules = [(_Every(p.interval_seconds), p) for p in probes]
        secret = password_of(target.dsn) or ""
        conn: psycopg.Connection | None = None
        changes = _Changes()
        while not self._stop.is_set():
            for every, probe in schedules:
                if self._stop.is_set() or not every.due(time.monotonic()):
                    continue
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = connect(target, self.session)
                    result = run_probe(conn, probe)
                except psycopg.Error as exc:
                    conn = None
                    result = ProbeResult(False, 0.0, str(exc).strip().splitlines()[0])
                self.metrics.duration.labels(target.name, probe.name).observe(result.seconds)
                self.metrics.success.labels(target.name, probe.name).set(int(result.ok))
                changes.note(f"probe {probe.name} on {target.name}", result.ok, redact(result.error, (secret,)))
            self._stop.wait(0.05)
        if conn is not None:
            conn.close()

    def _app_loop(self, apps: tuple[App, ...]) -> None:
        schedules = [(_Every(a.interval_seconds), a) for a in apps]
        changes = _Changes()
        while not self._stop.is_set():
            for every, app in schedules:
                if self._stop.is_set() or not every.due(time.monotonic()):
                    continue
                result = check_app(app)
                self.metrics.app_up.labels(app.name).set(int(result.ok))
                self.metrics.app_duration.labels(app.name).set(result.seconds)
                changes.note(f"app {app.name} health check", result.ok, result.error)
            self._stop.wait(0.05)
