"""The demo's watch: short thresholds, a baseline, and Prometheus + Alertmanager on 127.0.0.1.

The thresholds are the checklist's with every duration cut to seconds, so that an alert fires within a
minute of its cause; the servers are Debian's `prometheus` and `prometheus-alertmanager` binaries
(scripts/setup.sh installs them), run with their storage in the demo's temp directory.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from migexport import localpg, rulegen
from migexport.baseline import capture
from migexport.baseline_file import write_baseline
from migexport.config import Migration, Probe, Thresholds, parse_config
from migexport.dsn import Target

THRESHOLDS = Thresholds(
    rate_window_seconds=30.0,
    alert_for_seconds=10.0,
    critical_for_seconds=10.0,
    lock_wait_seconds=5.0,
    blocking_seconds=5.0,
    replication_lag_watch_seconds=5.0,
)
WATCH_WINDOW_SECONDS = 120.0
SCRAPE_INTERVAL = "2s"
EXPORTER_SCRAPE_TIMEOUT_SECONDS = 1.5  # answers within Prometheus' scrape_timeout (the 2 s interval)
BASELINE_SECONDS = 15.0
PROBE = Probe(
    name="recent_orders",
    sql="SELECT count(*) FROM demo_orders WHERE created_at > now() - interval '1 minute'",
    target="primary",
    interval_seconds=1.0,
    timeout_seconds=2.0,
)
CRITERIA_QUERY = "migexport:success_criterion:passed"
ALERTMANAGER_CONFIG = {
    "route": {"receiver": "demo", "group_wait": "1s", "group_interval": "5s", "repeat_interval": "1h"},
    "receivers": [{"name": "demo"}],  # no webhook: the alerts are seen on the Alertmanager's page
}


def migration(work: Path) -> Migration:
    return Migration(
        id="demo",
        target="primary",
        affected_tables=("demo_orders",),
        watch_window_seconds=WATCH_WINDOW_SECONDS,
        log_file=str(work / "migration.log"),
        state_file=str(work / "migexport-state.json"),
    )


def start_baseline(
    targets: list[Target], work: Path, exporter_url: str, path: Path, echo: Callable[[str], None]
) -> threading.Thread:
    """Capture a short baseline in the background (probe timings from the exporter) and write it to `path`."""
    config = parse_config(
        {
            "targets": {t.name: {"dsn": t.dsn} for t in targets},
            "baseline_file": str(path),
            "migration": {"id": "demo", "target": "primary", "affected_tables": ["demo_orders"]},
            "thresholds": {"rate_window": f"{THRESHOLDS.rate_window_seconds:g}s"},
            "probes": [{"name": PROBE.name, "sql": PROBE.sql, "target": PROBE.target, "interval": "1s"}],
        }
    )

    def run() -> None:
        try:
            doc = capture(config, BASELINE_SECONDS, exporter_url=exporter_url)
            write_baseline(path, doc, force=True)
        except Exception as exc:  # the demo goes on without a baseline (MigrationBaselineMissing says so)
            echo(f"baseline: not captured: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}")
            return
        echo(f"baseline: ready ({path}); the relative triggers and the success criteria are armed")

    thread = threading.Thread(target=run, name="demo-baseline", daemon=True)
    thread.start()
    return thread


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Monitoring:
    """Prometheus (with the rendered rules) and Alertmanager; empty when they are not installed."""

    servers: list[Server] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def url(self, name: str) -> str | None:
        return next((s.url for s in self.servers if s.name == name), None)

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/-/ready", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _start(name: str, argv: list[str], url: str, log: Path, timeout: float = 30.0) -> Server:
    with open(log, "w") as out:
        # A session of its own: Ctrl-C in the terminal reaches the demo, which stops it in order.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, url, proc, log)
    deadline = time.monotonic() + timeout
    while not _ready(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise RuntimeError(f"{name} did not start: {tail[0] if tail else 'no output'} (log: {log})")
        time.sleep(0.2)
    return server


def start_monitoring(work: Path, exporter_url: str) -> Monitoring:
    """Render the rules and start Alertmanager, then Prometheus, when both binaries are installed."""
    prometheus, alertmanager = shutil.which("prometheus"), shutil.which("prometheus-alertmanager")
    found = {"prometheus": prometheus, "prometheus-alertmanager": alertmanager}
    monitoring = Monitoring(missing=[name for name, path in found.items() if not path])
    if monitoring.missing:
        return monitoring
    assert prometheus and alertmanager
    rules = work / "migexport.rules.yml"
    rules.write_text(rulegen.render(THRESHOLDS, watch_window_seconds=WATCH_WINDOW_SECONDS))
    am_config = work / "alertmanager.yml"
    am_config.write_text(yaml.safe_dump(ALERTMANAGER_CONFIG, sort_keys=False))
    am_addr = f"127.0.0.1:{localpg.free_port()}"
    try:
        monitoring.servers.append(
            _start(
                "alertmanager",
                [
                    alertmanager,
                    f"--config.file={am_config}",
                    f"--storage.path={work / 'alertmanager-data'}",
                    f"--web.listen-address={am_addr}",
                    "--cluster.listen-address=",
                ],
                f"http://{am_addr}",
                work / "alertmanager.log",
            )
        )
        prom_config = work / "prometheus.yml"
        prom_config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": SCRAPE_INTERVAL,
                        "scrape_timeout": SCRAPE_INTERVAL,
                        "evaluation_interval": SCRAPE_INTERVAL,
                    },
                    "rule_files": [str(rules)],
                    "alerting": {"alertmanagers": [{"static_configs": [{"targets": [am_addr]}]}]},
                    "scrape_configs": [
                        {
                            "job_name": "migexport",
                            "static_configs": [{"targets": [exporter_url.removeprefix("http://")]}],
                        }
                    ],
                },
                sort_keys=False,
            )
        )
        prom_addr = f"127.0.0.1:{localpg.free_port()}"
        monitoring.servers.append(
            _start(
                "prometheus",
                [
                    prometheus,
                    f"--config.file={prom_config}",
                    f"--storage.tsdb.path={work / 'prometheus-data'}",
                    f"--web.listen-address={prom_addr}",
                ],
                f"http://{prom_addr}",
                work / "prometheus.log",
            )
        )
    except BaseException:
        with contextlib.suppress(Exception):
            monitoring.stop()
        raise
    return monitoring
