"""The exporter as a library: build the registry, start the HTTP server, stop cleanly.

`cli.py` and `demo.py` are thin layers over this; tests and benchmarks use it directly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from migexport.collect import MigexportCollector
from migexport.dsn import Target
from migexport.http import MetricsServer
from migexport.targets import SessionSettings

log = logging.getLogger(__name__)

DEFAULT_PORT = 9745  # postgres_exporter has 9187; this one is ours


@dataclass
class ServeSettings:
    targets: list[Target]
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    scrape_timeout_seconds: float = 5.0
    session: SessionSettings = field(default_factory=SessionSettings)


class Exporter:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = MigexportCollector(
            settings.targets, settings.session, settings.scrape_timeout_seconds
        )
        self.registry.register(self.collector)
        self.server: MetricsServer | None = None

    def start(self) -> Exporter:
        self.server = MetricsServer(
            self.settings.host, self.settings.port, self.registry, [t.name for t in self.settings.targets]
        ).start()
        log.info(
            "serving metrics on http://%s:%d/metrics for %s",
            self.settings.host,
            self.server.port,
            ", ".join(t.name for t in self.settings.targets),
        )
        return self

    @property
    def url(self) -> str:
        assert self.server is not None, "exporter not started"
        host = self.settings.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.collector.close()

    def __enter__(self) -> Exporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
