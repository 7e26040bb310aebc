"""Traffic: "Traffic at acceptable level", the transaction rate now against the baseline's.

The rate is measured over a few seconds on the migration's target, from the same counter the
baseline's `tps` comes from (`pg_stat_database` of the watched database, commits plus rollbacks), with
this session's own statements subtracted as the exporter subtracts its own (flushed first on
PostgreSQL 15+). The window starts when preflight connects and ends after the other checks, so it
costs little extra time. A baseline below one transaction per second counts as one, so that a few
transactions on a quiet database cannot read as many times the baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from migexport.checks.preflight_common import Session
from migexport.checks.result import CheckResult, Status

XACTS_SQL = """
SELECT xact_commit + xact_rollback, extract(epoch FROM clock_timestamp())::float8
FROM pg_stat_database
WHERE datname = current_database()
"""

CHECK = "traffic"
BASELINE_FLOOR_TPS = 1.0


@dataclass
class Reading:
    transactions: float
    server_time: float
    own: int
    started: float  # time.monotonic(), for the wait


def read(session: Session) -> Reading:
    ctx = session.ctx
    ctx.publish_own_transactions()
    total, now = ctx.query_one(XACTS_SQL)
    own = sum(ctx.own.totals()) if ctx.own is not None else 0
    return Reading(float(total), float(now), own, time.monotonic())


def finish(session: Session, start: Reading, window: float, baseline_tps: float | None) -> list[CheckResult]:
    """Wait for the rest of the window, read again, compare."""
    time.sleep(max(0.0, window - (time.monotonic() - start.started)))
    end = read(session)
    elapsed = end.server_time - start.server_time
    # Each reading's own statement is in the other's count on both sides: they cancel (see read()).
    xacts = max(0.0, end.transactions - start.transactions - (end.own - start.own))
    rate = xacts / elapsed if elapsed > 0 else 0.0
    ratio_max = session.config.preflight.traffic_max_ratio
    value = f"{rate:.1f} tx/s over {elapsed:.1f}s"
    if baseline_tps is None:
        return [
            CheckResult(
                CHECK,
                Status.WARN,
                f"{value}; no baseline rate",
                f"<= {ratio_max:g}x the baseline",
                "capture a baseline",
            )
        ]
    base = max(baseline_tps, BASELINE_FLOOR_TPS)
    ratio = rate / base
    limit = f"<= {ratio_max:g}x baseline {baseline_tps:.1f} tx/s"
    value = f"{value} ({ratio:.2f}x)"
    if ratio > ratio_max:
        return [
            CheckResult(
                CHECK,
                Status.FAIL,
                value,
                limit,
                "traffic is well above the baseline: wait for a quieter time (locks and rewrites hurt more now)",
            )
        ]
    return [CheckResult(CHECK, Status.PASS, value, limit)]
