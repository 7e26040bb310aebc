"""Replication lag from both ends, induced for real on the session's primary + streaming replica.

Replay is paused on the standby while the primary writes, the standby's stream is broken by pointing
it at a closed port, and an unconsumed slot holds WAL back. Every test leaves the pair streaming.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from psycopg import sql

from conftest import Metrics, monitor_dsn, scrape, series, value, wait_for
from migexport.dsn import Target
from migexport.localpg import LocalCluster
from migexport.service import Exporter

STANDBY = "replica1"
SLOT = "migexport_test_slot"


@pytest.fixture
def exporter(pg, start_exporter) -> Exporter:
    return start_exporter(Target("primary", monitor_dsn(pg.primary)), Target("replica1", monitor_dsn(pg.replicas[0])))


# -- readings --------------------------------------------------------------------------------------
def primary_lag_seconds(m: Metrics) -> float:
    return value(m, "migexport_replication_lag_seconds", target="primary", standby=STANDBY)


def primary_lag_bytes(m: Metrics) -> float:
    return value(m, "migexport_replication_lag_bytes", target="primary", standby=STANDBY)


def standby_lag_seconds(m: Metrics) -> float:
    return value(m, "migexport_standby_replay_lag_seconds", target="replica1")


def standby_lag_bytes(m: Metrics) -> float:
    return value(m, "migexport_standby_replay_lag_bytes", target="replica1")


def streaming(m: Metrics) -> float:
    return value(m, "migexport_standby_receiver_streaming", target="replica1")


def standbys(m: Metrics) -> float:
    return value(m, "migexport_replication_standbys", target="primary")


def lag_readings(m: Metrics) -> dict[str, float]:
    return {
        "primary lag seconds": primary_lag_seconds(m),
        "primary lag bytes": primary_lag_bytes(m),
        "standby lag seconds": standby_lag_seconds(m),
        "standby lag bytes": standby_lag_bytes(m),
    }


def caught_up(m: Metrics) -> bool:
    return (
        (STANDBY in {dict(labels).get("standby") for labels in series(m, "migexport_replication_lag_bytes")})
        and streaming(m) == 1
        and all(v == 0 for v in lag_readings(m).values())
    )


def healthy_pair(m: Metrics) -> bool:
    return (
        value(m, "migexport_up", target="primary") == 1
        and value(m, "migexport_up", target="replica1") == 1
        and standbys(m) == 1
        and streaming(m) == 1
    )


def wal_position(cluster: LocalCluster) -> tuple[str, str]:
    with cluster.connect() as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return row[0], row[1]


class Writer:
    """Inserts a row every ~0.2 s on its own connection until stopped."""

    def __init__(self, cluster: LocalCluster, table: str) -> None:
        self._cluster = cluster
        self._table = table
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self.rows = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-writer")

    def start(self) -> Writer:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with self._cluster.connect(application_name="test-writer") as conn:
                insert = sql.SQL("INSERT INTO {} DEFAULT VALUES").format(sql.Identifier(self._table))
                while not self._stop.is_set():
                    conn.execute(insert)
                    self.rows += 1
                    self._stop.wait(0.2)
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "writer thread did not stop"


@pytest.fixture
def writes_table(pg) -> Iterator[str]:
    # Autovacuum off: an analyze of this table would write WAL during the idle window below.
    with pg.primary.connect() as conn:
        conn.execute("DROP TABLE IF EXISTS repl_lag_t")
        conn.execute(
            "CREATE TABLE repl_lag_t (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())"
            " WITH (autovacuum_enabled = off)"
        )
    try:
        yield "repl_lag_t"
    finally:
        with pg.primary.connect() as conn:
            conn.execute("DROP TABLE IF EXISTS repl_lag_t")


# -- tests -----------------------------------------------------------------------------------------
def test_pair_at_rest(pg, exporter):
    wait_for(lambda: healthy_pair(scrape(exporter.url)), timeout=20, what="a streaming pair")
    m = scrape(exporter.url)
    assert standbys(m) == 1
    assert value(m, "migexport_in_recovery", target="primary") == 0
    assert value(m, "migexport_in_recovery", target="replica1") == 1
    assert value(m, "migexport_standby_replay_paused", target="replica1") == 0
    # Each side exports only its own end's series.
    assert not series(m, "migexport_standby_replay_lag_seconds").keys() - {frozenset({("target", "replica1")})}
    assert {dict(labels)["target"] for labels in series(m, "migexport_replication_standbys")} == {"primary"}
    assert {dict(labels)["standby"] for labels in series(m, "migexport_replication_lag_seconds")} == {STANDBY}


def test_paused_replay_shows_growing_lag_then_exactly_zero(pg, exporter, writes_table):
    url = exporter.url
    wait_for(lambda: healthy_pair(scrape(url)), timeout=20, what="a streaming pair")
    replica = pg.replicas[0].connect()
    writer = Writer(pg.primary, writes_table)
    try:
        replica.execute("SELECT pg_wal_replay_pause()")
        writer.start()

        def behind(m: Metrics) -> bool:
            return all(v > 0 for v in lag_readings(m).values())

        wait_for(lambda: behind(scrape(url)), timeout=20, what="both ends to report lag")
        first = scrape(url)
        assert behind(first), lag_readings(first)
        assert value(first, "migexport_standby_replay_paused", target="replica1") == 1
        assert streaming(first) == 1
        assert standbys(first) == 1

        # Lag in seconds grows while replay stays paused, on both ends.
        def grown(m: Metrics) -> bool:
            primary_grew = primary_lag_seconds(m) > primary_lag_seconds(first)
            return primary_grew and standby_lag_seconds(m) > standby_lag_seconds(first)

        wait_for(lambda: grown(scrape(url)), timeout=15, what="lag seconds to grow on both ends")
        later = scrape(url)
        assert primary_lag_bytes(later) > 0
        assert standby_lag_bytes(later) > 0
        assert value(later, "migexport_standby_replay_paused", target="replica1") == 1
    finally:
        try:
            replica.execute("SELECT pg_wal_replay_resume()")
            replica.close()
        finally:
            writer.stop()
    assert not writer.errors, writer.errors
    assert writer.rows > 0

    wait_for(lambda: caught_up(scrape(url)), timeout=20, what="lag to return to exactly 0 after resume")
    m = scrape(url)
    assert value(m, "migexport_standby_replay_paused", target="replica1") == 0

    # An idle primary must show neither stale nor growing lag. "Idle" is checked, not assumed: the
    # server writes some WAL on its own (e.g. a running-xacts record ~15 s after activity), so a
    # window counts only if the primary's WAL position did not move during it.
    for _ in range(4):
        before = wal_position(pg.primary)
        wait_for(lambda: caught_up(scrape(url)), timeout=20, what="lag to be exactly 0")
        readings = []
        window_end = time.monotonic() + 3.0
        while time.monotonic() < window_end:
            readings.append(lag_readings(scrape(url)))
            time.sleep(0.25)
        if wal_position(pg.primary) == before:
            assert len(readings) >= 5
            assert all(v == 0 for r in readings for v in r.values()), readings
            break
    else:
        raise AssertionError("the primary never stayed free of WAL writes for 3 s")


def test_broken_stream_does_not_read_as_caught_up(pg, exporter):
    url = exporter.url
    wait_for(lambda: healthy_pair(scrape(url)), timeout=20, what="a streaming pair")
    replica = pg.replicas[0].connect()
    (original,) = replica.execute("SHOW primary_conninfo").fetchone()  # type: ignore[misc]
    # pg_basebackup -R wrote it to postgresql.auto.conf, so ALTER SYSTEM RESET would delete it:
    # restore the original value instead.
    assert "port=" in original
    try:
        replica.execute("ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1 user=postgres'")
        replica.execute("SELECT pg_reload_conf()")
        wait_for(lambda: streaming(scrape(url)) == 0, timeout=20, what="the WAL receiver to stop streaming")
        first = scrape(url)
        assert streaming(first) == 0
        assert standby_lag_seconds(first) > 0
        wait_for(
            lambda: standby_lag_seconds(scrape(url)) > standby_lag_seconds(first),
            timeout=10,
            what="standby lag to grow while the stream is broken",
        )
        wait_for(lambda: standbys(scrape(url)) == 0, timeout=20, what="the primary to lose its standby")
        m = scrape(url)
        assert standbys(m) == 0
        assert streaming(m) == 0
        assert standby_lag_seconds(m) > 0
        assert value(m, "migexport_up", target="replica1") == 1
    finally:
        try:
            replica.execute(sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(sql.Literal(original)))
            replica.execute("SELECT pg_reload_conf()")
        finally:
            replica.close()
        # The replica retries streaming every wal_retrieve_retry_interval (5 s by default).
        wait_for(lambda: healthy_pair(scrape(url)), timeout=30, what="the pair to stream again")
    # A reload reaches each backend asynchronously: ask a new session.
    with pg.replicas[0].connect() as conn:
        (restored,) = conn.execute("SHOW primary_conninfo").fetchone()  # type: ignore[misc]
    assert restored == original


def test_unconsumed_slot_retains_wal(pg, exporter):
    url = exporter.url
    with pg.primary.connect() as conn:
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (SLOT,))
        try:
            conn.execute("DROP TABLE IF EXISTS slot_wal_t")
            conn.execute("CREATE TABLE slot_wal_t (id int, pad text)")
            conn.execute("INSERT INTO slot_wal_t SELECT g, repeat('x', 100) FROM generate_series(1, 30000) g")
            retained_sql = (
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8"
                " FROM pg_replication_slots WHERE slot_name = %s"
            )
            wait_for(
                lambda: conn.execute(retained_sql, (SLOT,)).fetchone()[0] > 1_000_000,  # type: ignore[index]
                timeout=10,
                what="a few MB of WAL to be written",
            )
            low = conn.execute(retained_sql, (SLOT,)).fetchone()[0]  # type: ignore[index]
            m = scrape(url)
            high = conn.execute(retained_sql, (SLOT,)).fetchone()[0]  # type: ignore[index]
            retained = value(m, "migexport_replication_slot_retained_bytes", target="primary", slot=SLOT)
            assert low <= retained <= high
            assert retained > 1_000_000
            assert value(m, "migexport_replication_slot_active", target="primary", slot=SLOT) == 0
            assert value(m, "migexport_replication_slot_wal_at_risk", target="primary", slot=SLOT) == 0
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
            conn.execute("DROP TABLE IF EXISTS slot_wal_t")
    # Gone from the next scrape.
    m = scrape(url)
    assert SLOT not in {dict(lbl)["slot"] for lbl in series(m, "migexport_replication_slot_retained_bytes")}
