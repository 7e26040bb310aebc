"""A marker password in every DSN form, through every command and every error path: it never appears
in stdout, stderr, the run log, a file written, /metrics or / of a running serve (issue 12, item 1).

Forms: URI user:password@ and ?password= (valid, and with an invalid % escape libpq quotes back),
keyword DSNs (plain, quoted with a space, split by a stray space, an unterminated quote). Sources:
--target NAME=DSN, env:, file:, MIGEXPORT_TARGETS (bare and quoted), the config's dsn, dsn_env,
dsn_file, migration.control_dsn, verify.dsn, run --control-dsn, and the migration's own command line.
No database listens on the port: every command reaches its connection error path as well.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from migexport.cli import main
from migexport.localpg import free_port

MARKER = "Zq9MARKER"
LEAK = "MARKER"  # any piece of it: libpq quotes tokens, and a bad escape splits the password
PORT = free_port()  # nothing listens there

FORMS = {
    "uri": f"postgresql://app:{MARKER}@127.0.0.1:{PORT}/app",
    "uri_bad_escape": f"postgresql://app:{MARKER}%zz@127.0.0.1:{PORT}/app",
    "query": f"postgresql://app@127.0.0.1:{PORT}/app?password={MARKER}",
    "query_bad_escape": f"postgresql://app@127.0.0.1:{PORT}/app?password={MARKER}%zz",
    "keyword": f"host=127.0.0.1 port={PORT} user=app password={MARKER}",
    "keyword_quoted": f"host=127.0.0.1 port={PORT} user=app password='{MARKER} x'",
    "keyword_split": f"host=127.0.0.1 port={PORT} password={MARKER} junk{MARKER}",
    "keyword_unterminated": f"host=127.0.0.1 port={PORT} password='{MARKER}",
}
VALID = {"uri", "query", "keyword", "keyword_quoted"}
# serve is started as a process (and scraped) for these; the rest of serve's cases end before serving.
SERVED_SOURCES = {"target", "MIGEXPORT_TARGETS"}
PLAIN = f"host=127.0.0.1 port={PORT} user=app"


def _argv() -> list[str]:
    # In-tree, not an installed entry point: the same code whichever migexport is on PATH.
    return [sys.executable, "-c", "from migexport.cli import main; main()"]


def _yaml(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass
class Case:
    name: str
    args: list[str]
    config: str | None = None  # migexport.yml in the case's directory
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # inputs that hold the marker by design
    serve: bool = False


def _config(targets: str, extra: str = "") -> str:
    return (
        f"targets:\n{targets}"
        "migration: {id: m1, affected_tables: [orders]}\n"
        f"slis: {{prometheus_url: 'http://127.0.0.1:{PORT}'}}\n"
        f"{extra}"
    )


CONFIG_COMMANDS = {
    "rules": ["rules", "-c", "migexport.yml", "-o", "rules.yml"],
    "dashboards": ["dashboards", "-c", "migexport.yml", "-o", "dash"],
    "baseline": ["baseline", "-c", "migexport.yml", "--duration", "1s", "--exporter-url", "none"],
    "preflight": ["preflight", "-c", "migexport.yml", "--fast"],
    "verify": ["verify", "-c", "migexport.yml"],
    "snapshot": ["snapshot", "-c", "migexport.yml"],
    "report": ["report", "-c", "migexport.yml", "--id", "m1"],
    "run": ["run", "-c", "migexport.yml", "--", "true"],
}


def _cases() -> list[Case]:
    cases: list[Case] = []
    for form, dsn in FORMS.items():
        sources = {
            "dsn": (f"  p: {{dsn: {_yaml(dsn)}}}\n", {}, {}),
            "dsn_env": ("  p: {dsn_env: SECRET_DSN}\n", {"SECRET_DSN": dsn}, {}),
            "dsn_file": ("  p: {dsn_file: p.dsn}\n", {}, {"p.dsn": dsn}),
        }
        for source, (targets, env, files) in sources.items():
            commands = CONFIG_COMMANDS if source == "dsn" else {k: CONFIG_COMMANDS[k] for k in ("rules", "run")}
            for command, args in commands.items():
                cases.append(Case(f"{command}-{source}-{form}", args, _config(targets), env, files))
        plain = f"  p: {{dsn: {_yaml(PLAIN)}}}\n"
        cases.append(
            Case(
                f"run-control_dsn-{form}",
                CONFIG_COMMANDS["run"],
                _config(plain, f"migration: {{id: m1, control_dsn: {_yaml(dsn)}}}\n").replace(
                    "migration: {id: m1, affected_tables: [orders]}\n", ""
                ),
            )
        )
        cases.append(
            Case(
                f"verify-verify_dsn-{form}",
                CONFIG_COMMANDS["verify"],
                _config(plain, f"verify: {{dsn: {_yaml(dsn)}}}\n"),
            )
        )
        cases.append(Case(f"run--control-dsn-{form}", ["run", "--control-dsn", dsn, "--", "true"]))
        cases.append(
            Case(
                f"run--control-dsn-env-{form}",
                ["run", "--control-dsn", "env:SECRET_DSN", "--", "true"],
                env={"SECRET_DSN": dsn},
            )
        )

        def serve(source: str, form: str = form) -> bool:
            return form in VALID and (source in SERVED_SOURCES or form == "keyword")

        # A valid DSN keeps serve running: such a case runs as a process, and only for some sources.
        cases += [
            c
            for c in [
                Case(f"serve-target-{form}", ["serve", "-t", f"p={dsn}"], serve=serve("target")),
                Case(
                    f"serve-env-{form}",
                    ["serve", "-t", "p=env:SECRET_DSN"],
                    env={"SECRET_DSN": dsn},
                    serve=serve("env"),
                ),
                Case(f"serve-file-{form}", ["serve", "-t", "p=file:p.dsn"], files={"p.dsn": dsn}, serve=serve("file")),
                Case(
                    f"serve-MIGEXPORT_TARGETS-{form}",
                    ["serve"],
                    env={"MIGEXPORT_TARGETS": f"p={dsn}"},
                    serve=serve("MIGEXPORT_TARGETS"),
                ),
                Case(
                    f"serve-MIGEXPORT_TARGETS-quoted-{form}",
                    ["serve"],
                    env={"MIGEXPORT_TARGETS": f'q={PLAIN} p="{dsn}"'},
                    serve=serve("quoted"),
                ),
                Case(
                    f"serve-config-{form}",
                    ["serve", "-c", "migexport.yml"],
                    _config(f"  p: {{dsn: {_yaml(dsn)}}}\n"),
                    serve=serve("config"),
                ),
            ]
            if c.serve or form not in VALID
        ]
    # The migration's own command line, as the run log records it.
    cases.append(
        Case(
            "run-command-line",
            [
                "run",
                "--",
                "true",
                f"postgresql://app:{MARKER}@127.0.0.1:{PORT}/app",
                f"host=x password={MARKER}",
                f"host=x password='{MARKER} x'",
                f"PGPASSWORD={MARKER}",
                f"--password={MARKER}",
                "--password",
                MARKER,
            ],
        )
    )
    # A keyword DSN in MIGEXPORT_TARGETS split at its spaces where no target name can be.
    cases.append(
        Case("serve-MIGEXPORT_TARGETS-stray-password", ["serve"], env={"MIGEXPORT_TARGETS": f"password={MARKER}"})
    )
    cases.append(Case("serve-MIGEXPORT_TARGETS-bare-word", ["serve"], env={"MIGEXPORT_TARGETS": f"p=host=x {MARKER}"}))
    return cases


def _serve(case: Case, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Until it exits (bad input) or answers / and /metrics; then SIGTERM."""
    port = free_port()
    proc = subprocess.Popen(
        [*_argv(), *case.args, "--listen", f"127.0.0.1:{port}", "--scrape-timeout", "2s"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pages = ""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                for path in ("/", "/metrics", "/metrics"):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
                        pages += resp.read().decode()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.terminate()
        out, err = proc.communicate(timeout=20)
    return proc.returncode, out + pages, err


def _in_process(case: Case, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """migexport.cli.main as the entry point runs it, its output captured (one case at a time)."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    logging.root.handlers.clear()  # each command's logging.basicConfig binds this case's stderr
    os.chdir(cwd)
    try:
        with (
            mock.patch.dict(os.environ, env, clear=True),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                main(case.args)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        os.chdir(previous)
        logging.root.handlers.clear()
    return code, out.getvalue(), err.getvalue()


def _run(case: Case, base: Path) -> tuple[Case, int, str, str, dict[str, str]]:
    cwd = base / case.name
    cwd.mkdir()
    inputs = set(case.files)
    for name, text in case.files.items():
        (cwd / name).write_text(text)
    if case.config is not None:
        (cwd / "migexport.yml").write_text(case.config)
        inputs.add("migexport.yml")
    env = {**os.environ, **case.env}
    env.pop("MIGEXPORT_DEBUG", None)
    if "MIGEXPORT_TARGETS" not in case.env:
        env.pop("MIGEXPORT_TARGETS", None)
    if case.serve:
        code, out, err = _serve(case, cwd, env)
    else:
        code, out, err = _in_process(case, cwd, env)
    written = {
        str(p.relative_to(cwd)): p.read_bytes().decode("utf-8", "replace")
        for p in cwd.rglob("*")
        if p.is_file() and str(p.relative_to(cwd)) not in inputs
    }
    return case, code, out, err, written


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Case, int, str, str, dict[str, str]]]:
    base = tmp_path_factory.mktemp("secrets")
    cases = _cases()
    with ThreadPoolExecutor(max_workers=4) as pool:  # the served ones as processes, meanwhile the rest here
        served = pool.map(lambda c: _run(c, base), [c for c in cases if c.serve])
        results = [_run(c, base) for c in cases if not c.serve]
        results += list(served)
    return {r[0].name: r for r in results}


@pytest.mark.parametrize("name", [c.name for c in _cases()])
def test_marker_password_never_printed_logged_or_written(outcomes, name: str):
    case, code, out, err, written = outcomes[name]
    where = f"{name} (exit {code})\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert LEAK not in out, where
    assert LEAK not in err, where
    for path, text in written.items():
        assert LEAK not in text, f"{where}\n{path} holds the password"
    assert "Traceback" not in err and "internal error" not in err, where
    if case.serve:
        assert code == 0 and "migexport_up" in out, where  # it served; SIGTERM: a clean stop
    else:
        assert code in (0, 1, 2, 3, 126, 127), where


@pytest.mark.parametrize("form", sorted(set(FORMS) - VALID))
def test_invalid_dsn_is_one_line_naming_the_target(outcomes, form: str):
    _, code, _, err, _ = outcomes[f"serve-target-{form}"]
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert err.startswith("migexport: error: target 'p': invalid DSN: "), err


def test_keyword_dsn_in_migexport_targets_keeps_its_spaces(outcomes):
    # p=host=... password=... unquoted is one target (it used to be split into 'p' and 'password').
    _, code, out, err, _ = outcomes["serve-MIGEXPORT_TARGETS-keyword"]
    assert code == 0, err
    assert 'migexport_up{target="p"} 0.0' in out
    assert 'target="password"' not in out


def test_run_log_records_the_command_line_redacted(outcomes):
    _, _, _, _, written = outcomes["run-command-line"]
    log = written["migration.log"]
    assert "true 'postgresql://app:***@127.0.0.1:" in log, log
    assert "PGPASSWORD=***" in log and "--password=***" in log and "--password '***'" in log, log
