"""Baseline: "Baseline metrics captured", present, fresh, and covering every target and probe.

The relative rollback triggers (latency, error rate, connections, probe response times) compare with
the baseline; where it lacks a value the trigger cannot fire, and `MigrationBaselineMissing` says so
during the migration. Preflight says it before, with the same rule (`baseline_gauges.TARGET_NEEDS`,
as `migexport_baseline_missing`): a target without a baseline transaction rate, or a probe without a
baseline p95 on its own target, is a FAIL (their alerts are blind from the start); a target without
an error ratio or statement latency is a WARN, because those alerts are blind only once traffic
arrives (a quiet standby has neither). An older baseline than `thresholds.baseline_max_age` is stale.
"""

from __future__ import annotations

import time

from migexport.baseline_file import Baseline
from migexport.baseline_gauges import TARGET_NEEDS
from migexport.checks.preflight_common import fmt_age
from migexport.checks.result import CheckResult, Status
from migexport.config import Config

CHECK = "baseline"


def coverage_gaps(config: Config, b: Baseline) -> tuple[list[str], list[str]]:
    """(blind from the start: FAIL, blind once traffic arrives: WARN), each a short phrase."""
    blind: list[str] = []
    later: list[str] = []
    for target in (t.name for t in config.targets):
        t = b.targets.get(target)
        if t is None or t.get("tps") is None:
            blind.append(f"target {target}")
            continue
        lacking = [value for value, key in TARGET_NEEDS if key != "tps" and t.get(key) is None]
        if lacking:
            later.append(f"{target} has no {' or '.join(lacking)}")
    for probe in config.probes:
        p = b.probes.get(probe.name, {})
        if p.get("target") != probe.target or p.get("p95_seconds") is None:
            blind.append(f"probe {probe.name} on {probe.target}")
    return blind, later


def check_baseline(config: Config, b: Baseline | None, error: str | None) -> list[CheckResult]:
    max_age = config.thresholds.baseline_max_age_seconds
    limit = f"present, <= {fmt_age(max_age)} old, every target and probe"
    run_it = f"capture one: migexport baseline -c {config.path or 'migexport.yml'}"
    if b is None:
        return [CheckResult(CHECK, Status.FAIL, f"no usable baseline: {error}", limit, run_it)]
    age = time.time() - b.captured_at
    blind, later = coverage_gaps(config, b)
    value = f"captured {fmt_age(age)} ago for {b.migration_id}"
    if age > max_age:
        return [
            CheckResult(CHECK, Status.FAIL, f"stale: {value}", limit, f"the traffic may have changed since; {run_it}")
        ]
    if blind:
        return [
            CheckResult(
                CHECK,
                Status.FAIL,
                f"{value}; missing {', '.join(blind)}",
                limit,
                "their rollback triggers could not fire: make them reachable and working, then capture again",
            )
        ]
    if later:
        return [
            CheckResult(
                CHECK,
                Status.WARN,
                f"{value}; {'; '.join(later)}",
                limit,
                "no traffic there during the baseline: its error/latency triggers stay blind if traffic arrives",
            )
        ]
    covered = f"{len(config.targets)} targets, {len(config.probes)} probes"
    return [CheckResult(CHECK, Status.PASS, f"{value}; covers {covered}", limit)]
