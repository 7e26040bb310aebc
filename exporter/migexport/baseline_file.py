"""The baseline file: a versioned JSON document, written atomically, checked field by field on reading.

Every value a reader will serve is checked here, so a truncated or hand-edited file is one clear line
("baseline.json: targets.primary.tps: expected a non-negative number, got 'fast'"), never a crash.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migexport.state import write_atomic

FORMAT = "migexport-baseline"
VERSION = 1


class BaselineError(ValueError):
    """A baseline file cannot be used; one printable line."""


def write_baseline(path: Path, doc: dict[str, Any], force: bool) -> None:
    if path.exists() and not force:
        raise BaselineError(f"{path} exists; use --force to replace it")
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _number(raw: Any, where: str, optional: bool = True) -> float | None:
    if raw is None and optional:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw) or raw < 0:
        raise BaselineError(f"{where}: expected a non-negative number, got {raw!r}")
    return float(raw)


def _object(raw: Any, where: str) -> list[tuple[str, Any]]:
    """The items of an optional JSON object (absent or null: none)."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise BaselineError(f"{where}: expected an object, got {type(raw).__name__}")
    return list(raw.items())


@dataclass(frozen=True)
class Baseline:
    migration_id: str
    captured_at: float
    window_seconds: float
    targets: dict[str, dict[str, Any]]
    probes: dict[str, dict[str, Any]]
    slis: dict[str, float | None]
    missing: tuple[str, ...]


def read_baseline(path: Path) -> Baseline:
    """Load and check a baseline file; every problem is one line naming the file and the field."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BaselineError(f"{path}: no such baseline file (run 'migexport baseline')") from None
    except OSError as exc:
        raise BaselineError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{path}: not valid JSON (truncated or edited?) at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BaselineError(f"{path}: not a migexport baseline file (format field missing)")
    if raw.get("version") != VERSION:
        raise BaselineError(f"{path}: baseline version {raw.get('version')!r} is not supported (expected {VERSION})")
    for key in ("migration_id", "captured_at", "window_seconds", "targets", "probes"):
        if key not in raw:
            raise BaselineError(f"{path}: field {key!r} is missing")
    where = str(path)
    captured = _number(raw["captured_at"], f"{where}: captured_at", optional=False)
    window = _number(raw["window_seconds"], f"{where}: window_seconds", optional=False)
    if not isinstance(raw["targets"], dict) or not isinstance(raw["probes"], dict):
        raise BaselineError(f"{path}: targets and probes must be objects")
    for name, t in raw["targets"].items():
        if not isinstance(t, dict):
            raise BaselineError(f"{path}: targets.{name} must be an object")
        for key in (
            "tps",
            "error_ratio",
            "statement_latency_seconds",
            "connections",
            "connection_utilisation",
            "database_size_bytes",
        ):
            _number(t.get(key), f"{where}: targets.{name}.{key}")
        for standby, lag in _object(
            t.get("replication_lag_seconds"), f"{where}: targets.{name}.replication_lag_seconds"
        ):
            _object(lag, f"{where}: targets.{name}.replication_lag_seconds.{standby}")
            _number(lag.get("max"), f"{where}: targets.{name}.replication_lag_seconds.{standby}.max")
        for table, rows in _object(t.get("table_rows_estimate"), f"{where}: targets.{name}.table_rows_estimate"):
            _number(rows, f"{where}: targets.{name}.table_rows_estimate.{table}")
    for name, p in raw["probes"].items():
        if not isinstance(p, dict):
            raise BaselineError(f"{path}: probes.{name} must be an object")
        for key in ("p50_seconds", "p95_seconds", "success_ratio"):
            _number(p.get(key), f"{where}: probes.{name}.{key}")
    slis = dict(_object(raw.get("slis"), f"{where}: slis"))
    return Baseline(
        migration_id=str(raw["migration_id"]),
        captured_at=captured,  # type: ignore[arg-type]
        window_seconds=window,  # type: ignore[arg-type]
        targets=raw["targets"],
        probes=raw["probes"],
        slis={k: _number(v, f"{where}: slis.{k}") for k, v in slis.items()},
        missing=tuple(str(m) for m in raw.get("missing", [])),
    )
