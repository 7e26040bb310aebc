"""Recording rules: every live value a rule compares with a baseline, computed the way the baseline is.

- error ratio: rollbacks / transactions over the rate window, the exporter's own excluded on both sides;
- statement latency: Δexec / Δcalls, and its spread from the sum of squares, like baseline.py;
- probe p95: histogram_quantile over the same buckets the baseline's p95 is interpolated from;
- the counts of the window (transactions, calls, probe runs), for the noise of a value of that many;
- z-scores: how far beyond that noise the live value is from its baseline.
"""

from __future__ import annotations

from migexport.config import Thresholds
from migexport.promql import JOIN, duration, fmt, series_names, with_baseline


def recording_rules(t: Thresholds) -> list[dict[str, str]]:
    """Live values over the rate window, computed as their baselines are (see baseline.py)."""
    return (
        _rate_rules(t)
        + _significance_rules(t)
        + [{"record": "migexport:connections:sum", "expr": f"sum by ({JOIN}, target) (migexport_connections)"}]
    )


def _rate_rules(t: Thresholds) -> list[dict[str, str]]:
    by, w, n = f"sum by ({JOIN}, target)", duration(t.rate_window_seconds), series_names(t)
    seconds = fmt(t.rate_window_seconds)
    return [
        {
            "record": n.xact_rate,
            "expr": f"{by} (rate(migexport_xact_commit_total[{w}]) + rate(migexport_xact_rollback_total[{w}]))",
        },
        # Counts over the window, for the noise of a ratio or a mean of that many.
        {"record": n.xacts, "expr": f"{n.xact_rate} * {seconds}"},
        {"record": n.rollbacks, "expr": f"{by} (rate(migexport_xact_rollback_total[{w}])) * {seconds}"},
        # Only where transactions happen: a zero denominator yields no series, not NaN.
        {"record": n.error_ratio, "expr": f"{by} (rate(migexport_xact_rollback_total[{w}]))\n/ ({n.xact_rate} > 0)"},
        {"record": n.calls, "expr": f"{by} (rate(migexport_statements_calls_total[{w}])) * {seconds}"},
        {
            "record": n.latency,
            "expr": f"{by} (rate(migexport_statements_exec_seconds_total[{w}])) * {seconds}\n/ ({n.calls} > 0)",
        },
        {
            # sqrt(E[x²] - E[x]²) over the window's calls; clamped at 0 against rounding below it.
            "record": n.latency_stddev,
            "expr": (
                f"sqrt(clamp_min(\n  {by} (rate(migexport_statements_exec_seconds_squared_total[{w}])) * {seconds}\n"
                f"  / ({n.calls} > 0)\n  - {n.latency} ^ 2,\n0))"
            ),
        },
        {
            # The same buckets and the same interpolation as the baseline's p95 (baseline.py).
            "record": n.probe_p95,
            "expr": (
                "histogram_quantile(0.95,\n"
                f"  sum by ({JOIN}, target, probe, le) (rate(migexport_probe_duration_seconds_bucket[{w}])))"
            ),
        },
        {
            "record": n.probe_runs,
            "expr": f"sum by ({JOIN}, target, probe) (increase(migexport_probe_duration_seconds_count[{w}]))",
        },
    ]


def _significance_rules(t: Thresholds) -> list[dict[str, str]]:
    """How many standard deviations of the window's noise the live value is above its baseline.

    Errors: a two-proportion z-test of the window's rollbacks against the baseline's, with the pooled
    ratio. Latency: a z-test of two means, each with the variance of its own window.
    """
    n = series_names(t)
    pooled = (
        "(\n  "
        + with_baseline(n.rollbacks, "+", "migexport_baseline_error_ratio * migexport_baseline_transactions")
        + "\n)\n/ on("
        + JOIN
        + ", target, migration_id) (\n  "
        + with_baseline(n.xacts, "+", "migexport_baseline_transactions")
        + "\n)"
    )
    error_z = (
        "(\n  "
        + with_baseline(n.error_ratio, "-", "migexport_baseline_error_ratio")
        + "\n)\n/ sqrt(\n"
        + f"  {n.error_pooled} * (1 - {n.error_pooled})\n"
        + "  * ("
        + with_baseline(f"1 / {n.xacts}", "+", "1 / migexport_baseline_transactions")
        + ")\n)"
    )
    latency_z = (
        "(\n  "
        + with_baseline(n.latency, "-", "migexport_baseline_statement_latency_seconds")
        + "\n)\n/ clamp_min(sqrt(\n  "
        + with_baseline(
            f"{n.latency_stddev} ^ 2 / {n.calls}",
            "+",
            "migexport_baseline_statement_latency_stddev_seconds ^ 2 / migexport_baseline_statement_calls",
        )
        # Both windows without any spread: any change is beyond the noise.
        + "\n), 1e-9)"
    )
    return [
        {"record": n.error_pooled, "expr": pooled},
        {"record": n.error_z, "expr": error_z},
        {"record": n.latency_z, "expr": latency_z},
    ]
