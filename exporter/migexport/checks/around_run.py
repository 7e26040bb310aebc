"""What `migexport run` does around the command, built from the config: the fast preflight (go / no-go),
the snapshot of the affected tables, the verification after a command that succeeded, and with
`--report` the migration report once the watch window has closed.

Each step records its result where the standalone commands do (the checks file that `serve` exports,
the snapshot file that `verify` reads), under the id `run` was given, so `migexport preflight`,
`snapshot` and `verify` run by hand and `run` leave the same traces.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from migexport.checks.preflight import run_preflight
from migexport.checks.result import Report
from migexport.checks.result import write_report as write_checks
from migexport.checks.snapshot import read_snapshot, take_snapshot, write_snapshot
from migexport.checks.verify import run_verify
from migexport.config import Config
from migexport.report.render import FORMATS, default_output, write_report
from migexport.run import Around


def around_run(
    config: Config,
    migration_id: str,
    *,
    skip_preflight: bool,
    no_verify: bool,
    report: bool = False,
    prometheus_url: str | None = None,
    log_path: Path | None = None,
    state_path: Path | None = None,
) -> Around:
    """The steps for `run`; a skipped step is None. `log_path`/`state_path`: where this run really writes
    (its --log-file/--state-file), so the report finds the migration and lands next to its log."""
    m = config.migration
    config = dataclasses.replace(
        config,
        migration=dataclasses.replace(
            m,
            id=migration_id,
            log_file=str(log_path.absolute()) if log_path else m.log_file,
            state_file=str(state_path.absolute()) if state_path else m.state_file,
        ),
    )
    checks_file = config.resolve(config.migration.checks_file)

    def preflight() -> Report:
        # The fast checks: no backup command and no lint, which may take long; `preflight` does them.
        report = run_preflight(config, fast=True)
        write_checks(checks_file, report)
        return report

    def snapshot() -> str:
        doc = take_snapshot(config)
        # This run's snapshot replaces whatever was there: verify must compare with this migration's start.
        path = write_snapshot(config, doc, force=True)
        tables = ", ".join(sorted(doc.get("tables", {}))) or "no affected tables"
        return f"{tables} recorded in {path}"

    def verify() -> Report:
        report = run_verify(config, read_snapshot(config))
        write_checks(checks_file, report)
        unread = [c.value for c in report.checks if c.check == "schema_read"]
        if unread:  # the migration target could not be read: nothing was verified
            raise RuntimeError(f"the migration target could not be read: {unread[0]}")
        return report

    def write_reports(started_at: float) -> list[Path]:
        # Named by the run's start: a later run of the same id does not replace this record.
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at))
        paths = []
        for fmt in FORMATS:
            default = default_output(config, migration_id, fmt)
            output = default.with_name(f"{default.stem}-{stamp}{default.suffix}")
            paths.append(write_report(config, migration_id, output, fmt, prometheus_url, force=True))
        return paths

    return Around(
        preflight=None if skip_preflight else preflight,
        snapshot=None if no_verify else snapshot,
        verify=None if no_verify else verify,
        report=write_reports if report else None,
    )
