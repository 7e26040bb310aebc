"""Size of the watched database.

pg_database_size() adds up file sizes in the database's directory and takes no lock on any table,
unlike pg_relation_size() and friends, which wait behind a queued ACCESS EXCLUSIVE and lengthen the
very queue we watch. It stats every file, so it runs at most once a minute.
"""

from __future__ import annotations

from migexport.collectors.base import Collector, Context
from migexport.metrics import MetricSpec, Sample

DATABASE_SIZE_SQL = "SELECT pg_database_size(current_database())::float8"

DATABASE_SIZE = MetricSpec(
    "migexport_database_size_bytes", "Size of the watched database on disk (refreshed at most every 60 s)."
)


class SizeCollector(Collector):
    name = "size"
    specs = (DATABASE_SIZE,)
    min_interval_seconds = 60.0

    def collect(self, ctx: Context) -> list[Sample]:
        (size,) = ctx.query_one(DATABASE_SIZE_SQL)
        return [DATABASE_SIZE.sample(size)]
