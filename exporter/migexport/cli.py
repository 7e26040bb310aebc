"""The `migexport` command: a thin layer of argument parsing over the library.

Modules only one command needs (the baseline sampler, the run wrapper, the dashboards' SDK, the
report's page and charts) are imported by that command: `serve` runs for months and keeps only what
it uses in memory.

Every error a user can cause ends as one line on stderr and a non-zero exit, never a traceback
(set MIGEXPORT_DEBUG=1 to see one) and never a password.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from migexport import DEFAULT_RUNBOOK_BASE, __version__
from migexport.baseline_file import BaselineError, read_baseline, write_baseline
from migexport.config import (
    EXAMPLE_CONFIG,
    MAX_RUN_SECONDS,
    Config,
    ConfigError,
    Migration,
    Thresholds,
    load_config,
)
from migexport.dsn import TargetError, parse_targets, redact, split_targets
from migexport.paths import PathRefused, check_output, known_files
from migexport.service import DEFAULT_PORT, Exporter, ServeSettings
from migexport.state import write_atomic
from migexport.targets import SessionSettings
from migexport.topstatements import TOP_STATEMENTS
from migexport.units import PG_TIMEOUT_MAX_SECONDS, PG_TIMEOUT_MIN_SECONDS, parse_duration, parse_listen, show
from migexport.web_config import WebConfigError, load_web_config

EXIT_USAGE = 2


class UserError(Exception):
    """Something the user gave us is wrong; each message is one printable line."""

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems = problems


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _duration(
    name: str, text: str, minimum: float = 0.0, maximum: float = MAX_RUN_SECONDS, smallest: float = 0.0
) -> float:
    """A duration option: greater than `minimum`, at least `smallest` (never rounded down to 0), at most
    `maximum`."""
    try:
        seconds = parse_duration(text, maximum=maximum, minimum=smallest)
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from None
    if seconds <= minimum:
        raise UserError(f"{name}: must be greater than {minimum:g}s, got {show(text)}")
    return seconds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="migexport")
def cli() -> None:
    """Make PostgreSQL production migrations observable and safe."""


def _load_config(path: str | None) -> Config | None:
    if path is None:
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        raise UserError(*exc.problems) from None


CONFIG_OPTION = click.option(
    "--config", "-c", "config_path", metavar="FILE", help="migexport.yml (see 'migexport init')."
)


@cli.command()
@CONFIG_OPTION
@click.option(
    "--target",
    "-t",
    "target_specs",
    multiple=True,
    metavar="NAME=DSN",
    help="A database to watch, repeatable (added to the config's). DSN is a libpq string or URI, or env:VAR, "
    "or file:PATH (keeps passwords off the command line). Also read from MIGEXPORT_TARGETS (space-separated; "
    "a keyword DSN may keep its spaces: p=host=db password=x, or quoted).",
)
@click.option("--listen", help=f"HOST:PORT to serve /metrics on.  [default: :{DEFAULT_PORT}]")
@click.option("--scrape-timeout", help="A scrape returns by then even if a database hangs.  [default: 5s]")
@click.option("--statement-timeout", help="statement_timeout of the exporter's own sessions.  [default: 2s]")
@click.option("--lock-timeout", help="lock_timeout of the exporter's own sessions.  [default: 100ms]")
@click.option("--application-name", help="application_name of the exporter's sessions.  [default: migexport]")
@click.option("--baseline", "baseline_path", metavar="FILE", help="Baseline file to export as migexport_baseline_*.")
@click.option("--state-file", metavar="FILE", help="Migration state file written by 'migexport run'.")
@click.option(
    "--checks-file",
    metavar="FILE",
    help="Checks file written by 'migexport preflight' and 'verify', to export as migexport_preflight_*, "
    "migexport_verify_* and migexport_data_integrity_ratio.  [default: the config's migration.checks_file]",
)
@click.option(
    "--web.config.file",
    "web_config_file",
    metavar="FILE",
    help="TLS and basic auth for /metrics, in the Prometheus exporters' web config format (tls_server_config, "
    "basic_auth_users with bcrypt hashes); re-read when it changes.  [default: the config's web_config_file; none]",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def serve(
    config_path: str | None,
    target_specs: tuple[str, ...],
    listen: str | None,
    scrape_timeout: str | None,
    statement_timeout: str | None,
    lock_timeout: str | None,
    application_name: str | None,
    baseline_path: str | None,
    state_file: str | None,
    checks_file: str | None,
    web_config_file: str | None,
    log_level: str,
) -> None:
    """Serve lock, replication, connection, error, latency, baseline, migration and preflight/verify metrics."""
    config = _load_config(config_path)
    try:  # keyword DSNs keep their spaces; an error never quotes the value
        specs = list(target_specs) + split_targets(os.environ.get("MIGEXPORT_TARGETS", ""))
    except TargetError as exc:
        raise UserError(str(exc)) from None
    if config is None and not specs:
        raise UserError("no target: give --target NAME=DSN (or NAME=env:VAR, NAME=file:PATH) or --config FILE")
    try:
        settings = ServeSettings.from_config(config) if config else ServeSettings(targets=[])
        settings.targets = parse_targets(specs, existing=settings.targets)
        if listen is not None:
            settings.host, settings.port = parse_listen(listen)
    except (TargetError, ValueError) as exc:
        raise UserError(str(exc)) from None
    session = settings.session
    settings.session = SessionSettings(
        application_name=application_name or session.application_name,
        lock_timeout_ms=_ms("--lock-timeout", lock_timeout, session.lock_timeout_ms),
        statement_timeout_ms=_ms("--statement-timeout", statement_timeout, session.statement_timeout_ms),
    )
    if scrape_timeout is not None:
        settings.scrape_timeout_seconds = _duration(
            "--scrape-timeout", scrape_timeout, maximum=3600.0, smallest=PG_TIMEOUT_MIN_SECONDS
        )
    if baseline_path is not None:
        settings.baseline_path = Path(baseline_path)
    if state_file is not None:
        settings.state_path = Path(state_file)
    if checks_file is not None:
        settings.checks_path = Path(checks_file)
    if web_config_file is not None:
        settings.web_config_path = Path(web_config_file)
    if settings.web_config_path is not None:
        try:
            settings.web_config = load_web_config(settings.web_config_path)
        except WebConfigError as exc:
            raise UserError(*exc.problems) from None
    _setup_logging(log_level)
    try:
        exporter = Exporter(settings).start()
    except OSError as exc:
        where = listen or f"{settings.host}:{settings.port}"
        raise UserError(f"--listen {where}: cannot listen: {exc.strerror or exc}") from None
    # What is loaded by now (modules, settings) lives as long as the process: out of the cyclic
    # collector's reach, its full collections stop walking it (3.7 ms each, in whichever scrape).
    gc.freeze()
    _wait_for_signal()
    logging.getLogger("migexport").info("shutting down")
    exporter.stop()


def _check_output(path: Path, kind: str, config: Config | None, role: str = "") -> None:
    """A regular file (or none), not another file the config names, not another kind of file."""
    try:
        check_output(path, kind, known_files(config), role)
    except PathRefused as exc:
        raise UserError(str(exc)) from None


def _write_new(
    path: Path, text: str, force: bool, mode: int = 0o644, kind: str = "", config: Config | None = None
) -> None:
    """Write a file the user asked for, atomically; never replace one without --force, and with it only
    a regular file of the same kind (or of none migexport knows)."""
    if kind:
        _check_output(path, kind, config)
    if path.exists() and not force:
        raise UserError(f"{path} exists; use --force to replace it")
    try:
        write_atomic(path, text, mode)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def _ms(name: str, text: str | None, default: int) -> int:
    """A PostgreSQL timeout in whole milliseconds: 0.4ms is refused, never sent as 0 (no timeout)."""
    if text is None:
        return default
    return round(_duration(name, text, maximum=PG_TIMEOUT_MAX_SECONDS, smallest=PG_TIMEOUT_MIN_SECONDS) * 1000)


@cli.command()
@click.argument("path", default="migexport.yml", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace the file if it exists.")
def init(path: str, force: bool) -> None:
    """Write an annotated example config file (default: migexport.yml)."""
    target = Path(path)
    # Private: a config may end up holding a DSN with a password (the example reads it from the environment).
    _write_new(target, EXAMPLE_CONFIG, force, mode=0o600, kind="config")
    click.echo(f"wrote {target}: edit its targets and migration, then run 'migexport baseline -c {target}'")


@cli.command()
@CONFIG_OPTION
@click.option("--duration", default="5m", show_default=True, help="How long to sample.")
@click.option("--output", "-o", metavar="FILE", help="Baseline file to write.  [default: the config's baseline_file]")
@click.option("--force", is_flag=True, help="Replace an existing baseline file.")
@click.option(
    "--allow-partial",
    is_flag=True,
    help="Write the file even if a target is not reachable or a probe never succeeds (their alerts stay disarmed).",
)
@click.option(
    "--exporter-url",
    metavar="URL",
    help="The running 'migexport serve' whose probe timings and transaction counts the baseline takes, so that "
    "both sides are measured alike; 'none' to measure here.  [default: http://127.0.0.1:<the config's listen port>]",
)
@click.option(
    "--top-statements",
    type=click.IntRange(min=0, max=1000),
    default=TOP_STATEMENTS,
    show_default=True,
    help="Statements of pg_stat_statements kept per target (by time in the window, with their text) for the "
    "report's 'what got slower'; 0 for none.",
)
def baseline(
    config_path: str | None,
    duration: str,
    output: str | None,
    force: bool,
    allow_partial: bool,
    exporter_url: str | None,
    top_statements: int,
) -> None:
    """Sample the targets for a window before the migration and record the baseline.

    Exit 1, and nothing written, when a target cannot be reached or a probe never succeeds (each is
    named, with the fix); every target and probe is tried once before the window starts.
    """
    config = _load_config(config_path)
    if config is None:
        raise UserError("baseline needs --config FILE (targets, probes, the migration's id and tables)")
    seconds = _duration("--duration", duration)
    out = Path(output) if output else config.resolve(config.baseline_file)
    _check_output(out, "baseline", config, "baseline_file")
    if out.exists() and not force:  # before sampling, not after five minutes of it
        raise UserError(f"{out} exists; use --force to replace it")
    _setup_logging("warning")
    from migexport.baseline import BaselineIncomplete
    from migexport.baseline import capture as capture_baseline

    try:
        with click.progressbar(length=1000, label=f"sampling for {seconds:g}s", file=sys.stderr) as bar:

            def progress(fraction: float) -> None:
                bar.update(round(fraction * 1000) - bar.pos)

            doc = capture_baseline(
                config,
                seconds,
                progress,
                allow_partial=allow_partial,
                exporter_url=_exporter_url(config, exporter_url),
                top_statements=top_statements,
            )
        write_baseline(out, doc, force=force)
    except BaselineIncomplete as exc:
        # Not a usage error (exit 2): the command ran and found the databases not ready for it.
        for problem in exc.problems:
            click.echo(f"migexport: error: {redact(problem)}", err=True)
        click.echo(f"migexport: error: {out} not written (--allow-partial writes what can be captured)", err=True)
        sys.exit(1)
    except BaselineError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror}") from None
    click.echo(f"baseline for migration {doc['migration_id']} written to {out}")
    _print_baseline(doc)


def _exporter_url(config: Config, given: str | None) -> str | None:
    """The exporter on this machine by default: the config's listen port on the loopback address."""
    if given is not None:
        if given.lower() == "none":
            return None
        if not given.startswith(("http://", "https://")):
            raise UserError(f"--exporter-url: {given!r} is not an http:// or https:// URL (or 'none')")
        return given
    host, port = parse_listen(config.listen)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _print_baseline(doc: dict) -> None:
    from migexport.baseline import summary_rows

    rows = summary_rows(doc)
    width = max(len(k) for k, _ in rows)
    for key, val in rows:
        click.echo(f"  {key:<{width}}  {val}")
    for missing in doc.get("missing") or []:
        click.echo(f"  not captured: {redact(missing)}")
    for failure in doc.get("failures") or []:
        click.echo(f"  MISSING (written with --allow-partial; its alerts are disarmed): {redact(failure)}")


@cli.command()
@CONFIG_OPTION
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["prometheus", "prometheus-operator"]),
    default="prometheus",
    show_default=True,
    help="A Prometheus rule file, or a PrometheusRule manifest.",
)
@click.option(
    "--runbook-base-url",
    default=DEFAULT_RUNBOOK_BASE,
    show_default=True,
    help="Where rules/runbooks/ is published; each alert links to <this>/<AlertName>.md.",
)
@click.option("--output", "-o", metavar="FILE", help="Write here instead of standard output.")
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def rules(config_path: str | None, output_format: str, runbook_base_url: str, output: str | None, force: bool) -> None:
    """Render the alert and recording rules from the config's thresholds (default: the checklist's)."""
    from migexport.rulegen import RuleError, render  # not loaded by serve

    config = _load_config(config_path)
    try:
        text = render(
            config.thresholds if config else Thresholds(),
            runbook_base_url,
            output_format,
            (config.migration if config else Migration()).watch_window_seconds,
        )
    except RuleError as exc:
        raise UserError(str(exc)) from None
    if output is None:
        click.echo(text, nl=False)
        return
    _write_new(Path(output), text, force, kind="rules", config=config)


@cli.command()
@CONFIG_OPTION
@click.option(
    "--output", "-o", "output_dir", metavar="DIR", required=True, help="Write migration.json and database.json here."
)
@click.option("--force", is_flag=True, help="Replace the files if they exist.")
def dashboards(config_path: str | None, output_dir: str, force: bool) -> None:
    """Render the Grafana dashboards from the config's thresholds (default: the checklist's)."""
    config = _load_config(config_path)
    from migexport.dashboards import render as render_dashboards  # the Grafana SDK: only this command needs it

    texts = render_dashboards(
        config.thresholds if config else Thresholds(), config.migration if config else Migration()
    )
    directory = Path(output_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {directory}: {exc.strerror}") from None
    for name in texts:
        _check_output(directory / name, "dashboard", config)
        if (directory / name).exists() and not force:
            raise UserError(f"{directory / name} exists; use --force to replace it")
    for name, text in texts.items():
        _write_new(directory / name, text, force, kind="dashboard", config=config)
        click.echo(f"wrote {directory / name}")


@cli.command("show-baseline")
@click.argument("path", type=click.Path(dir_okay=False))
def show_baseline(path: str) -> None:
    """Check a baseline file and print what it holds."""
    try:
        # The checked document, not the raw JSON: whatever the file holds, this prints or is one line.
        doc = read_baseline(Path(path)).doc()
    except BaselineError as exc:
        raise UserError(str(exc)) from None
    from migexport.baseline import summary_rows

    rows = summary_rows(doc)
    click.echo(f"baseline for migration {doc['migration_id']} in {path} ({len(rows)} values)")
    _print_baseline(doc)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@CONFIG_OPTION
@click.option("--time-limit", help="Kill the command after this long.  [default: the config's time_budget, 30m]")
@click.option("--watch-window", help="Alerts stay armed this long after the end.  [default: the config's, 1h]")
@click.option("--log-file", metavar="FILE", help="Append to this log.  [default: the config's, migration.log]")
@click.option("--state-file", metavar="FILE", help="Publish state here.  [default: the config's]")
@click.option("--id", "migration_id", help="Migration id.  [default: the config's]")
@click.option(
    "--control-dsn",
    metavar="SOURCE",
    help="How to reach the server to end the migration's sessions at the time limit or on a signal: a libpq "
    "DSN or URI, env:VAR or file:PATH.  [default: the config's migration.control_dsn, else the PG* environment]",
)
@click.option("--skip-preflight", is_flag=True, help="Start even when the preflight checks say no-go.")
@click.option("--no-verify", is_flag=True, help="No snapshot before the command and no verification after it.")
@click.option(
    "--report",
    "write_report_after",
    is_flag=True,
    help="Wait for the watch window to close, then write the report (HTML and Markdown) next to the log.",
)
@click.option("--prometheus-url", metavar="URL", help="For --report.  [default: the config's slis.prometheus_url]")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def run(
    config_path: str | None,
    time_limit: str | None,
    watch_window: str | None,
    log_file: str | None,
    state_file: str | None,
    migration_id: str | None,
    control_dsn: str | None,
    skip_preflight: bool,
    no_verify: bool,
    write_report_after: bool,
    prometheus_url: str | None,
    command: tuple[str, ...],
) -> None:
    """Run the migration command: log, time limit, signals, exit status, state for 'serve'.

    At the time limit or on SIGINT/SIGTERM it also ends the migration's sessions on the server
    (application_name migration.session_application_name, or migration.role).

    With a config it first runs the fast preflight checks (a no-go exits 1 without starting), records
    the affected tables, and after a command that succeeded runs 'verify' (a failed one exits 3).

    Example: PGAPPNAME=migration migexport run -c migexport.yml -- npm run migrate:production
    """
    config = _load_config(config_path)
    # Without a file: the migration section's defaults (30 min budget, files in this directory).
    m = config.migration if config else Migration()
    resolve = config.resolve if config else Path
    log_path = Path(log_file) if log_file else resolve(m.log_file)
    state_path = Path(state_file) if state_file else resolve(m.state_file)
    # `run --state-file migexport.yml` must not replace the config with JSON (nor the log a baseline).
    _check_output(state_path, "state", config, "migration.state_file")
    _check_output(log_path, "log", config, "migration.log_file")
    if config is not None:
        _check_output(config.resolve(m.snapshot_file), "snapshot", config, "migration.snapshot_file")
        _check_output(config.resolve(m.checks_file), "checks", config, "migration.checks_file")
    from migexport.run import Around, RunError, ServerSide, run_migration

    around = Around()
    if write_report_after and (config is None or not (prometheus_url or config.slis.prometheus_url)):
        raise UserError("--report: needs a config (-c) and a Prometheus (--prometheus-url or slis.prometheus_url)")
    if config is not None:
        from migexport.checks.around_run import around_run

        around = around_run(
            config,
            migration_id or m.id,
            skip_preflight=skip_preflight,
            no_verify=no_verify,
            report=write_report_after,
            prometheus_url=prometheus_url,
            log_path=log_path,
            state_path=state_path,
        )
    try:
        code = run_migration(
            list(command),
            migration_id=migration_id or m.id,
            time_budget_seconds=_duration("--time-limit", time_limit) if time_limit else m.time_budget_seconds,
            watch_window_seconds=_duration("--watch-window", watch_window) if watch_window else m.watch_window_seconds,
            log_path=log_path,
            state_path=state_path,
            server=ServerSide(
                application_name=m.session_application_name,
                role=m.role,
                control_dsn=m.control_dsn if control_dsn is None else control_dsn,
            ),
            around=around,
        )
    except RunError as exc:
        click.echo(f"migexport: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code)


@cli.command()
@click.option(
    "--listen", default=f"127.0.0.1:{DEFAULT_PORT}", show_default=True, help="HOST:PORT to serve /metrics on."
)
@click.option("--duration", default=None, help="Stop by itself after this long (e.g. 10m); default: Ctrl-C.")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
)
def demo(listen: str, duration: str | None, log_level: str) -> None:
    """Start a throwaway primary + replica with a workload, the exporter, Prometheus, Alertmanager and
    scripted migrations to watch; Ctrl-C stops and removes everything."""
    from migexport.demo import run_demo
    from migexport.localpg import LocalPgError

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    seconds = _duration("--duration", duration) if duration is not None else None
    _setup_logging(log_level)
    try:
        run_demo(host, port, seconds, echo=lambda line: click.echo(line))
    except LocalPgError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"demo: {exc.strerror or exc}") from None


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


@cli.command()
@CONFIG_OPTION
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--fast", is_flag=True, help="Leave out the backup command and the SQL lint (what 'run' checks).")
def preflight(config_path: str | None, output_format: str, fast: bool) -> None:
    """Go / no-go before the migration: PITR, backup, baseline, replication, traffic, nothing else in
    flight, headroom, rollback, SQL lint. Exit 0 go, 1 no-go (a FAIL), 2 bad input.

    The result is also written to the config's migration.checks_file, which 'serve' exports.
    """
    from migexport.checks.preflight import run_preflight
    from migexport.checks.result import render_json, render_table, write_report

    config = _load_config(config_path)
    if config is None:
        raise UserError("preflight needs --config FILE (targets, the migration, its thresholds)")
    _check_output(config.resolve(config.migration.checks_file), "checks", config, "migration.checks_file")
    report = run_preflight(config, fast=fast)
    if output_format == "json":
        click.echo(render_json(report), nl=False)
    else:
        click.echo(redact(render_table(report.checks)))
        failed = [c.check for c in report.checks if c.status.name == "FAIL"]
        click.echo(f"\nNO-GO: {', '.join(dict.fromkeys(failed))} failed" if failed else "\nGO: nothing failed")
    checks_file = config.resolve(config.migration.checks_file)
    try:  # after printing: the user sees the result even when it cannot be saved
        write_report(checks_file, report)
    except OSError as exc:
        raise UserError(f"cannot write {checks_file}: {exc.strerror or exc}") from None
    sys.exit(0 if report.ok else 1)


# -- snapshot / verify (issue 10): the affected tables before the migration, compared after it ------
@cli.command()
@CONFIG_OPTION
@click.option("--force", is_flag=True, help="Replace a snapshot of another migration id.")
def snapshot(config_path: str | None, force: bool) -> None:
    """Record the affected tables before the migration (schema, validity, relfilenode, statistics, the
    invariants and frozen-table checksums) in migration.snapshot_file, for 'verify' to compare.

    Exit 0 written, 1 the database could not be read, 2 bad input.
    """
    from migexport.checks.snapshot import SnapshotError, take_snapshot, write_snapshot

    config = _load_config(config_path)
    if config is None:
        raise UserError("snapshot needs --config FILE (the migration's target and affected tables)")
    _check_output(config.resolve(config.migration.snapshot_file), "snapshot", config, "migration.snapshot_file")
    try:
        doc = take_snapshot(config)
    except SnapshotError as exc:
        click.echo(f"migexport: error: {redact(str(exc))}", err=True)
        sys.exit(1)
    try:
        path = write_snapshot(config, doc, force=force)
    except SnapshotError as exc:
        raise UserError(str(exc)) from None
    tables = doc["tables"]
    found = sum(1 for t in tables.values() if t.get("found"))
    click.echo(f"snapshot of migration {doc['migration_id']} written to {path}: {found} of {len(tables)} tables")
    for problem in [doc.get("integrity_error", ""), *_integrity_errors(doc)]:
        if problem:
            click.echo(f"migexport: warning: {redact(problem)}", err=True)


def _integrity_errors(doc: dict) -> list[str]:
    integrity = doc.get("integrity", {})
    return [
        f"{kind} {name}: {entry['error']}"
        for kind in ("invariants", "frozen")
        for name, entry in integrity.get(kind, {}).items()
        if "error" in entry
    ]


@cli.command()
@CONFIG_OPTION
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True)
def verify(config_path: str | None, output_format: str) -> None:
    """After the migration: schema changes against verify.expect, invalid indexes, NOT VALID
    constraints, rewrites and stale statistics, invariants and frozen-table checksums, compared with
    the snapshot. Without a snapshot, only the checks that need none run (and it says which it skipped).

    Exit 0 verified, 1 failed (or the migration target could not be read), 2 bad input. The result is
    also written to migration.checks_file, which 'serve' exports.
    """
    from migexport.checks.result import render_json, render_table, write_report
    from migexport.checks.snapshot import SnapshotError, read_snapshot
    from migexport.checks.verify import run_verify, verified

    config = _load_config(config_path)
    if config is None:
        raise UserError("verify needs --config FILE (the migration's target, affected tables and verify section)")
    _check_output(config.resolve(config.migration.checks_file), "checks", config, "migration.checks_file")
    try:
        before = read_snapshot(config)
    except SnapshotError as exc:
        raise UserError(str(exc)) from None
    report = run_verify(config, before)
    checks_file = config.resolve(config.migration.checks_file)
    try:
        write_report(checks_file, report)
    except OSError as exc:
        raise UserError(f"cannot write {checks_file}: {exc.strerror or exc}") from None
    ok = verified(report)
    if output_format == "json":
        click.echo(render_json(report), nl=False)
    else:
        click.echo(redact(render_table(report.checks)))
        integrity = f"data integrity {report.integrity_passed}/{report.integrity_total}"
        failed = [c.check for c in report.checks if c.status.name == "FAIL"]
        verdict = f"FAILED: {', '.join(dict.fromkeys(failed))}" if failed else "VERIFIED" if ok else "NOT VERIFIED"
        click.echo(f"\n{verdict} ({integrity})")
    sys.exit(0 if ok else 1)


# -- report (issue 11): the migration report, one self-contained page or a Markdown summary ---------
@cli.command()
@CONFIG_OPTION
@click.option("--id", "migration_id", help="The migration to report on.  [default: the one in the state file]")
@click.option(
    "--output",
    "-o",
    metavar="FILE",
    help="Write here.  [default: next to the run log, migexport-report-<id>.html (.md)]",
)
@click.option("--format", "output_format", type=click.Choice(["html", "markdown"]), default="html", show_default=True)
@click.option(
    "--prometheus-url", metavar="URL", help="The Prometheus to ask.  [default: the config's slis.prometheus_url]"
)
@click.option("--force", is_flag=True, help="Replace FILE if it exists.")
def report(
    config_path: str | None,
    migration_id: str | None,
    output: str | None,
    output_format: str,
    prometheus_url: str | None,
    force: bool,
) -> None:
    """Write the migration report: header, success criteria (from the same recording rules as the
    dashboard), timeline charts, the alerts that fired, preflight and verify, what got slower, and the
    run log's tail. Exit 2 when Prometheus is unreachable or has no data for the migration.
    """
    from migexport.report.prometheus import ReportError
    from migexport.report.render import write_report

    config = _load_config(config_path)
    if config is None:
        raise UserError("report needs --config FILE (the state file, the log, the thresholds, slis.prometheus_url)")
    if output is not None:
        _check_output(Path(output), "report", config)
    try:
        path = write_report(config, migration_id, output, output_format, prometheus_url, force=force)
    except ReportError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit 2 for usage errors, 1 for anything unexpected."""
    try:
        cli.main(args=argv, prog_name="migexport", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        message = exc.format_message()
        if "\n" in message:  # `migexport` alone: click's error is the whole help text; it goes to stdout
            click.echo(message)
            message = "no command given (the commands are listed above)"
        click.echo(f"migexport: error: {redact(message)}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except UserError as exc:
        for problem in exc.problems:
            click.echo(f"migexport: error: {redact(problem)}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:
        if os.environ.get("MIGEXPORT_DEBUG"):
            raise
        click.echo(f"migexport: internal error: {type(exc).__name__}: {redact(str(exc))}", err=True)
        sys.exit(1)
