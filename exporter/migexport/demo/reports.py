"""The demo writes the report of each scripted migration: once shortly after it ends (its watch window
still open, so the page says what happened so far) and again when the window has closed (the record).

It also leaves a `migexport.yml` describing the demo in its directory, so a newcomer can point the other
commands at it (`migexport report -c ...`, `preflight`, `verify`); the reports are written through it,
exactly as a user's `migexport report` would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from migexport.config import Migration, load_config
from migexport.demo import monitoring
from migexport.dsn import Target
from migexport.report.prometheus import ReportError
from migexport.report.render import FORMATS, write_report
from migexport.state import StateError, read_state

# After the end (or the window's close), how long to let Prometheus scrape and evaluate the last samples.
SETTLE_SECONDS = 6.0
POLL_SECONDS = 1.0


def write_config(
    work: Path, targets: list[Target], migration: Migration, baseline_path: Path, prometheus_url: str
) -> Path:
    """The demo as a config file (its DSNs are the throwaway clusters': nothing secret)."""
    t = monitoring.THRESHOLDS
    doc = {
        "targets": {target.name: {"dsn": target.dsn} for target in targets},
        "baseline_file": str(baseline_path),
        "migration": {
            "id": migration.id,
            "target": migration.target,
            "affected_tables": list(migration.affected_tables),
            "watch_window": f"{migration.watch_window_seconds:g}s",
            "log_file": migration.log_file,
            "state_file": migration.state_file,
            "checks_file": str(work / "migexport-checks.json"),
            "snapshot_file": str(work / "migexport-snapshot.json"),
        },
        "thresholds": {
            "rate_window": f"{t.rate_window_seconds:g}s",
            "alert_for": f"{t.alert_for_seconds:g}s",
            "critical_for": f"{t.critical_for_seconds:g}s",
            "lock_wait": f"{t.lock_wait_seconds:g}s",
            "blocking": f"{t.blocking_seconds:g}s",
            "replication_lag_watch": f"{t.replication_lag_watch_seconds:g}s",
        },
        "probes": [
            {
                "name": monitoring.PROBE.name,
                "sql": monitoring.PROBE.sql,
                "target": monitoring.PROBE.target,
                "interval": f"{monitoring.PROBE.interval_seconds:g}s",
            }
        ],
        "slis": {"prometheus_url": prometheus_url},
    }
    path = work / "migexport.yml"
    path.write_text(
        "# Written by `migexport demo`: the demo as a config file.\n" + yaml.safe_dump(doc, sort_keys=False)
    )
    return path


class Reporter:
    """Polls the state file; per migration (id and start) writes the report when it has ended and again
    when its watch window has closed."""

    def __init__(self, config_path: Path, say: Callable[[str], None], stop: threading.Event) -> None:
        self.config_path, self.say, self.stop = config_path, say, stop
        self.config = load_config(config_path)
        self.reports = config_path.parent / "reports"
        self.done: set[tuple[str, float, str]] = set()  # (id, started_at, "ended" | "closed")
        self.thread = threading.Thread(target=self._loop, name="demo-reports", daemon=True)

    def start(self) -> Reporter:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()  # also when the demo ends by its --duration, which does not set it
        self.thread.join(timeout=30)  # a report being written finishes: a half page is worse than none

    def _loop(self) -> None:
        state_path = self.config.resolve(self.config.migration.state_file)
        while not self.stop.wait(POLL_SECONDS):
            try:
                state = read_state(state_path)
            except StateError:
                continue
            if state is None or state.ended_at is None:
                continue
            now = time.time()
            stages = [("ended", state.ended_at), ("closed", state.ended_at + state.watch_window_seconds)]
            for stage, at in stages:
                key = (state.migration_id, state.started_at, stage)
                if key not in self.done and now >= at + SETTLE_SECONDS:
                    self.done.add(key)
                    self._write(state.migration_id, state.started_at, stage)

    def _write(self, migration_id: str, started_at: float, stage: str) -> None:
        stamp = time.strftime("%H%M%S", time.localtime(started_at))
        paths = []
        try:
            for fmt, suffix in FORMATS.items():
                output = self.reports / f"{migration_id}-{stamp}{suffix}"
                paths.append(write_report(self.config, migration_id, output, fmt, force=True))
        except (ReportError, OSError) as exc:
            self.say(f"report: {migration_id}: not written: {exc}")
            return
        note = "the watch window is still open; rewritten when it closes" if stage == "ended" else "final"
        self.say(f"report: {paths[0]} ({note}; Markdown: {paths[1].name})")
