"""The schema half of `verify`: what changed, what is left broken, what was rewritten.

Pure functions over two `read_table()` results (before: the snapshot; after: now). They encode the
checklist's "Verify schema changes / indexes / constraints" without its queries (information_schema
and pg_indexes wait behind a queued ACCESS EXCLUSIVE and see no validity).

Checks, one row per table:
- schema_changes: columns / indexes / constraints added, dropped or changed (type, NOT NULL, default,
  definition). Against `verify.expect`: any change of a listed table that is not expected, or an
  expected change that did not happen, is FAIL; unlisted tables only report (PASS with the diff).
- index_validity: an index left INVALID by a failed CREATE INDEX CONCURRENTLY, or not ready, or a
  REINDEX CONCURRENTLY leftover (`_ccnew`/`_ccold`) is FAIL: it still costs every write.
- constraint_validation: a constraint still NOT VALID is WARN, not FAIL: ADD ... NOT VALID then
  VALIDATE in a later step is the safe pattern (the first step takes a short lock, VALIDATE takes
  SHARE UPDATE EXCLUSIVE and lets writes through), so it is often intended; existing rows are unchecked
  until then.
- table_rewrite: a new relfilenode (ALTER COLUMN TYPE, a volatile default, VACUUM FULL, CLUSTER,
  TRUNCATE) is reported as PASS with the old and new relfilenode: it already happened; what it calls
  for is in planner_statistics.
- planner_statistics: after a rewrite, statistics not gathered since the snapshot are older than the
  rewrite (ALTER COLUMN TYPE drops the column's statistics): WARN "run ANALYZE".
"""

from __future__ import annotations

import re
import time
from typing import Any

from migexport.checks.result import CheckResult, Status

KINDS = ("columns", "indexes", "constraints")
CHANGES = ("added", "dropped", "changed")
LEFTOVER = re.compile(r"_cc(new|old)[0-9]*$")

Diff = dict[str, dict[str, dict[str, str]]]  # kind -> change -> name -> detail


def _column_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    if old["type"] != new["type"]:
        parts.append(f"type {old['type']} -> {new['type']}")
    if old["not_null"] != new["not_null"]:
        parts.append("NOT NULL " + ("added" if new["not_null"] else "dropped"))
    if old.get("kind", "") != new.get("kind", ""):
        parts.append(f"{old.get('kind') or 'plain'} -> {new.get('kind') or 'plain'}")
    if _default_changed(old, new):
        parts.append(f"default {old['default'] or 'none'} -> {new['default'] or 'none'}")
    return ", ".join(parts)


def _default_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """By the readable definitions when both were read (a type change re-casts the stored default
    without changing it); by the lock-free fingerprints otherwise."""
    readable = [d for d in (old["default"], new["default"]) if d is not None and not d.startswith("(not read")]
    if len(readable) == 2:
        return readable[0] != readable[1]
    return old["fingerprint"] != new["fingerprint"]


def _reported(kind: str, table: dict[str, Any]) -> dict[str, Any]:
    """A table's objects of one kind as the diff compares them. PostgreSQL 18 records every NOT NULL as a
    constraint of its own (contype 'n', named `<table>_<column>_not_null`): the column's NOT NULL already
    reports it, as on 13-17, so it is no constraint change of its own (constraint_check still sees a NOT
    VALID one)."""
    objects = table.get(kind, {})
    if kind != "constraints":
        return objects
    return {name: con for name, con in objects.items() if con.get("type") != "n"}


def diff_table(before: dict[str, Any], after: dict[str, Any]) -> Diff:
    """What was added, dropped or changed, with a short detail each."""
    out: Diff = {kind: {change: {} for change in CHANGES} for kind in KINDS}
    for kind in KINDS:
        old, new = _reported(kind, before), _reported(kind, after)
        for name in new.keys() - old.keys():
            out[kind]["added"][name] = new[name].get("definition") or new[name].get("type", "")
        for name in old.keys() - new.keys():
            out[kind]["dropped"][name] = old[name].get("definition") or old[name].get("type", "")
        for name in old.keys() & new.keys():
            if kind == "columns":
                detail = _column_change(old[name], new[name])
            elif old[name]["fingerprint"] != new[name]["fingerprint"]:
                detail = f"{old[name]['definition']} -> {new[name]['definition']}"
            else:
                detail = ""
            if detail:
                out[kind]["changed"][name] = detail
    return out


def _describe(diff: Diff) -> str:
    items = [
        f"{kind} {change}: {', '.join(sorted(names))}"
        for kind in KINDS
        for change in CHANGES
        if (names := diff[kind][change])
    ]
    return "; ".join(items) or "no change"


def _against(diff: Diff, expect: dict[str, dict[str, tuple[str, ...]]]) -> tuple[list[str], list[str]]:
    """Changes nobody declared, and declared changes that did not happen."""
    unexpected, missing = [], []
    for kind in KINDS:
        for change in CHANGES:
            wanted = set(expect.get(kind, {}).get(change, ()))
            done = diff[kind][change]
            unexpected += [f"{kind} {change}: {n} ({done[n]})" for n in sorted(done.keys() - wanted)]
            missing += [f"{kind} {change}: {n}" for n in sorted(wanted - done.keys())]
    return unexpected, missing


def schema_check(
    table: str, before: dict[str, Any], after: dict[str, Any], expect: dict[str, Any] | None
) -> CheckResult:
    check = "schema_changes"
    limit = "as declared in verify.expect" if expect is not None else "no expectation declared: reported only"
    if not after.get("found"):
        if not before.get("found"):
            return CheckResult(check, Status.WARN, "table not found before or after", limit, "check the name", table)
        status = Status.FAIL if expect is not None else Status.WARN
        return CheckResult(check, status, "table dropped", limit, "was dropping it intended?", table)
    if not before.get("found"):
        return CheckResult(check, Status.PASS, "table created", limit, "", table)
    diff = diff_table(before, after)
    value = _describe(diff)
    if before.get("oid") != after.get("oid"):
        value = f"table replaced (oid {before.get('oid')} -> {after.get('oid')}); {value}"
    if expect is None:
        return CheckResult(check, Status.PASS, value, limit, "", table)
    unexpected, missing = _against(diff, expect)
    if not unexpected and not missing:
        return CheckResult(check, Status.PASS, value, limit, "", table)
    problems = [f"unexpected {u}" for u in unexpected] + [f"expected but not done: {m}" for m in missing]
    advice = "an unintended schema change: review it and roll back, or declare it in verify.expect"
    return CheckResult(check, Status.FAIL, "; ".join(problems), limit, advice, table)


def index_check(table: str, after: dict[str, Any]) -> CheckResult:
    check, limit = "index_validity", "every index valid and ready, no _ccnew/_ccold"
    bad = []
    for name, idx in sorted(after.get("indexes", {}).items()):
        if not idx["valid"] or not idx["ready"]:
            bad.append(f"{name} {'INVALID' if not idx['valid'] else 'not ready'}")
        elif LEFTOVER.search(name):
            bad.append(f"{name} (REINDEX CONCURRENTLY leftover)")
    if not bad:
        n = len(after.get("indexes", {}))
        return CheckResult(check, Status.PASS, f"{n} index{'es' if n != 1 else ''} valid", limit, "", table)
    advice = (
        "a failed CREATE INDEX / REINDEX CONCURRENTLY left these behind and they still slow every write: "
        "DROP INDEX CONCURRENTLY each, then create it again CONCURRENTLY (or REINDEX INDEX CONCURRENTLY)"
    )
    return CheckResult(check, Status.FAIL, "; ".join(bad), limit, advice, table)


def constraint_check(table: str, after: dict[str, Any]) -> CheckResult:
    check, limit = "constraint_validation", "every constraint validated"
    pending = sorted(name for name, con in after.get("constraints", {}).items() if not con["validated"])
    if not pending:
        return CheckResult(check, Status.PASS, "all validated", limit, "", table)
    advice = (
        f"existing rows are not checked yet: ALTER TABLE {table} VALIDATE CONSTRAINT <name> "
        "(SHARE UPDATE EXCLUSIVE: reads and writes go on)"
    )
    return CheckResult(check, Status.WARN, "NOT VALID: " + ", ".join(pending), limit, advice, table)


def rewritten(before: dict[str, Any], after: dict[str, Any]) -> bool:
    if not (before.get("found") and after.get("found")):
        return False
    return bool(after["relfilenode"]) and after["relfilenode"] != before["relfilenode"]


def rewrite_check(table: str, before: dict[str, Any], after: dict[str, Any]) -> CheckResult:
    check, limit = "table_rewrite", "reported: a rewrite holds ACCESS EXCLUSIVE while it copies the table"
    if not (before.get("found") and after.get("found")):
        return CheckResult(check, Status.PASS, "table not present before and after", limit, "", table)
    if not after["relfilenode"]:
        return CheckResult(check, Status.PASS, "no storage of its own (partitioned?)", limit, "", table)
    if rewritten(before, after):
        value = f"rewritten: relfilenode {before['relfilenode']} -> {after['relfilenode']}"
        return CheckResult(check, Status.PASS, value, limit, "", table)
    return CheckResult(check, Status.PASS, f"not rewritten (relfilenode {after['relfilenode']})", limit, "", table)


def _when(epoch: float | None) -> str:
    return "never" if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def statistics_check(table: str, before: dict[str, Any], after: dict[str, Any], taken_at: float) -> CheckResult:
    """`taken_at`: the snapshot's server time, a lower bound of the rewrite's."""
    check, limit = "planner_statistics", "gathered after the rewrite"
    analyzed = after.get("last_analyze")
    value = f"last ANALYZE {_when(analyzed)}"
    if not rewritten(before, after):
        return CheckResult(check, Status.PASS, value + " (no rewrite)", limit, "", table)
    if analyzed is not None and analyzed >= taken_at:
        return CheckResult(check, Status.PASS, value, limit, "", table)
    advice = f"the planner works from statistics older than the rewrite: run ANALYZE {table}"
    return CheckResult(check, Status.WARN, value + ", before the rewrite", limit, advice, table)
