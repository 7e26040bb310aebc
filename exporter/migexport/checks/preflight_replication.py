"""Replication: every expected standby streaming and caught up, no slot about to lose its WAL.

A migration writes WAL fast (a rewrite writes the whole table); a standby already behind falls further
behind, and one that is not streaming at all is a failover target without the migration. The expected
standbys are `preflight.standbys` (their application_name on the primary), or by default as many
streaming standbys as there are other targets. The lag is the one the alerts use: 0 when the standby
has replayed everything the primary wrote (replay_lag keeps a stale value on an idle primary),
otherwise `replay_lag`, compared with `thresholds.replication_lag_watch`. A slot whose `wal_status` is
`unreserved` or `lost` has lost (or is about to lose) the WAL its consumer needs; an inactive slot
retains WAL without bound while the migration writes it. pg_stat_replication shows the positions of
other roles' walsenders only to pg_read_all_stats (part of pg_monitor).
"""

from __future__ import annotations

from migexport.checks.preflight_common import Session, fmt_age, fmt_bytes
from migexport.checks.result import CheckResult, Status, cannot_check

STANDBYS_SQL = """
SELECT coalesce(application_name, ''), coalesce(state, ''),
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8,
       extract(epoch FROM replay_lag)::float8
FROM pg_stat_replication
ORDER BY application_name, pid
"""
SLOTS_SQL = """
SELECT slot_name, slot_type, active, coalesce(wal_status, ''),
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8
FROM pg_replication_slots
WHERE NOT temporary
ORDER BY slot_name
"""

STANDBYS, SLOTS = "replication", "replication_slots"


def _lag(lag_bytes: float | None, lag_seconds: float | None) -> float | None:
    if lag_bytes is not None and lag_bytes <= 0:
        return 0.0
    return lag_seconds


def check_standbys(session: Session) -> list[CheckResult]:
    config = session.config
    if session.server.in_recovery:
        return [cannot_check(STANDBYS, "the migration's target is a standby", "set migration.target to the primary")]
    if (hidden := session.hidden(STANDBYS)) is not None:
        return [hidden]
    rows = session.ctx.query(STANDBYS_SQL)
    watch = config.thresholds.replication_lag_watch_seconds
    streaming = {name: _lag(b, s) for name, state, b, s in rows if state == "streaming"}
    named = config.preflight.standbys
    expected = len(named) if named else len(config.targets) - 1
    limit = f"{expected} streaming, lag <= {fmt_age(watch)}"
    considered = {n: streaming[n] for n in named if n in streaming} if named else streaming
    shown = ", ".join(f"{n} {fmt_age(lag)}" for n, lag in considered.items()) or "none streaming"
    value = f"{len(considered)} of {expected} expected streaming ({shown})"
    absent = [n for n in named if n not in streaming]
    if absent or len(considered) < expected:
        who = f" ({', '.join(absent)} not streaming)" if absent else ""
        return [
            CheckResult(
                STANDBYS,
                Status.FAIL,
                value + who,
                limit,
                "a standby is missing: fix replication first (a failover now would lose the migration)",
            )
        ]
    behind = [n for n, lag in considered.items() if lag is None or lag > watch]
    if behind:
        return [
            CheckResult(
                STANDBYS,
                Status.FAIL,
                value,
                limit,
                f"{', '.join(behind)} behind (or lag unknown): let it catch up; the migration's WAL adds to it",
            )
        ]
    return [CheckResult(STANDBYS, Status.PASS, value, limit)]


def check_slots(session: Session) -> list[CheckResult]:
    if session.server.in_recovery:
        return [cannot_check(SLOTS, "the migration's target is a standby", "set migration.target to the primary")]
    rows = session.ctx.query(SLOTS_SQL)
    limit = "no slot lost/unreserved, none inactive"
    lost = [f"{name} {status}" for name, _, _, status, _ in rows if status in ("lost", "unreserved")]
    if lost:
        return [
            CheckResult(
                SLOTS,
                Status.FAIL,
                "; ".join(lost),
                limit,
                "its consumer has lost WAL it needs and must be re-seeded; fix or drop the slot first",
            )
        ]
    inactive = [
        f"{name} ({kind}, retains {fmt_bytes(retained) if retained is not None else 'no WAL yet'})"
        for name, kind, active, _, retained in rows
        if not active
    ]
    if inactive:
        return [
            CheckResult(
                SLOTS,
                Status.WARN,
                "inactive: " + "; ".join(inactive),
                limit,
                "an inactive slot keeps all WAL the migration writes: reconnect its consumer or drop the slot "
                "(logical subscribers also need the new schema: DDL is not replicated)",
            )
        ]
    return [CheckResult(SLOTS, Status.PASS, f"{len(rows)} slots, all active" if rows else "no slots", limit)]
