"""`migexport verify`: compare the affected tables now with the snapshot taken before the migration.

Schema rows (verify_schema.py) read the migration's target lock-free; integrity rows (invariants,
frozen-table checksums, verify_integrity.py) read verify.target in one REPEATABLE READ snapshot. Each
integrity row that produced an answer counts once in `integrity_passed / integrity_total` (the success
criteria's data-integrity ratio); one that could not run is WARN "cannot check" and is left out of
both, so an unreachable replica reads as "no data", not as corruption.

Without a snapshot, only what needs none runs: index validity, NOT VALID constraints, and the `zero` /
`at_most` invariants; one `snapshot` row (WARN) names what was skipped.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from migexport.checks import verify_schema as vs
from migexport.checks.result import CheckResult, Report, Status, cannot_check
from migexport.checks.snapshot import SnapshotError, read_now, snapshot_path
from migexport.checks.verify_integrity import as_number
from migexport.config import Config, FrozenTable, Invariant

NO_SNAPSHOT_ADVICE = "run 'migexport snapshot -c FILE' before the migration ('migexport run' does)"


def _schema_rows(
    config: Config, tables: dict[str, Any], before: dict[str, Any] | None, taken_at: float
) -> list[CheckResult]:
    rows: list[CheckResult] = []
    for name, after in tables.items():
        if before is not None:
            old = before.get(name, {"found": False})
            rows.append(vs.schema_check(name, old, after, config.verify.expect.get(name)))
        if not after.get("found"):
            if before is None:
                rows.append(cannot_check("schema_changes", "table not found", "check the name", name))
            continue
        rows += [vs.index_check(name, after), vs.constraint_check(name, after)]
        if before is not None:
            old = before.get(name, {"found": False})
            rows += [vs.rewrite_check(name, old, after), vs.statistics_check(name, old, after, taken_at)]
    return rows


def invariant_row(inv: Invariant, before: dict[str, Any] | None, after: dict[str, Any]) -> CheckResult:
    check, name = "invariant", inv.name  # the `table` label carries the invariant's name
    if "error" in after:
        return cannot_check(check, after["error"], "fix the query, or grant SELECT to the verification role", name)
    if inv.expect == "equal":
        limit = "equal to the value before the migration"
        if before is None or "error" in before:
            why = before["error"] if before else "no value in the snapshot"
            return cannot_check(check, f"before: {why}", NO_SNAPSHOT_ADVICE, name)
        shown = {k: "NULL" if e["value"] is None else e["value"] for k, e in (("before", before), ("after", after))}
        if before["value"] == after["value"]:
            return CheckResult(check, Status.PASS, f"{shown['after']} (unchanged)", limit, "", name)
        value = f"before {shown['before']}, after {shown['after']}"
        return CheckResult(check, Status.FAIL, value, limit, "data changed that must not have: roll back", name)
    number = as_number(after["value"]) if after["value"] is not None else as_number("0")  # no row / NULL: none
    if number is None:
        return cannot_check(check, f"{after['value']!r} is not a number", "make the query return one number", name)
    limit = "0" if inv.expect == "zero" else f"at most {inv.value:g}"
    bound = Decimal(0) if inv.expect == "zero" else Decimal(str(inv.value))
    if number <= bound:
        return CheckResult(check, Status.PASS, str(number), limit, "", name)
    return CheckResult(check, Status.FAIL, str(number), limit, "an invariant no longer holds: roll back", name)


def _segment_label(seg: str, thresholds: list[str]) -> str:
    if seg == "null":
        return "key NULL"
    i = int(seg)
    if not thresholds:
        return "all rows"
    if i == 0:
        return f"key < {thresholds[0]}"
    if i >= len(thresholds):
        return f"key >= {thresholds[-1]}"
    return f"{thresholds[i - 1]} <= key < {thresholds[i]}"


def frozen_row(frozen: FrozenTable, before: dict[str, Any] | None, after: dict[str, Any]) -> CheckResult:
    check, table, limit = "frozen_checksum", frozen.table, "count and hash sum of every segment unchanged"
    if before is None or "error" in before:
        why = before["error"] if before else "no checksum in the snapshot"
        return cannot_check(check, f"before: {why}", NO_SNAPSHOT_ADVICE, table)
    if "error" in after:
        return cannot_check(check, after["error"], "grant SELECT on it to the verification role", table)
    old, new = before["segments"], after["segments"]
    rows = sum(c for c, _ in new.values())
    differ = []
    for seg in sorted(old.keys() | new.keys(), key=lambda s: (s == "null", int(s) if s != "null" else 0)):
        (bc, bs), (ac, as_) = old.get(seg, [0, "0"]), new.get(seg, [0, "0"])
        if bc != ac or as_number(bs) != as_number(as_):
            what = f"{bc} -> {ac} rows" if bc != ac else f"{ac} rows, contents changed"
            differ.append(f"{_segment_label(seg, before['thresholds'])}: {what}")
    if not differ:
        value = f"{rows} rows in {len(new)} segments unchanged"
        return CheckResult(check, Status.PASS, value, limit, "", table)
    advice = "rows of a table declared frozen changed: data corruption? roll back / restore"
    return CheckResult(check, Status.FAIL, "; ".join(differ), limit, advice, table)


def _skipped_row(config: Config) -> CheckResult:
    equal = [i.name for i in config.verify.invariants if i.expect == "equal"]
    skipped = ["schema_changes", "table_rewrite", "planner_statistics"]
    skipped += [f"invariant {n}" for n in equal] + [f"frozen_checksum {f.table}" for f in config.verify.frozen_tables]
    reason = f"no snapshot at {snapshot_path(config)}; skipped: {', '.join(skipped)}"
    return cannot_check("snapshot", reason, NO_SNAPSHOT_ADVICE)


def _integrity_rows(
    now: dict[str, Any],
    before: dict[str, Any] | None,
    invariants: tuple[Invariant, ...],
    frozen: tuple[FrozenTable, ...],
) -> list[CheckResult]:
    rows: list[CheckResult] = []
    if "integrity_error" in now:  # the whole session failed: each row says so, none counts
        rows += [invariant_row(i, None, {"error": now["integrity_error"]}) for i in invariants]
        rows += [cannot_check("frozen_checksum", now["integrity_error"], "", f.table) for f in frozen]
        return rows
    after = now.get("integrity", {"invariants": {}, "frozen": {}})
    old = (before or {}).get("integrity", {"invariants": {}, "frozen": {}})
    old_error = (before or {}).get("integrity_error")
    for inv in invariants:
        previous = {"error": old_error} if old_error else old["invariants"].get(inv.name)
        rows.append(invariant_row(inv, previous, after["invariants"][inv.name]))
    for f in frozen:
        previous = {"error": old_error} if old_error else old["frozen"].get(f.table)
        rows.append(frozen_row(f, previous, after["frozen"].get(f.table, {"error": "not read"})))
    return rows


def run_verify(config: Config, snapshot: dict[str, Any] | None) -> Report:
    """Compare now with `snapshot` (None: only the checks that need none). Never raises for what it
    finds: an unreachable migration target is a `schema_read` row, WARN "cannot check"."""
    v = config.verify
    if snapshot is None:
        invariants = tuple(i for i in v.invariants if i.expect != "equal")
        frozen: tuple[FrozenTable, ...] = ()
        thresholds = None
    else:
        invariants, frozen = v.invariants, v.frozen_tables
        taken = snapshot.get("integrity", {}).get("frozen", {})
        thresholds = {t: e["thresholds"] for t, e in taken.items() if isinstance(e, dict) and "thresholds" in e}
    report = Report(kind="verify", checks=[], migration_id=config.migration.id)
    if snapshot is None:
        report.checks.append(_skipped_row(config))
    try:
        now = read_now(config, invariants, frozen, thresholds)
    except SnapshotError as exc:
        advice = "check the migration target's DSN and that it is up"
        report.checks.append(cannot_check("schema_read", str(exc), advice))
        return report
    before = snapshot.get("tables", {}) if snapshot is not None else None
    taken_at = float(snapshot.get("server_time", 0.0)) if snapshot is not None else 0.0
    report.checks += _schema_rows(config, now["tables"], before, taken_at)
    integrity = _integrity_rows(now, snapshot, invariants, frozen)
    report.checks += integrity
    answered = [c for c in integrity if not c.value.startswith("cannot check")]
    report.integrity_total = len(answered)
    report.integrity_passed = sum(c.status is Status.PASS for c in answered)
    return report


def verified(report: Report) -> bool:
    """`verify`'s exit status: nothing FAILed and the migration target could be read."""
    return report.ok and not any(c.check == "schema_read" for c in report.checks)
