"""The `migexport` command as a user runs it: real processes, real HTTP, bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import monitor_dsn, scrape, value
from migexport.localpg import free_port

SECRET = "s3cr3t-Pa55"


def migexport_argv() -> list[str]:
    exe = shutil.which("migexport")
    return [exe] if exe else [sys.executable, "-c", "from migexport.cli import main; main()"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*migexport_argv(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {}, "no target"),
        (("--target", "nodsn"), {}, "expected NAME=DSN"),
        (("--target", "1bad=host=x"), {}, "target name '1bad'"),
        (("--target", "p=env:MIGEXPORT_TEST_UNSET"), {}, "MIGEXPORT_TEST_UNSET is not set"),
        (("--target", "p=file:/nonexistent/dsn"), {}, "cannot read DSN file /nonexistent/dsn"),
        (("--target", f"p=host=x password='{SECRET}"), {}, "invalid DSN"),
        (("--target", f"p=host=x password={SECRET} junk"), {}, "invalid DSN"),
        (("--target", "a=host=x", "--target", "a=host=y"), {}, "'a' is given twice"),
        (("--target", "a=host=x", "--listen", "nowhere"), {}, "listen address 'nowhere'"),
        (("--target", "a=host=x", "--scrape-timeout", "soon"), {}, "--scrape-timeout"),
        (("--target", "a=host=x", "--lock-timeout", "0s"), {}, "--lock-timeout: must be greater than"),
        (("--bogus",), {}, "No such option"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(args, env, expected):
    proc = run_cli("serve", *args, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


def test_listen_port_in_use_is_one_line():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--target", "a=host=127.0.0.1", "--listen", f"127.0.0.1:{port}")
    assert proc.returncode == 2
    assert re.fullmatch(r"migexport: error: --listen 127\.0\.0\.1:\d+: cannot listen: .+", proc.stderr.strip())


class Serve:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*migexport_argv(), "serve", "--listen", f"127.0.0.1:{self.port}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(self.url + "/", timeout=2).read()
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"serve did not start: {self.stop()}") from None
                time.sleep(0.1)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        _, err = self.proc.communicate(timeout=20)
        return err


def test_serve_with_dsn_from_env_and_file_labels_every_target(pg, tmp_path: Path):
    dsn_file = tmp_path / "replica.dsn"
    dsn_file.write_text(monitor_dsn(pg.replicas[0]) + f" password={SECRET}\n")
    server = Serve(
        "--target",
        "primary=env:MIGEXPORT_TEST_PRIMARY_DSN",
        "--target",
        f"replica1=file:{dsn_file}",
        env={"MIGEXPORT_TEST_PRIMARY_DSN": monitor_dsn(pg.primary) + f" password={SECRET}"},
    )
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        metrics = scrape(server.url)
        assert value(metrics, "migexport_up", target="primary") == 1
        assert value(metrics, "migexport_up", target="replica1") == 1
        assert value(metrics, "migexport_in_recovery", target="replica1") == 1
        assert value(metrics, "migexport_build_info", version="0.1.0") == 1
        assert SECRET not in text
        landing = urllib.request.urlopen(server.url + "/", timeout=5).read().decode()
        assert 'href="/metrics"' in landing
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(server.url + "/nope", timeout=5)
        assert not_found.value.code == 404
    finally:
        stderr = server.stop()
    assert server.proc.returncode == 0, stderr  # SIGTERM is a clean shutdown
    assert SECRET not in stderr


def test_unreachable_database_is_logged_once_without_the_password():
    port = free_port()  # nothing listens there
    server = Serve("--target", f"db=postgresql://app:{SECRET}@127.0.0.1:{port}/app")
    try:
        for _ in range(3):
            assert value(scrape(server.url), "migexport_up", target="db") == 0
        assert server.proc.poll() is None, "the exporter must stay up"
    finally:
        stderr = server.stop()
    assert SECRET not in stderr
    down_lines = [line for line in stderr.splitlines() if "target db: down" in line]
    assert len(down_lines) == 1, stderr  # logged on the change, not on every scrape
    assert "Traceback" not in stderr
