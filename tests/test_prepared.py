"""The statements a scrape repeats are prepared once per connection, and preparing them changes nothing
the exporter counts: every statement of ours is still one transaction in the server's counters, and a
statement whose first prepared run fails leaves at most one server-side statement behind."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import psycopg
import pytest

from conftest import monitor_dsn, server_version_num
from migexport.collectors.activity import read as read_activity
from migexport.collectors.base import Context, PreparedStatements, ServerInfo
from migexport.collectors.connections import CONNECTIONS_PART
from migexport.dsn import Target
from migexport.own import OwnTransactions, SessionLedger
from migexport.targets import SessionSettings, connect

COUNTERS_SQL = "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = current_database()"
PREPARED_SQL = "SELECT count(*) FROM pg_prepared_statements"
FAILS_ON_ZERO = "SELECT 100 / %s::int"


@pytest.fixture(scope="module")
def quiet_db(pg) -> str:
    """A database of its own: nobody else's transactions move its counters."""
    with pg.primary.connect() as conn:
        conn.execute("DROP DATABASE IF EXISTS prepared_app")
        conn.execute("CREATE DATABASE prepared_app")
    return "prepared_app"


OpenContext = Callable[[], AbstractContextManager[Context]]


@pytest.fixture
def open_preparing(pg, quiet_db) -> OpenContext:
    """Opens a connection set up as the exporter's sessions are, with its ledger and its prepared statements."""
    version = server_version_num(pg.primary)
    # The suite runs on 15 and 18; an older server (MIGEXPORT_PG_BINDIR) publishes our counts late.
    assert version >= 150000, "these exact counts need PostgreSQL 15+ (pg_stat_force_next_flush)"

    @contextmanager
    def opened() -> Iterator[Context]:
        conn = connect(Target("app", monitor_dsn(pg.primary, quiet_db)), SessionSettings())
        conn.prepare_threshold = sys.maxsize  # as targets._Session: prepared only where asked
        ledger = SessionLedger(OwnTransactions(), version)
        try:
            yield Context("app", conn, ServerInfo(version, False, quiet_db), ledger, prepared=PreparedStatements())
        finally:
            conn.close()

    return opened


@pytest.fixture
def preparing(open_preparing: OpenContext) -> Iterator[Context]:
    with open_preparing() as ctx:
        yield ctx


def counts_do_not_move(open_ctx: OpenContext, body: Callable[[Context], None]) -> None:
    """`body` on a fresh connection leaves the database's counters minus ours where they were. An
    autovacuum worker visiting the database meanwhile commits 2 transactions of its own, at moments no
    test chooses (see conftest.AUTOVACUUM_COMMITS_PER_VISIT); then the body runs once more on another
    fresh connection. What is counted here is deterministic: a miscount of ours moves them both times."""
    moved = []
    for _ in range(2):
        with open_ctx() as ctx:
            before = not_ours(ctx)
            body(ctx)
            after = not_ours(ctx)
        if after == before:
            return
        moved.append((before, after))
    raise AssertionError(f"the commits and rollbacks not ours moved on both tries: {moved}")


def not_ours(ctx: Context) -> tuple[int, int]:
    """The database's commits and rollbacks minus those the ledger counted as ours. The read itself is
    counted before the server shows it, the same offset at every call."""
    assert ctx.own is not None
    ctx.publish_own_transactions()
    commits, rollbacks = ctx.query_one(COUNTERS_SQL)
    own_commits, own_rollbacks = ctx.own.totals()
    return commits - own_commits, rollbacks - own_rollbacks


def prepared_on(ctx: Context) -> int:
    """Statements the server holds prepared for this session (this read is a transaction of ours too)."""
    return ctx.query_one(PREPARED_SQL)[0]


def executions_of_prepared(ctx: Context) -> list[int]:
    """How often each statement prepared in this session ran (PostgreSQL 14+ counts its plans)."""
    rows = ctx.query("SELECT generic_plans + custom_plans FROM pg_prepared_statements ORDER BY prepare_time")
    return [n for (n,) in rows]


def test_prepared_statements_are_one_transaction_each_as_the_ledger_counts(open_preparing: OpenContext):
    def body(ctx: Context) -> None:
        for i in range(20):  # each prepared at its first run, then run prepared
            assert ctx.query_one(f"SELECT {i}", prepare=True) == (i,)
            assert ctx.query_one(f"SELECT {i}", prepare=True) == (i,)
        for _ in range(5):  # fails at every preparing run: prepared 3 times, then run unprepared
            with pytest.raises(psycopg.errors.DivisionByZero):
                ctx.query_one(FAILS_ON_ZERO, (0,), prepare=True)
        assert ctx.query_one(FAILS_ON_ZERO, (4,), prepare=True) == (25,)
        # The 20, and what the failing one's preparing runs left behind: PREPARE_ATTEMPTS, not one a run.
        assert prepared_on(ctx) == 20 + PreparedStatements.PREPARE_ATTEMPTS

    # Were a preparation a transaction of its own (psycopg syncs after it outside a pipeline), the 20
    # preparations would read as 20 commits of the application. Nobody else uses this database.
    counts_do_not_move(open_preparing, body)


def test_a_prepared_statement_that_fails_now_and_then_stays_prepared(open_preparing: OpenContext):
    def body(ctx: Context) -> None:
        assert ctx.query_one(FAILS_ON_ZERO, (5,), prepare=True) == (20,)
        for _ in range(PreparedStatements.PREPARE_ATTEMPTS - 1):
            with pytest.raises(psycopg.errors.DivisionByZero):
                ctx.query_one(FAILS_ON_ZERO, (0,), prepare=True)
        assert ctx.query_one(FAILS_ON_ZERO, (10,), prepare=True) == (10,)
        # One statement, still prepared: both successful runs used it (PostgreSQL counts no plan for a
        # failed one).
        assert executions_of_prepared(ctx) == [2]

    counts_do_not_move(open_preparing, body)  # the failures are ours, as rollbacks


def test_the_pass_is_one_prepared_statement_whatever_the_pids_it_leaves_out(preparing: Context):
    """psycopg prepares a statement per parameter types, and types a list of pids by their values: the
    pids the pass leaves out (the second session's, or none) must not make it a new statement."""
    ctx = preparing
    for not_counted in ([], [123], [40000], [123, 40000], []):
        (version,), values = read_activity(
            ctx, [CONNECTIONS_PART], ("current_setting('server_version_num')",), not_counted
        )
        assert int(version) >= 130000 and values["connections"] is not None
    assert executions_of_prepared(ctx) == [5]
