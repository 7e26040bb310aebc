"""Throwaway local PostgreSQL clusters: a primary and streaming replicas in a temp directory.

Used by `migexport demo`, the test suite and the benchmarks. The servers listen on 127.0.0.1 only,
use trust authentication and fsync=off: they are for experiments, never for data you want to keep.
PostgreSQL refuses to run as root, so when we are root every server command runs as the `postgres`
OS user (`runuser -u postgres -- ...`), and the temp directory is handed over to that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

SUPERUSER = "postgres"

# Settings every throwaway cluster gets. pg_stat_statements is preloaded because the latency signals
# depend on it; fsync is off because these clusters are disposable and tests should be fast.
BASE_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "shared_preload_libraries": "'pg_stat_statements'",
    "pg_stat_statements.track": "'top'",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_receiver_status_interval": "1s",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class LocalPgError(RuntimeError):
    """A throwaway cluster could not be created, started or stopped."""


def find_bindir() -> Path:
    """The newest PostgreSQL server bin directory on this machine."""
    on_path = shutil.which("pg_ctl")
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for candidate in candidates:
        if (Path(candidate) / "pg_basebackup").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    raise LocalPgError(
        "PostgreSQL server binaries not found (initdb, pg_ctl): install them with "
        "'apt-get install -y postgresql' (Debian) or put their bin directory on PATH"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SUPERUSER, "--", *argv]
    return argv


def _run(argv: list[str], what: str, timeout: float = 120) -> None:
    proc = subprocess.run(_as_server_user(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise LocalPgError(f"{what} failed: {detail[-1] if detail else f'exit {proc.returncode}'}")


def _hand_over(path: Path) -> None:
    """Let the server user own a directory we created (only matters when running as root)."""
    if os.geteuid() == 0:
        shutil.chown(path, user=SUPERUSER, group=None)


@dataclass
class LocalCluster:
    """One PostgreSQL server in a directory of its own."""

    name: str
    datadir: Path
    port: int
    bindir: Path
    logfile: Path = field(init=False)

    def __post_init__(self) -> None:
        self.logfile = self.datadir.parent / f"{self.name}.log"

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname: str = "postgres", user: str = SUPERUSER, **kwargs) -> psycopg.Connection:
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn(dbname, user), connect_timeout=10, **kwargs)

    def write_settings(self, settings: dict[str, str]) -> None:
        conf = self.datadir / "postgresql.auto.conf"
        with open(conf, "a", encoding="utf-8") as f:
            for key, value in settings.items():
                f.write(f"{key} = {value}\n")

    def start(self) -> None:
        _run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {self.port} -k {self.datadir.parent}",
                "start",
            ],
            f"starting {self.name}",
        )

    def stop(self, mode: str = "fast") -> None:
        _run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop"],
            f"stopping {self.name}",
        )

    def is_running(self) -> bool:
        proc = subprocess.run(
            _as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "status"]),
            capture_output=True,
            check=False,
        )
        return proc.returncode == 0

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.connect() as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def init_primary(base: Path, name: str = "primary", settings: dict[str, str] | None = None) -> LocalCluster:
    bindir = find_bindir()
    datadir = base / name
    cluster = LocalCluster(name=name, datadir=datadir, port=free_port(), bindir=bindir)
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        f"initdb for {name}",
    )
    cluster.write_settings({**BASE_SETTINGS, "cluster_name": f"'{name}'", **(settings or {})})
    cluster.start()
    cluster.wait_ready()
    with cluster.connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    return cluster


def init_replica(primary: LocalCluster, base: Path, name: str = "replica1") -> LocalCluster:
    """A streaming replica of `primary`, made with pg_basebackup; its application_name is `name`."""
    datadir = base / name
    cluster = LocalCluster(name=name, datadir=datadir, port=free_port(), bindir=primary.bindir)
    _run(
        [
            str(primary.bindir / "pg_basebackup"),
            "-D",
            str(datadir),
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            SUPERUSER,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        ],
        f"pg_basebackup for {name}",
    )
    cluster.write_settings({"cluster_name": f"'{name}'"})
    cluster.start()
    cluster.wait_ready()
    return cluster


def make_base_dir(prefix: str = "migexport-pg-") -> Path:
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o755)
    _hand_over(base)
    return base


@dataclass
class LocalSetup:
    """A primary, its replicas, and the temp directory that holds them all."""

    base: Path
    primary: LocalCluster
    replicas: list[LocalCluster]

    def clusters(self) -> list[LocalCluster]:
        return [*self.replicas, self.primary]

    def destroy(self) -> None:
        for cluster in self.clusters():
            with contextlib.suppress(Exception):
                if cluster.is_running():
                    cluster.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def local_setup(
    replicas: int = 1, settings: dict[str, str] | None = None, prefix: str = "migexport-pg-"
) -> Iterator[LocalSetup]:
    """A throwaway primary with `replicas` streaming replicas, removed on exit."""
    base = make_base_dir(prefix)
    setup = LocalSetup(base=base, primary=None, replicas=[])  # type: ignore[arg-type]
    try:
        setup.primary = init_primary(base, settings=settings)
        for i in range(replicas):
            setup.replicas.append(init_replica(setup.primary, base, name=f"replica{i + 1}"))
        yield setup
    finally:
        if setup.primary is not None:
            setup.destroy()
        else:
            shutil.rmtree(base, ignore_errors=True)
