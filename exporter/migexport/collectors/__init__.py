"""One module per signal; `default_collectors()` is the set `serve` runs for every target."""

from __future__ import annotations

from migexport.collectors.base import Collector
from migexport.collectors.connections import ConnectionsCollector
from migexport.collectors.locks import LocksCollector
from migexport.collectors.replication import PrimaryReplicationCollector, StandbyReplicationCollector
from migexport.collectors.size import SizeCollector
from migexport.collectors.statements import StatementsCollector
from migexport.collectors.transactions import TransactionsCollector

COLLECTOR_CLASSES: tuple[type[Collector], ...] = (
    LocksCollector,
    ConnectionsCollector,
    TransactionsCollector,
    PrimaryReplicationCollector,
    StandbyReplicationCollector,
    SizeCollector,
    StatementsCollector,
)


def default_collectors(excluded_roles: tuple[str, ...] = ()) -> list[Collector]:
    """Fresh instances for one target (collectors keep per-target state). The statements of
    `excluded_roles` (the migration's) stay out of the latency sums, like the exporter's own."""
    return [StatementsCollector(excluded_roles) if cls is StatementsCollector else cls() for cls in COLLECTOR_CLASSES]
