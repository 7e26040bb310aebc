"""docker-compose.yml and what it mounts, checked without a container engine.

- `docker-compose config` (Debian's 1.29, which rejects newer compose-spec keys) accepts the file;
- every bind-mounted host path, build context and secret file exists in the repo;
- Prometheus' and Alertmanager's configs pass promtool/amtool as the containers see them: the test
  rebuilds each container's file layout from the service's bind mounts and checks the file its
  command line names, so a rule path that resolves in the repo but not in the container fails;
- the stack's migexport config loads (with the secret files) and its state, log and baseline files
  live on the one volume `migexport` and `migrate` share;
- Grafana's provisioning: the datasource uid the dashboards use, the provider's path where the
  dashboards are mounted;
- the non-root users, and the Dockerfile's entrypoint, command, port and health check;
- the primary's initdb scripts, the demo migration and the workload run against a real PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from conftest import require_binary, running, scrape, value, wait_for
from migexport import localpg
from migexport.config import load_config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
STATE_VOLUME = "migexport-state"
CONFIG_IN_CONTAINER = "/etc/migexport/migexport.yml"
DATASOURCE_UID = "migexport-prometheus"


def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each volume of a service, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v["source"], v["target"], "ro" if v.get("read_only") else "rw"))
            continue
        parts = v.split(":")
        out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def host_path(source: str) -> Path:
    return (ROOT / source).resolve()


def mirror_container(service: dict, root: Path) -> Path:
    """Copy a service's bind mounts into `root` at their container paths: the files as the container sees them."""
    for source, target, _ in mounts(service):
        if not is_bind(source):
            continue
        dest = root / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = host_path(source)
        if src.is_dir():
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest)
    return root


def flag(argv: list[str], name: str) -> str:
    for arg in argv:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"--{name}= not in {argv}")


def secret_files() -> dict[str, Path]:
    return {name: host_path(spec["file"]) for name, spec in compose()["secrets"].items()}


def config_for_tests(tmp_path: Path) -> Path:
    """deploy/migexport.yml with /run/secrets/NAME read from the secret's file in the repo."""
    files = secret_files()
    text = re.sub(
        r"/run/secrets/([A-Za-z0-9_.-]+)", lambda m: str(files[m.group(1)]), (DEPLOY / "migexport.yml").read_text()
    )
    path = tmp_path / "migexport.yml"
    path.write_text(text)
    return path


def test_docker_compose_config_accepts_the_file() -> None:
    binary = require_binary("docker-compose", "docker-compose")
    proc = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "config", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    data = compose()
    assert "name" not in data, "docker-compose 1.29 rejects a top-level name:"
    for svc in data["services"].values():
        assert "start_interval" not in svc.get("healthcheck", {}), "docker-compose 1.29 rejects start_interval"


README_COMPOSE = re.compile(r"^\s*(?:\$\s*)?docker-compose\s+(.*)$")
# Options that take a value: before the subcommand (global), and after it (run, exec, logs, up).
GLOBAL_VALUE_OPTIONS = {"-f", "--file", "-p", "--project-name", "--profile", "--env-file"}
VALUE_OPTIONS = {"-e", "-u", "--user", "--entrypoint", "-w", "--workdir", "--name", "-v", "--volume", "-l"}
VALUE_OPTIONS |= {"--label", "--index", "--tail", "--scale", "-t", "--timeout"}
VERBS_NAMING_ONE = {"run", "exec"}
VERBS_NAMING_ALL = {"up", "logs", "stop", "start", "restart", "ps", "build", "pull", "top", "rm", "kill"}


def compose_commands(markdown: str) -> list[list[str]]:
    """The docker-compose command lines of a markdown text's code blocks (comments dropped)."""
    commands, in_code = [], False
    for line in markdown.splitlines():
        if line.strip().startswith("```"):
            in_code = not in_code
            continue
        match = README_COMPOSE.match(line) if in_code else None
        if match:
            commands.append(shlex.split(match.group(1).split(" #", 1)[0]))
    return commands


def named_services(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """(subcommand, the services it names, the profiles given) of a docker-compose command line."""
    words, profiles, i = [], [], 0
    while i < len(argv):
        if argv[i] in (VALUE_OPTIONS if words else GLOBAL_VALUE_OPTIONS):
            if argv[i] == "--profile":
                profiles.append(argv[i + 1])
            i += 2
            continue
        if not argv[i].startswith("-"):
            words.append(argv[i])
            if words[0] in VERBS_NAMING_ONE and len(words) == 2:
                break  # the rest is the command run in the container
        i += 1
    if not words:
        return "", [], profiles
    verb = words[0]
    return verb, words[1:] if verb in VERBS_NAMING_ONE | VERBS_NAMING_ALL else [], profiles


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md"])
def test_documented_compose_commands_match_the_file(doc: str) -> None:
    """Each service a documented docker-compose command names is in the file; `up` of a profiled service
    gives its profile (`run` enables it by itself)."""
    svcs = services()
    path = ROOT / doc
    if not path.exists():
        return
    for argv in compose_commands(path.read_text()):
        verb, names, profiles = named_services(argv)
        for name in names:
            assert name in svcs, f"{doc}: docker-compose {shlex.join(argv)}: no service {name!r}"
            if verb == "up":
                assert set(svcs[name].get("profiles", [])) <= set(profiles), f"{doc}: {shlex.join(argv)}"


def test_deploy_readme_shows_bring_up_migrate_and_watch() -> None:
    documented = [named_services(argv) for argv in compose_commands((DEPLOY / "README.md").read_text())]
    assert any(verb == "up" for verb, _, _ in documented)
    assert any(verb == "run" and names == ["migrate"] for verb, names, _ in documented)
    assert any(verb == "logs" for verb, _, _ in documented)


def test_compose_command_parsing() -> None:
    assert named_services(shlex.split("--profile migrate run --rm migrate run -c x -- psql -f y")) == (
        "run",
        ["migrate"],
        ["migrate"],
    )
    assert named_services(shlex.split("-f docker-compose.yml up -d --build")) == ("up", [], [])
    assert named_services(shlex.split("exec -u postgres primary psql -d app")) == ("exec", ["primary"], [])
    assert named_services(shlex.split("logs -f migexport app")) == ("logs", ["migexport", "app"], [])


def test_the_stack_has_every_service() -> None:
    assert set(services()) >= {
        "primary",
        "replica",
        "app",
        "migexport",
        "migrate",
        "prometheus",
        "alertmanager",
        "grafana",
    }


def test_every_bind_mount_build_context_and_secret_exists() -> None:
    missing = []
    for name, svc in services().items():
        for source, target, _ in mounts(svc):
            if is_bind(source) and not host_path(source).exists():
                missing.append(f"{name}: {source} (mounted at {target})")
        build = svc.get("build")
        if build is not None:
            context = host_path(build if isinstance(build, str) else build.get("context", "."))
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            if not dockerfile.is_file():
                missing.append(f"{name}: build {dockerfile}")
    # docker-compose 1.29 does not check secret files itself.
    missing += [f"secret {name}: {path}" for name, path in secret_files().items() if not path.is_file()]
    declared = set(compose()["secrets"])
    for name, svc in services().items():
        missing += [f"{name}: secret {s} not declared" for s in svc.get("secrets", []) if s not in declared]
    assert not missing, missing


def test_executable_scripts_keep_their_mode() -> None:
    """The postgres image executes an initdb .sh only if it is executable (else it sources it, under its own set -e)."""
    for script in (DEPLOY / "initdb" / "02-roles.sh", DEPLOY / "replica" / "entrypoint.sh"):
        assert os.access(script, os.X_OK), script
        subprocess.run(["bash", "-n", str(script)], check=True)
    if not (ROOT / ".git").exists():
        return  # an export of the repo: the modes above are what it holds
    listed = subprocess.run(
        ["git", "ls-files", "-s", "deploy/initdb/02-roles.sh", "deploy/replica/entrypoint.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Committed 100755, or the next checkout loses the bit (a new file not yet added is not listed).
    for line in listed.splitlines():
        assert line.startswith("100755"), line


def test_prometheus_config_passes_promtool_as_the_container_sees_it(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    prometheus = services()["prometheus"]
    root = mirror_container(prometheus, tmp_path / "prometheus")
    config_path = root / flag(prometheus["command"], "config.file").lstrip("/")
    proc = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The glob of rule_files found the repo's rules (an empty glob passes promtool silently).
    assert "migexport.rules.yml" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    config = yaml.safe_load(config_path.read_text())
    migexport_jobs = [j for j in config["scrape_configs"] if j["job_name"] == "migexport"]
    assert [t for j in migexport_jobs for s in j["static_configs"] for t in s["targets"]] == ["migexport:9745"]
    assert config["global"]["scrape_interval"] == "15s"
    # A hung database must not fail the scrape: migexport answers within its own scrape_timeout.
    exporter_timeout = load_config(config_for_tests(tmp_path)).scrape_timeout_seconds
    assert float(migexport_jobs[0]["scrape_timeout"].removesuffix("s")) > exporter_timeout
    targets = [t for a in config["alerting"]["alertmanagers"] for s in a["static_configs"] for t in s["targets"]]
    assert targets == ["alertmanager:9093"]


def test_alertmanager_config_passes_amtool_as_the_container_sees_it(tmp_path: Path) -> None:
    amtool = require_binary("amtool", "prometheus-alertmanager")
    alertmanager = services()["alertmanager"]
    root = mirror_container(alertmanager, tmp_path / "alertmanager")
    config_path = root / flag(alertmanager["command"], "config.file").lstrip("/")
    assert config_path.read_text() == (ROOT / "rules" / "alertmanager.yml").read_text()
    proc = subprocess.run([amtool, "check-config", str(config_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_migexport_config_loads_and_its_files_are_on_the_shared_volume(tmp_path: Path) -> None:
    config = load_config(config_for_tests(tmp_path))
    assert [t.name for t in config.targets] == ["primary", "replica"]
    assert config.migration.role == "migration"
    assert config.migration.target == "primary"
    files = [config.migration.state_file, config.migration.log_file, config.baseline_file]
    assert all(f.startswith("/") for f in files), files  # relative ones would land next to the read-only config
    for name in ("migexport", "migrate"):
        svc = services()[name]
        by_target = {target: source for source, target, _ in mounts(svc)}
        assert by_target.get(CONFIG_IN_CONTAINER) == "./deploy/migexport.yml", name
        volume_at = [target for source, target, _ in mounts(svc) if source == STATE_VOLUME]
        assert len(volume_at) == 1, f"{name}: {STATE_VOLUME} mounted {volume_at}"
        for f in files:
            assert Path(f).parent == Path(volume_at[0]), f"{name}: {f} is not on {STATE_VOLUME} ({volume_at[0]})"
        # Every DSN file of the config is a secret of the service.
        wanted = set(re.findall(r"/run/secrets/([A-Za-z0-9_.-]+)", (DEPLOY / "migexport.yml").read_text()))
        assert wanted <= set(svc.get("secrets", [])), f"{name}: secrets {svc.get('secrets')} lack {wanted}"
    assert STATE_VOLUME in compose()["volumes"]
    assert services()["migexport"]["command"] == ["serve", "-c", CONFIG_IN_CONTAINER]
    migrate = services()["migrate"]
    assert migrate["command"][:3] == ["run", "-c", CONFIG_IN_CONTAINER]
    assert migrate["environment"]["PGAPPNAME"] == config.migration.session_application_name
    assert migrate["environment"]["PGUSER"] == config.migration.role
    assert migrate.get("profiles") or migrate.get("restart") == "no"


def test_dsn_secrets_match_the_role_passwords() -> None:
    files = secret_files()
    password = files["migexport_password"].read_text().strip()
    for name, host in (("migexport_primary_dsn", "primary"), ("migexport_replica_dsn", "replica")):
        dsn = conninfo_to_dict(files[name].read_text().strip())
        assert dsn["host"] == host and host in services()
        assert dsn["user"] == "migexport"
        assert dsn["password"] == password, f"{name}: its password is not migexport_password's"


def test_grafana_provisioning() -> None:
    grafana = services()["grafana"]
    assert grafana["image"] == "grafana/grafana:11.6.0"
    by_source = {source: target for source, target, _ in mounts(grafana)}
    assert by_source["./dashboards/provisioning"] == "/etc/grafana/provisioning"
    provisioning = ROOT / "dashboards" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    [prometheus] = datasources["datasources"]
    assert prometheus["uid"] == DATASOURCE_UID
    assert prometheus["type"] == "prometheus"
    assert prometheus["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((provisioning / "dashboards" / "migexport.yml").read_text())
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    # The provider reads the directory where the repo's dashboards/ is mounted (whole: its JSON files
    # are generated by `migexport dashboards` and may come and go).
    assert provider["options"]["path"] == by_source["./dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(by_source["./dashboards"])
    # Dashboards (generated by `migexport dashboards`) name no datasource uid but the provisioned one:
    # a hard-coded datasource is the provisioned uid, a variable defaults to it.
    for dashboard in sorted((ROOT / "dashboards").glob("*.json")):
        doc = json.loads(dashboard.read_text())
        for uid in datasource_uids(doc):
            assert uid == DATASOURCE_UID or uid.startswith("$"), f"{dashboard.name}: datasource uid {uid!r}"
        for var in doc.get("templating", {}).get("list", []):
            if var.get("type") == "datasource" and var.get("current"):
                assert var["current"].get("value") in (DATASOURCE_UID, "default"), f"{dashboard.name}: {var}"


def datasource_uids(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [] if not isinstance(node.get("datasource"), dict) else [str(node["datasource"].get("uid", ""))]
        return found + [u for v in node.values() for u in datasource_uids(v)]
    if isinstance(node, list):
        return [u for v in node for u in datasource_uids(v)]
    return []


def test_services_run_as_non_root() -> None:
    svcs = services()
    for name in ("migexport", "migrate", "app"):
        user = str(svcs[name].get("user", ""))
        assert user and user.split(":")[0] not in ("0", "root"), f"{name}: user {user!r}"
    assert str(svcs["grafana"]["user"]) == "472"
    assert svcs["replica"]["user"] == "postgres"
    # primary: the postgres image starts as root only to fix ownership, then drops to postgres itself.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert 'ENTRYPOINT ["migexport"]' in dockerfile
    assert f'CMD ["serve", "-c", "{CONFIG_IN_CONTAINER}"]' in dockerfile
    assert re.search(r"^EXPOSE 9745$", dockerfile, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/metrics", dockerfile, re.M)
    assert "pip install" in dockerfile and ' ".[lint]"' in dockerfile  # the package, with squawk for preflight
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", ".pytest_cache", ".ruff_cache"} <= set(ignored)
    # The image's health check is the exporter's: the other services of the image turn it off.
    for name in ("app", "migrate"):
        assert svcs[name]["healthcheck"] == {"disable": True}, name


def test_primary_preloads_pg_stat_statements_and_replica_streams() -> None:
    svcs = services()
    assert "shared_preload_libraries=pg_stat_statements" in svcs["primary"]["command"]
    assert "wal_level=replica" in svcs["primary"]["command"]
    script = (DEPLOY / "replica" / "entrypoint.sh").read_text()
    assert (
        "pg_basebackup" in script
        and "-S replica1" in script
        and "shared_preload_libraries=pg_stat_statements" in script
    )
    assert "pg_create_physical_replication_slot('replica1')" in (DEPLOY / "initdb" / "sql" / "roles.sql").read_text()


ARCHIVE_IN_IMAGE = "/var/lib/postgresql/archive"


def archive_settings(archive: Path) -> dict[str, str]:
    """The compose primary's WAL archiving (its `-c` arguments), into `archive` instead of the container."""
    command = services()["primary"]["command"]
    out = {}
    for pair in (command[i + 1] for i, arg in enumerate(command) if arg == "-c"):
        key, _, value = pair.partition("=")
        if key.startswith("archive_"):
            out[key] = "'" + value.replace(ARCHIVE_IN_IMAGE, str(archive)).replace("'", "''") + "'"
    assert set(out) == {"archive_mode", "archive_command"}, command
    return out


@pytest.fixture(scope="module")
def fresh_pg():
    try:
        localpg.find_bindir()
    except localpg.LocalPgError as exc:
        pytest.fail(str(exc), pytrace=False)
    # Outside pytest's root-only temp directories: the server user writes the archive.
    archive = Path(tempfile.mkdtemp(prefix="migexport-compose-archive-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(archive, user=localpg.SUPERUSER)
        settings = archive_settings(archive)
        with localpg.local_setup(replicas=0, prefix="migexport-compose-", settings=settings) as setup:
            yield setup.primary
    finally:
        shutil.rmtree(archive, ignore_errors=True)


@pytest.fixture(scope="module")
def stack_primary(fresh_pg: localpg.LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A primary after what the postgres image runs on its first start (deploy/initdb/, in its order);
    with the pg_hba.conf the roles script appended to."""
    cluster = fresh_pg
    with cluster.connect() as conn:
        conn.execute("CREATE DATABASE app")
    pgdata = tmp_path_factory.mktemp("initdb") / "pgdata"
    pgdata.mkdir()
    (pgdata / "pg_hba.conf").write_text("host all all all scram-sha-256\n")
    for script in sorted((DEPLOY / "initdb").iterdir()):
        if script.suffix == ".sql":
            psql(cluster, "-f", str(script))
        elif script.suffix == ".sh":
            env = {
                "POSTGRES_USER": "postgres",
                "POSTGRES_DB": "app",
                "PGDATA": str(pgdata),
                "PGHOST": "127.0.0.1",
                "PGPORT": str(cluster.port),
                "SECRETS_DIR": str(DEPLOY / "secrets"),
                "PATH": f"{cluster.bindir}:{os.environ['PATH']}",
            }
            proc = subprocess.run(["bash", str(script)], env={**os.environ, **env}, capture_output=True, text=True)
            assert proc.returncode == 0, proc.stdout + proc.stderr
    return cluster, pgdata


def psql(cluster: localpg.LocalCluster, *args: str, user: str = "postgres", env: dict | None = None) -> str:
    proc = subprocess.run(
        [str(cluster.bindir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(cluster.port),
         "-U", user, "-d", "app", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_initdb_migration_and_workload_on_a_real_server(stack_primary: tuple, tmp_path: Path) -> None:
    """What the primary's first start runs (in the image's order), then the demo migration as `migrate`
    runs it and a transaction of the workload: each on a real PostgreSQL, each role with only its grants."""
    cluster, pgdata = stack_primary
    assert "host replication replicator all scram-sha-256" in (pgdata / "pg_hba.conf").read_text()

    with cluster.connect(dbname="app") as conn:
        roles = dict(
            conn.execute(
                "SELECT rolname, rolconnlimit FROM pg_roles"
                " WHERE rolname IN ('migexport', 'app', 'migration', 'replicator')"
            ).fetchall()
        )
        assert set(roles) == {"migexport", "app", "migration", "replicator"}
        assert roles["migexport"] > 0
        assert conn.execute("SELECT pg_has_role('migexport', 'pg_monitor', 'member')").fetchone()[0]
        assert not conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'migexport'").fetchone()[0]
        settings = conn.execute(
            "SELECT setconfig FROM pg_db_role_setting WHERE setrole = 'migration'::regrole"
        ).fetchone()[0]
        assert "lock_timeout=5s" in settings
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'replica1'").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'").fetchone()[0] == 1

    config = load_config(config_for_tests(tmp_path))
    # The exporter's probes run as migexport.
    for probe in config.probes:
        with psycopg.connect(cluster.dsn("app", "migexport"), autocommit=True) as conn:
            assert conn.execute(probe.sql).fetchone()[0] >= 0, probe.name

    # A transaction of the workload, as app.
    spec = importlib.util.spec_from_file_location("demo_app", DEPLOY / "workload" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    with psycopg.connect(cluster.dsn("app", "app")) as conn:
        before = conn.execute("SELECT count(*) FROM shop.orders").fetchone()[0]
        conn.commit()
        app.one_transaction(conn, error_rate=0.0)
        with pytest.raises(app.SimulatedError):
            app.one_transaction(conn, error_rate=1.0)
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone()[0] == before + 1

    # The demo migration, as the migrate service runs it (psql as the migration role), twice: idempotent.
    migration = services()["migrate"]["command"]
    sql_file = migration[migration.index("-f") + 1]
    host_file = DEPLOY / "migrations" / Path(sql_file).name
    assert services()["migrate"]["volumes"].count("./deploy/migrations:/migrations:ro") == 1
    for _ in range(2):
        psql(cluster, "-f", str(host_file), user="migration", env={"PGAPPNAME": "migration"})
    with cluster.connect(dbname="app") as conn:
        assert conn.execute("SELECT count(*) FROM shop.orders WHERE status IS NULL").fetchone()[0] == 0
        assert conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'shop.orders_status'::regclass"
        ).fetchone()[0]
    # The app keeps working on the migrated table.
    with psycopg.connect(cluster.dsn("app", "app")) as conn:
        app.one_transaction(conn, error_rate=0.0)
        assert conn.execute("SELECT status FROM shop.orders ORDER BY id DESC LIMIT 1").fetchone()[0] == "new"


def as_postgres() -> list[str]:
    """As the replica service runs: the postgres user (postgres refuses to run as root)."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@dataclass
class StackReplica:
    cluster: localpg.LocalCluster
    process: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def stack_replica(stack_primary: tuple) -> Iterator[StackReplica]:
    """deploy/replica/entrypoint.sh, as the replica service runs it (as postgres, with the replication
    secret), against the initialised primary."""
    cluster, _ = stack_primary
    base = localpg.make_base_dir("migexport-compose-replica-")  # the postgres user's, as the volume is
    pgdata = base / "pgdata"
    port = localpg.free_port()
    # The script and secrets are mounted into the container; here the postgres user reads copies, since
    # the checkout may sit in a directory only root can enter (a mktemp -d clone).
    script = base / "entrypoint.sh"
    shutil.copy(DEPLOY / "replica" / "entrypoint.sh", script)
    secrets = base / "secrets"
    shutil.copytree(DEPLOY / "secrets", secrets)
    if os.geteuid() == 0:
        for path in (script, secrets, *secrets.rglob("*")):
            shutil.chown(path, user="postgres", group=None)
    env = {
        "PGDATA": str(pgdata),
        "PRIMARY_HOST": "127.0.0.1",
        "PRIMARY_PORT": str(cluster.port),
        "SECRETS_DIR": str(secrets),
        "PATH": f"{cluster.bindir}:{os.environ['PATH']}",
    }
    args = ["-c", f"port={port}", "-c", f"unix_socket_directories={base}", "-c", "listen_addresses=127.0.0.1"]
    argv = [*as_postgres(), "env", *(f"{k}={v}" for k, v in env.items()), "bash", str(script), *args]
    log_path = base / "replica.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    replica = localpg.LocalCluster(name="replica", datadir=pgdata, port=port, bindir=cluster.bindir)
    try:
        yield StackReplica(replica, proc, log_path)
    finally:
        stop = [str(cluster.bindir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "-w", "stop"]
        subprocess.run([*as_postgres(), *stop], capture_output=True, check=False)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def wait_streaming(stack: StackReplica) -> None:
    def streaming() -> bool:
        try:
            with stack.cluster.connect() as conn:
                return conn.execute("SELECT status FROM pg_stat_wal_receiver").fetchone() == ("streaming",)
        except psycopg.OperationalError:
            return stack.process.poll() is not None

    wait_for(streaming, timeout=60, what="the replica to stream")
    assert stack.process.poll() is None, stack.log.read_text()


def test_replica_entrypoint_clones_the_primary_and_streams(
    stack_primary: tuple, stack_replica: StackReplica, tmp_path: Path
) -> None:
    """It clones through slot replica1, streams, and keeps what a restart of its container needs."""
    cluster, _ = stack_primary
    wait_streaming(stack_replica)
    replica = stack_replica.cluster
    with replica.connect(dbname="app") as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        assert conn.execute("SELECT slot_name FROM pg_stat_wal_receiver").fetchone()[0] == "replica1"
        assert conn.execute("SHOW shared_preload_libraries").fetchone()[0] == "pg_stat_statements"
    # The probe of deploy/migexport.yml's replica target answers, as migexport.
    with psycopg.connect(replica.dsn("app", "migexport"), autocommit=True) as conn:
        probe = next(p for p in load_config(config_for_tests(tmp_path)).probes if p.target == "replica")
        assert conn.execute(probe.sql).fetchone()[0] >= 0
    with cluster.connect() as conn:
        assert conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = 'replica1'").fetchone()[0]
    # A restart of the container must reconnect: the clone keeps the replication password.
    auto_conf = subprocess.run(
        [*as_postgres(), "cat", str(replica.datadir / "postgresql.auto.conf")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "primary_conninfo" in auto_conf and "password=" in auto_conf


def local_dsn(secret: Path, cluster: localpg.LocalCluster, into: Path) -> Path:
    """A copy of a DSN secret that reaches `cluster` instead of the compose service."""
    dsn = conninfo_to_dict(secret.read_text().strip())
    dsn.update(host="127.0.0.1", port=str(cluster.port))
    path = into / secret.name
    path.write_text(make_conninfo(**dsn) + "\n")
    return path


def test_the_stack_without_containers(stack_primary: tuple, stack_replica: StackReplica, tmp_path: Path) -> None:
    """The stack's processes with its files, as compose wires them, on this machine: the workload, `migexport
    serve` with deploy/migexport.yml (hosts and paths rewritten to the test's), and the `migrate` service's
    command with its environment. Serve sees both targets, the probes, the app's health, and the migration."""
    cluster, _ = stack_primary
    wait_streaming(stack_replica)
    app_port, listen_port = localpg.free_port(), localpg.free_port()
    files = secret_files()
    text = (DEPLOY / "migexport.yml").read_text()
    for name, target in (("migexport_primary_dsn", cluster), ("migexport_replica_dsn", stack_replica.cluster)):
        text = text.replace(f"/run/secrets/{name}", str(local_dsn(files[name], target, tmp_path)))
    volume = next(t for s, t, _ in mounts(services()["migexport"]) if s == STATE_VOLUME)
    text = text.replace(volume + "/", f"{tmp_path}/state/").replace("http://app:8080/", f"http://127.0.0.1:{app_port}/")
    text = text.replace('listen: ":9745"', f'listen: "127.0.0.1:{listen_port}"')
    text = text.replace("/migrations/", f"{DEPLOY}/migrations/")
    (tmp_path / "state").mkdir()
    config_path = tmp_path / "migexport.yml"
    config_path.write_text(text)
    config = load_config(config_path)
    assert config.migration.state_file.startswith(f"{tmp_path}/state/")

    app_env = {k: str(v) for k, v in services()["app"]["environment"].items()}
    app_dsn = conninfo_to_dict(app_env["APP_DSN"])
    app_dsn.update(host="127.0.0.1", port=str(cluster.port))
    app_env.update(
        APP_DSN=make_conninfo(**app_dsn),
        APP_PASSWORD_FILE=str(files["app_password"]),
        APP_HEALTH_PORT=str(app_port),
    )
    migexport = str(Path(sys.executable).parent / "migexport")
    url = f"http://127.0.0.1:{listen_port}"
    with (
        running(
            ["env", *(f"{k}={v}" for k, v in app_env.items()), sys.executable, str(DEPLOY / "workload" / "app.py")],
            tmp_path / "app.log",
            f"http://127.0.0.1:{app_port}/healthz",
            "the workload",
        ),
        running([migexport, "serve", "-c", str(config_path)], tmp_path / "serve.log", url + "/metrics", "serve"),
    ):

        def ready() -> bool:
            m = scrape(url)
            wanted = [
                ("migexport_up", {"target": "primary"}),
                ("migexport_up", {"target": "replica"}),
                ("migexport_app_health_up", {"app": "app"}),
                *(("migexport_probe_success", {"target": p.target, "probe": p.name}) for p in config.probes),
            ]
            return all(m.get((n, frozenset(lbl.items()))) == 1 for n, lbl in wanted)

        wait_for(ready, timeout=60, what="serve to see both targets, the probes and the app")

        # An earlier test applied the demo migration to this primary: its rollback file undoes it, so the
        # migration below adds what verify.expect says it adds.
        rollback = DEPLOY / "migrations" / "001_add_orders_status.rollback.sql"
        password = {"PGPASSWORD": files["migration_password"].read_text().strip()}
        psql(cluster, "-f", str(rollback), user="migration", env=password)
        # As the README has it: the baseline first (short here), timed by the running exporter.
        baseline = subprocess.run(
            [migexport, "baseline", "-c", str(config_path), "--duration", "5s", "--exporter-url", url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert baseline.returncode == 0, baseline.stdout + baseline.stderr
        migrate = services()["migrate"]
        command = list(migrate["command"])
        assert command[:3] == ["run", "-c", CONFIG_IN_CONTAINER]
        command[2] = str(config_path)
        sql = command.index("-f") + 1
        command[sql] = str(DEPLOY / "migrations" / Path(command[sql]).name)
        env = {**os.environ, **{k: str(v) for k, v in migrate["environment"].items()}}
        env.update(
            PGHOST="127.0.0.1", PGPORT=str(cluster.port), PGPASSWORD=files["migration_password"].read_text().strip()
        )
        env["PATH"] = f"{cluster.bindir}:{env['PATH']}"
        proc = subprocess.run([migexport, *command], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        m = scrape(url)
        mig = {"migration_id": config.migration.id}
        assert value(m, "migexport_migration_in_progress", **mig) == 0
        assert value(m, "migexport_migration_failed", **mig) == 0
        assert value(m, "migexport_migration_end_timestamp_seconds", **mig) > 0
        assert value(m, "migexport_migration_watch_active", **mig) == 1
        assert "Migration started at" in Path(config.migration.log_file).read_text()
        # `run` checked before (go: WAL archived, the baseline, the replica streaming, the rollback file)
        # and verified after: the intended column and index, the backfill complete.
        state = json.loads(Path(config.migration.state_file).read_text())
        assert state["preflight"]["result"] == "go", (state["preflight"], proc.stdout)
        assert state["verify"]["result"] == "passed", (state["verify"], proc.stdout)
        assert state["verify"]["integrity"] == "1/1"
