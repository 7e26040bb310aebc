"""The migration's own database session: what it blocks while it waits for its lock."""

from __future__ import annotations

import os
import time

from conftest import ddl_lock_queue, monitor_dsn, scrape, series, value
from migexport.config import Migration
from migexport.dsn import Target
from migexport.state import RUNNING, MigrationState, write_state


def test_migration_session_queued_behind_a_reader_blocks_the_readers_behind_it(pg, tmp_path, start_exporter):
    exporter = start_exporter(
        Target("primary", monitor_dsn(pg.primary)),
        migration=Migration(id="m1", session_application_name="migration"),
        state_path=tmp_path / "state.json",
    )
    m = scrape(exporter.url)
    assert value(m, "migexport_migration_blocked_sessions", target="primary", migration_id="m1") == 0
    assert value(m, "migexport_migration_session_connected", target="primary", migration_id="m1") == 0

    with ddl_lock_queue(pg.primary, "mig_t", alter_app="migration"):
        m = scrape(exporter.url)
        assert value(m, "migexport_lock_waiting_sessions", target="primary") == 4
        assert value(m, "migexport_migration_blocked_sessions", target="primary", migration_id="m1") == 3
        assert value(m, "migexport_migration_session_connected", target="primary", migration_id="m1") == 1
        assert value(m, "migexport_migration_lock_wait_seconds", target="primary", migration_id="m1") > 0
        assert value(m, "migexport_collector_success", target="primary", collector="migration") == 1


def test_migration_session_carries_the_id_of_the_migration_run_ran(pg, tmp_path, start_exporter):
    state = tmp_path / "state.json"
    exporter = start_exporter(
        Target("primary", monitor_dsn(pg.primary)),
        migration=Migration(id="m1", session_application_name="migration"),
        state_path=state,
    )
    write_state(state, MigrationState("hotfix-7", RUNNING, time.time(), 1800, 3600, pid=os.getpid()))
    with ddl_lock_queue(pg.primary, "mig_id_t", alter_app="migration"):
        # The first scrape after the change already labels the session with the new id.
        m = scrape(exporter.url)
        assert value(m, "migexport_migration_session_connected", target="primary", migration_id="hotfix-7") == 1
        assert value(m, "migexport_migration_blocked_sessions", target="primary", migration_id="hotfix-7") == 3
        assert value(m, "migexport_migration_in_progress", migration_id="hotfix-7") == 1
        assert not series(m, "migexport_migration_session_connected").keys() - {
            frozenset({("target", "primary"), ("migration_id", "hotfix-7")})
        }
