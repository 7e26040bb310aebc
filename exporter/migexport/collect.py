"""The scrape: every target collected in parallel under one deadline, written as the text exposition.

`MigexportCollector.exposition()` is called once per scrape and renders fresh snapshots and the
file-backed sources; nothing is kept in global metric objects that concurrent scrapes could fight over.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Protocol

from migexport import __version__
from migexport.baseline_gauges import BASELINE_SPECS
from migexport.checks_gauges import CHECKS_SPECS
from migexport.collectors import COLLECTOR_CLASSES, default_collectors
from migexport.collectors.base import Collector
from migexport.collectors.migration import MigrationSessionCollector, MigrationStateSource
from migexport.dsn import Target
from migexport.metrics import COUNTER, MetricSpec, Sample, render
from migexport.probes import PROBE_SPECS
from migexport.targets import SessionSettings, Snapshot, TargetWorker

log = logging.getLogger(__name__)

UP = MetricSpec(
    "migexport_up",
    "1 if the target's database answered this scrape's collection, 0 if it could not be reached or "
    "did not answer before the scrape deadline.",
)
SCRAPE_DURATION = MetricSpec("migexport_scrape_duration_seconds", "Time this scrape spent collecting the target.")
COLLECTOR_SUCCESS = MetricSpec(
    "migexport_collector_success",
    "1 if the collector's queries succeeded in this scrape, 0 if one failed (timeout, permission).",
    labels=("collector",),
)
COLLECTOR_DURATION = MetricSpec(
    "migexport_collector_duration_seconds", "Time one collector took in this scrape.", labels=("collector",)
)
IN_RECOVERY = MetricSpec("migexport_in_recovery", "1 if the target is a standby (pg_is_in_recovery()), 0 if a primary.")
CAN_READ_ALL_STATS = MetricSpec(
    "migexport_role_can_read_all_stats",
    "1 if the exporter's role sees every session's activity (superuser, or the privileges of "
    "pg_read_all_stats, e.g. through pg_monitor); 0 if it sees only its own sessions: then the collectors "
    "that read other sessions (locks, connections, replication, migration) are not run and report "
    "migexport_collector_success 0 rather than a calm 0.",
)
SERVER_VERSION = MetricSpec("migexport_server_version_num", "The target's server_version_num.")
QUERIES = MetricSpec(
    "migexport_queries_total", "Statements the exporter sent to the target: the load it adds.", kind=COUNTER
)
TIMEOUTS = MetricSpec(
    "migexport_scrape_timeouts_total",
    "Scrapes that gave up on the target at the deadline while its collection was still running.",
    kind=COUNTER,
)
CONNECTS = MetricSpec(
    "migexport_connection_attempts_total",
    "Connections the exporter opened (or tried to) to the target; it keeps two open between scrapes (the "
    "pass's and the statement sums').",
    kind=COUNTER,
)
BUILD_INFO = MetricSpec("migexport_build_info", "migexport version; always 1.", labels=("version",), per_target=False)
SELF_SPECS = (
    UP,
    SCRAPE_DURATION,
    COLLECTOR_SUCCESS,
    COLLECTOR_DURATION,
    IN_RECOVERY,
    CAN_READ_ALL_STATS,
    SERVER_VERSION,
    QUERIES,
    TIMEOUTS,
    CONNECTS,
)


class Source(Protocol):
    """Metrics that come from files, not from a database (migration state, baseline)."""

    specs: tuple[MetricSpec, ...]

    def samples(self) -> list[Sample]: ...


@functools.cache
def all_specs() -> tuple[MetricSpec, ...]:
    return (
        SELF_SPECS
        + tuple(spec for cls in COLLECTOR_CLASSES for spec in cls.specs)
        + MigrationSessionCollector.specs
        + MigrationStateSource.specs
        + BASELINE_SPECS
        + CHECKS_SPECS
        + PROBE_SPECS
        + (BUILD_INFO,)
    )


class MigexportCollector:
    def __init__(
        self,
        targets: list[Target],
        session: SessionSettings | None = None,
        scrape_timeout_seconds: float = 5.0,
        collectors: Callable[[Target], list[Collector]] = lambda _target: default_collectors(),
        sources: list[Source] | None = None,
    ) -> None:
        self.workers = [TargetWorker(t, lambda t=t: collectors(t), session) for t in targets]
        self.sources = sources or []
        self.scrape_timeout_seconds = scrape_timeout_seconds

    def snapshots(self) -> list[Snapshot]:
        """Every target's pass started at once (each on its worker's thread), then each awaited until
        the one deadline: a hung target costs the scrape its deadline, never the other targets' results."""
        deadline = time.monotonic() + self.scrape_timeout_seconds
        running = [worker.begin(deadline) for worker in self.workers]
        return [worker.finish(future, deadline) for worker, future in zip(self.workers, running, strict=True)]

    def exposition(self) -> str:
        """The whole /metrics page of one scrape."""
        snaps = self.snapshots()
        per_target: list[tuple[str | None, list[Sample]]] = [
            (snap.target, self._self_samples(worker, snap) + snap.samples)
            for worker, snap in zip(self.workers, snaps, strict=True)
        ]
        per_target += [(None, self._source_samples(source)) for source in self.sources]
        per_target.append((None, [BUILD_INFO.sample(1, version=__version__)]))
        return render(per_target, all_specs())

    @staticmethod
    def _source_samples(source: Source) -> list[Sample]:
        # A file-backed source must never take the database metrics down with it.
        try:
            return source.samples()
        except Exception:
            log.exception("%s failed; its metrics are left out of this scrape", type(source).__name__)
            return []

    @staticmethod
    def _self_samples(worker: TargetWorker, snap: Snapshot) -> list[Sample]:
        samples = [
            UP.sample(int(snap.up)),
            SCRAPE_DURATION.sample(snap.duration_seconds),
            QUERIES.sample(worker.queries_total),
            TIMEOUTS.sample(worker.timeouts_total),
            CONNECTS.sample(worker.connects_total),
        ]
        for name, ok in snap.collector_success.items():
            samples.append(COLLECTOR_SUCCESS.sample(int(ok), collector=name))
            samples.append(COLLECTOR_DURATION.sample(snap.collector_duration[name], collector=name))
        if snap.server is not None:
            samples.append(IN_RECOVERY.sample(int(snap.server.in_recovery)))
            samples.append(CAN_READ_ALL_STATS.sample(int(snap.server.can_read_all_stats)))
            samples.append(SERVER_VERSION.sample(snap.server.version_num))
        return samples

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
