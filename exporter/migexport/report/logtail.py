"""The run log's part for one migration, its last lines, with secrets redacted.

`run` appends to one log for every migration: "Preflight at ..." (when it checks first), "Migration
started at ...", "migration ID: COMMAND (time limit ...)", the command's output, "Migration ended at
...", then "Verify at ...". The report shows the section of the asked-for migration, not the next one's.
"""

from __future__ import annotations

import re
from pathlib import Path

from migexport.dsn import REDACTED, redact

TAIL_LINES = 100
MAX_LINE = 400  # characters: a minified blob in a log must not become the page
MAX_READ = 8 * 1024 * 1024  # the last bytes of a huge log are enough for its last lines

_STARTS = ("Preflight at ", "Migration started at ")
# Beyond the DSN forms dsn.redact knows: PGPASSWORD=..., password: ..., token=..., Authorization headers.
_SECRETS = [
    re.compile(
        r"(\b(?:PGPASSWORD|[A-Za-z_]*password|passwd|pwd|secret|[A-Za-z_]*token|api[_-]?key)\b\s*[=:]\s*)([^\s'\"&,;]+)",
        re.IGNORECASE,
    ),
    re.compile(r"(\bAuthorization:\s*\w+\s+)(\S+)", re.IGNORECASE),
]


def scrub(line: str) -> str:
    line = redact(line)
    for pattern in _SECRETS:
        line = pattern.sub(lambda m: m.group(1) + REDACTED, line)
    return line


def _read_lines(path: Path) -> list[str]:
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - MAX_READ))
        data = f.read()
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[1:] if size > MAX_READ else lines  # the first line may be cut


def _section(lines: list[str], migration_id: str) -> tuple[int, int] | None:
    """[first, end) of the migration's lines: from its preflight (or start) to the next migration's."""
    marker = f"migration {migration_id}: "
    found = [i for i, line in enumerate(lines) if line.startswith(marker)]
    if not found:
        return None
    i = found[-1]
    first = i - 1 if i > 0 and lines[i - 1].startswith("Migration started at ") else i
    # Its preflight table comes before "Migration started at", after the previous migration's lines.
    for k in range(first - 1, -1, -1):
        if lines[k].startswith("Migration ended at ") or lines[k].startswith("Migration started at "):
            break
        if lines[k].startswith("Preflight at "):
            first = k
            break
    end = next((k for k in range(i + 1, len(lines)) if lines[k].startswith(_STARTS)), len(lines))
    return first, end


def log_tail(path: Path, migration_id: str, limit: int = TAIL_LINES) -> tuple[list[str], str]:
    """The last `limit` lines of the migration's section (redacted), and a note on what is shown."""
    try:
        lines = _read_lines(path)
    except FileNotFoundError:
        return [], f"{path}: no run log"
    except OSError as exc:
        return [], f"{path}: cannot read: {exc.strerror}"
    section = _section(lines, migration_id)
    if section is None:
        chosen, note = lines, f"{path}: migration {migration_id!r} not found in the log; its last lines"
    else:
        chosen, note = lines[section[0] : section[1]], f"{path}: the lines of migration {migration_id!r}"
    shown = chosen[-limit:]
    if len(chosen) > limit:
        note += f" (the last {limit} of {len(chosen)})"
    return [scrub(line[:MAX_LINE]) for line in shown], note


def command_line(path: Path, migration_id: str) -> str | None:
    """The command `run` started for the migration (its last run in the log), redacted."""
    try:
        lines = _read_lines(path)
    except OSError:
        return None
    marker = f"migration {migration_id}: "
    for line in reversed(lines):
        if line.startswith(marker):
            command = re.sub(r" \(time limit [^)]*\)$", "", line[len(marker) :])
            return scrub(command[:MAX_LINE])
    return None
