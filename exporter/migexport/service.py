"""The exporter as a library: build the registry, start the HTTP server and probes, stop cleanly.

`cli.py` and `demo.py` are thin layers over this; tests and benchmarks use it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from migexport.baseline_gauges import BaselineSource
from migexport.checks_gauges import ChecksSource
from migexport.collect import MigexportCollector, Source
from migexport.collectors import default_collectors
from migexport.collectors.base import Collector
from migexport.collectors.migration import MigrationSessionCollector, MigrationStateSource
from migexport.config import App, Config, Migration, Probe
from migexport.dsn import Target
from migexport.http import MetricsServer
from migexport.probes import ProbeMetrics, ProbeRunner
from migexport.targets import SessionSettings
from migexport.units import parse_listen
from migexport.web_config import WebConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 9745  # postgres_exporter has 9187; this one is ours


@dataclass
class ServeSettings:
    targets: list[Target]
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    scrape_timeout_seconds: float = 5.0
    session: SessionSettings = field(default_factory=SessionSettings)
    migration: Migration = field(default_factory=Migration)
    state_path: Path = field(default_factory=lambda: Path(Migration().state_file))
    baseline_path: Path | None = None
    baseline_max_age_seconds: float = 86400.0
    # The last preflight and verify (migration.checks_file); None: not exported.
    checks_path: Path | None = None
    probes: tuple[Probe, ...] = ()
    apps: tuple[App, ...] = ()
    # TLS and basic auth (--web.config.file); the path is read by the caller, which reports a bad file.
    web_config_path: Path | None = None
    web_config: WebConfig | None = None

    @classmethod
    def from_config(cls, config: Config) -> ServeSettings:
        host, port = parse_listen(config.listen)
        return cls(
            targets=list(config.targets),
            host=host,
            port=port,
            scrape_timeout_seconds=config.scrape_timeout_seconds,
            session=SessionSettings(
                application_name=config.application_name,
                lock_timeout_ms=round(config.lock_timeout_seconds * 1000),
                statement_timeout_ms=round(config.statement_timeout_seconds * 1000),
            ),
            migration=config.migration,
            state_path=config.resolve(config.migration.state_file),
            baseline_path=config.resolve(config.baseline_file),
            baseline_max_age_seconds=config.thresholds.baseline_max_age_seconds,
            checks_path=config.resolve(config.migration.checks_file),
            probes=config.probes,
            apps=config.apps,
            web_config_path=config.resolve(config.web_config_file) if config.web_config_file else None,
        )

    def migration_target(self) -> str:
        return self.migration.target or self.targets[0].name


class Exporter:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        migration = settings.migration
        # The migration in the state file, not the config's id, labels every migration series.
        self.state_source = MigrationStateSource(settings.state_path, migration.id, migration.time_budget_seconds)
        sources: list[Source] = [self.state_source]
        if settings.baseline_path is not None:
            sources.append(
                BaselineSource(
                    settings.baseline_path,
                    self.state_source.current_migration_id,
                    settings.baseline_max_age_seconds,
                    expected_targets=tuple(t.name for t in settings.targets),
                    expected_probes=tuple((p.target, p.name) for p in settings.probes),
                )
            )
        if settings.checks_path is not None:
            sources.append(ChecksSource(settings.checks_path, self.state_source.current_migration_id))
        self.probe_metrics = ProbeMetrics()
        sources.append(self.probe_metrics)
        self.collector = MigexportCollector(
            settings.targets,
            settings.session,
            settings.scrape_timeout_seconds,
            collectors=self._collectors_for,
            sources=sources,
        )
        self.probes: ProbeRunner | None = None
        if settings.probes or settings.apps:
            self.probes = ProbeRunner(
                {t.name: t for t in settings.targets},
                settings.probes,
                settings.apps,
                self.probe_metrics,
                settings.session,
                own={w.name: w.own for w in self.collector.workers},
            )
        self.server: MetricsServer | None = None

    def _collectors_for(self, target: Target) -> list[Collector]:
        collectors = default_collectors(excluded_roles=(self.settings.migration.role,))
        if target.name == self.settings.migration_target():
            migration = self.settings.migration
            # It shares the pass's lock graph with the locks collector (collectors.locks.lock_snapshot).
            collectors.append(
                MigrationSessionCollector(self.state_source.current_migration_id, migration.session_application_name)
            )
        return collectors

    def start(self) -> Exporter:
        web = self.settings.web_config or WebConfig()
        self.server = MetricsServer(
            self.settings.host,
            self.settings.port,
            self.collector.exposition,
            [t.name for t in self.settings.targets],
            web,
        ).start()
        if self.probes is not None:
            self.probes.start()
        everywhere = " (all interfaces)" if self.settings.host in ("0.0.0.0", "::", "") else ""
        log.info(
            "serving metrics on %s://%s:%d/metrics%s with %s for %s",
            self.server.scheme,
            self.settings.host,
            self.server.port,
            everywhere,
            web.describe(),
            ", ".join(t.name for t in self.settings.targets),
        )
        if web.auth is not None and web.tls is None:
            log.warning("basic auth without TLS: passwords cross the network in clear text; add tls_server_config")
        return self

    @property
    def url(self) -> str:
        assert self.server is not None, "exporter not started"
        host = self.settings.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"{self.server.scheme}://{host}:{self.server.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.probes is not None:
            self.probes.stop()
        self.collector.close()

    def __enter__(self) -> Exporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
