"""The state file as `serve` reads it: any bytes give a state or one error line, never a traceback or a
stale value; the files `run` writes are readable by a `serve` running as another user."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import monitor_dsn, scrape, series, value
from migexport.config import Migration
from migexport.dsn import Target
from migexport.state import RUNNING, MigrationState, StateError, read_state, write_state
from test_cli import migexport_argv

VALID = {
    "format": "migexport-state",
    "version": 1,
    "migration_id": "m1",
    "status": "failed",
    "started_at": 1700000000.0,
    "time_budget_seconds": 1800,
    "watch_window_seconds": 3600,
    "ended_at": 1700000060.5,
    "exit_code": 1,
}


def with_fields(**fields: object) -> bytes:
    return json.dumps({**VALID, **fields}).encode()


def replace_number(field: str, literal: str) -> bytes:
    """VALID with one field's value replaced by a JSON literal json.dumps() would not write."""
    return json.dumps({**VALID, field: "@@"}).replace('"@@"', literal).encode()


BAD_FILES = {
    "binary garbage": bytes(range(256)) * 4,
    "non-UTF-8": b'{"format": "migexport-state", "migration_id": "caf\xe9"}',
    "UTF-16": json.dumps(VALID).encode("utf-16"),
    "truncated": with_fields()[:40],
    "1e400 (inf)": replace_number("started_at", "1e400"),
    "-1e400": replace_number("ended_at", "-1e400"),
    "NaN": replace_number("started_at", "NaN"),
    "Infinity": replace_number("time_budget_seconds", "Infinity"),
    "deeply nested": b'{"format": "migexport-state", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "huge integer": replace_number("exit_code", "9" * 5000),
    "integer beyond a pid": with_fields(status="running", pid=2**40),
    "pid 0 (would signal our own group)": with_fields(status="running", pid=0),
    "negative pid": with_fields(status="running", pid=-1),
    "string for a number": with_fields(started_at="1700000000"),
    "boolean for a number": with_fields(started_at=True),
    "boolean exit code": with_fields(exit_code=False),
    "boolean version": with_fields(version=True),
    "list for the id": with_fields(migration_id=["m1"]),
    "lone surrogate in the id": json.dumps({**VALID, "migration_id": "\ud800"}).encode(),
    "newline in the id": with_fields(migration_id="m1\nfake_metric 1"),
    "empty id": with_fields(migration_id=""),
    "unknown status": with_fields(status="paused"),
    "missing field": json.dumps({k: v for k, v in VALID.items() if k != "started_at"}).encode(),
    "nested server_cancel": with_fields(server_cancel={"terminated": {"a": 1}}),
    "server_cancel a list": with_fields(server_cancel=[1, 2]),
    "a JSON list": b"[1, 2, 3]",
    "a JSON string": b'"migexport-state"',
    "another format": with_fields(format="migexport-baseline"),
    "too large": b" " * 100_000 + with_fields(),
    "empty": b"",
}


@pytest.mark.parametrize("data", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_bytes_give_one_error_line(tmp_path, data):
    path = tmp_path / "state.json"
    path.write_bytes(data)
    with pytest.raises(StateError) as err:
        read_state(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_random_bytes_give_a_state_or_one_error_line(tmp_path):
    path = tmp_path / "state.json"
    rng = random.Random(8)
    prefix = b'{"format": "migexport-state", "version": 1, '
    for i in range(3000):
        # Half pure noise, half noise behind a plausible start, so the parser gets past the first byte.
        noise = os.urandom(rng.randint(0, 300))
        path.write_bytes(noise if i % 2 else prefix + noise)
        try:
            state = read_state(path)
        except StateError as exc:
            assert "\n" not in str(exc)
        else:
            assert state is None or isinstance(state, MigrationState)


def test_a_valid_file_with_extra_fields_is_read(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(with_fields(server_cancel={"terminated": 1, "remaining": 0, "error": None}, future="x"))
    state = read_state(path)
    assert (
        state is not None and state.failed and state.server_cancel == {"terminated": 1, "remaining": 0, "error": None}
    )


@pytest.fixture
def exporter(pg, tmp_path, start_exporter):
    return start_exporter(
        Target("primary", monitor_dsn(pg.primary)), migration=Migration(id="m1"), state_path=tmp_path / "state.json"
    )


@pytest.mark.parametrize("case", ["binary garbage", "1e400 (inf)", "deeply nested", "lone surrogate in the id"])
def test_serve_reports_a_broken_file_once_without_stale_values(tmp_path, exporter, caplog, case):
    path = tmp_path / "state.json"
    write_state(path, MigrationState("m1", RUNNING, 1700000000.0, 1800, 3600, pid=os.getpid()))
    m = scrape(exporter.url)
    assert value(m, "migexport_migration_in_progress", migration_id="m1") == 1

    caplog.set_level(logging.INFO, logger="migexport")
    path.write_bytes(BAD_FILES[case])
    for _ in range(3):
        m = scrape(exporter.url)
    assert value(m, "migexport_migration_state_readable", migration_id="m1") == 0
    assert value(m, "migexport_migration_in_progress", migration_id="m1") == 0  # not the running state of before
    assert value(m, "migexport_migration_watch_active", migration_id="m1") == 0
    assert not series(m, "migexport_migration_start_timestamp_seconds")
    assert value(m, "migexport_up", target="primary") == 1
    problems = [r for r in caplog.records if r.name.startswith("migexport") and r.levelno >= logging.WARNING]
    assert len(problems) == 1, [r.getMessage() for r in problems]  # once per change, not per scrape
    assert problems[0].exc_info is None and "\n" not in problems[0].getMessage()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another OS user can enter (pytest's tmp_path is private to its user)."""
    path = Path(tempfile.mkdtemp(prefix="migexport-shared-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_as_postgres(path: Path) -> subprocess.CompletedProcess:
    """`cat` as the unprivileged postgres OS user (this venv's python lives under root's private home)."""
    assert os.geteuid() == 0, "this test writes as root and reads as the unprivileged postgres user"
    return subprocess.run(["cat", str(path)], user="postgres", capture_output=True, text=True, check=False)


def run_true(state: Path, umask: int) -> None:
    log = str(state.parent / "m.log")
    proc = subprocess.run(
        [*migexport_argv(), "run", "--id", "m1", "--log-file", log, "--state-file", str(state), "--", "true"],
        umask=umask,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_state_written_by_root_is_readable_by_another_user(shared_dir):
    state = shared_dir / "state.json"
    run_true(state, umask=0o022)
    assert state.stat().st_mode & 0o777 == 0o644
    reader = read_as_postgres(state)
    assert reader.returncode == 0, reader.stderr
    assert json.loads(reader.stdout)["status"] == "succeeded"


def test_a_private_umask_keeps_the_state_private(shared_dir):
    state = shared_dir / "state.json"
    run_true(state, umask=0o077)
    assert state.stat().st_mode & 0o777 == 0o600
    reader = read_as_postgres(state)
    assert reader.returncode != 0 and "Permission denied" in reader.stderr


def test_current_migration_id_follows_the_file_from_the_first_call(tmp_path):
    from migexport.collectors.migration import MigrationStateSource

    path = tmp_path / "state.json"
    source = MigrationStateSource(path, "m1", 1800)
    assert source.current_migration_id() == "m1"  # no file: the config's id
    path.write_bytes(with_fields(migration_id="hotfix-7"))
    fresh = MigrationStateSource(path, "m1", 1800)
    assert fresh.current_migration_id() == "hotfix-7"  # before any samples() call
    assert source.current_migration_id() == "hotfix-7"  # the file changed under a running source
    path.write_bytes(b"\x00garbage")
    assert source.current_migration_id() == "m1"  # unreadable: the config's id again
