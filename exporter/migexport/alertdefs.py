"""The alerts: the checklist's rollback triggers, and the alerts that say when they cannot fire.

Each alert is built from the thresholds; no number is written twice. Relative triggers (latency,
error rate) compare a live value with its baseline computed by the same estimator (recording.py) and
fire only when the change is beyond the noise of the window's volume as well as beyond the
checklist's ratio. Descriptions state the observed and the expected values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from migexport.config import Thresholds
from migexport.promql import (
    JOIN,
    WATCHING,
    armed,
    armed_same_migration,
    connections_scale,
    duration,
    error_ratio_trigger,
    fmt,
    latency_trigger,
    probe_latency_trigger,
    series_names,
    with_baseline,
)

ROLLBACK, CONSIDER, WATCH, INVESTIGATE = "rollback", "consider_rollback", "watch", "investigate"


@dataclass(frozen=True)
class Alert:
    name: str
    expr: str
    for_seconds: float
    severity: str
    action: str
    summary: str
    description: str
    trigger: str  # for the README: what fires it, with its default threshold
    checklist: str  # the checklist line it encodes

    def rule(self, runbook_base: str) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": duration(self.for_seconds),
            "labels": {"severity": self.severity, "action": self.action},
            "annotations": {
                "summary": self.summary,
                "description": self.description,
                "runbook_url": f"{runbook_base.rstrip('/')}/{self.name}.md",
            },
        }


def baseline_value(metric: str, fmt_: str, extra: str = "", missing: str = "(not in the baseline)") -> str:
    """A template that reads the alert's own baseline value from Prometheus (`query`), e.g. to say
    "2.4 %, against 2.0 % in the baseline"; `extra` adds label matchers such as the probe."""
    selector = metric + '{job="%s",instance="%s",target="%s",migration_id="%s"' + extra + "}"
    args = "$labels.job $labels.instance $labels.target $labels.migration_id"
    if extra:
        args += " $labels.probe"
    return (
        "{{ with printf `" + selector + "` " + args + " | query }}{{ . | first | value | " + fmt_ + " }}"
        "{{ else }}" + missing + "{{ end }}"
    )


def live_value(metric: str, fmt_: str, labels: str = "target") -> str:
    """A template that reads a live series of the alert's target (and migration) from Prometheus."""
    names = ["job", "instance", *(label.strip() for label in labels.split(","))]
    selector = metric + "{" + ",".join(f'{n}="%s"' for n in names) + "}"
    args = " ".join(f"$labels.{n}" for n in names)
    return "{{ with printf `" + selector + "` " + args + " | query }}{{ . | first | value | " + fmt_ + " }}{{ end }}"


def alerts(t: Thresholds) -> list[Alert]:
    return _immediate(t) + _relative(t) + _watch(t) + _blind_spots(t)


def _immediate(t: Thresholds) -> list[Alert]:
    """The checklist's "Immediate rollback if" lines."""
    critical_for = duration(t.critical_for_seconds)
    # A probe that never worked cannot say the migration broke it: no rollback page for it, a warning
    # of its own instead. "Never worked": failed all through the baseline and not since, or (without a
    # baseline entry) never succeeded since the exporter started. Over the last hour, so that an
    # exporter restart does not turn a broken query's page into a warning.
    ever = "max_over_time(migexport_probe_ever_succeeded[1h])"
    never_worked = (
        f"(migexport_baseline_probe_success_ratio == 0 unless on({JOIN}, target, probe) {ever} == 1)\n"
        f"  or ({ever} == 0 unless on({JOIN}, target, probe) migexport_baseline_probe_success_ratio > 0)"
    )
    return [
        Alert(
            "MigrationFailed",
            armed_same_migration("migexport_migration_failed == 1"),
            0,
            "critical",
            ROLLBACK,
            "The migration failed: roll back.",
            "Migration {{ $labels.migration_id }} exited with an error or was killed at its time limit. "
            "Immediate rollback trigger: run the rollback procedure.",
            "`migexport run` saw a non-zero exit or the time limit",
            "Immediate rollback if: migration fails with error",
        ),
        Alert(
            "MigrationApplicationDown",
            armed("migexport_app_health_up == 0"),
            t.critical_for_seconds,
            "critical",
            ROLLBACK,
            "An application health check fails during the migration: roll back.",
            "Health check of {{ $labels.app }} has failed for "
            + duration(t.critical_for_seconds)
            + " during migration {{ $labels.migration_id }}.",
            f"`migexport_app_health_up == 0` for {duration(t.critical_for_seconds)}",
            "Immediate rollback if: application cannot start",
        ),
        Alert(
            "MigrationCriticalQueryFailing",
            armed(f"migexport_probe_success == 0\nunless on({JOIN}, target, probe) (\n  {never_worked}\n)"),
            t.critical_for_seconds,
            "critical",
            ROLLBACK,
            "A key business query fails during the migration: roll back.",
            "Probe {{ $labels.probe }} on {{ $labels.target }} has failed for "
            + critical_for
            + " during migration {{ $labels.migration_id }}; it worked before (in the baseline or since the "
            "exporter started).",
            f"`migexport_probe_success == 0` for {critical_for}, for a probe that worked in the baseline",
            "Immediate rollback if: critical functionality broken",
        ),
        _data_integrity_failed(),
        Alert(
            "MigrationProbeBroken",
            armed(f"migexport_probe_success == 0\nand on({JOIN}, target, probe) (\n  {never_worked}\n)"),
            t.critical_for_seconds,
            "warning",
            WATCH,
            "A key business query has never worked: it cannot judge the migration.",
            "Probe {{ $labels.probe }} on {{ $labels.target }} fails and never succeeded in the baseline or "
            "since the exporter started (often a missing GRANT to the exporter's role; see the exporter log): "
            "MigrationCriticalQueryFailing cannot fire for it.",
            f"a probe that never succeeded fails for {critical_for}",
            "Key business queries performing well (the probe must work first)",
        ),
    ]


def _data_integrity_failed() -> Alert:
    """A user-declared invariant of `migexport verify` broke. `for: 0s`, like MigrationFailed: the ratio is
    the outcome of a deliberate verification, not a sample that flaps; it holds until the next verify, so a
    `for:` would only delay the page. The series carries the id the verification ran for: a verification
    of an earlier migration cannot arm the one watched now."""
    return Alert(
        "MigrationDataIntegrityFailed",
        armed_same_migration("migexport_data_integrity_ratio < 1"),
        0,
        "critical",
        ROLLBACK,
        "Data corruption detected: roll back.",
        "Migration {{ $labels.migration_id }}: only {{ $value | humanizePercentage }} of the data integrity "
        "checks of the last `migexport verify` passed. Immediate rollback trigger: see which invariant failed "
        "(`migexport verify -c FILE`), stop the writes that depend on it, and run the rollback procedure.",
        "`migexport verify` found a data integrity check failing (`migexport_data_integrity_ratio < 1`)",
        "Immediate rollback if: data corruption detected",
    )


def _relative(t: Thresholds) -> list[Alert]:
    """The checklist's "Consider rollback if" lines."""
    lag_rollback = fmt(t.replication_lag_rollback_seconds)
    return [
        _latency_degraded(t),
        _error_rate_increased(t),
        Alert(
            "MigrationReplicationLagTooHigh",
            armed(
                f"migexport_replication_lag_seconds > {lag_rollback}\n"
                f"or migexport_standby_replay_lag_seconds > {lag_rollback}"
            ),
            t.alert_for_seconds,
            "warning",
            CONSIDER,
            "Replication lag is beyond the rollback threshold.",
            "{{ $labels.target }}{{ with $labels.standby }} → {{ . }}{{ end }}: replication lag is "
            "{{ $value | humanizeDuration }}, above " + duration(t.replication_lag_rollback_seconds) + ".",
            f"replication lag > {duration(t.replication_lag_rollback_seconds)}",
            "Consider rollback if: replication lag >10 minutes",
        ),
        Alert(
            "MigrationOverTimeBudget",
            "(\n  time() - migexport_migration_start_timestamp_seconds > migexport_migration_time_budget_seconds\n)"
            f" and on({JOIN}, migration_id) (migexport_migration_in_progress == 1)",
            0,
            "warning",
            CONSIDER,
            "The migration runs past its time budget.",
            "Migration {{ $labels.migration_id }} has run for {{ $value | humanizeDuration }}, past its time budget.",
            "still running after `time_budget` (30m)",
            "Migration duration < 30 min (success criteria); `timeout 30m`",
        ),
    ]


def _latency_degraded(t: Thresholds) -> Alert:
    """Statement latency or a probe's p95 against the baseline, beyond the ratio and the noise."""
    n, window, sigmas = series_names(t), duration(t.rate_window_seconds), fmt(t.significance_sigmas)
    latency_ratio = fmt(t.latency_degradation_ratio)
    p95 = 'migexport_baseline_probe_latency_seconds{quantile="0.95"}'
    statement = (
        with_baseline(n.latency, ">", latency_trigger("migexport_baseline_statement_latency_seconds", t))
        + f"\n  and on({JOIN}, target, migration_id) {n.latency_z} > {sigmas}"
        + f"\n  and on({JOIN}, target) {n.calls} >= {fmt(t.latency_min_calls)}"
    )
    # A probe's p95 must also be above the highest p95 a window of as many runs showed at rest.
    probe = (
        with_baseline(n.probe_p95, ">", probe_latency_trigger(p95, t), on="target, probe")
        + f"\n  unless on({JOIN}, target, probe, migration_id) ("
        + with_baseline(n.probe_p95, "<=", "migexport_baseline_probe_latency_window_max_seconds", on="target, probe")
        + ")"
        + f"\n  and on({JOIN}, target, probe) {n.probe_runs} >= {fmt(t.probe_min_runs)}"
    )
    return Alert(
        "MigrationLatencyDegraded",
        armed_same_migration(f"(\n  {statement}\n)\nor\n(\n  {probe}\n)"),
        t.alert_for_seconds,
        "warning",
        CONSIDER,
        "Response times are degraded beyond the rollback threshold.",
        "{{ if $labels.probe }}{{ $labels.target }} probe {{ $labels.probe }}: p95 latency is "
        "{{ $value | humanizeDuration }} over the last "
        + window
        + " against "
        + baseline_value("migexport_baseline_probe_latency_seconds", "humanizeDuration", ',probe="%s",quantile="0.95"')
        + " in the baseline (highest at rest: "
        + baseline_value(
            "migexport_baseline_probe_latency_window_max_seconds",
            "humanizeDuration",
            ',probe="%s"',
            "none recorded",
        )
        + "){{ else }}{{ $labels.target }}: mean statement latency is {{ $value | humanizeDuration }} over "
        "the last "
        + window
        + " against "
        + baseline_value("migexport_baseline_statement_latency_seconds", "humanizeDuration")
        + " in the baseline, "
        + live_value(n.latency_z, 'printf "%.1f"', "target, migration_id")
        + " standard deviations above its noise{{ end }} (threshold: × "
        + latency_ratio
        + ").",
        f"statement latency or probe p95 > baseline × {latency_ratio}, beyond {sigmas}σ of the window's noise "
        f"(≥ {fmt(t.latency_min_calls)} calls, ≥ {fmt(t.probe_min_runs)} probe runs), "
        f"for {duration(t.alert_for_seconds)}",
        "Consider rollback if: response times degraded >50%",
    )


def _error_rate_increased(t: Thresholds) -> Alert:
    """The rollback ratio against the baseline: beyond the ratio, the floor and the noise."""
    n, window, sigmas = series_names(t), duration(t.rate_window_seconds), fmt(t.significance_sigmas)
    error_ratio = fmt(t.error_rate_increase_ratio)
    error = (
        with_baseline(n.error_ratio, ">", error_ratio_trigger("migexport_baseline_error_ratio", t))
        + f"\nand on({JOIN}, target, migration_id) {n.error_z} > {sigmas}"
        + f"\nand on({JOIN}, target) {n.xacts} >= {fmt(t.error_min_transactions)}"
    )
    return Alert(
        "MigrationErrorRateIncreased",
        armed_same_migration(error),
        t.alert_for_seconds,
        "warning",
        CONSIDER,
        "The error rate rose beyond the rollback threshold.",
        "{{ $labels.target }}: {{ $value | humanizePercentage }} of "
        + live_value(n.xacts, 'printf "%.0f"')
        + " transactions rolled back over the last "
        + window
        + ", against "
        + baseline_value("migexport_baseline_error_ratio", "humanizePercentage")
        + " in the baseline: "
        + live_value(n.error_z, 'printf "%.1f"', "target, migration_id")
        + " standard deviations above its noise (thresholds: × "
        + error_ratio
        + f", above {t.error_ratio_floor:.1%}).",
        f"rollback ratio > baseline × {error_ratio} and > {t.error_ratio_floor:.0%}, beyond {sigmas}σ of the "
        f"window's noise (≥ {fmt(t.error_min_transactions)} transactions), for {duration(t.alert_for_seconds)}",
        "Consider rollback if: error rate increased >10%",
    )


def _watch(t: Thresholds) -> list[Alert]:
    """ "Monitor during migration": lock waits, blocking, replication lag, connections."""
    lag_watch = fmt(t.replication_lag_watch_seconds)
    return [
        Alert(
            "MigrationLockWaitHigh",
            armed(f"migexport_lock_wait_max_seconds > {fmt(t.lock_wait_seconds)}"),
            t.alert_for_seconds,
            "warning",
            WATCH,
            "A session waits for a lock longer than the threshold.",
            "{{ $labels.target }}: a session has waited {{ $value | humanizeDuration }} for a lock "
            "(threshold " + duration(t.lock_wait_seconds) + ").",
            f"longest lock wait > {duration(t.lock_wait_seconds)}",
            "Lock wait time < threshold",
        ),
        Alert(
            "MigrationBlockingSessions",
            armed_same_migration("migexport_migration_blocked_sessions > 0"),
            t.blocking_seconds,
            "warning",
            WATCH,
            "The migration's session blocks other sessions.",
            "{{ $labels.target }}: the migration's session has been blocking other sessions for more than "
            + duration(t.blocking_seconds)
            + " (now {{ $value }}).",
            f"`migexport_migration_blocked_sessions > 0` for {duration(t.blocking_seconds)}",
            "Lock wait time < threshold (the migration as the blocker)",
        ),
        Alert(
            "MigrationReplicationLagHigh",
            armed(
                f"migexport_replication_lag_seconds > {lag_watch}\n"
                f"or migexport_standby_replay_lag_seconds > {lag_watch}"
            ),
            t.alert_for_seconds,
            "warning",
            WATCH,
            "Replication lag is above the watch threshold.",
            "{{ $labels.target }}{{ with $labels.standby }} → {{ . }}{{ end }}: replication lag is "
            "{{ $value | humanizeDuration }}, above " + duration(t.replication_lag_watch_seconds) + ".",
            f"replication lag > {duration(t.replication_lag_watch_seconds)}",
            "Replication lag < threshold",
        ),
        _connections_unstable(t),
    ]


def _connections_unstable(t: Thresholds) -> Alert:
    """Connections far from the baseline, or close to max_connections: a label says which."""
    return Alert(
        "MigrationConnectionsUnstable",
        # Two reasons, told apart by a label: the description reads differently for each.
        armed_same_migration(
            "label_replace(\n"
            f"  abs(migexport:connections:sum - on({JOIN}, target) group_left(migration_id) "
            "migexport_baseline_connections)\n"
            f"  / on({JOIN}, target) group_left(migration_id)\n"
            f"  {connections_scale('migexport_baseline_connections', t)}\n"
            f"  > {fmt(t.connections_change_ratio)},\n"
            '  "reason", "baseline", "", "")'
        )
        + "\nor\n"
        + armed(
            "label_replace(\n"
            f"  migexport:connections:sum / on({JOIN}, target) migexport_connections_max"
            f" > {fmt(t.connections_utilisation_max)},\n"
            '  "reason", "limit", "", "")'
        ),
        t.alert_for_seconds,
        "warning",
        WATCH,
        "The connection count is far from its baseline or close to the limit.",
        '{{ $labels.target }}: {{ if eq $labels.reason "limit" }}connections are at '
        "{{ $value | humanizePercentage }} of max_connections"
        "{{ else }}connections are {{ $value | humanizePercentage }} away from the baseline{{ end }}.",
        f"connections off the baseline (at least {fmt(t.connections_floor)}) by > "
        f"{t.connections_change_ratio:.0%}, or > {t.connections_utilisation_max:.0%} of max_connections",
        "Connection count stable",
    )


def _blind_spots(t: Thresholds) -> list[Alert]:
    """When the other alerts cannot fire: no baseline for what they compare, a lost run, an unreadable
    state file, an unreachable exporter or database."""
    return [
        Alert(
            "MigrationBaselineMissing",
            _baseline_missing(t),
            t.alert_for_seconds,
            "warning",
            WATCH,
            "The migration runs without a usable baseline.",
            '{{ if eq $labels.reason "file" }}Migration {{ $labels.migration_id }} is watched without a loaded, '
            "fresh baseline: the relative rollback triggers (latency, error rate, connections) cannot fire."
            '{{ else if eq $labels.reason "target" }}{{ $labels.target }} is not in the baseline (it was not '
            "reachable when the baseline was captured): its latency, error-rate and connection triggers cannot fire."
            '{{ else if eq $labels.reason "probe" }}Probe {{ $labels.probe }} on {{ $labels.target }} has no '
            "baseline latency (it never succeeded while the baseline was captured, or was added since): its "
            "latency trigger cannot fire."
            "{{ else }}{{ $labels.target }} has traffic now but its baseline has no {{ $labels.reason }} (it was "
            "quiet when the baseline was captured): that trigger cannot fire.{{ end }}",
            "no loaded, fresh baseline, or one without a target, probe or value that a trigger needs",
            "Query performance baseline captured; Error rate baseline captured",
        ),
        Alert(
            "MigrationRunLost",
            armed_same_migration("migexport_migration_lost == 1"),
            0,
            "critical",
            INVESTIGATE,
            "The migration's `migexport run` died without recording the end: the outcome is unknown.",
            "The run of migration {{ $labels.migration_id }} was killed (SIGKILL, OOM, reboot) while the "
            "migration was running: the migration command may still be running without its time limit, and "
            "nobody knows whether it finished. Find its process and its database session.",
            "the state says running and its `migexport run` process is gone",
            "Migration fails with error / Migration completed without errors (unknown)",
        ),
        Alert(
            "MigrationStateUnreadable",
            # Not armed: with the state unreadable, nobody can tell whether a migration runs.
            "migexport_migration_state_readable == 0",
            t.critical_for_seconds,
            "critical",
            INVESTIGATE,
            "The migration state file cannot be read: migration alerts are disarmed.",
            "{{ $labels.instance }}: the migration state file exists but cannot be read or understood (see the "
            "exporter log): no migration alert can fire while it is so.",
            f"the state file exists but is unreadable or broken, for {duration(t.critical_for_seconds)}",
            "Monitoring during migration (the watch must be armed)",
        ),
        Alert(
            "MigrationExporterDown",
            armed("migexport_up == 0")
            + "\nor\n"
            # Prometheus cannot scrape the exporter at all: armed by the exporter's last known window. Written
            # as `and`, not a group_left join, since two migrations in one hour give two series to match.
            + f"(last_over_time(migexport_migration_watch_active[1h]) == 1) and on({JOIN}) (up == 0)",
            t.critical_for_seconds,
            "critical",
            INVESTIGATE,
            "migexport cannot see the database during the migration: the team is blind.",
            "{{ $labels.instance }}{{ with $labels.target }} target {{ . }}{{ end }}: the exporter or its database "
            "is unreachable during migration {{ $labels.migration_id }}; no other alert can fire for it.",
            f"exporter or database unreachable for {duration(t.critical_for_seconds)}",
            "Database dashboards open; monitoring during migration",
        ),
    ]


def _baseline_missing(t: Thresholds) -> str:
    """One alert, several reasons (a label): no usable baseline file, or one without what a trigger needs."""
    n = series_names(t)
    loaded = f"and on({JOIN}) (migexport_baseline_loaded == 1)"

    def reason(expr: str, why: str) -> str:
        return f'label_replace(\n{expr},\n"reason", "{why}", "", "")'

    return "\nor\n".join(
        [
            reason(
                f"({WATCHING})\nunless on({JOIN}, migration_id)\n"
                "(migexport_baseline_loaded == 1 and migexport_baseline_stale == 0)",
                "file",
            ),
            reason(
                armed(f"migexport_up == 1 unless on({JOIN}, target) migexport_baseline_tps") + f" {loaded}", "target"
            ),
            reason(
                armed(
                    f"migexport_probe_success unless on({JOIN}, target, probe) "
                    'migexport_baseline_probe_latency_seconds{quantile="0.95"}'
                )
                + f" {loaded}",
                "probe",
            ),
            reason(
                armed(
                    f"{n.xacts} >= {fmt(t.error_min_transactions)} "
                    f"unless on({JOIN}, target) migexport_baseline_error_ratio"
                )
                + f" {loaded}",
                "error ratio",
            ),
            reason(
                armed(
                    f"{n.calls} >= {fmt(t.latency_min_calls)} "
                    f"unless on({JOIN}, target) migexport_baseline_statement_latency_seconds"
                )
                + f" {loaded}",
                "statement latency",
            ),
        ]
    )
