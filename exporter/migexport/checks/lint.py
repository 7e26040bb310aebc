"""Migration SQL lint: squawk's findings as check results (we run squawk, we do not write a linter).

squawk (`pip install 'migexport[lint]'`, the `squawk-cli` wheel ships a native binary that works
offline) knows which statements take which locks. Its JSON report gives one finding per rule and
statement, with 0-based lines; we show them 1-based, as editors do. A missing `lock_timeout`
(`require-lock-timeout`) is a FAIL: the migration's DDL would queue the application behind it for as
long as the oldest transaction lives. A syntax error (squawk level "Error") is a FAIL too: the file
will not run. Every other finding is a WARN for the user to judge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from migexport.checks.result import CheckResult, Status, cannot_check

CHECK = "sql_lint"
FAIL_RULES = frozenset({"require-lock-timeout"})
INSTALL = "pip install 'migexport[lint]'"


def squawk_binary() -> str | None:
    """squawk next to this Python first (the venv migexport runs in), then on PATH."""
    beside = Path(sys.executable).parent / "squawk"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("squawk")


def _unreadable(files: list[Path]) -> tuple[list[Path], list[CheckResult]]:
    """The files squawk can read, and a FAIL for each it cannot (squawk would only say "no files")."""
    ok: list[Path] = []
    bad: list[CheckResult] = []
    for f in files:
        try:
            with f.open("rb"):
                pass
            if not f.is_file():
                raise IsADirectoryError(21, "not a regular file")
        except OSError as exc:
            why = exc.strerror or str(exc)
            bad.append(
                CheckResult(CHECK, Status.FAIL, f"{f}: {why}", "readable SQL file", f"fix migration.sql_files: {f}")
            )
        else:
            ok.append(f)
    return ok, bad


def _finding(item: dict[str, Any]) -> CheckResult:
    rule = str(item.get("rule_name") or "unknown")
    line = int(item.get("line") or 0) + 1  # squawk counts lines from 0
    failed = rule in FAIL_RULES or item.get("level") == "Error"
    message, help_text = str(item.get("message") or ""), str(item.get("help") or "")
    advice = f"{message} {help_text}".strip() if help_text and help_text not in message else message
    return CheckResult(
        CHECK,
        Status.FAIL if failed else Status.WARN,
        f"{rule} at {item.get('file')}:{line}",
        "no squawk findings",
        advice,
    )


def lint(files: list[Path], timeout: float = 60) -> list[CheckResult]:
    """squawk's findings for the migration's SQL files: one result per finding, a PASS when there is none."""
    if not files:
        return []
    binary = squawk_binary()
    if binary is None:
        return [cannot_check(CHECK, f"squawk not installed: {INSTALL}", INSTALL)]
    readable, results = _unreadable(files)
    if not readable:
        return results
    argv = [binary, "--reporter", "json", *(str(f) for f in readable)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [*results, cannot_check(CHECK, f"squawk did not finish within {timeout:g}s")]
    except OSError as exc:
        return [*results, cannot_check(CHECK, f"cannot run {binary}: {exc.strerror or exc}", INSTALL)]
    try:
        findings = json.loads(proc.stdout) if proc.returncode in (0, 1) else None
    except ValueError:
        findings = None
    if not isinstance(findings, list):
        # Exit 0 = clean, 1 = findings; anything else (or no JSON) is squawk failing, not the SQL.
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return [*results, cannot_check(CHECK, f"squawk failed: {why[0][:200]}")]
    results += [_finding(item) for item in findings if isinstance(item, dict)]
    if not findings:
        names = ", ".join(str(f) for f in readable)
        results.append(CheckResult(CHECK, Status.PASS, f"no findings in {names}", "no squawk findings"))
    return results
