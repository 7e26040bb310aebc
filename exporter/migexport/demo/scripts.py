"""The demo's scripted migrations: shell scripts in the temp directory, each run through `migexport run`.

- clean.sh: an instant ALTER TABLE; nothing fires, the success criteria pass.
- stuck.sh: a reader holds demo_orders open, the ALTER TABLE queues behind it and every later query of the
  workload queues behind the ALTER: lock waits, a blocking migration, a failing probe; `run` ends the
  server-side work at its time limit.
- breaking.sh: a migration that "succeeds" but breaks the application (the table is renamed): the workload
  and the probe fail until the script puts the table back 30 s later (also on Ctrl-C).
"""

from __future__ import annotations

import glob
import shlex
import shutil
import sys
from pathlib import Path

from migexport.config import Migration
from migexport.localpg import SUPERUSER, LocalCluster

STUCK_TIME_LIMIT = "40s"
READER_SECONDS = 45  # longer than the time limit: the ALTER TABLE stays queued until `run` ends it
BROKEN_SECONDS = 30


def migexport_command() -> str:
    """How the scripts call this very migexport: the console script next to our Python, else `python -c`."""
    beside = Path(sys.executable).parent / "migexport"
    if beside.exists():
        return shlex.quote(str(beside))
    found = shutil.which("migexport")
    if found:
        return shlex.quote(found)
    return f"{shlex.quote(sys.executable)} -c 'from migexport.cli import main; main()'"


def psql_command() -> str:
    found = shutil.which("psql") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"), reverse=True)), None)
    return shlex.quote(found) if found else "psql"


def write_scripts(work: Path, primary: LocalCluster, migration: Migration) -> dict[str, Path]:
    """Write clean.sh, stuck.sh and breaking.sh into `work`; returns their paths by name."""
    psql = psql_command() + " -X -q -v ON_ERROR_STOP=1"
    run = (
        f"{migexport_command()} run --state-file {shlex.quote(migration.state_file)} "
        f"--log-file {shlex.quote(migration.log_file)} --watch-window {migration.watch_window_seconds:g}s"
    )
    header = (
        "#!/bin/sh\n"
        "# Written by `migexport demo`: {what}\n"
        "set -eu\n"
        f"export PGHOST=127.0.0.1 PGPORT={primary.port} PGUSER={SUPERUSER} PGDATABASE=postgres\n"
    )
    bodies = {
        "clean": (
            "a clean migration: an instant ALTER TABLE, watched by migexport.",
            f"PGAPPNAME={migration.session_application_name} exec {run} --id demo-clean --time-limit 60s -- \\\n"
            f'  {psql} -c "ALTER TABLE demo_orders ADD COLUMN IF NOT EXISTS note text"\n',
        ),
        "stuck": (
            "a migration stuck behind a reader, blocking the application.",
            f"# A report that keeps its transaction (and its lock on demo_orders) open for {READER_SECONDS} s.\n"
            f"PGAPPNAME=demo-reader {psql} -c 'BEGIN' -c 'SELECT count(*) FROM demo_orders' "
            f"-c 'SELECT pg_sleep({READER_SECONDS})' -c 'COMMIT' >/dev/null 2>&1 &\n"
            "sleep 1\n"
            "echo 'a reader holds demo_orders; the ALTER TABLE queues behind it and the workload behind the ALTER'\n"
            "# `run` ends the ALTER TABLE on the server at its time limit (exit 124): it is never applied.\n"
            f"PGAPPNAME={migration.session_application_name} exec {run} --id demo-stuck "
            f"--time-limit {STUCK_TIME_LIMIT} -- \\\n"
            f'  {psql} -c "ALTER TABLE demo_orders ADD COLUMN IF NOT EXISTS shipped_at timestamptz"\n',
        ),
        "breaking": (
            "a migration that succeeds but breaks the application, rolled back after a while.",
            "rollback() {\n"
            f'  PGAPPNAME=demo-rollback {psql} -c "ALTER TABLE IF EXISTS demo_orders_old RENAME TO demo_orders"\n'
            "}\n"
            "trap 'rollback; exit 130' INT TERM HUP\n"
            f"PGAPPNAME={migration.session_application_name} {run} --id demo-breaking --time-limit 60s -- \\\n"
            f'  {psql} -c "ALTER TABLE demo_orders RENAME TO demo_orders_old"\n'
            f"echo 'the application is broken (demo_orders is gone); rolling back in {BROKEN_SECONDS} s'\n"
            f"sleep {BROKEN_SECONDS} & wait $!  # a signal ends the wait (and rolls back) at once\n"
            "rollback\n"
            "echo 'rolled back: demo_orders is back'\n",
        ),
    }
    paths: dict[str, Path] = {}
    for name, (what, body) in bodies.items():
        path = work / f"{name}.sh"
        path.write_text(header.format(what=what) + body)
        path.chmod(0o755)
        paths[name] = path
    return paths
