"""What a check returns, how a list of them prints, and the checks file `serve` exports.

A check that cannot run (missing privilege, timeout, an unreachable server) returns WARN "cannot
check: ..." rather than failing: the user decides whether an unknown is a no-go. Only FAIL makes a
report a no-go (preflight) or a failed verification (verify).

The checks file (`migration.checks_file`, JSON) holds the last report of each kind, written whole and
atomically by `migexport preflight`, `migexport verify` and `migexport run`:

    {"format": "migexport-checks", "version": 1,
     "preflight": {"kind": "preflight", "at": 1764000000.0, "migration_id": "m1", "ok": true,
                   "checks": [{"check": "pitr", "table": "", "status": "PASS", "value": "...",
                               "limit": "...", "advice": "..."}, ...]},
     "verify": {... the same shape, plus "integrity": {"passed": 3, "total": 4}}}
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from migexport import strictjson
from migexport.state import write_atomic

FORMAT = "migexport-checks"
VERSION = 1
KINDS = ("preflight", "verify")
MAX_COLUMN = 48  # characters; a table wider than a terminal is not read


class Status(enum.IntEnum):
    """Ordered by severity; the exported gauge value is PASS 1, WARN -1, FAIL 0."""

    PASS = 0
    WARN = 1
    FAIL = 2

    @property
    def gauge(self) -> float:
        return {Status.PASS: 1.0, Status.WARN: -1.0, Status.FAIL: 0.0}[self]


@dataclass(frozen=True)
class CheckResult:
    check: str  # a stable snake_case name: the `check` label
    status: Status
    value: str = ""  # what was measured, human-readable
    limit: str = ""  # what it was compared with
    advice: str = ""  # what to do (empty on PASS)
    table: str = ""  # the affected table, for per-table checks: the `table` label

    def as_dict(self) -> dict[str, str]:
        d = asdict(self)
        d["status"] = self.status.name
        return d


def cannot_check(check: str, reason: str, advice: str = "", table: str = "") -> CheckResult:
    """A check that could not run: WARN, saying why and what would let it run."""
    return CheckResult(check, Status.WARN, f"cannot check: {reason}", "", advice, table)


@dataclass
class Report:
    kind: str  # "preflight" or "verify"
    checks: list[CheckResult]
    migration_id: str = ""
    at: float = field(default_factory=time.time)
    # verify only: integrity checks passed / run (data_integrity's actual value = passed / total).
    integrity_passed: int = 0
    integrity_total: int = 0

    @property
    def ok(self) -> bool:
        """Go (preflight) / verified (verify): nothing FAILed."""
        return all(c.status is not Status.FAIL for c in self.checks)

    @property
    def worst(self) -> Status:
        return max((c.status for c in self.checks), default=Status.PASS)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "at": self.at,
            "migration_id": self.migration_id,
            "ok": self.ok,
            "checks": [c.as_dict() for c in self.checks],
        }
        if self.kind == "verify":
            d["integrity"] = {"passed": self.integrity_passed, "total": self.integrity_total}
        return d


def render_table(checks: Iterable[CheckResult]) -> str:
    """A fixed-width table: STATUS, CHECK (table), VALUE, LIMIT, then the advice on its own line."""
    rows = [(c.status.name, c.check + (f" ({c.table})" if c.table else ""), c.value, c.limit, c.advice) for c in checks]
    header = ("STATUS", "CHECK", "VALUE", "LIMIT")
    # A long value (a list of sessions, an error) pushes only its own row's limit to the right.
    widths = [
        min(MAX_COLUMN, max(len(header[i]), *(len(r[i]) for r in rows))) if rows else len(header[i]) for i in range(3)
    ]
    lines = [f"{header[0]:<{widths[0]}}  {header[1]:<{widths[1]}}  {header[2]:<{widths[2]}}  {header[3]}"]
    for status, check, value, limit, advice in rows:
        lines.append(f"{status:<{widths[0]}}  {check:<{widths[1]}}  {value:<{widths[2]}}  {limit}".rstrip())
        if advice and status != "PASS":
            lines.append(" " * (widths[0] + 2) + f"-> {advice}")
    return "\n".join(lines)


def render_json(report: Report) -> str:
    return json.dumps(report.as_dict(), indent=2) + "\n"


class ChecksFileError(ValueError):
    pass


def read_checks(path: Path) -> dict[str, dict[str, Any]]:
    """The checks file's reports by kind; {} when there is none yet."""
    try:
        data = strictjson.read_bytes(path)  # bounded: a huge file is refused, not read
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ChecksFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = strictjson.loads(data)
    except (strictjson.JsonRefused, ValueError) as exc:
        raise ChecksFileError(f"{path}: not a migexport checks file: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ChecksFileError(f"{path}: not a migexport checks file (format {FORMAT} version {VERSION})")
    return {k: v for k, v in doc.items() if k in KINDS and isinstance(v, dict)}


def write_report(path: Path, report: Report) -> None:
    """Replace this kind's report in the checks file, keeping the other kind's."""
    try:
        reports = read_checks(path)
    except ChecksFileError:
        reports = {}  # not ours or damaged: the new report is the truth
    reports[report.kind] = report.as_dict()
    write_atomic(path, json.dumps({"format": FORMAT, "version": VERSION, **reports}, indent=2) + "\n")
