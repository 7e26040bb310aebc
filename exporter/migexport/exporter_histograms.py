"""Probe latency for the baseline, read from the running exporter's own histograms.

A probe's latency is timed by a client, and the client's conditions are part of the number: the
exporter times its probes on their own schedule and connection, in a process that also answers
scrapes, while `migexport baseline` is a separate, quiet process. Measured on a busy two-core host,
the same key query read a p95 about 1.4× higher in the exporter than in the baseline command, which is
most of the way to a "degraded by 50 %" page with nothing wrong. So when the exporter that will
watch the migration is running, the baseline takes the probes' latency from it: the bucket counts of
`migexport_probe_duration_seconds` at every sampling tick, whose differences are exactly what the
live `histogram_quantile(0.95, rate(...[window]))` is computed from. Same process, same schedule,
same buckets, same interpolation.

The same holds for transactions: with `serve` running, its own transactions (each scrape's queries, its
probes) are in `pg_stat_database` but not in the counters it exports, which the live error ratio is
computed from. So the baseline takes the window's commits and rollbacks from those exported counters
too (and subtracts its own sampler's, which the exporter counts as anyone's).
"""

from __future__ import annotations

import logging
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from migexport.probes import PROBE_BUCKETS, probe_quantile

log = logging.getLogger(__name__)

HISTOGRAM = "migexport_probe_duration_seconds"
COMMITS = "migexport_xact_commit"  # counter family names, without _total
ROLLBACKS = "migexport_xact_rollback"
SCRAPE_TIMEOUT_SECONDS = 5.0
MAX_BODY_BYTES = 16 * 1024 * 1024  # an exporter's page is tens of KB; anything far larger is not one

Key = tuple[str, str]  # (target, probe)


@dataclass(frozen=True)
class Page:
    """What the baseline reads from one scrape of the exporter."""

    probes: dict[Key, list[float]]  # (target, probe) -> cumulative bucket counts
    xacts: dict[str, tuple[float, float]]  # target -> (commits, rollbacks), the exporter's own excluded


def read_page(text: str) -> Page:
    families = list(text_string_to_metric_families(text))
    return Page(cumulative_from_families(families), xacts_from_families(families))


def xacts_from_families(families: list) -> dict[str, tuple[float, float]]:
    totals: dict[str, dict[str, float]] = {}
    for family in families:
        if family.name in (COMMITS, ROLLBACKS):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals.setdefault(sample.labels.get("target", ""), {})[family.name] = sample.value
    return {t: (v[COMMITS], v[ROLLBACKS]) for t, v in totals.items() if COMMITS in v and ROLLBACKS in v}


def cumulative_from_page(text: str) -> dict[Key, list[float]]:
    return cumulative_from_families(list(text_string_to_metric_families(text)))


def cumulative_from_families(families: list) -> dict[Key, list[float]]:
    """Per (target, probe): cumulative bucket counts in PROBE_BUCKETS order, then +Inf. Series whose
    buckets differ from ours (another version of the exporter) are left out."""
    wanted = [*PROBE_BUCKETS, math.inf]
    found: dict[Key, dict[float, float]] = {}
    for family in families:
        if family.name != HISTOGRAM:
            continue
        for sample in family.samples:
            if sample.name != HISTOGRAM + "_bucket":
                continue
            key = (sample.labels.get("target", ""), sample.labels.get("probe", ""))
            found.setdefault(key, {})[float(sample.labels["le"])] = sample.value
    out: dict[Key, list[float]] = {}
    for key, by_bound in found.items():
        if sorted(by_bound) == wanted:
            out[key] = [by_bound[b] for b in wanted]
    return out


@dataclass
class ExporterHistograms:
    """Snapshots of the exporter's probe histograms over the baseline window."""

    url: str
    snapshots: list[tuple[float, Page]] = field(default_factory=list)
    error: str = ""

    def take(self) -> bool:
        """One snapshot now; False (and `error` set) if the exporter cannot be read."""
        try:
            with urllib.request.urlopen(self.url.rstrip("/") + "/metrics", timeout=SCRAPE_TIMEOUT_SECONDS) as resp:
                text = resp.read(MAX_BODY_BYTES).decode("utf-8", errors="replace")
            self.snapshots.append((time.monotonic(), read_page(text)))
            return True
        except (OSError, ValueError) as exc:  # URLError, timeouts, a page that does not parse
            self.error = str(getattr(exc, "reason", exc))
            return False

    def latency(self, key: Key, window_seconds: float) -> dict[str, float | list[float]] | None:
        """The window's latency of one probe as the live rules will estimate it, or None when the
        exporter did not run that probe (or ran it not once) during the window."""
        series = [(t, page.probes[key]) for t, page in self.snapshots if key in page.probes]
        if len(series) < 2:
            return None
        (t0, first), (t1, last) = series[0], series[-1]
        counts = _delta(last, first)
        if counts[-1] <= 0:
            return None
        return {
            "cumulative_counts": counts,
            "runs": counts[-1],
            "p50_seconds": probe_quantile(0.50, counts) or 0.0,
            "p95_seconds": probe_quantile(0.95, counts) or 0.0,
            "p95_window_max_seconds": _window_max(series, window_seconds) or 0.0,
            "seconds": t1 - t0,
        }

    def xacts(self, target: str) -> tuple[float, float] | None:
        """Commits and rollbacks of the target over the window as the exporter counts them (its own
        excluded), or None if it does not watch that target or its counters restarted meanwhile."""
        pages = [page.xacts[target] for _, page in self.snapshots if target in page.xacts]
        if len(pages) < 2:
            return None
        (c0, r0), (c1, r1) = pages[0], pages[-1]
        if c1 < c0 or r1 < r0:
            return None
        return c1 - c0, r1 - r0


def _delta(later: list[float], earlier: list[float]) -> list[float]:
    # A restarted exporter starts its counters again: then the later page alone is the window.
    if any(b < a for a, b in zip(earlier, later, strict=True)):
        return list(later)
    return [b - a for a, b in zip(earlier, later, strict=True)]


def _window_max(series: list[tuple[float, list[float]]], window_seconds: float) -> float | None:
    """The highest p95 over any stretch of the window as long as the live rate window (or the whole
    window if it is shorter): how high the live p95 reads at rest by chance alone."""
    best: float | None = None
    for i, (t_start, start) in enumerate(series):
        end = next((snap for t, snap in series[i + 1 :] if t - t_start >= window_seconds), None)
        if end is None:
            if best is not None:
                break
            end = series[-1][1]  # shorter than one live window: all of it
        counts = _delta(end, start)
        if counts[-1] > 0:
            p95 = probe_quantile(0.95, counts)
            if p95 is not None:
                best = p95 if best is None else max(best, p95)
    return best
