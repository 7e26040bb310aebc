"""Files (issue 12, item 2): a path migexport writes is a regular file or absent, never one of the other
files the config names nor a file of another kind it knows; --force replaces nothing else; a config
whose written files coincide is refused."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
from pathlib import Path

import pytest

from migexport.cli import main
from migexport.config import ConfigError, load_config
from migexport.state import write_atomic

TARGETS = "targets:\n  p: {dsn: 'host=127.0.0.1 port=1'}\n"


def cli(*argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    logging.root.handlers.clear()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(argv))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        os.chdir(previous)
        logging.root.handlers.clear()
    return code, out.getvalue(), err.getvalue()


def refused(result: tuple[int, str, str], *expected: str) -> None:
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("migexport: error: "), err
    for text in expected:
        assert text in lines[0], err


@pytest.fixture
def device(tmp_path: Path) -> Path:
    """A character device like /dev/null (root), else a named pipe: neither may become a regular file."""
    path = tmp_path / "null"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(path)
    return path


def test_rules_force_never_replaces_a_device(device: Path):
    mode = os.stat(device).st_mode
    refused(cli("rules", "-o", str(device), "--force"), "not a regular file")
    assert os.stat(device).st_mode == mode and not stat.S_ISREG(os.stat(device).st_mode)


def test_write_atomic_refuses_a_device_and_a_directory(device: Path, tmp_path: Path):
    with pytest.raises(OSError, match="not a regular file"):
        write_atomic(device, "x")
    assert not stat.S_ISREG(os.stat(device).st_mode)
    (tmp_path / "dir").mkdir()
    refused(cli("rules", "-o", str(tmp_path / "dir"), "--force"), "is a directory")
    assert (tmp_path / "dir").is_dir()


def test_run_state_file_on_the_config_does_not_replace_it(tmp_path: Path):
    config = tmp_path / "migexport.yml"
    config.write_text(TARGETS)
    refused(cli("run", "--state-file", "migexport.yml", "--", "true", cwd=tmp_path), "holds a migexport config")
    refused(
        cli("run", "-c", str(config), "--state-file", str(config), "--skip-preflight", "--", "true"),
        "is the config file itself",
    )
    refused(cli("run", "--log-file", "migexport.yml", "--", "true", cwd=tmp_path), "holds a migexport config")
    assert config.read_text() == TARGETS


def test_run_state_file_on_the_baseline_is_refused(tmp_path: Path):
    config = tmp_path / "migexport.yml"
    config.write_text(TARGETS)
    (tmp_path / "baseline.json").write_text('{"format": "migexport-baseline", "version": 1}\n')
    refused(
        cli("run", "-c", str(config), "--state-file", str(tmp_path / "baseline.json"), "--", "true"),
        "is the config's baseline_file",
    )
    refused(cli("run", "--state-file", "baseline.json", "--", "true", cwd=tmp_path), "holds a migexport baseline")
    assert "migexport-baseline" in (tmp_path / "baseline.json").read_text()


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("baseline_file: same.json\nmigration: {state_file: same.json}\n", "is the same file as"),
        ("baseline_file: ./same.json\nmigration: {state_file: sub/../same.json}\n", "is the same file as"),
        ("migration: {log_file: migexport.yml}\n", "migration.log_file: is the same file as the config file itself"),
        ("migration: {snapshot_file: x.json, checks_file: x.json}\n", "is the same file as"),
        ("migration: {state_file: m.sql, sql_files: [m.sql]}\n", "is the same file as migration.sql_files[0]"),
    ],
)
def test_config_refuses_written_files_that_coincide(tmp_path: Path, section: str, expected: str):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "migexport.yml"
    path.write_text(TARGETS + section)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert any(expected in p for p in exc.value.problems), exc.value.problems
    refused(cli("rules", "-c", str(path)), expected)


def test_config_refuses_a_symlink_to_another_written_file(tmp_path: Path):
    (tmp_path / "state.json").write_text("")
    (tmp_path / "link.json").symlink_to(tmp_path / "state.json")
    path = tmp_path / "migexport.yml"
    path.write_text(TARGETS + "baseline_file: link.json\nmigration: {state_file: state.json}\n")
    with pytest.raises(ConfigError, match="is the same file as"):
        load_config(path)


def test_force_does_not_replace_a_file_of_another_kind(tmp_path: Path):
    config = tmp_path / "migexport.yml"
    config.write_text(TARGETS)
    refused(cli("rules", "-o", str(config), "--force"), "holds a migexport config")
    assert cli("rules", "-o", str(tmp_path / "rules.yml"))[0] == 0
    refused(cli("init", str(tmp_path / "rules.yml"), "--force"), "holds a rules file")
    refused(cli("baseline", "-c", str(config), "-o", str(config), "--force"), "is the config file itself")
    assert config.read_text() == TARGETS


def test_force_replaces_a_file_of_the_same_kind(tmp_path: Path):
    rules = tmp_path / "rules.yml"
    assert cli("rules", "-o", str(rules))[0] == 0
    assert cli("rules", "-o", str(rules), "--force")[0] == 0
    (tmp_path / "notes.txt").write_text("anything migexport does not know\n")
    assert cli("rules", "-o", str(tmp_path / "notes.txt"), "--force")[0] == 0  # the user's intent
    assert cli("init", str(tmp_path / "migexport.yml"))[0] == 0
    assert cli("init", str(tmp_path / "migexport.yml"), "--force")[0] == 0


def test_force_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path: Path):
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "rules.yml"
    target.write_text("old\n")
    link = tmp_path / "rules.yml"
    link.symlink_to(target)
    assert cli("rules", "-o", str(link), "--force")[0] == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text().startswith("# Generated by `migexport rules`")


def test_a_dangling_symlink_does_not_create_directories(tmp_path: Path):
    link = tmp_path / "rules.yml"
    link.symlink_to(tmp_path / "nowhere" / "deeper" / "rules.yml")
    refused(cli("rules", "-o", str(link), "--force"), "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_dashboards_refuse_a_directory_in_the_way(tmp_path: Path):
    (tmp_path / "out" / "migration.json").mkdir(parents=True)
    refused(cli("dashboards", "-o", str(tmp_path / "out"), "--force"), "is a directory")
    assert not (tmp_path / "out" / "database.json").exists()


def test_checks_and_snapshot_files_must_be_regular(tmp_path: Path, device: Path):
    config = tmp_path / "migexport.yml"
    (tmp_path / "snapshot").mkdir()
    config.write_text(TARGETS + f"migration: {{checks_file: {device}, snapshot_file: snapshot}}\n")
    for command in ("preflight", "verify"):
        refused(cli(command, "-c", str(config)), "not a regular file")
    refused(cli("snapshot", "-c", str(config)), "is a directory")
    refused(cli("report", "-c", str(config), "-o", str(device), "--force", "--id", "m"), "not a regular file")
    assert not stat.S_ISREG(os.stat(device).st_mode)
