"""The checklist's success-criteria table as recording rules: per migration and criterion, the target,
the actual value and whether it passed. One source for the dashboard, the report and anyone's query.

- duration: end − start, or elapsed while running; target the migration's time budget
  (`migration.time_budget`, `run --time-limit`); passed when actual < target.
- error_rate_change: the error ratio over the watch window − the baseline's (absolute); target
  `success_error_rate_change_max` (0.01: one point); passed when actual < target.
- response_time_change: floored live / floored baseline − 1, the worst of the statement latency and every
  probe's p95 over the watch window; target `success_latency_change_max` (0.10); passed when actual < target.
- rollback_required: 1 once an `action="rollback"` alert fired for the migration, else 0; target 0; passed
  when actual ≤ target.
- data_integrity: the share of the data integrity checks of the last `migexport verify` of the migration
  that passed (`migexport_data_integrity_ratio`, from the checks file); target 1 (100 %); passed when
  actual ≥ target. No data (neither actual nor passed) while no verification with integrity checks ran.

Live values use the same estimators as the alerts (counts with the exporter's own left out, Δexec/Δcalls,
histogram_quantile over the probe buckets), over the watch window instead of the rate window: the
table judges the whole migration, the alerts the last minutes. Both sides are floored as in the alerts
(`latency_floor`, `probe_latency_floor`), so a change of microseconds on a sub-millisecond baseline does not
read as +50 %, and the row fails exactly when the live value crosses what the alert's ratio compares with.
"""

from __future__ import annotations

from migexport.config import Thresholds
from migexport.promql import JOIN, duration, fmt

TARGET = "migexport:success_criterion:target"
ACTUAL = "migexport:success_criterion:actual"
PASSED = "migexport:success_criterion:passed"
CRITERIA = ("duration", "error_rate_change", "response_time_change", "rollback_required", "data_integrity")
BY_MIGRATION = f"{JOIN}, migration_id"
# Exists exactly while the exporter exports a migration (its state file holds one).
MIGRATION = f"max by ({BY_MIGRATION}) (migexport_migration_start_timestamp_seconds)"


def _rule(record: str, criterion: str, expr: str) -> dict[str, object]:
    # A static label rather than label_replace(): one rule per (name, criterion), which promtool's lint
    # can tell apart.
    return {"record": record, "expr": expr, "labels": {"criterion": criterion}}


def _constant(value: float) -> str:
    """A number per migration (the series exist while a migration does)."""
    return f"{MIGRATION} * 0 + {fmt(value)}"


def success_rules(t: Thresholds, watch_window_seconds: float) -> list[dict[str, object]]:
    """Targets first, then actual values, then passed: one group evaluates them in this order."""
    return _targets(t) + _actuals(t, duration(watch_window_seconds)) + _passed()


def _targets(t: Thresholds) -> list[dict[str, object]]:
    budget = f"max by ({BY_MIGRATION}) (migexport_migration_time_budget_seconds)\nand on({BY_MIGRATION}) {MIGRATION}"
    return [
        _rule(TARGET, "duration", budget),
        _rule(TARGET, "error_rate_change", _constant(t.success_error_rate_change_max)),
        _rule(TARGET, "response_time_change", _constant(t.success_latency_change_max)),
        _rule(TARGET, "rollback_required", _constant(0)),
        _rule(TARGET, "data_integrity", _constant(1)),
    ]


def _actuals(t: Thresholds, w: str) -> list[dict[str, object]]:
    by = f"sum by ({JOIN}, target)"
    elapsed = (
        f"max by ({BY_MIGRATION}) (\n"
        "  migexport_migration_end_timestamp_seconds - migexport_migration_start_timestamp_seconds\n)"
        f"\nor (time() - {MIGRATION})"
    )
    error_ratio = (
        f"{by} (increase(migexport_xact_rollback_total[{w}]))\n"
        f"/ ({by} (increase(migexport_xact_commit_total[{w}]) + increase(migexport_xact_rollback_total[{w}])) > 0)"
    )
    error_change = (
        f"max by ({BY_MIGRATION}) (\n({error_ratio})\n"
        f"- on({JOIN}, target) group_left(migration_id) migexport_baseline_error_ratio\n)"
    )
    latency = (
        f"{by} (increase(migexport_statements_exec_seconds_total[{w}]))\n"
        f"/ ({by} (increase(migexport_statements_calls_total[{w}])) > 0)"
    )
    floor, probe_floor = fmt(t.latency_floor_seconds), fmt(t.probe_latency_floor_seconds)
    base_latency = f"clamp_min(migexport_baseline_statement_latency_seconds, {floor})"
    # Only probes that ran in the window: histogram_quantile() of flat buckets is NaN, which would FAIL.
    p95 = (
        "(histogram_quantile(0.95, sum by (job, instance, target, probe, le) "
        f"(increase(migexport_probe_duration_seconds_bucket[{w}])))\n"
        f"  and on({JOIN}, target, probe) "
        f"(sum by ({JOIN}, target, probe) (increase(migexport_probe_duration_seconds_count[{w}])) > 0))"
    )
    base_p95 = 'migexport_baseline_probe_latency_seconds{quantile="0.95"}'
    # Both sides floored, as the alert's `live > clamp_min(baseline, floor) × ratio` is: a value under the
    # floor is jitter on either side, so 0.4 ms → 1.5 ms under a 5 ms probe floor is no change (flooring
    # the baseline alone read it +22 % and failed a `sleep 3` on a loaded machine).
    response_change = (
        f"max by ({BY_MIGRATION}) (\n"
        f"  clamp_min({latency}, {floor})\n"
        f"  / on({JOIN}, target) group_left(migration_id) {base_latency}\n"
        "or\n"
        f"  clamp_min({p95}, {probe_floor})\n"
        f"  / on({JOIN}, target, probe) group_left(migration_id) clamp_min({base_p95}, {probe_floor})\n"
        ") - 1"
    )
    # A latch: once a rollback alert fired for the migration, the row stays 1 for as long as the
    # exporter exports that migration (its own earlier values keep it; ALERTS forget).
    rollback = (
        f'max by ({BY_MIGRATION}) (ALERTS{{alertstate="firing", action="rollback"}})\n'
        # Over the window, not the last step: one failed scrape (or a pause of the rule evaluation) leaves
        # a gap in the latch's own series that a lookback of one step would not bridge.
        f'or max by ({BY_MIGRATION}) (max_over_time({ACTUAL}{{criterion="rollback_required"}}[{w}]) > 0)\n'
        f"or {MIGRATION} * 0"
    )
    # The verification's own migration_id: a verification of another migration fills in nothing here.
    integrity = f"max by ({BY_MIGRATION}) (migexport_data_integrity_ratio)"
    only_while_exported = f"\nand on({BY_MIGRATION}) {MIGRATION}"
    return [
        _rule(ACTUAL, "duration", f"({elapsed}){only_while_exported}"),
        _rule(ACTUAL, "error_rate_change", f"({error_change}){only_while_exported}"),
        _rule(ACTUAL, "response_time_change", f"({response_change}){only_while_exported}"),
        _rule(ACTUAL, "rollback_required", f"({rollback}){only_while_exported}"),
        _rule(ACTUAL, "data_integrity", f"({integrity}){only_while_exported}"),
    ]


def _passed() -> list[dict[str, object]]:
    def compare(criterion: str, op: str) -> dict[str, object]:
        selector = f'{{criterion="{criterion}"}}'
        return _rule(PASSED, criterion, f"{ACTUAL}{selector}\n{op} bool on({BY_MIGRATION}) {TARGET}{selector}")

    # Lower is better, except data_integrity (a share passed, 1 = 100 %). Without a verification it has a
    # target and no actual, so `bool` yields no passed series either: no data, not FAIL.
    ops = {"rollback_required": "<=", "data_integrity": ">="}
    return [compare(c, ops.get(c, "<")) for c in CRITERIA]
