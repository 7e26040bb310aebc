"""`migexport demo`: the newcomer's first command starts, serves both clusters, and cleans up."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from conftest import scrape, value, wait_for
from test_cli import migexport_argv


def test_demo_serves_a_primary_and_replica_with_workload_then_removes_them():
    # Only this demo's directory: another demo (or one killed earlier) may have left its own in /tmp.
    before = set(Path("/tmp").glob("migexport-demo-*"))
    proc = subprocess.Popen(
        [*migexport_argv(), "demo", "--listen", "127.0.0.1:0", "--duration", "60s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if match := re.match(r"metrics:\s+(http://\S+)/metrics", line):
                url = match.group(1)
        assert url, f"no metrics URL printed: {lines} {proc.stderr.read() if proc.poll() else ''}"
        port = re.search(r"primary:.*port=(\d+)", "".join(lines)).group(1)
        datadirs = list(set(Path("/tmp").glob("migexport-demo-*")) - before)

        first = scrape(url)
        assert value(first, "migexport_up", target="primary") == 1
        assert value(first, "migexport_up", target="replica1") == 1
        assert value(first, "migexport_replication_standbys", target="primary") == 1
        commits = value(first, "migexport_xact_commit_total", target="primary")
        wait_for(
            lambda: value(scrape(url), "migexport_xact_commit_total", target="primary") > commits + 20,
            what="the demo workload to commit transactions",
        )
        proc.terminate()  # what Ctrl-C / SIGTERM does
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped" in proc.stdout.read()
    assert datadirs and not any(d.exists() for d in datadirs), "the demo's temp directory must be removed"
    probe = subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", port], capture_output=True, check=False)
    assert probe.returncode != 0, "the demo's primary must be stopped"
