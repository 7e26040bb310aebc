"""The last `preflight` and `verify` of the checks file, as gauges `serve` exports.

The file (`migration.checks_file`, written by `migexport preflight`, `verify` and `run`) is read again
whenever it changes (inode, size, mtime or ctime: it is replaced by rename), at most once per scrape.
No file yet: no series, and `migexport_checks_file_readable 1` (nothing is wrong). A file that cannot be
read or understood, any part of it: `readable 0`, one log line per change of the problem, and no series
from it at all, never the previous file's values.

Each report's series carry the `migration_id` it was run for (the one in the report; the migration
watched now when the report has none), so a verification of yesterday's migration cannot arm today's
alert. Check results are `1` PASS, `0` FAIL, `-1` WARN (Status.gauge), labelled `check` and `table`
(empty for checks of the whole server); several results of one (check, table), e.g. one per squawk
finding, become one series with the worst status, so the labels stay as bounded as the checks and the
affected tables of the config.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migexport.checks.result import ChecksFileError, Status, read_checks
from migexport.metrics import MetricSpec, Sample

log = logging.getLogger(__name__)

# More (check, table) pairs than any config yields: a file written by something else stays bounded.
MAX_CHECKS_PER_REPORT = 200


def _spec(name: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, help_text, labels=labels, per_target=False)


READABLE = _spec(
    "migexport_checks_file_readable",
    "0 if the checks file (migration.checks_file) exists but cannot be read or understood (see the log); "
    "1 otherwise, also before the first preflight or verify wrote it.",
)
PREFLIGHT_CHECK = _spec(
    "migexport_preflight_check",
    "Result of each check of the last `migexport preflight`: 1 PASS, 0 FAIL, -1 WARN (including cannot check); "
    "table is the affected table of a per-table check, empty otherwise.",
    "migration_id",
    "check",
    "table",
)
PREFLIGHT_TIME = _spec(
    "migexport_preflight_timestamp_seconds", "When the last `migexport preflight` ran (Unix time).", "migration_id"
)
VERIFY_CHECK = _spec(
    "migexport_verify_check",
    "Result of each check of the last `migexport verify`: 1 PASS, 0 FAIL, -1 WARN (including cannot check); "
    "table is the affected table of a per-table check, empty otherwise.",
    "migration_id",
    "check",
    "table",
)
VERIFY_TIME = _spec(
    "migexport_verify_timestamp_seconds", "When the last `migexport verify` ran (Unix time).", "migration_id"
)
INTEGRITY = _spec(
    "migexport_data_integrity_ratio",
    "Share of the data integrity checks of the last `migexport verify` that passed (1 = 100 %); absent when it "
    "ran none.",
    "migration_id",
)

CHECKS_SPECS = (READABLE, PREFLIGHT_CHECK, PREFLIGHT_TIME, VERIFY_CHECK, VERIFY_TIME, INTEGRITY)
_KIND_SPECS = {"preflight": (PREFLIGHT_CHECK, PREFLIGHT_TIME), "verify": (VERIFY_CHECK, VERIFY_TIME)}


@dataclass(frozen=True)
class _Report:
    """One report, checked field by field; migration_id may be empty (filled in at each scrape)."""

    kind: str
    migration_id: str
    at: float
    checks: dict[tuple[str, str], Status]  # (check, table) -> worst status
    integrity: tuple[int, int] | None  # (passed, total), verify only


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ChecksFileError(f"{what} is not a string")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ChecksFileError(f"{what} is not a count")
    return value


def _parse_checks(raw: Any, kind: str) -> dict[tuple[str, str], Status]:
    if not isinstance(raw, list):
        raise ChecksFileError(f"{kind}.checks is not a list")
    out: dict[tuple[str, str], Status] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ChecksFileError(f"{kind}.checks[{i}] is not an object")
        check = _text(item.get("check"), f"{kind}.checks[{i}].check")
        table = _text(item.get("table", ""), f"{kind}.checks[{i}].table")
        status_name = _text(item.get("status"), f"{kind}.checks[{i}].status")
        if not check or status_name not in Status.__members__:
            raise ChecksFileError(f"{kind}.checks[{i}]: no check name, or status not PASS/WARN/FAIL")
        key = (check, table)
        if key not in out and len(out) >= MAX_CHECKS_PER_REPORT:
            continue
        out[key] = max(out.get(key, Status.PASS), Status[status_name])
    return out


def _parse_report(kind: str, raw: dict[str, Any]) -> _Report:
    at = raw.get("at")
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at) or at < 0:
        raise ChecksFileError(f"{kind}.at is not a Unix time")
    integrity = None
    if kind == "verify" and raw.get("integrity") is not None:
        block = raw["integrity"]
        if not isinstance(block, dict):
            raise ChecksFileError("verify.integrity is not an object")
        passed = _count(block.get("passed"), "verify.integrity.passed")
        total = _count(block.get("total"), "verify.integrity.total")
        if passed > total:
            raise ChecksFileError("verify.integrity: more passed than run")
        integrity = (passed, total)
    migration_id = _text(raw.get("migration_id", ""), f"{kind}.migration_id")
    return _Report(kind, migration_id, float(at), _parse_checks(raw.get("checks"), kind), integrity)


class ChecksSource:
    """Exports the checks file as gauges; re-reads it when it changes, never crashes on it."""

    specs = CHECKS_SPECS

    def __init__(self, path: Path, current_migration_id: Callable[[], str]) -> None:
        self.path = path
        self.current_migration_id = current_migration_id
        self._lock = threading.Lock()
        self._stamp: tuple[int, ...] | None = None
        self._reports: list[_Report] = []
        self._error: str | None = None
        self._reported: str | None = None

    def _load(self) -> tuple[list[_Report], str | None]:
        with self._lock:
            try:
                st = self.path.stat()
                stamp: tuple[int, ...] | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            except FileNotFoundError:
                stamp = ()
            except OSError:
                stamp = None  # cannot even stat it: read_checks() says why, every time
            if stamp is None or stamp != self._stamp:
                self._stamp = stamp
                # Cleared first: whatever happens below, the previous file's values are never served.
                self._reports, self._error = [], None
                try:
                    raw = read_checks(self.path)
                    self._reports = [_parse_report(kind, raw[kind]) for kind in _KIND_SPECS if kind in raw]
                except ChecksFileError as exc:
                    self._error = str(exc) if str(self.path) in str(exc) else f"{self.path}: {exc}"
                except Exception as exc:  # a bug of ours must not take the scrape down: one line, readable 0
                    self._error = f"{self.path}: cannot use this checks file: {type(exc).__name__}: {exc}"[:500]
            self._note(self._error)
            return self._reports, self._error

    def samples(self) -> list[Sample]:
        reports, error = self._load()
        out = [READABLE.sample(0 if error else 1)]
        current = None
        for r in reports:
            if not r.migration_id and current is None:
                current = self.current_migration_id()
            m = r.migration_id or current or ""
            check_spec, time_spec = _KIND_SPECS[r.kind]
            out.append(time_spec.sample(r.at, migration_id=m))
            out += [
                check_spec.sample(status.gauge, migration_id=m, check=check, table=table)
                for (check, table), status in r.checks.items()
            ]
            if r.integrity is not None and r.integrity[1] > 0:  # no integrity check ran: no ratio, not 0 %
                out.append(INTEGRITY.sample(r.integrity[0] / r.integrity[1], migration_id=m))
        return out

    def _note(self, error: str | None) -> None:
        """One log line per change of the problem, not one per scrape."""
        if error != self._reported:
            if error is not None:
                log.warning("checks file: %s", error)
            elif self._reported is not None:
                log.info("checks file %s readable again", self.path)
        self._reported = error
