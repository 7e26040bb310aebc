"""`migexport demo`: the whole loop on one machine, removed on exit.

A throwaway primary + streaming replica with a small workload, the exporter (with a migration state file,
a key-query probe and a baseline captured in the background), Prometheus with the rules rendered from
short demo thresholds and an Alertmanager (when installed), and three scripted migrations to run.
Ctrl-C, SIGTERM or --duration stop and remove everything.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from migexport import localpg
from migexport.config import Migration
from migexport.demo import monitoring, reports, scripts
from migexport.dsn import Target
from migexport.service import Exporter, ServeSettings
from migexport.workload import Workload

__all__ = ["run_demo"]

MONITOR_ROLE = "migexport_demo"  # a pg_monitor member, like the role the README recommends


def run_demo(host: str, port: int, duration_seconds: float | None, echo: Callable[[str], None] = print) -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    lock = threading.Lock()

    def say(line: str) -> None:  # the baseline thread prints too
        with lock:
            echo(line)

    try:
        say("starting a throwaway PostgreSQL primary and streaming replica ...")
        with localpg.local_setup(replicas=1, prefix="migexport-demo-") as setup, contextlib.ExitStack() as stack:
            _run(setup, host, port, duration_seconds, stop, say, stack)
        say("stopped; the temporary clusters are removed")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(
    setup: localpg.LocalSetup,
    host: str,
    port: int,
    duration_seconds: float | None,
    stop: threading.Event,
    say: Callable[[str], None],
    stack: contextlib.ExitStack,
) -> None:
    """Everything after the clusters; `stack` stops it all (last started, first stopped) before they go."""
    primary, replica = setup.primary, setup.replicas[0]
    work = setup.base / "demo"  # removed with the clusters' temp directory
    work.mkdir()
    migration = monitoring.migration(work)
    baseline_path = work / "baseline.json"
    # 1 % rolled back on purpose: the error ratio has a baseline, and a clean migration keeps it.
    workload = Workload(primary.dsn(), workers=2, rate_per_worker=20, rollback_share=0.01).start()
    stack.callback(workload.stop)
    with primary.connect() as conn:
        # The exporter's own role, as in production: its statements (and only its) stay out of the latency sums.
        conn.execute(f"CREATE ROLE {MONITOR_ROLE} LOGIN CONNECTION LIMIT 20 IN ROLE pg_monitor")
        conn.execute(f"GRANT SELECT ON demo_orders TO {MONITOR_ROLE}")
    _wait_for_role(replica)
    targets = [
        Target("primary", primary.dsn(user=MONITOR_ROLE)),
        Target("replica1", replica.dsn(user=MONITOR_ROLE)),
    ]
    exporter = Exporter(
        ServeSettings(
            targets=targets,
            host=host,
            port=port,
            scrape_timeout_seconds=monitoring.EXPORTER_SCRAPE_TIMEOUT_SECONDS,
            migration=migration,
            state_path=Path(migration.state_file),
            baseline_path=baseline_path,
            probes=(monitoring.PROBE,),
        )
    ).start()
    stack.callback(exporter.stop)
    say(f"primary:  {primary.dsn()}")
    say(f"replica1: {replica.dsn()}")
    say(f"metrics:  {exporter.url}/metrics")
    baseline = monitoring.start_baseline(targets, work, exporter.url, baseline_path, say)
    stack.callback(baseline.join, 5)
    say(f"baseline: capturing {monitoring.BASELINE_SECONDS:g} s of normal traffic in the background ...")

    _watch(work, exporter.url, targets, migration, baseline_path, stop, say, stack)

    paths = scripts.write_scripts(work, primary, migration)
    say("scripted migrations (run one in another terminal, then watch the alerts):")
    say(f"clean:    {paths['clean']}  (an instant ALTER TABLE: nothing fires, the criteria pass)")
    say(f"stuck:    {paths['stuck']}  (queued behind a reader, blocking the workload: lock alerts fire)")
    say(f"breaking: {paths['breaking']}  (renames the table for 30 s: the key query fails, rollback alerts fire)")
    say(f"state: {migration.state_file}  log: {migration.log_file}")
    say(
        "press Ctrl-C to stop and remove everything"
        if duration_seconds is None
        else f"stopping by itself after {duration_seconds:g} s"
    )
    stop.wait(duration_seconds)


def _watch(
    work: Path,
    exporter_url: str,
    targets: list[Target],
    migration: Migration,
    baseline_path: Path,
    stop: threading.Event,
    say: Callable[[str], None],
    stack: contextlib.ExitStack,
) -> None:
    """Prometheus and Alertmanager when installed, and the reports of the scripted migrations."""
    try:
        watch = monitoring.start_monitoring(work, exporter_url)
    except (RuntimeError, OSError) as exc:
        say(f"prometheus: not started: {exc}; the demo goes on without alerts")
        watch = monitoring.Monitoring()
    stack.callback(watch.stop)
    if watch.missing:
        say(
            f"prometheus: not installed ({', '.join(watch.missing)} missing): no alerts in this demo; "
            "'bash scripts/demo.sh' installs them (apt-get install prometheus prometheus-alertmanager)"
        )
        return
    prom = watch.url("prometheus")
    if not prom:
        return
    say(f"prometheus: {prom}/alerts")
    say(f"alertmanager: {watch.url('alertmanager')}")
    query = monitoring.CRITERIA_QUERY
    say(f"criteria: {prom}/graph?g0.expr={query}&g0.tab=1  (the success criteria: query {query})")
    say(f"rules: {work / 'migexport.rules.yml'} (demo thresholds: alerts fire after seconds, not minutes)")
    config = reports.write_config(work, targets, migration, baseline_path, prom)
    reporter = reports.Reporter(config, say, stop).start()
    stack.callback(reporter.close)
    say(f"config: {config} (try: migexport report -c {config} --id demo-clean)")
    say(f"reports: {config.parent / 'reports'} (each migration's page, when it ends and when its window closes)")


def _wait_for_role(replica: localpg.LocalCluster, timeout: float = 15.0) -> None:
    """The role reaches the standby by replication: wait for it, so the exporter's first login works."""
    deadline = time.monotonic() + timeout
    with replica.connect() as conn:
        while not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (MONITOR_ROLE,)).fetchone():
            if time.monotonic() > deadline:
                raise localpg.LocalPgError(f"the role {MONITOR_ROLE} did not reach {replica.name} by replication")
            time.sleep(0.1)
