"""Replication lag, from both ends.

On a primary, per standby: replay lag in seconds and bytes, plus replication slots. replay_lag keeps
its last value for a while on an idle primary, then turns NULL; here a standby that has replayed
everything the primary has written reads 0, so an idle primary never shows stale or growing lag.

On a standby: now() - pg_last_xact_replay_timestamp() grows forever on an idle primary, and "received
= replayed" also holds when the stream is broken. So the lag reads 0 only when the standby has
replayed all it received *and* its WAL receiver is streaming; otherwise it is the age of the last
replayed transaction.
"""

from __future__ import annotations

import functools
import math
import time

from migexport.collectors.activity import ActivityPart
from migexport.collectors.base import Collector, Context, ServerInfo
from migexport.metrics import MetricSpec, Sample

# On a primary (the CASE keeps pg_current_wal_lsn(), which fails during recovery, from running on a
# standby): [standbys, slots]. The standbys come from pg_stat_get_wal_senders(), each walsender looked
# up by pid in the pass's snapshot of the sessions (collectors.activity), which is what
# pg_stat_replication is, without its own pass over pg_stat_activity; the
# slots from pg_get_replication_slots(), which is pg_replication_slots without its join to pg_database
# (a lock on that catalog must not fail the pass's read).
PRIMARY_SELECT = """CASE WHEN NOT pg_is_in_recovery() THEN json_build_array(
  (SELECT json_agg(json_build_array(w.pid, coalesce(s.application_name, ''), coalesce(s.client_addr::text, ''),
                                    coalesce(w.state, ''),
                                    pg_wal_lsn_diff(pg_current_wal_lsn(), w.replay_lsn)::float8,
                                    extract(epoch FROM w.replay_lag)::float8) ORDER BY w.pid)
   FROM pg_stat_get_wal_senders() AS w CROSS JOIN LATERAL pg_stat_get_activity(w.pid) AS s),
  (SELECT json_agg(json_build_array(slot_name, active,
                                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::float8,
                                    coalesce(wal_status, '')) ORDER BY slot_name)
   FROM pg_get_replication_slots())
) END"""
PRIMARY_PART = ActivityPart("replication", PRIMARY_SELECT)
# On a standby. pg_stat_wal_receiver shows its status only to roles with pg_read_all_stats (pg_monitor
# has it); the pause state function fails on a primary, hence the CASE.
STANDBY_SELECT_TEMPLATE = """CASE WHEN pg_is_in_recovery() THEN json_build_array(
  coalesce((SELECT status FROM pg_stat_wal_receiver), 'none'),
  coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0)::float8,
  extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8,
  extract(epoch FROM clock_timestamp() - pg_postmaster_start_time())::float8,
  {paused}
) END"""
PAUSED_SINCE_14 = "pg_get_wal_replay_pause_state() <> 'not paused'"
PAUSED_BEFORE_14 = "pg_is_wal_replay_paused()"


@functools.cache  # one part per server version, built once
def standby_part(version_num: int) -> ActivityPart:
    paused = PAUSED_SINCE_14 if version_num >= 140000 else PAUSED_BEFORE_14
    return ActivityPart("standby", STANDBY_SELECT_TEMPLATE.format(paused=paused))


LAG_SECONDS = MetricSpec(
    "migexport_replication_lag_seconds",
    "Replay lag of a standby as seen by the primary (pg_stat_replication.replay_lag); 0 when the "
    "standby has replayed all WAL the primary has written.",
    labels=("standby",),
)
LAG_BYTES = MetricSpec(
    "migexport_replication_lag_bytes",
    "WAL written on the primary and not yet replayed by the standby.",
    labels=("standby",),
)
STANDBYS = MetricSpec("migexport_replication_standbys", "Standbys connected to the primary and streaming.")
SLOT_RETAINED = MetricSpec(
    "migexport_replication_slot_retained_bytes",
    "WAL kept on the primary for a replication slot (current WAL position minus the slot's restart_lsn).",
    labels=("slot",),
)
SLOT_ACTIVE = MetricSpec(
    "migexport_replication_slot_active", "1 if a client is connected to the slot.", labels=("slot",)
)
SLOT_WAL_LOST = MetricSpec(
    "migexport_replication_slot_wal_at_risk",
    "1 if the slot's wal_status is 'unreserved' or 'lost': its consumer will need re-seeding.",
    labels=("slot",),
)
STANDBY_LAG_SECONDS = MetricSpec(
    "migexport_standby_replay_lag_seconds",
    "On a standby: 0 when it has replayed everything received and its WAL receiver is streaming, "
    "otherwise the age of the last replayed transaction (or of the server, if none was replayed).",
)
STANDBY_LAG_BYTES = MetricSpec("migexport_standby_replay_lag_bytes", "On a standby: WAL received but not yet replayed.")
STANDBY_STREAMING = MetricSpec(
    "migexport_standby_receiver_streaming", "On a standby: 1 if the WAL receiver is streaming from upstream."
)
STANDBY_PAUSED = MetricSpec(
    "migexport_standby_replay_paused", "On a standby: 1 if WAL replay is paused (pg_wal_replay_pause())."
)


def standby_labels(rows: list[tuple[int, str, str]]) -> dict[int, str]:
    """A unique label per walsender: application_name, else client address, with the pid appended
    when two walsenders would otherwise share one."""
    names = {pid: app or addr or f"pid {pid}" for pid, app, addr in rows}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {pid: name if counts[name] == 1 else f"{name} (pid {pid})" for pid, name in names.items()}


class PrimaryReplicationCollector(Collector):
    name = "replication"
    needs_all_stats = True
    specs = (LAG_SECONDS, LAG_BYTES, STANDBYS, SLOT_RETAINED, SLOT_ACTIVE, SLOT_WAL_LOST)

    def __init__(self) -> None:
        super().__init__()
        # Per standby, when this exporter first saw it behind while the server reported no
        # replay_lag yet (right after a walsender starts): a lower bound that keeps growing.
        self._behind_since: dict[str, float] = {}

    def applies(self, server: ServerInfo) -> bool:
        return not server.in_recovery

    def activity_parts(self, version_num: int) -> tuple[ActivityPart, ...]:
        return (PRIMARY_PART,)

    def collect(self, ctx: Context) -> list[Sample]:
        value = ctx.activity(PRIMARY_PART)
        if value is None:
            raise RuntimeError("the server is in recovery: no standbys to report")
        rows, slots = value[0] or [], value[1] or []
        labels = standby_labels([(pid, app, addr) for pid, app, addr, *_ in rows])
        samples: list[Sample] = []
        now = time.monotonic()
        streaming = 0
        for pid, _app, _addr, state, lag_bytes, replay_lag in rows:
            standby = labels[pid]
            streaming += state == "streaming"
            samples.append(LAG_BYTES.sample(lag_bytes, standby=standby))
            samples.append(LAG_SECONDS.sample(self._lag_seconds(standby, lag_bytes, replay_lag, now), standby=standby))
        self._behind_since = {k: v for k, v in self._behind_since.items() if k in labels.values()}
        samples.append(STANDBYS.sample(streaming))
        for slot, active, retained, wal_status in slots:
            samples.append(SLOT_RETAINED.sample(retained, slot=slot))
            samples.append(SLOT_ACTIVE.sample(int(active), slot=slot))
            samples.append(SLOT_WAL_LOST.sample(int(wal_status in ("unreserved", "lost")), slot=slot))
        return samples

    def _lag_seconds(self, standby: str, lag_bytes: float | None, replay_lag: float | None, now: float) -> float:
        if lag_bytes is not None and lag_bytes <= 0:
            self._behind_since.pop(standby, None)
            return 0.0
        if replay_lag is not None and not math.isnan(replay_lag):
            self._behind_since.pop(standby, None)
            return replay_lag
        since = self._behind_since.setdefault(standby, now)
        return now - since


class StandbyReplicationCollector(Collector):
    name = "standby"
    needs_all_stats = True
    specs = (STANDBY_LAG_SECONDS, STANDBY_LAG_BYTES, STANDBY_STREAMING, STANDBY_PAUSED)

    def applies(self, server: ServerInfo) -> bool:
        return server.in_recovery

    def activity_parts(self, version_num: int) -> tuple[ActivityPart, ...]:
        return (standby_part(version_num),)

    def collect(self, ctx: Context) -> list[Sample]:
        value = ctx.activity(standby_part(ctx.server.version_num))
        if value is None:
            raise RuntimeError("the server is not in recovery: no standby to report")
        status, lag_bytes, replay_age, server_age, paused = value
        streaming = status == "streaming"
        if streaming and lag_bytes <= 0:
            lag = 0.0
        elif replay_age is not None:
            lag = replay_age
        else:  # nothing replayed since this server started: it has been behind at least that long
            lag = server_age
        return [
            STANDBY_LAG_SECONDS.sample(lag),
            STANDBY_LAG_BYTES.sample(lag_bytes),
            STANDBY_STREAMING.sample(int(streaming)),
            STANDBY_PAUSED.sample(int(bool(paused))),
        ]
