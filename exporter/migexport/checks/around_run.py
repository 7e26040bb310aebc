"""What `migexport run` does around the command, built from the config: the fast preflight (go / no-go),
the snapshot of the affected tables, and the verification after a command that succeeded.

Each step records its result where the standalone commands do (the checks file that `serve` exports,
the snapshot file that `verify` reads), under the id `run` was given, so `migexport preflight`,
`snapshot` and `verify` run by hand and `run` leave the same traces.
"""

from __future__ import annotations

import dataclasses

from migexport.checks.preflight import run_preflight
from migexport.checks.result import Report, write_report
from migexport.checks.snapshot import read_snapshot, take_snapshot, write_snapshot
from migexport.checks.verify import run_verify
from migexport.config import Config
from migexport.run import Around


def around_run(config: Config, migration_id: str, *, skip_preflight: bool, no_verify: bool) -> Around:
    """The steps for `run`; a skipped step is None."""
    config = dataclasses.replace(config, migration=dataclasses.replace(config.migration, id=migration_id))
    checks_file = config.resolve(config.migration.checks_file)

    def preflight() -> Report:
        # The fast checks: no backup command and no lint, which may take long; `preflight` does them.
        report = run_preflight(config, fast=True)
        write_report(checks_file, report)
        return report

    def snapshot() -> str:
        doc = take_snapshot(config)
        # This run's snapshot replaces whatever was there: verify must compare with this migration's start.
        path = write_snapshot(config, doc, force=True)
        tables = ", ".join(sorted(doc.get("tables", {}))) or "no affected tables"
        return f"{tables} recorded in {path}"

    def verify() -> Report:
        report = run_verify(config, read_snapshot(config))
        write_report(checks_file, report)
        unread = [c.value for c in report.checks if c.check == "schema_read"]
        if unread:  # the migration target could not be read: nothing was verified
            raise RuntimeError(f"the migration target could not be read: {unread[0]}")
        return report

    return Around(
        preflight=None if skip_preflight else preflight,
        snapshot=None if no_verify else snapshot,
        verify=None if no_verify else verify,
    )
