"""Property-based tests (issue 12, item 4): arbitrary bytes and arbitrary YAML/JSON thrown at the config,
baseline, state, checks and snapshot readers and at the CLI. Every outcome is a value or the reader's
own one-line error; the CLI exits 0 or 2 with `migexport: error: ...` lines, never a traceback or an
`internal error`.

Bounded and reproducible: derandomized (the same examples in CI as here), no example database, no
deadline (the machine may be busy), a few hundred examples per property.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import migexport.cli as cli_module
from migexport.baseline import summary_rows
from migexport.baseline_file import BaselineError, read_baseline
from migexport.checks.result import ChecksFileError, read_checks
from migexport.checks.snapshot import SnapshotError, read_snapshot
from migexport.cli import main
from migexport.config import TOP_KEYS, ConfigError, load_config, parse_config
from migexport.state import StateError, read_state

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
WORK = Path(tempfile.mkdtemp(prefix="migexport-fuzz-"))

# -- strategies -------------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["1h", "0.4ms", "99999999h", ".nan", "-1s", "host=x", "env:X", "file:/nonexistent", "1e400"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.text(max_size=12), children, max_size=5),
    ),
    max_leaves=25,
)
DURATION_KEYS = ["scrape_timeout", "statement_timeout", "lock_timeout"]
THRESHOLD_KEYS = ["alert_for", "lock_wait", "rate_window", "connections_floor", "latency_degradation_ratio"]
config_shaped = st.fixed_dictionaries(
    {"targets": st.one_of(values, st.just({"p": {"dsn": "host=127.0.0.1 port=1"}}))},
    optional={
        **{key: values for key in TOP_KEYS if key != "targets"},
        **{key: st.one_of(scalars, st.sampled_from(["1ms", "0.1ms", "2562047h", "2562048h"])) for key in DURATION_KEYS},
        "thresholds": st.dictionaries(st.sampled_from(THRESHOLD_KEYS), scalars, max_size=4),
        "migration": st.dictionaries(
            st.sampled_from(["id", "state_file", "log_file", "time_budget", "watch_window", "lock_timeout"]),
            st.one_of(scalars, st.sampled_from(["migexport.yml", "baseline.json", "s.json"])),
            max_size=4,
        ),
    },
)
yaml_texts = st.one_of(
    values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    config_shaped.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`,? \n\t0.9e+")), max_size=200),
).map(str.encode)
raw_bytes = st.binary(max_size=400)


def _json_default(value: Any) -> Any:
    return str(value)


def _json(value: Any) -> bytes:
    # Python's json writes NaN/Infinity and any integer: exactly what a reader must refuse.
    return json.dumps(value, default=_json_default).encode()


def _doc(fmt: str) -> st.SearchStrategy[bytes]:
    shaped = st.dictionaries(st.text(max_size=15), values, max_size=6).map(lambda d: {"format": fmt, "version": 1, **d})
    return st.one_of(raw_bytes, values.map(_json), shaped.map(_json))


def _file(name: str, data: bytes) -> Path:
    path = WORK / name
    path.write_bytes(data)
    return path


def _one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


# -- the readers ------------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(raw_bytes, yaml_texts))
def test_config_reader_answers_any_bytes(data: bytes):
    path = _file("migexport.yml", data)
    try:
        config = load_config(path, environ={})
    except ConfigError as exc:
        for problem in exc.problems:
            _one_line(problem)
        return
    for seconds in (config.scrape_timeout_seconds, config.lock_timeout_seconds, config.statement_timeout_seconds):
        assert math.isfinite(seconds) and seconds >= 0.001


@FUZZ
@given(config_shaped)
def test_config_validation_answers_any_structure(data: dict[str, Any]):
    try:
        parse_config(data, WORK / "migexport.yml", environ={})
    except ConfigError as exc:
        for problem in exc.problems:
            _one_line(problem)


@FUZZ
@given(_doc("migexport-baseline"))
def test_baseline_reader_answers_any_bytes(data: bytes):
    path = _file("baseline.json", data)
    try:
        rows = summary_rows(read_baseline(path).doc())
    except BaselineError as exc:
        _one_line(str(exc))
        return
    assert all(isinstance(key, str) for key, _ in rows)


@FUZZ
@given(_doc("migexport-state"))
def test_state_reader_answers_any_bytes(data: bytes):
    path = _file("state.json", data)
    try:
        read_state(path)
    except StateError as exc:
        _one_line(str(exc))


@FUZZ
@given(_doc("migexport-checks"))
def test_checks_reader_answers_any_bytes(data: bytes):
    try:
        read_checks(_file("checks.json", data))
    except ChecksFileError as exc:
        _one_line(str(exc))


@FUZZ
@given(_doc("migexport-snapshot"))
def test_snapshot_reader_answers_any_bytes(data: bytes):
    _file("snapshot.json", data)
    config = parse_config(
        {"targets": {"p": "host=127.0.0.1 port=1"}, "migration": {"snapshot_file": "snapshot.json"}},
        WORK / "migexport.yml",
        environ={},
    )
    try:
        read_snapshot(config)
    except SnapshotError as exc:
        _one_line(str(exc))


# -- the CLI, in process -------------------------------------------------------------------------------
class _NoServer:
    """serve's parsing runs in full; the server itself never starts (the port 'is taken')."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    def start(self) -> _NoServer:
        raise OSError(98, "Address already in use (fuzz)")


def _stop(*args: Any, **kw: Any) -> Any:
    raise cli_module.UserError("fuzz: stopped where the database would be reached")


def _no_run(command: list[str], **kw: Any) -> int:
    return 0  # run's options are all parsed and checked before the command would start


option_values = st.one_of(
    st.text(max_size=25),
    st.sampled_from(["0", "0.4ms", "1ms", "5s", "99999999h", "nan", "inf", "-1s", "1e400", "2562048h", ":0"]),
)
FILE_ARGS = {"CONFIG": "fuzz.yml", "BASELINE": "fuzz-baseline.json"}
argvs = st.one_of(
    st.tuples(
        st.sampled_from(["serve"]),
        st.lists(
            st.tuples(
                st.sampled_from(
                    ["--scrape-timeout", "--statement-timeout", "--lock-timeout", "--listen", "-t", "--baseline"]
                ),
                option_values,
            ),
            max_size=4,
        ),
    ).map(lambda t: [t[0], "-t", "p=host=127.0.0.1 port=1", *[x for pair in t[1] for x in pair]]),
    st.tuples(
        st.sampled_from(["run"]),
        st.lists(
            st.tuples(st.sampled_from(["--time-limit", "--watch-window", "--id", "--control-dsn"]), option_values),
            max_size=3,
        ),
    ).map(
        lambda t: (
            [t[0], "--state-file", "fuzz-state.json", "--log-file", "fuzz.log"]
            + [x for p in t[1] for x in p]
            + ["--", "true"]
        )
    ),
    st.tuples(
        st.sampled_from(
            ["rules", "dashboards", "baseline", "preflight", "verify", "snapshot", "report", "run", "serve"]
        ),
        st.just("-c"),
        st.just("CONFIG"),
    ).map(list),
    st.tuples(st.just("show-baseline"), st.just("BASELINE")).map(list),
    st.lists(st.text(max_size=15), max_size=4),
)


@FUZZ
@given(argv=argvs, config=st.one_of(raw_bytes, yaml_texts), baseline=_doc("migexport-baseline"))
def test_cli_answers_exit_0_or_2_with_error_lines(monkeypatch: pytest.MonkeyPatch, argv, config, baseline):
    monkeypatch.setattr(cli_module, "Exporter", _NoServer)
    # The commands import these when they run (serve keeps only what it uses in memory): patched where
    # they live.
    monkeypatch.setattr("migexport.run.run_migration", _no_run)
    # Past its input checks a command would reach the database or Prometheus: stop there, as a user error.
    for where, name in [
        ("migexport.baseline", "capture"),
        ("migexport.checks.preflight", "run_preflight"),
        ("migexport.checks.verify", "run_verify"),
        ("migexport.checks.snapshot", "take_snapshot"),
        ("migexport.report.render", "write_report"),
    ]:
        monkeypatch.setattr(f"{where}.{name}", _stop)
    monkeypatch.chdir(WORK)
    monkeypatch.delenv("MIGEXPORT_TARGETS", raising=False)
    monkeypatch.delenv("MIGEXPORT_DEBUG", raising=False)
    (WORK / "fuzz.yml").write_bytes(config)
    (WORK / "fuzz-baseline.json").write_bytes(baseline)
    for leftover in ("fuzz-state.json", "fuzz.log", "migexport.yml"):
        (WORK / leftover).unlink(missing_ok=True)
    args = [FILE_ARGS.get(a, a) for a in argv]
    if args and args[0] in ("demo", "init"):  # demo starts servers; init is covered with files above
        return
    out, err = io.StringIO(), io.StringIO()
    logging.root.handlers.clear()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    logging.root.handlers.clear()
    stderr = err.getvalue()
    assert "Traceback" not in stderr and "internal error" not in stderr, (args, stderr)
    assert code in (0, 2), (args, code, stderr)
    if code == 2:
        lines = stderr.strip().splitlines()
        assert lines, args
        assert all(line.startswith("migexport: error: ") for line in lines), (args, stderr)
