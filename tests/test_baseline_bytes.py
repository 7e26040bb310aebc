"""Whatever bytes are in a baseline file, `serve` and `show-baseline` give one line, never a traceback.

Each case replaces a good file that a real exporter is serving: the scrape still answers, the baseline
reads `migexport_baseline_loaded 0` with nothing else (the previous file's values are not served as
current), one warning names the file, and `show-baseline` exits 2 with one line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_baseline_gauges import baseline_series, make_doc

from conftest import monitor_dsn, scrape, value
from migexport.baseline_file import MAX_BASELINE_BYTES, write_baseline
from migexport.config import Migration
from migexport.dsn import Target
from test_cli import run_cli


def doc_text(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A valid document with one change, written as JSON."""

    def write(path: Path) -> None:
        doc = make_doc()
        change(doc)
        path.write_text(json.dumps(doc))

    return write


def raw_text(replace: str, by: str) -> Callable[[Path], None]:
    """A valid document's text with a literal replaced: for what json.dumps would never write."""

    def write(path: Path) -> None:
        text = json.dumps(make_doc())
        assert replace in text
        path.write_bytes(text.replace(replace, by, 1).encode("utf-8", "surrogatepass"))

    return write


def data(payload: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(payload)


def fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)  # opening it for reading would block every scrape


def set_in(*keys: str, to: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        node = doc
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = to

    return change


CASES: dict[str, Callable[[Path], None]] = {
    "binary-garbage": data(bytes(range(256)) * 8),
    "not-utf8": data(json.dumps(make_doc()).replace('"m1"', '"m\u00e9"').encode("latin-1")),
    "empty": data(b""),
    "1e400-is-inf": raw_text('"tps": 123.5', '"tps": 1e400'),
    "nan": raw_text('"error_ratio": 0.00135', '"error_ratio": NaN'),
    "infinity": raw_text('"window_seconds": 300.0', '"window_seconds": Infinity'),
    "negative": raw_text('"tps": 123.5', '"tps": -1'),
    "deep-nesting": raw_text('"slis": {', '"slis": {"x": ' + "[" * 200_000 + "]" * 200_000 + ", "),
    "huge-int": raw_text('"tps": 123.5', '"tps": ' + "9" * 400),
    "huge-int-beyond-int-max-digits": raw_text('"tps": 123.5', '"tps": ' + "9" * 5000),
    "lone-surrogate-name": raw_text('"recent_orders"', '"\\udc80"'),
    "control-char-id": raw_text('"migration_id": "m1"', '"migration_id": "m1\\u0000"'),
    "version-1": doc_text(set_in("version", to=1)),
    "id-not-text": doc_text(set_in("migration_id", to=5)),
    "probes-list": doc_text(set_in("probes", to=[])),
    "target-string": doc_text(set_in("targets", "primary", to="fast")),
    "probe-target-number": doc_text(set_in("probes", "recent_orders", "target", to=3)),
    "in-recovery-string": doc_text(set_in("targets", "primary", "in_recovery", to="yes")),
    "lag-number": doc_text(set_in("targets", "primary", "replication_lag_seconds", to={"replica1": 5})),
    "buckets-decreasing": doc_text(
        set_in("probes", "recent_orders", "latency_buckets", "cumulative_counts", to=[5, 3, 9, 9])
    ),
    "buckets-short": doc_text(set_in("probes", "recent_orders", "latency_buckets", "cumulative_counts", to=[1])),
    "missing-not-list": doc_text(set_in("missing", to="everything")),
    "too-large": data(b" " * (MAX_BASELINE_BYTES + 1)),
    "fifo": fifo,
    "directory": lambda path: (path.unlink(), path.mkdir()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_any_bytes_give_one_line_and_loaded_0(pg, tmp_path, start_exporter, caplog, case):
    caplog.set_level(logging.INFO, logger="migexport")
    path = tmp_path / "baseline.json"
    write_baseline(path, make_doc(), force=False)
    exporter = start_exporter(
        Target("primary", monitor_dsn(pg.primary)),
        migration=Migration(id="m1"),
        state_path=tmp_path / "state.json",
        baseline_path=path,
    )
    assert value(scrape(exporter.url), "migexport_baseline_tps", target="primary", migration_id="m1") == 123.5

    CASES[case](path)
    for _ in range(3):
        m = scrape(exporter.url)  # HTTP 200, or this raises
        assert value(m, "migexport_up", target="primary") == 1
        assert baseline_series(m) == {
            ("migexport_baseline_loaded", frozenset({("migration_id", "m1")})): 0.0,
            ("migexport_baseline_stale", frozenset({("migration_id", "m1")})): 0.0,
        }
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and str(path) in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert len(warnings[0].getMessage()) < 400 and "\n" not in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"

    shown = run_cli("show-baseline", str(path))
    assert shown.returncode == 2, shown.stderr
    lines = shown.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], shown.stderr
    assert "Traceback" not in shown.stderr and "internal error" not in shown.stderr


def test_a_version_1_file_says_to_capture_again(tmp_path):
    path = tmp_path / "baseline.json"
    doc = make_doc()
    doc["version"] = 1
    path.write_text(json.dumps(doc))
    shown = run_cli("show-baseline", str(path))
    assert shown.returncode == 2
    assert "capture it again with 'migexport baseline'" in shown.stderr
