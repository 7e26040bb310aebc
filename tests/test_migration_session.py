"""The migration's own database session: what it blocks while it waits for its lock."""

from __future__ import annotations

from conftest import monitor_dsn, run_blocking, scrape, value, wait_for
from migexport.config import Migration
from migexport.dsn import Target


def test_migration_session_queued_behind_a_reader_blocks_the_readers_behind_it(pg, tmp_path, start_exporter):
    with pg.primary.connect() as setup:
        setup.execute("DROP TABLE IF EXISTS mig_t")
        setup.execute("CREATE TABLE mig_t (id int)")
    exporter = start_exporter(
        Target("primary", monitor_dsn(pg.primary)),
        migration=Migration(id="m1", session_application_name="migration"),
        state_path=tmp_path / "state.json",
    )
    reader = pg.primary.connect(application_name="test-old-reader")
    blocked = []
    try:
        m = scrape(exporter.url)
        assert value(m, "migexport_migration_blocked_sessions", target="primary", migration_id="m1") == 0
        assert value(m, "migexport_migration_session_connected", target="primary", migration_id="m1") == 0

        reader.execute("BEGIN")
        reader.execute("SELECT * FROM mig_t")
        blocked.append(run_blocking(pg.primary, "ALTER TABLE mig_t ADD COLUMN status text", app="migration"))
        wait_for(lambda: value(scrape(exporter.url), "migexport_lock_waiting_sessions", target="primary") == 1)
        blocked += [run_blocking(pg.primary, "SELECT count(*) FROM mig_t", app="test-app") for _ in range(3)]
        wait_for(lambda: value(scrape(exporter.url), "migexport_lock_waiting_sessions", target="primary") == 4)

        m = scrape(exporter.url)
        assert value(m, "migexport_migration_blocked_sessions", target="primary", migration_id="m1") == 3
        assert value(m, "migexport_migration_session_connected", target="primary", migration_id="m1") == 1
        assert value(m, "migexport_migration_lock_wait_seconds", target="primary", migration_id="m1") > 0
        assert value(m, "migexport_collector_success", target="primary", collector="migration") == 1
    finally:
        reader.execute("ROLLBACK")
        reader.close()
        for b in blocked:
            b.thread.join(timeout=10)
            b.conn.close()
    assert not any(b.error for b in blocked)
