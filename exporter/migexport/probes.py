"""Key business queries and application health checks, run on their own schedule.

A probe runs its SQL in a READ ONLY transaction with its own statement_timeout, on a connection of
its own per target (one, shared by that target's probes, so a slow probe never delays a scrape and
probes never multiply connections). A health check is an HTTP GET that must answer 2xx in time.

`run_probe()` is shared with `migexport baseline`, which times the same queries the same way, and so
are PROBE_BUCKETS and `histogram_quantile()`: the live p95 is PromQL's histogram_quantile() over these
buckets, so the baseline's p95 is the same function over the same buckets. An exact quantile of raw
samples compared with an interpolated one pages on noise: a 0.4 ms probe whose runs fall in a 1-2.5 ms
bucket reads p95 2.35 ms live against an exact 0.97 ms.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import psycopg

from migexport.collectors.base import MARKER
from migexport.config import App, Probe
from migexport.dsn import Target, password_of, redact
from migexport.metrics import HISTOGRAM, MetricSpec, Sample
from migexport.own import OwnTransactions, SessionLedger
from migexport.targets import SessionSettings, connect

log = logging.getLogger(__name__)

# Key queries take from a tenth of a millisecond (an index lookup) to seconds. Five buckets per decade
# (1, 1.6, 2.5, 4, 6.3: each ~1.6x the last) from 100 us to 10 s: interpolation inside a bucket is off by
# at most ~60 %, wherever the probe sits, instead of 2.5x in the 1-2.5 ms bucket of a coarser series.
PROBE_BUCKETS: tuple[float, ...] = (
    *(float(f"{m}e{e}") for e in range(-4, 1) for m in ("1", "1.6", "2.5", "4", "6.3")),
    10.0,
)


def bucket_index(seconds: float, bounds: Sequence[float] = PROBE_BUCKETS) -> int:
    """The bucket a duration counts in (len(bounds) for +Inf): the first whose upper bound it does not
    exceed, so a duration equal to a bound counts in that bound's bucket (Prometheus' `le`). The live
    histogram and the baseline's own timings both count with this."""
    return bisect_left(bounds, seconds)


def cumulative_buckets(durations: Iterable[float], bounds: Sequence[float] = PROBE_BUCKETS) -> list[int]:
    """Cumulative counts per upper bound, then +Inf, exactly as the exporter's probe histogram exposes them."""
    counts = [0] * (len(bounds) + 1)
    for d in durations:
        counts[bucket_index(d, bounds)] += 1
    return list(itertools.accumulate(counts))


def _go_div(a: float, b: float) -> float:
    """Go's float division: x/0 is +-Inf and 0/0 is NaN, where Python raises."""
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def _coalesce(buckets: list[list[float]]) -> list[list[float]]:
    """Merge buckets with the same upper bound (sorted input)."""
    out = [list(buckets[0])]
    for bound, count in buckets[1:]:
        if bound == out[-1][0]:
            out[-1][1] += count
        else:
            out.append([bound, count])
    return out


def _fix_counts(buckets: list[list[float]]) -> None:
    """Prometheus' correctPrecisionErrors (tolerance 1e-12) and ensureMonotonic, in that order."""
    prev = buckets[0][1]
    for b in buckets[1:]:
        delta = abs(b[1] - prev)
        if delta == 0:
            continue
        if _go_div(delta, b[1]) <= 1e-12:
            b[1] = prev
        else:
            prev = b[1]
    highest = buckets[0][1]
    for b in buckets[1:]:
        if b[1] > highest:
            highest = b[1]
        elif b[1] < highest:
            b[1] = highest


def histogram_quantile(q: float, bucket_upper_bounds: Sequence[float], cumulative_counts: Sequence[float]) -> float:
    """PromQL's histogram_quantile() over classic buckets (promql/quantile.go, bucketQuantile), step by step.

    `bucket_upper_bounds` must end with +Inf (else NaN, like Prometheus). The rank q * total falls in the
    first bucket whose cumulative count reaches it, and is interpolated linearly between that bucket's
    lower bound (0 for the first bucket if its upper bound is positive) and its upper bound; a rank in
    the +Inf bucket returns the highest finite bound.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    # Stable sort by bound; equal bounds are merged right after, so their order does not matter.
    buckets = sorted(
        ([float(b), float(c)] for b, c in zip(bucket_upper_bounds, cumulative_counts, strict=True)), key=lambda b: b[0]
    )
    if not buckets or buckets[-1][0] != math.inf:
        return math.nan
    buckets = _coalesce(buckets)
    _fix_counts(buckets)
    if len(buckets) < 2:
        return math.nan
    observations = buckets[-1][1]
    if observations == 0:
        return math.nan
    rank = q * observations
    # Go's sort.Search over all but the +Inf bucket: the first whose count reaches the rank.
    b = next((i for i in range(len(buckets) - 1) if buckets[i][1] >= rank), len(buckets) - 1)
    if b == len(buckets) - 1:
        return buckets[-2][0]
    if b == 0 and buckets[0][0] <= 0:
        return buckets[0][0]
    start, end, count = 0.0, buckets[b][0], buckets[b][1]
    if b > 0:
        start = buckets[b - 1][0]
        count -= buckets[b - 1][1]
        rank -= buckets[b - 1][1]
    return start + (end - start) * _go_div(rank, count)


def probe_quantile(q: float, cumulative_counts: Sequence[float]) -> float | None:
    """histogram_quantile() over PROBE_BUCKETS counts (with +Inf last); None without observations."""
    if not cumulative_counts or cumulative_counts[-1] <= 0:
        return None
    return histogram_quantile(q, (*PROBE_BUCKETS, math.inf), cumulative_counts)


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    seconds: float
    error: str = ""
    sqlstate: str = ""


# "permission denied for table orders" (PostgreSQL 15+; "relation" before), "... for schema app", ...
_DENIED = re.compile(
    r"permission denied for (table|relation|view|materialized view|foreign table|sequence|schema|function) (.+)$"
)
_GRANT = {"sequence": "SELECT ON SEQUENCE", "schema": "USAGE ON SCHEMA", "function": "EXECUTE ON FUNCTION"}


def _ident(name: str) -> str:
    """An identifier as SQL needs it: bare when it is a plain lower-case name, else double-quoted."""
    return name if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) else '"' + name.replace('"', '""') + '"'


def fix_hint(result: ProbeResult, role: str) -> str:
    """What to do about a failing probe, in one clause ("" when there is nothing specific to say)."""
    who = _ident(role) if role else "the exporter's role"
    if result.sqlstate == "42501" or "permission denied" in result.error:
        found = _DENIED.search(result.error)
        if found:
            kind, name = found.groups()
            return f"fix: GRANT {_GRANT.get(kind, 'SELECT ON')} {_ident(name.strip())} TO {who}"
        return f"fix: GRANT the privileges this query needs (e.g. GRANT SELECT ON <table>) TO {who}"
    if result.sqlstate == "57014":
        return "fix: the query ran past the probe's timeout: make it faster or raise probes[].timeout"
    if result.sqlstate in ("42P01", "42883", "3F000"):
        return "fix: check the probe's SQL and that the target's DSN names the application's database"
    if result.sqlstate == "25006":
        return "fix: probes run READ ONLY: a probe must only read"
    return ""


def run_probe(conn: psycopg.Connection, probe: Probe, ledger: SessionLedger | None = None) -> ProbeResult:
    """Run one probe in a read-only transaction with its own statement timeout.

    Only the query's own round trip is timed (rows received included), not BEGIN, the timeout or
    COMMIT: every round trip adds the client's scheduling jitter, and the probe's latency is the query's.
    Every statement carries the MARKER. `conn` must be in autocommit mode. The probe's transaction is
    counted in `ledger` (the exporter's own) before it ends, so no scrape can see it as the application's.
    """
    seconds = 0.0
    try:
        conn.execute(MARKER + "BEGIN READ ONLY")
        try:
            conn.execute(
                MARKER + "SELECT set_config('statement_timeout', %s, true)",
                (str(round(probe.timeout_seconds * 1000)),),
            )
            started = time.perf_counter()
            try:
                cur = conn.execute(MARKER + probe.sql)
                if cur.description is not None:
                    cur.fetchall()  # the time to receive the rows is part of the query's latency
            finally:
                seconds = time.perf_counter() - started
            if ledger is not None:
                ledger.ending(ok=True)
            conn.execute(MARKER + "COMMIT")
        except psycopg.Error:
            if not conn.broken and not conn.closed:
                if ledger is not None:
                    ledger.ending(ok=False)
                conn.execute(MARKER + "ROLLBACK")
            raise
        return ProbeResult(True, seconds)
    except psycopg.Error as exc:
        text = str(exc).strip()
        return ProbeResult(False, seconds, text.splitlines()[0] if text else "error", exc.sqlstate or "")


def check_app(app: App) -> ProbeResult:
    # Loaded only when an app is probed: half a megabyte of serve's memory otherwise.
    import urllib.error
    import urllib.request

    started = time.perf_counter()
    try:
        with urllib.request.urlopen(app.url, timeout=app.timeout_seconds) as resp:
            ok = 200 <= resp.status < 300
            return ProbeResult(ok, time.perf_counter() - started, "" if ok else f"HTTP {resp.status}")
    except urllib.error.HTTPError as exc:
        return ProbeResult(False, time.perf_counter() - started, f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return ProbeResult(False, time.perf_counter() - started, str(reason))


PROBE_LABELS = ("target", "probe")
PROBE_DURATION = MetricSpec(
    "migexport_probe_duration_seconds",
    "Duration of the successful runs of a key business query probe (failures: migexport_probe_success).",
    kind=HISTOGRAM,
    labels=PROBE_LABELS,
    per_target=False,
)
PROBE_SUCCESS = MetricSpec(
    "migexport_probe_success",
    "1 if the probe's last run succeeded, 0 if it failed or timed out.",
    labels=PROBE_LABELS,
    per_target=False,
)
PROBE_EVER_SUCCEEDED = MetricSpec(
    "migexport_probe_ever_succeeded",
    "1 once any run of the probe succeeded since the exporter started, else 0 (see the log for the fix).",
    labels=PROBE_LABELS,
    per_target=False,
)
APP_UP = MetricSpec(
    "migexport_app_health_up",
    "1 if the application's health URL answered 2xx in time at the last check.",
    labels=("app",),
    per_target=False,
)
APP_DURATION = MetricSpec(
    "migexport_app_health_duration_seconds",
    "Duration of the last application health check.",
    labels=("app",),
    per_target=False,
)
PROBE_SPECS = (PROBE_DURATION, PROBE_SUCCESS, PROBE_EVER_SUCCEEDED, APP_UP, APP_DURATION)


class ProbeMetrics:
    """What the probes and health checks found, written by their threads and read by each scrape
    (a file-less Source of the page). Durations of successful runs only, like the baseline's quantiles:
    a run cut off by its timeout would read as a latency, and failures have migexport_probe_success."""

    specs = PROBE_SPECS

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], list[int]] = {}  # per bucket, +Inf last, not cumulative
        self._sums: dict[tuple[str, str], float] = {}
        self._success: dict[tuple[str, str], int] = {}
        self._ever: dict[tuple[str, str], int] = {}
        self._apps: dict[str, tuple[int, float | None]] = {}

    def observe(self, target: str, probe: str, seconds: float) -> None:
        with self._lock:
            counts = self._counts.setdefault((target, probe), [0] * (len(PROBE_BUCKETS) + 1))
            counts[bucket_index(seconds)] += 1
            self._sums[(target, probe)] = self._sums.get((target, probe), 0.0) + seconds
            self._ever[(target, probe)] = 1

    def set_success(self, target: str, probe: str, ok: bool) -> None:
        with self._lock:
            self._success[(target, probe)] = int(ok)
            self._ever.setdefault((target, probe), 0)

    def set_app(self, app: str, ok: bool, seconds: float | None) -> None:
        with self._lock:
            self._apps[app] = (int(ok), seconds)

    def samples(self) -> list[Sample]:
        with self._lock:
            out = [PROBE_SUCCESS.sample(v, target=t, probe=p) for (t, p), v in self._success.items()]
            out += [PROBE_EVER_SUCCEEDED.sample(v, target=t, probe=p) for (t, p), v in self._ever.items()]
            for (t, p), counts in self._counts.items():
                cumulative = list(itertools.accumulate(counts))
                out += PROBE_DURATION.histogram(PROBE_BUCKETS, cumulative, self._sums[(t, p)], target=t, probe=p)
            for app, (up, seconds) in self._apps.items():
                out.append(APP_UP.sample(up, app=app))
                if seconds is not None:
                    out.append(APP_DURATION.sample(seconds, app=app))
            return out


def _role_of(conn: psycopg.Connection | None) -> str:
    """The role the session logged in as (the one a GRANT must name), or "" when unknown."""
    try:
        return conn.info.user if conn is not None and not conn.closed else ""
    except psycopg.Error:
        return ""


class _Changes:
    """Logs a check when it starts failing and when it recovers, not at every run."""

    def __init__(self) -> None:
        self.failing: set[str] = set()

    def note(self, what: str, ok: bool, error: str) -> None:
        if not ok and what not in self.failing:
            log.warning("%s failed: %s", what, error)
            self.failing.add(what)
        elif ok and what in self.failing:
            log.info("%s recovered", what)
            self.failing.discard(what)


class _Every:
    """Fixed-rate scheduling that does not drift with the time each run takes."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next = time.monotonic()

    def due(self, now: float) -> bool:
        if now < self.next:
            return False
        self.next = max(self.next + self.interval, now)
        return True


class ProbeRunner:
    """One thread per target with probes, and one for application health checks."""

    def __init__(
        self,
        targets: dict[str, Target],
        probes: tuple[Probe, ...],
        apps: tuple[App, ...],
        metrics: ProbeMetrics,
        session: SessionSettings,
        own: Mapping[str, OwnTransactions] | None = None,
    ) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.metrics = metrics
        self.session = session
        # Per target, the exporter's own transactions, which its xact counters leave out: each probe run
        # is one (a failing probe's a rollback), and they must not move the error ratio they watch.
        self.own = own or {}
        by_target: dict[str, list[Probe]] = {}
        for probe in probes:
            by_target.setdefault(probe.target, []).append(probe)
            # Present from the start: a probe that never ran is not a probe that succeeded.
            metrics.set_success(probe.target, probe.name, False)
        for name, target_probes in by_target.items():
            self._threads.append(
                threading.Thread(
                    target=self._probe_loop,
                    args=(targets[name], target_probes),
                    daemon=True,
                    name=f"migexport-probes-{name}",
                )
            )
        if apps:
            for app in apps:
                metrics.set_app(app.name, False, None)
            self._threads.append(
                threading.Thread(target=self._app_loop, args=(apps,), daemon=True, name="migexport-apps")
            )

    def start(self) -> ProbeRunner:
        # A probe thread waiting for the GIL after its query returned would add up to the interpreter's
        # switch interval (5 ms by default) to the timing; a millisecond keeps that below the buckets'
        # resolution at the probe floor. Costs a little more thread switching in a mostly idle process.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _probe_loop(self, target: Target, probes: list[Probe]) -> None:
        schedules = [(_Every(p.interval_seconds), p) for p in probes]
        conn: psycopg.Connection | None = None
        ledger: SessionLedger | None = None
        changes = _Changes()
        succeeded: set[str] = set()  # probes with a successful run since the exporter started
        while not self._stop.is_set():
            for every, probe in schedules:
                if self._stop.is_set() or not every.due(time.monotonic()):
                    continue
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = connect(target, self.session)
                        ledger = self._ledger(target, conn)
                    result = run_probe(conn, probe, ledger)
                    if ledger is not None:
                        ledger.flush(conn, MARKER)  # published now: the server's counters catch up at once
                except psycopg.Error as exc:
                    conn, ledger = None, None
                    result = ProbeResult(False, 0.0, str(exc).strip().splitlines()[0], exc.sqlstate or "")
                self._record(target, probe, result, _role_of(conn), changes, succeeded)
            self._stop.wait(0.05)
        if conn is not None:
            conn.close()

    def _ledger(self, target: Target, conn: psycopg.Connection) -> SessionLedger | None:
        own = self.own.get(target.name)
        return SessionLedger(own, conn.info.server_version) if own is not None else None

    def _record(
        self, target: Target, probe: Probe, result: ProbeResult, role: str, changes: _Changes, succeeded: set[str]
    ) -> None:
        if result.ok:
            self.metrics.observe(target.name, probe.name, result.seconds)
            succeeded.add(probe.name)
        self.metrics.set_success(target.name, probe.name, result.ok)
        error = redact(result.error, (password_of(target.dsn) or "",))
        if not result.ok and probe.name not in succeeded:
            # A probe that never worked is a setup problem (a missing GRANT, a wrong database), not an
            # incident: say so at start, with the fix, instead of leaving it to the critical page.
            hint = fix_hint(result, role)
            error += f" (it has not succeeded since the exporter started{'; ' + hint if hint else ''})"
        changes.note(f"probe {probe.name} on {target.name}", result.ok, error)

    def _app_loop(self, apps: tuple[App, ...]) -> None:
        schedules = [(_Every(a.interval_seconds), a) for a in apps]
        changes = _Changes()
        while not self._stop.is_set():
            for every, app in schedules:
                if self._stop.is_set() or not every.due(time.monotonic()):
                    continue
                result = check_app(app)
                self.metrics.set_app(app.name, result.ok, result.seconds)
                changes.note(f"app {app.name} health check", result.ok, result.error)
            self._stop.wait(0.05)
