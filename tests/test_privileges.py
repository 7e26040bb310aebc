"""Privileges checked, not assumed: a role without pg_read_all_stats sees only its own sessions, so its
lock, connection and replication views read low (a calm 0 during a real lock queue). The exporter says
what its role can see (migexport_role_can_read_all_stats, a warning at the first connection), and the
collectors that would read low report collector_success 0 instead of numbers. The suite's exporter role
is the README's recipe, created from the README itself."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from conftest import (
    MONITOR_ROLE,
    README,
    ddl_lock_queue,
    exporter_role_sql,
    monitor_dsn,
    scrape,
    series,
    value,
    wait_for,
)
from migexport.config import Migration
from migexport.dsn import Target

NOSTATS_ROLE = "migexport_nostats"
BLIND = ("locks", "connections", "replication", "migration")  # on the primary
BLIND_ON_STANDBY = ("connections", "standby")
SEEING = ("transactions", "size", "statements")  # their views show everyone's numbers to anyone


@pytest.fixture
def nostats_dsn(pg) -> Iterator[tuple[str, str]]:
    """The README's role recipe without pg_monitor: (primary DSN, replica DSN)."""
    sql = exporter_role_sql(NOSTATS_ROLE).replace(" IN ROLE pg_monitor", "")
    with pg.primary.connect() as conn:
        conn.execute(f"DROP ROLE IF EXISTS {NOSTATS_ROLE}")
        conn.execute(sql)
        oid = conn.execute("SELECT oid FROM pg_roles WHERE rolname = %s", (NOSTATS_ROLE,)).fetchone()[0]
    replica = pg.replicas[0]
    with replica.connect() as conn:  # this role (not one of an earlier run) has reached the standby

        def replicated() -> bool:
            return conn.execute("SELECT 1 FROM pg_roles WHERE oid = %s", (oid,)).fetchone() is not None

        wait_for(replicated, timeout=30, what=f"the role {NOSTATS_ROLE} to reach the standby")
    yield pg.primary.dsn(user=NOSTATS_ROLE), replica.dsn(user=NOSTATS_ROLE)
    with pg.primary.connect() as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (NOSTATS_ROLE,))
        conn.execute(f"DROP ROLE IF EXISTS {NOSTATS_ROLE}")


def success(metrics, target: str) -> dict[str, float]:
    return {
        dict(labels)["collector"]: v
        for labels, v in series(metrics, "migexport_collector_success").items()
        if dict(labels)["target"] == target
    }


def test_a_role_without_pg_read_all_stats_never_reads_calm_during_a_lock_queue(pg, nostats_dsn, start_exporter, caplog):
    primary_dsn, replica_dsn = nostats_dsn
    seeing = start_exporter(Target("primary", monitor_dsn(pg.primary)), migration=Migration(id="m1"))
    blind = start_exporter(
        Target("primary", primary_dsn), Target("replica", replica_dsn), migration=Migration(id="m1", target="primary")
    )
    caplog.set_level(logging.INFO, logger="migexport.targets")
    with ddl_lock_queue(pg.primary, "priv_queue", alter_app="migration", readers=3):
        # The suite's role (the README's recipe) sees the whole queue: the ALTER and 3 readers.
        m = scrape(seeing.url)
        assert value(m, "migexport_role_can_read_all_stats", target="primary") == 1
        assert value(m, "migexport_lock_waiting_sessions", target="primary") == 4
        assert all(v == 1 for v in success(m, "primary").values()), success(m, "primary")

        # Without pg_read_all_stats: no calm 0, but "cannot see", said in the metrics...
        for _ in range(3):
            m = scrape(blind.url)
        assert value(m, "migexport_up", target="primary") == 1
        assert value(m, "migexport_role_can_read_all_stats", target="primary") == 0
        assert value(m, "migexport_role_can_read_all_stats", target="replica") == 0
        ok = success(m, "primary")
        assert {c: ok[c] for c in BLIND} == dict.fromkeys(BLIND, 0), ok
        assert {c: ok[c] for c in SEEING} == dict.fromkeys(SEEING, 1), ok
        ok = success(m, "replica")
        assert {c: ok[c] for c in BLIND_ON_STANDBY} == dict.fromkeys(BLIND_ON_STANDBY, 0), ok
        for name in (
            "migexport_lock_waiting_sessions",
            "migexport_connections",
            "migexport_migration_blocked_sessions",
        ):
            assert not series(m, name), f"{name} must be absent, not a calm 0: {series(m, name)}"

    # ...and once in the log per target (three scrapes, one warning each), naming the fix.
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "pg_read_all_stats" in r.message
    ]
    assert sorted(w.split(":")[0] for w in warnings) == ["target primary", "target replica"], warnings
    assert all(f"GRANT pg_monitor TO {NOSTATS_ROLE}" in w for w in warnings), warnings
    assert "the connections, locks, migration, replication collectors" in "".join(warnings), warnings


def test_a_grant_is_seen_at_the_next_scrape(pg, nostats_dsn, start_exporter):
    exporter = start_exporter(Target("primary", nostats_dsn[0]))
    assert value(scrape(exporter.url), "migexport_role_can_read_all_stats", target="primary") == 0
    with pg.primary.connect() as conn:
        conn.execute(f"GRANT pg_monitor TO {NOSTATS_ROLE}")
    m = scrape(exporter.url)
    assert value(m, "migexport_role_can_read_all_stats", target="primary") == 1
    assert value(m, "migexport_collector_success", target="primary", collector="locks") == 1


def test_the_suites_exporter_role_is_the_readmes_recipe(pg):
    """The README's recipe, run as written (another name), makes a role identical to the suite's."""
    recipe = exporter_role_sql("migexport_readme_recipe")
    assert re.fullmatch(
        r"CREATE ROLE migexport_readme_recipe LOGIN PASSWORD '[^']+' CONNECTION LIMIT \d+ IN ROLE pg_monitor;", recipe
    ), recipe
    attrs = """
        SELECT rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication, rolconnlimit,
               rolbypassrls, rolpassword IS NOT NULL, rolvaliduntil,
               (SELECT setconfig FROM pg_db_role_setting WHERE setrole = r.oid AND setdatabase = 0),
               array(SELECT b.rolname::text FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid
                     WHERE m.member = r.oid ORDER BY 1),
               pg_has_role(r.oid, 'pg_read_all_stats', 'USAGE')
        FROM pg_authid r WHERE rolname = %s
    """
    with pg.primary.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS migexport_readme_recipe")
        conn.execute(recipe)
        try:
            readme = conn.execute(attrs, ("migexport_readme_recipe",)).fetchone()
            suite = conn.execute(attrs, (MONITOR_ROLE,)).fetchone()
        finally:
            conn.execute("DROP ROLE migexport_readme_recipe")
    assert suite == readme
    assert readme[-2:] == (["pg_monitor"], True)
    # The README says so where it gives the recipe.
    assert "creates its exporter's role with exactly this statement" in README.read_text()


def test_the_compose_init_script_makes_the_same_role():
    """deploy/initdb (docker-compose) creates the exporter's role with the README's statement too."""
    roles_sql = (README.parent / "deploy" / "initdb" / "sql" / "roles.sql").read_text()
    made = [line for line in roles_sql.splitlines() if line.startswith("CREATE ROLE migexport ")]
    recipe = exporter_role_sql("migexport")
    expected = re.sub(r"PASSWORD '[^']*'", "PASSWORD ?", recipe)
    assert [re.sub(r"PASSWORD \S+", "PASSWORD ?", m) for m in made] == [expected]
