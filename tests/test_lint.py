"""Migration SQL lint with the real squawk (the `lint` extra) on real files: its rules, 1-based lines,
a missing lock_timeout as FAIL, a safe migration clean, and what happens without squawk or without a file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from migexport.checks.lint import CHECK, lint, squawk_binary
from migexport.checks.result import Status


@pytest.fixture(autouse=True)
def squawk_installed(request: pytest.FixtureRequest) -> None:
    """The real squawk is part of what these tests check: without it they fail saying how to install it."""
    if request.node.name != "test_without_squawk_it_warns_how_to_install_it" and squawk_binary() is None:
        pytest.fail("squawk is needed for this test: pip install -e '.[lint]' (scripts/test.sh does)", pytrace=False)


UNSAFE = """\
-- orders: index for the new report
CREATE INDEX orders_created_at ON orders (created_at);
"""
SAFE = """\
SET lock_timeout = '5s';
SET statement_timeout = '10min';
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_created_at ON orders (created_at);
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_create_index_without_concurrently_is_found_at_its_1_based_line(tmp_path: Path):
    path = write(tmp_path, "001_index.sql", UNSAFE)
    results = lint([path])
    assert {r.check for r in results} == {CHECK}
    by_rule = {r.value.split(" at ")[0]: r for r in results}
    concurrent = by_rule["require-concurrent-index-creation"]
    assert concurrent.value == f"require-concurrent-index-creation at {path}:2"  # squawk says line 1 (0-based)
    assert concurrent.status is Status.WARN and "concurrently" in concurrent.advice.lower()
    # No lock_timeout before a statement that takes a SHARE lock: the one finding that is a no-go.
    assert by_rule["require-lock-timeout"].status is Status.FAIL
    assert [r.status for r in results if r.status is Status.FAIL] == [Status.FAIL]


def test_a_migration_with_timeouts_and_concurrently_is_clean(tmp_path: Path):
    path = write(tmp_path, "002_index.sql", SAFE)
    [result] = lint([path])
    assert result.status is Status.PASS and str(path) in result.value


def test_a_missing_file_fails_naming_it_and_the_others_are_still_linted(tmp_path: Path):
    missing = tmp_path / "003_gone.sql"
    results = lint([missing, write(tmp_path, "002_index.sql", SAFE), tmp_path])
    failed = [r for r in results if r.status is Status.FAIL]
    assert len(failed) == 2 and str(missing) in failed[0].value and str(tmp_path) in failed[1].value
    assert [r.status for r in results if r.status is not Status.FAIL] == [Status.PASS]


def test_a_syntax_error_fails(tmp_path: Path):
    results = lint([write(tmp_path, "bad.sql", "SELEC 1;\n")])
    assert results and all(r.status is Status.FAIL and "syntax-error" in r.value for r in results)


def test_without_squawk_it_warns_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    [result] = lint([write(tmp_path, "001_index.sql", UNSAFE)])
    assert result.status is Status.WARN
    assert result.value == "cannot check: squawk not installed: pip install 'migexport[lint]'"


def test_no_files_no_results():
    assert lint([]) == []
