"""The baseline file: a versioned JSON document, written atomically, checked field by field on reading.

Every value a reader will serve is checked here, so a truncated or hand-edited file is one clear line
("baseline.json: targets.primary.tps: expected a non-negative number, got 'fast'"), never a crash. Any
bytes at all end as a `Baseline` or one `BaselineError`: binary garbage, text that is not UTF-8,
`1e400` (infinite as a float), `NaN`, nesting deep enough to exhaust the parser, integers too large for
a float, lone surrogates that would break the UTF-8 of the /metrics page, and wrong types anywhere.
What `read_baseline` returns holds only checked values, every known key present (None if absent).

Version 2: probe latencies are PromQL's histogram_quantile() over the probe buckets (version 1 had
exact quantiles, which the live p95 cannot be compared with), and the document keeps those buckets.
Optional in version 2: `top_statements`, the per-target statement snapshot for the report (files
written before it have none: `Baseline.top_statements` is None). Its query texts are read as text of
at most TEXT_MAX characters, never served: no metric is made from it.
"""

from __future__ import annotations

import itertools
import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migexport import strictjson
from migexport.state import write_atomic
from migexport.topstatements import TEXT_MAX

FORMAT = "migexport-baseline"
VERSION = 2

# A baseline is a few kilobytes (27 bucket counts per probe); anything much larger is not ours, and
# `serve` must not read a gigabyte when someone points it at the wrong file.
MAX_BASELINE_BYTES = 4 * 1024 * 1024
MAX_TEXT = 200  # names and ids: they become label values
MAX_TOP_STATEMENTS = 1000  # per target; the capture keeps 50 by default
QUERYID = re.compile(r"-?[0-9]{1,19}")
STATEMENT_NUMBERS = (
    "calls",
    "total_exec_seconds",
    "rows",
    "mean_exec_seconds",
    "cumulative_calls",
    "cumulative_total_exec_seconds",
    "cumulative_rows",
)

TARGET_NUMBERS = (
    "server_version_num",
    "tps",
    "commits",
    "rollbacks",
    "transactions",
    "error_ratio",
    "statement_latency_seconds",
    "statement_latency_stddev_seconds",
    "statement_calls",
    "statement_calls_per_second",
    "connections",
    "connections_max",
    "connection_utilisation",
    "database_size_bytes",
)
PROBE_NUMBERS = (
    "runs",
    "successful_runs",
    "success_ratio",
    "p50_seconds",
    "p95_seconds",
    "interval_seconds",
    "window_runs",
    "p95_window_max_seconds",
)


class BaselineError(ValueError):
    """A baseline file cannot be used; one printable line."""


def write_baseline(path: Path, doc: dict[str, Any], force: bool) -> None:
    if path.exists() and not force:
        raise BaselineError(f"{path} exists; use --force to replace it")
    # allow_nan=False: a NaN or an infinity written here would be refused on reading.
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n")


def _parse(path: Path, data: bytes) -> Any:
    try:
        return strictjson.loads(data)
    except strictjson.JsonRefused as exc:
        raise BaselineError(f"{path}: {exc}: not a migexport baseline file") from None


def _read_bytes(path: Path) -> bytes:
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block every scrape, a directory cannot be read
            raise BaselineError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            data = f.read(MAX_BASELINE_BYTES + 1)
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such baseline file (run 'migexport baseline')") from None
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_BASELINE_BYTES:
        raise BaselineError(f"{path}: larger than {MAX_BASELINE_BYTES} bytes: not a migexport baseline file")
    return data


class _Check:
    """Typed access to the decoded document; every problem names the file and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def bad(self, where: str, why: str) -> BaselineError:
        return BaselineError(f"{self.path}: {where}: {why}")

    def number(self, raw: Any, where: str, optional: bool = True) -> float | None:
        if raw is None and optional:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise self.bad(where, f"expected a non-negative number, got {_show(raw)}")
        value = float(raw)  # finite and in range: the JSON hooks refused the rest
        if value < 0:
            raise self.bad(where, f"expected a non-negative number, got {_show(raw)}")
        return value

    def text(self, raw: Any, where: str) -> str:
        if not isinstance(raw, str) or not raw or len(raw) > MAX_TEXT or not _printable(raw):
            raise self.bad(where, f"expected a printable name of at most {MAX_TEXT} characters, got {_show(raw)}")
        return raw

    def items(self, raw: Any, where: str) -> list[tuple[str, Any]]:
        """The items of an optional JSON object (absent or null: none), keys checked as names."""
        if raw is None:
            return []
        if not isinstance(raw, dict):
            raise self.bad(where, f"expected an object, got {type(raw).__name__}")
        return [(self.text(k, f"{where} key"), v) for k, v in raw.items()]

    def numbers(self, raw: Any, where: str) -> dict[str, float | None]:
        return {k: self.number(v, f"{where}.{k}") for k, v in self.items(raw, where)}

    def lines(self, raw: Any, where: str) -> list[str]:
        if raw is None:
            return []
        if not isinstance(raw, list) or not all(isinstance(m, str) and _printable(m) for m in raw):
            raise self.bad(where, "expected a list of text lines")
        return list(raw)


def _printable(text: str) -> bool:
    """Printable, and encodable: a lone surrogate ("\\ud800") would fail the UTF-8 of the whole page."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return text.isprintable()


def _show(raw: Any) -> str:
    """A short, safe rendering of a bad value for the one-line message."""
    if isinstance(raw, dict | list):
        return type(raw).__name__
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _lag(c: _Check, raw: Any, where: str) -> dict[str, float | None] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise c.bad(where, f"expected an object, got {type(raw).__name__}")
    return {k: c.number(raw.get(k), f"{where}.{k}") for k in ("mean", "max")}


def _target(c: _Check, raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise c.bad(where, "must be an object")
    in_recovery = raw.get("in_recovery")
    if in_recovery is not None and not isinstance(in_recovery, bool):
        raise c.bad(f"{where}.in_recovery", f"expected true or false, got {_show(in_recovery)}")
    t: dict[str, Any] = {key: c.number(raw.get(key), f"{where}.{key}") for key in TARGET_NUMBERS}
    t["in_recovery"] = in_recovery
    t["connections_by_state"] = c.numbers(raw.get("connections_by_state"), f"{where}.connections_by_state")
    lags = c.items(raw.get("replication_lag_seconds"), f"{where}.replication_lag_seconds")
    t["replication_lag_seconds"] = {s: _lag(c, v, f"{where}.replication_lag_seconds.{s}") or {} for s, v in lags}
    t["standby_replay_lag_seconds"] = _lag(c, raw.get("standby_replay_lag_seconds"), f"{where}.standby_replay_lag")
    t["table_rows_estimate"] = c.numbers(raw.get("table_rows_estimate"), f"{where}.table_rows_estimate")
    return t


def _histogram(c: _Check, raw: Any, where: str) -> dict[str, list[float]] | None:
    """Finite upper bounds, strictly increasing; cumulative counts, one per bound and one for +Inf."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise c.bad(where, f"expected an object, got {type(raw).__name__}")
    bounds, counts = raw.get("upper_bounds_seconds"), raw.get("cumulative_counts")
    if not isinstance(bounds, list) or not isinstance(counts, list) or len(counts) != len(bounds) + 1:
        raise c.bad(where, "expected upper_bounds_seconds and cumulative_counts (one more, for +Inf)")
    b = [c.number(v, f"{where}.upper_bounds_seconds", optional=False) for v in bounds]
    n = [c.number(v, f"{where}.cumulative_counts", optional=False) for v in counts]
    if any(x >= y for x, y in itertools.pairwise(b)) or any(x > y for x, y in itertools.pairwise(n)):  # type: ignore[operator]
        raise c.bad(where, "bounds must increase and counts must not decrease")
    return {"upper_bounds_seconds": b, "cumulative_counts": n}  # type: ignore[dict-item]


def _probe(c: _Check, raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise c.bad(where, "must be an object")
    p: dict[str, Any] = {key: c.number(raw.get(key), f"{where}.{key}") for key in PROBE_NUMBERS}
    p["target"] = c.text(raw.get("target"), f"{where}.target")
    p["latency_buckets"] = _histogram(c, raw.get("latency_buckets"), f"{where}.latency_buckets")
    return p


@dataclass(frozen=True)
class BaselineStatement:
    """One statement of a target's snapshot; counts of the window (None without a start reading)."""

    queryid: int
    userid: int
    dbid: int
    role: str
    calls: float | None
    total_exec_seconds: float | None
    rows: float | None
    mean_exec_seconds: float | None
    mean_source: str  # "window": Δtotal/Δcalls of the window; "cumulative": it did not run in the window
    cumulative_calls: float  # the counters at the end of the window: what a later reading is compared with
    cumulative_total_exec_seconds: float
    cumulative_rows: float
    query: str | None
    query_truncated: bool = False

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.queryid, self.userid, self.dbid)

    def to_doc(self) -> dict[str, Any]:
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["queryid"] = str(self.queryid)
        return doc


@dataclass(frozen=True)
class StatementSnapshot:
    """A target's top statements over the baseline window (topstatements.snapshot_doc writes it)."""

    database: str
    window_start_at: float | None
    captured_at: float
    stats_reset: float | None
    limit: int
    hidden_statements: int
    statements: tuple[BaselineStatement, ...]

    def to_doc(self) -> dict[str, Any]:
        doc = {k: getattr(self, k) for k in self.__dataclass_fields__}
        doc["statements"] = [st.to_doc() for st in self.statements]
        return doc


def _statement(c: _Check, raw: Any, where: str) -> BaselineStatement:
    if not isinstance(raw, dict):
        raise c.bad(where, "must be an object")
    queryid = raw.get("queryid")
    if not isinstance(queryid, str) or not QUERYID.fullmatch(queryid) or not -(2**63) <= int(queryid) < 2**63:
        raise c.bad(f"{where}.queryid", f"expected a 64-bit integer as text, got {_show(queryid)}")
    n = {key: c.number(raw.get(key), f"{where}.{key}") for key in STATEMENT_NUMBERS}
    ids = {key: c.number(raw.get(key), f"{where}.{key}", optional=False) for key in ("userid", "dbid")}
    for key in ("cumulative_calls", "cumulative_total_exec_seconds", "cumulative_rows"):
        if n[key] is None:
            raise c.bad(f"{where}.{key}", "expected a non-negative number, got None")
    if raw.get("mean_source") not in ("window", "cumulative"):
        raise c.bad(f"{where}.mean_source", f"expected 'window' or 'cumulative', got {_show(raw.get('mean_source'))}")
    query, cut = raw.get("query"), raw.get("query_truncated", False)
    # A statement's text is one line (topstatements.clean_text), longer than a name but never a label.
    if query is not None and (not isinstance(query, str) or len(query) > TEXT_MAX or not _printable(query)):
        raise c.bad(f"{where}.query", f"expected one printable line of at most {TEXT_MAX} characters")
    if not isinstance(cut, bool):
        raise c.bad(f"{where}.query_truncated", f"expected true or false, got {_show(cut)}")
    return BaselineStatement(
        queryid=int(queryid),
        userid=int(ids["userid"]),  # type: ignore[arg-type]
        dbid=int(ids["dbid"]),  # type: ignore[arg-type]
        role=c.text(raw.get("role"), f"{where}.role"),
        mean_source=raw["mean_source"],
        query=query,
        query_truncated=cut,
        **n,  # type: ignore[arg-type]
    )


def _snapshot(c: _Check, raw: Any, where: str) -> StatementSnapshot:
    if not isinstance(raw, dict):
        raise c.bad(where, "must be an object")
    entries = raw.get("statements")
    if not isinstance(entries, list) or len(entries) > MAX_TOP_STATEMENTS:
        raise c.bad(f"{where}.statements", f"expected a list of at most {MAX_TOP_STATEMENTS} statements")
    statements = tuple(_statement(c, e, f"{where}.statements[{i}]") for i, e in enumerate(entries))
    if len({st.key for st in statements}) != len(statements):
        raise c.bad(f"{where}.statements", "a statement (queryid, userid, dbid) is listed twice")
    return StatementSnapshot(
        database=c.text(raw.get("database"), f"{where}.database"),
        window_start_at=c.number(raw.get("window_start_at"), f"{where}.window_start_at"),
        captured_at=c.number(raw.get("captured_at"), f"{where}.captured_at", optional=False),  # type: ignore[arg-type]
        stats_reset=c.number(raw.get("stats_reset"), f"{where}.stats_reset"),
        limit=int(c.number(raw.get("limit"), f"{where}.limit", optional=False)),  # type: ignore[arg-type]
        hidden_statements=int(c.number(raw.get("hidden_statements"), f"{where}.hidden_statements") or 0),
        statements=statements,
    )


def _snapshots(c: _Check, raw: Any) -> dict[str, StatementSnapshot] | None:
    """Absent in files written before the snapshot existed: None, which the report says in words."""
    if raw is None:
        return None
    return {name: _snapshot(c, v, f"top_statements.{name}") for name, v in c.items(raw, "top_statements")}


@dataclass(frozen=True)
class Baseline:
    migration_id: str
    captured_at: float
    window_seconds: float
    targets: dict[str, dict[str, Any]]
    probes: dict[str, dict[str, Any]]
    slis: dict[str, float | None]
    missing: tuple[str, ...]
    failures: tuple[str, ...] = ()
    top_statements: dict[str, StatementSnapshot] | None = None

    def doc(self) -> dict[str, Any]:
        """The checked document, every known key present: what `show-baseline` prints."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "migration_id": self.migration_id,
            "captured_at": self.captured_at,
            "window_seconds": self.window_seconds,
            "targets": self.targets,
            "probes": self.probes,
            "slis": self.slis,
            "missing": list(self.missing),
            "failures": list(self.failures),
            "top_statements": (
                None
                if self.top_statements is None
                else {name: snap.to_doc() for name, snap in self.top_statements.items()}
            ),
        }


def read_baseline(path: Path) -> Baseline:
    """Load and check a baseline file; every problem is one BaselineError line naming the file and the field."""
    raw = _parse(path, _read_bytes(path))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BaselineError(f"{path}: not a migexport baseline file (format field missing)")
    version = raw.get("version")
    if version != VERSION or isinstance(version, bool):
        again = " (capture it again with 'migexport baseline')" if version == 1 else ""
        raise BaselineError(f"{path}: baseline version {_show(version)} is not supported (expected {VERSION}){again}")
    for key in ("migration_id", "captured_at", "window_seconds", "targets", "probes"):
        if key not in raw:
            raise BaselineError(f"{path}: field {key!r} is missing")
    c = _Check(path)
    if not isinstance(raw["targets"], dict) or not isinstance(raw["probes"], dict):
        raise BaselineError(f"{path}: targets and probes must be objects")
    return Baseline(
        migration_id=c.text(raw["migration_id"], "migration_id"),
        captured_at=c.number(raw["captured_at"], "captured_at", optional=False),  # type: ignore[arg-type]
        window_seconds=c.number(raw["window_seconds"], "window_seconds", optional=False),  # type: ignore[arg-type]
        targets={name: _target(c, t, f"targets.{name}") for name, t in c.items(raw["targets"], "targets")},
        probes={name: _probe(c, p, f"probes.{name}") for name, p in c.items(raw["probes"], "probes")},
        slis=c.numbers(raw.get("slis"), "slis"),
        missing=tuple(c.lines(raw.get("missing"), "missing")),
        failures=tuple(c.lines(raw.get("failures"), "failures")),
        top_statements=_snapshots(c, raw.get("top_statements")),
    )
