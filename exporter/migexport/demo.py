"""`migexport demo`: a throwaway primary + streaming replica, a small workload, and the exporter."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from migexport import localpg
from migexport.dsn import Target
from migexport.service import Exporter, ServeSettings
from migexport.workload import Workload


def run_demo(host: str, port: int, duration_seconds: float | None, echo: Callable[[str], None] = print) -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        echo("starting a throwaway PostgreSQL primary and streaming replica ...")
        with localpg.local_setup(replicas=1, prefix="migexport-demo-") as setup:
            primary, replica = setup.primary, setup.replicas[0]
            workload = Workload(primary.dsn(), workers=2, rate_per_worker=20, rollback_share=0.05).start()
            targets = [Target("primary", primary.dsn()), Target("replica1", replica.dsn())]
            exporter = Exporter(ServeSettings(targets=targets, host=host, port=port)).start()
            try:
                echo(f"primary:  {primary.dsn()}")
                echo(f"replica1: {replica.dsn()}")
                echo(f"metrics:  {exporter.url}/metrics")
                echo(
                    f"try a lock queue: psql -h 127.0.0.1 -p {primary.port} -U postgres "
                    "-c 'BEGIN; LOCK demo_orders; SELECT pg_sleep(60)'"
                )
                echo(
                    "press Ctrl-C to stop and remove everything"
                    if duration_seconds is None
                    else f"stopping by itself after {duration_seconds:g} s"
                )
                stop.wait(duration_seconds)
            finally:
                exporter.stop()
                workload.stop()
        echo("stopped; the temporary clusters are removed")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
