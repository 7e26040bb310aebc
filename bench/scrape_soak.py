"""Months of scrapes in minutes: does `migexport serve` keep its memory, threads, files and speed?

Run by hand: `python bench/scrape_soak.py [--sessions 400] [--statements 5000] [--scrapes 10000]
[--every 1000]`. It prints figures and asserts nothing. It needs what bench/scrape_curve.py needs,
except postgres_exporter.

One throwaway primary (127.0.0.1, removed at the end) holds `--sessions` client sessions shaped as in
scrape_curve.py (a quarter of them a lock queue behind an `ALTER TABLE`, a tenth of the others idle in
transaction) and `--statements` pg_stat_statements entries with long texts. `migexport serve` runs as a
subprocess and is scraped over HTTP, back to back, each scrape a new connection as Prometheus' would
be after an idle keep-alive: 10,000 scrapes are 42 hours at a 15 s interval. Every `--every` scrapes
it prints the exporter's RSS and peak RSS, its threads and open file descriptors, its sessions on the
server, the median and maximum scrape time of the block and the database time of its statements per
scrape (from pg_stat_statements): anything that accumulates per scrape (a leaked thread, socket,
cached label or prepared statement) shows as a column that keeps climbing.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from scrape_curve import (
    APP_PREFIX,
    SERVER_SETTINGS,
    Sessions,
    compile_package,
    prepare,
    scrape,
    start_migexport,
    statement_totals,
)
from scrape_load import ExporterProc, wait_answering

from migexport import localpg

HEADER = (
    f"{'scrapes':>8} {'RSS MiB':>8} {'peak MiB':>9} {'threads':>8} {'fds':>5} {'sessions':>9} "
    f"{'median ms':>10} {'max ms':>8} {'DB ms':>6}"
)


def proc_status(exp: ExporterProc) -> dict[str, str]:
    lines = Path(f"/proc/{exp.proc.pid}/status").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if ":" in line)


def kib_as_mib(value: str) -> float:
    return int(value.split()[0]) / 1024


def exporter_sessions(monitor: psycopg.Connection) -> int:
    return monitor.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migexport'").fetchone()[0]


def report(done: int, exp: ExporterProc, monitor: psycopg.Connection, seconds: list[float], db_ms: float) -> None:
    status = proc_status(exp)
    fds = len(os.listdir(f"/proc/{exp.proc.pid}/fd"))
    print(
        f"{done:>8} {kib_as_mib(status['VmRSS']):>8.1f} {kib_as_mib(status['VmHWM']):>9.1f} "
        f"{int(status['Threads']):>8} {fds:>5} {exporter_sessions(monitor):>9} "
        f"{statistics.median(seconds) * 1000:>10.2f} {max(seconds) * 1000:>8.2f} {db_ms:>6.2f}",
        flush=True,
    )


def soak(exp: ExporterProc, monitor: psycopg.Connection, scrapes: int, every: int) -> None:
    print(HEADER)
    block: list[float] = []
    before = statement_totals(monitor)["migexport"][1]
    warm_up, _body = scrape(exp.url)
    after = statement_totals(monitor)["migexport"][1]
    report(0, exp, monitor, [warm_up], after - before)  # after the warm-up scrape: where memory starts
    for done in range(1, scrapes + 1):
        seconds, _body = scrape(exp.url)
        block.append(seconds)
        if done % every == 0:
            before, after = after, statement_totals(monitor)["migexport"][1]
            report(done, exp, monitor, block, (after - before) / len(block))
            block = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=400, help="client sessions, a quarter of them a lock queue")
    parser.add_argument("--statements", type=int, default=5000, help="distinct pg_stat_statements entries")
    parser.add_argument("--scrapes", type=int, default=10000, help="scrapes in all")
    parser.add_argument("--every", type=int, default=1000, help="scrapes between two printed lines")
    args = parser.parse_args()
    if min(args.sessions, args.scrapes, args.every) < 1 or args.statements < 0:
        sys.exit("--sessions, --scrapes and --every must be at least 1, --statements at least 0")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.sessions + 1000)), hard))
    started = time.monotonic()
    compile_package()
    workdir = Path(tempfile.mkdtemp(prefix="migexport-soak-"))
    settings = {**SERVER_SETTINGS, "max_connections": str(args.sessions + 100)}
    exp: ExporterProc | None = None
    try:
        with localpg.local_setup(replicas=0, settings=settings, prefix="migexport-soak-pg-") as setup:
            prepare(setup.primary, args.statements)
            sessions = Sessions(setup.primary.dsn())
            with setup.primary.connect(application_name=f"{APP_PREFIX}monitor") as monitor:
                try:
                    sessions.shape(args.sessions, monitor)
                    exp = start_migexport(setup.primary, workdir)
                    wait_answering(exp)
                    queue = len(sessions.queue)
                    print(f"{args.sessions} sessions ({queue} in the queue), {args.statements} statements")
                    soak(exp, monitor, args.scrapes, args.every)
                finally:
                    if exp is not None:
                        exp.stop()
                    sessions.close()
    finally:
        if exp is not None:
            exp.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"\ntotal runtime {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
