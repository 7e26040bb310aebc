"""Backup recency: "Full database backup taken" and "Recent backup confirmed", from the backup tool itself.

The database cannot tell whether a backup exists, so this asks the tool that makes them: pgBackRest
(`pgbackrest --output=json --stanza=S info`, a stable format: `.[0].status.code` 0 is ok and
`.[0].backup[-1].timestamp.stop` is the newest backup's end, Unix seconds), or any command that prints
the last successful backup's end time (ISO 8601, without a zone meaning local time, or Unix seconds;
the last non-empty line of its output counts). The command runs with `preflight.command_timeout`, in
its own process group so a timeout ends all of it. With neither configured the answer is "unknown"
(WARN): not having checked is not the same as having no backup.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

from migexport.checks.preflight_common import fmt_age
from migexport.checks.result import CheckResult, Status, cannot_check
from migexport.config import Config, Preflight

CHECK = "backup"
# A backup "newer" than now by more than this is a clock or parsing problem, not a fresh backup.
FUTURE_SLACK_SECONDS = 300.0


class _CommandFailed(Exception):
    """The backup tool ran and said no (non-zero exit): the backup is not confirmed."""


def check_backup(config: Config) -> list[CheckResult]:
    p = config.preflight
    limit = f"<= {fmt_age(p.backup_max_age_seconds)} old"
    if not p.backup_command and not p.pgbackrest_stanza:
        return [
            CheckResult(
                CHECK,
                Status.WARN,
                "unknown: no backup source configured",
                limit,
                "confirm a recent backup by hand, or set preflight.backup_command or preflight.pgbackrest_stanza",
            )
        ]
    cwd = config.path.parent if config.path else Path.cwd()
    try:
        if p.pgbackrest_stanza:
            source = f"pgbackrest stanza {p.pgbackrest_stanza}"
            out = _run(["pgbackrest", "--output=json", f"--stanza={p.pgbackrest_stanza}", "info"], p, cwd)
            ended = pgbackrest_last_stop(out)
        else:
            source = "backup_command"
            ended = parse_timestamp(_last_line(_run(["/bin/sh", "-c", p.backup_command], p, cwd)))
    except _CommandFailed as exc:
        return [CheckResult(CHECK, Status.FAIL, f"{source}: {exc}", limit, "no confirmed backup: take one first")]
    except subprocess.TimeoutExpired:
        return [cannot_check(CHECK, f"{source} did not finish within {p.command_timeout_seconds:g}s")]
    except (OSError, ValueError) as exc:
        return [cannot_check(CHECK, f"{source}: {exc}", "fix preflight.backup_command / pgbackrest_stanza")]
    return [_judge(source, ended, p.backup_max_age_seconds, limit)]


def _judge(source: str, ended: float, max_age: float, limit: str) -> CheckResult:
    age = time.time() - ended
    stamp = datetime.fromtimestamp(ended).astimezone().isoformat(timespec="seconds")
    if age < -FUTURE_SLACK_SECONDS:
        return cannot_check(CHECK, f"{source}: last backup ended {stamp}, in the future", "check the clocks")
    value = f"last backup ended {fmt_age(age)} ago ({stamp}, {source})"
    if age > max_age:
        return CheckResult(CHECK, Status.FAIL, value, limit, "take a full backup before migrating")
    return CheckResult(CHECK, Status.PASS, value, limit)


def _run(argv: list[str], p: Preflight, cwd: Path) -> str:
    """stdout of a command; _CommandFailed on a non-zero exit, TimeoutExpired after command_timeout."""
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
    except FileNotFoundError:
        raise OSError(f"{argv[0]} not found on PATH") from None
    try:
        out, err = proc.communicate(timeout=p.command_timeout_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    if proc.returncode == 127:
        raise OSError(f"command not found: {(err.strip().splitlines() or [''])[-1][:200]}")
    if proc.returncode != 0:
        last = (err.strip().splitlines() or out.strip().splitlines() or [""])[-1][:200]
        raise _CommandFailed(f"exit {proc.returncode}" + (f": {last}" if last else ""))
    return out


def _last_line(out: str) -> str:
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if not lines:
        raise ValueError("printed nothing (expected the last backup's end time)")
    return lines[-1]


def parse_timestamp(text: str) -> float:
    """Unix seconds or ISO 8601 (no zone: local time) as Unix seconds; ValueError otherwise."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if value != value or value <= 0 or value == float("inf"):
            raise ValueError(f"{text[:60]!r} is not a time")
        return value
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"{text[:60]!r} is neither ISO 8601 nor Unix seconds") from None


def pgbackrest_last_stop(out: str) -> float:
    """The newest backup's end from `pgbackrest info --output=json`; _CommandFailed for a stanza in error."""
    try:
        stanza = json.loads(out)[0]
        code = stanza["status"]["code"]
        message = stanza["status"].get("message", "")
        backups = stanza.get("backup") or []
    except (ValueError, LookupError, TypeError, AttributeError):
        raise ValueError("unexpected output of pgbackrest info (expected its JSON)") from None
    if code != 0:
        raise _CommandFailed(f"stanza status {code}: {message}"[:200])
    if not backups:
        raise _CommandFailed("no backup in the repository")
    try:
        return float(backups[-1]["timestamp"]["stop"])
    except (LookupError, TypeError, ValueError):
        raise ValueError("pgbackrest info: the last backup has no timestamp.stop") from None
