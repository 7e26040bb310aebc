"""The `migexport` command: a thin layer of argument parsing over the library.

Every error a user can cause ends as one line on stderr and a non-zero exit, never a traceback
(set MIGEXPORT_DEBUG=1 to see one) and never a password.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from migexport import __version__
from migexport.dsn import TargetError, parse_targets, redact
from migexport.service import DEFAULT_PORT, Exporter, ServeSettings
from migexport.targets import SessionSettings
from migexport.units import parse_duration, parse_listen

EXIT_USAGE = 2


class UserError(Exception):
    """Something the user gave us is wrong; the message is one printable line."""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _duration(name: str, text: str, minimum: float = 0.0) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise UserError(f"{name}: {exc}") from None
    if seconds <= minimum:
        raise UserError(f"{name}: must be greater than {minimum:g}s, got {text!r}")
    return seconds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="migexport")
def cli() -> None:
    """Make PostgreSQL production migrations observable and safe."""


@cli.command()
@click.option(
    "--target",
    "-t",
    "target_specs",
    multiple=True,
    metavar="NAME=DSN",
    help="A database to watch, repeatable. DSN is a libpq string or URI, or env:VAR, or file:PATH "
    "(keeps passwords off the command line). Also read from MIGEXPORT_TARGETS (space-separated).",
)
@click.option(
    "--listen", default=f":{DEFAULT_PORT}", show_default=True, help="HOST:PORT to serve /metrics on."
)
@click.option(
    "--scrape-timeout",
    default="5s",
    show_default=True,
    help="A scrape returns by then even if a database hangs (that target then reads up 0).",
)
@click.option(
    "--statement-timeout",
    default="2s",
    show_default=True,
    help="statement_timeout of the exporter's own sessions.",
)
@click.option(
    "--lock-timeout", default="100ms", show_default=True, help="lock_timeout of the exporter's own sessions."
)
@click.option(
    "--application-name",
    default="migexport",
    show_default=True,
    help="application_name of the exporter's sessions, to tell them apart in pg_stat_activity.",
)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def serve(
    target_specs: tuple[str, ...],
    listen: str,
    scrape_timeout: str,
    statement_timeout: str,
    lock_timeout: str,
    application_name: str,
    log_level: str,
) -> None:
    """Serve lock, replication, connection, error and latency metrics for Prometheus."""
    specs = list(target_specs) + os.environ.get("MIGEXPORT_TARGETS", "").split()
    if not specs:
        raise UserError("no target: give --target NAME=DSN (or NAME=env:VAR, NAME=file:PATH)")
    try:
        targets = parse_targets(specs)
        host, port = parse_listen(listen)
    except (TargetError, ValueError) as exc:
        raise UserError(str(exc)) from None
    session = SessionSettings(
        application_name=application_name,
        lock_timeout_ms=round(_duration("--lock-timeout", lock_timeout) * 1000),
        statement_timeout_ms=round(_duration("--statement-timeout", statement_timeout) * 1000),
    )
    settings = ServeSettings(
        targets=targets,
        host=host,
        port=port,
        session=session,
        scrape_timeout_seconds=_duration("--scrape-timeout", scrape_timeout),
    )
    _setup_logging(log_level)
    try:
        exporter = Exporter(settings).start()
    except OSError as exc:
        raise UserError(f"--listen {listen}: cannot listen: {exc.strerror or exc}") from None
    _wait_for_signal()
    logging.getLogger("migexport").info("shutting down")
    exporter.stop()


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
    """Start a throwaway primary + replica with a workload, and serve metrics for both."""
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit 2 for usage errors, 1 for anything unexpected."""
    try:
        cli.main(args=argv, prog_name="migexport", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"migexport: error: {redact(exc.format_message())}", err=True)
        sys.exit(exc.exit_code if exc.exit_code else EXIT_USAGE)
    except UserError as exc:
        click.echo(f"migexport: error: {redact(str(exc))}", err=True)
        sys.exit(EXIT_USAGE)
    except Exception as exc:
        if os.environ.get("MIGEXPORT_DEBUG"):
            raise
        click.echo(f"migexport: internal error: {type(exc).__name__}: {redact(str(exc))}", err=True)
        sys.exit(1)
