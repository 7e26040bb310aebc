"""Rollback ready: "Rollback script ready", a file that is there and readable, or a command that can run.

Written down before the migration, not improvised during the incident. `migration.rollback_file` (a
path relative to the config file) must be a readable regular file; `migration.rollback_command`'s
program must be found (on PATH, or as a path relative to the config file). Neither configured is a
WARN: the user may keep the plan elsewhere, but should say so.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

from migexport.checks.result import CheckResult, Status
from migexport.config import Config

CHECK = "rollback"
LIMIT = "a readable rollback_file or a runnable rollback_command"


def check_rollback(config: Config) -> list[CheckResult]:
    m = config.migration
    if m.rollback_file:
        return [_file(config.resolve(m.rollback_file))]
    if m.rollback_command:
        return [_command(config, m.rollback_command)]
    return [
        CheckResult(
            CHECK,
            Status.WARN,
            "none configured",
            LIMIT,
            "write the rollback down before starting: set migration.rollback_file or migration.rollback_command",
        )
    ]


def _file(path: Path) -> CheckResult:
    try:
        with path.open("rb") as f:
            f.read(1)
        if not path.is_file():
            raise IsADirectoryError(21, "not a regular file")
    except OSError as exc:
        return CheckResult(
            CHECK, Status.FAIL, f"{path}: {exc.strerror or exc}", LIMIT, "write the rollback script first"
        )
    return CheckResult(CHECK, Status.PASS, f"{path} ({path.stat().st_size} bytes)", LIMIT)


def _command(config: Config, command: str) -> CheckResult:
    try:
        program = shlex.split(command)[0]
    except (ValueError, IndexError):
        return CheckResult(CHECK, Status.FAIL, f"cannot parse {command!r}", LIMIT, "fix migration.rollback_command")
    if "/" in program:
        path = config.resolve(program)
        found = str(path) if path.is_file() and os.access(path, os.X_OK) else None
    else:
        found = shutil.which(program)
    if found is None:
        return CheckResult(
            CHECK, Status.FAIL, f"{program}: not found or not executable", LIMIT, "install it or fix the command"
        )
    return CheckResult(CHECK, Status.PASS, f"{program} ({found})", LIMIT)
