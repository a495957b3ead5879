"""The Kubernetes manifests (infra/kustomization.yaml and infra/k8s/), offline.

They are rendered as ``kustomize build infra`` renders them, by :func:`render` below
(the few kustomize features they use, and no other: an unknown one fails here
instead of being ignored); where a kustomize binary is at hand (``kubectl
kustomize``), its output must be the same. Every rendered resource must then be
valid against the Kubernetes API schemas of 1.31 and of the newest release
kubernetes-validate knows, strictly: an unknown or misspelt field fails. And what
matters is checked against its source: the NATS ConfigMap is the files of
infra/nats/, every variable those files read is set, the gateway's environment is
one ``gateway serve`` accepts, the Secret keys are exactly the example's.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_schemas

from gateway import app as gateway_app
from gateway import config as cfg
from gateway.guards import RequestGuard
from tests.helpers import REPO

INFRA = REPO / "infra"
SECRET_EXAMPLE = INFRA / "k8s" / "secret.env.example"
#: the oldest Kubernetes the manifests are for (a preStop `sleep` needs 1.30+), and
#: the newest whose schemas kubernetes-validate carries
VERSIONS = ("1.31.0", kubernetes_schemas.latest_version())
#: the uid of `nobody`, whom infra/Dockerfile's `USER` names
NOBODY = 65534
#: aiohttp's wait for requests in flight at shutdown (gateway/cli.py, `shutdown_timeout`)
REQUESTS_SHUTDOWN_TIMEOUT = 5.0

Resource = dict[str, Any]


def read_env_file(path: Path) -> dict[str, str]:
    """A kustomize env file: ``KEY=VALUE`` lines; blank lines and ``#`` comments skipped."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            values[key.strip()] = value
    return values


def render(root: Path = INFRA, secret_env: Path = SECRET_EXAMPLE) -> list[Resource]:
    """What ``kustomize build root`` makes, generated names without kustomize's hash
    suffix, the Secret's env file read from ``secret_env``."""
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "resources", "configMapGenerator", "secretGenerator"}
    assert set(kustomization) <= known, f"not rendered here: {set(kustomization) - known}"
    resources: list[Resource] = []
    for path in kustomization["resources"]:
        resources += [doc for doc in yaml.safe_load_all((root / path).read_text()) if doc]
    for generator in kustomization["configMapGenerator"]:
        assert set(generator) == {"name", "files"}, generator
        resources.append({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]},
            "data": {Path(file).name: (root / file).read_text() for file in generator["files"]},
        })
    for generator in kustomization["secretGenerator"]:
        assert set(generator) == {"name", "envs"} and len(generator["envs"]) == 1, generator
        values = read_env_file(secret_env)
        resources.append({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": generator["name"]},
            "data": {key: base64.b64encode(value.encode()).decode()
                     for key, value in values.items()},
        })
    return resources


RESOURCES = render()


def find(kind: str, name: str) -> Resource:
    found = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(workload: Resource, name: str) -> dict[str, Any]:
    pod = workload["spec"]["template"]["spec"]
    found = [c for c in pod["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def pods() -> Iterator[tuple[Resource, dict[str, Any]]]:
    """Every workload and its pod spec."""
    for resource in RESOURCES:
        if resource["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield resource, resource["spec"]["template"]["spec"]


def environment(box: dict[str, Any], pod_name: str, secrets: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: field references, secret
    keys, and ``$(VAR)`` expanded from the variables above it."""
    env: dict[str, str] = {}
    for var in box.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                                      lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", var
            env[var["name"]] = pod_name
        else:
            env[var["name"]] = secrets[var["valueFrom"]["secretKeyRef"]["key"]]
    return env


def secret_key_refs() -> Iterator[dict[str, str]]:
    for _workload, pod in pods():
        for box in pod["containers"]:
            for var in box.get("env", []):
                if "secretKeyRef" in var.get("valueFrom", {}):
                    yield var["valueFrom"]["secretKeyRef"]


def example_secrets() -> dict[str, str]:
    """A value of 40 bytes for every key of the example, as a user would write."""
    return {key: f"{key.lower()}-{'x' * 40}"[:40] for key in read_env_file(SECRET_EXAMPLE)}


def test_the_kustomization_renders_every_manifest_and_kind_we_ship() -> None:
    kinds = sorted(f"{r['kind']}/{r['metadata']['name']}" for r in RESOURCES)
    assert kinds == [
        "ConfigMap/nats-config", "Deployment/gateway", "Job/jetstream-provision",
        "PodDisruptionBudget/gateway", "PodDisruptionBudget/nats", "Secret/gateway-secrets",
        "Service/gateway", "Service/gateway-admin", "Service/nats", "Service/nats-routes",
        "StatefulSet/nats",
    ]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_resource_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    for resource in RESOURCES:
        where = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_schemas.validate(resource, version, strict=True)
        except kubernetes_schemas.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")
        except kubernetes_schemas.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{where} is not valid Kubernetes {version}: {path}: {exc.message}")


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(kustomize_command() is None, reason="no kustomize nor kubectl here")
def test_kustomize_renders_the_same(tmp_path: Path) -> None:
    # a copy, with the example as the Secret's env file (the real one is the user's)
    for path in ("kustomization.yaml", "k8s", "nats"):
        source = INFRA / path
        if source.is_dir():
            shutil.copytree(source, tmp_path / path)
        else:
            shutil.copy(source, tmp_path / path)
    shutil.copy(SECRET_EXAMPLE, tmp_path / "k8s" / "secret.env")
    command = kustomize_command()
    assert command is not None
    built = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True,
                           timeout=60, check=True).stdout
    generated = {r["metadata"]["name"] for r in RESOURCES if r["kind"] in ("ConfigMap", "Secret")}
    suffixed = re.compile(rf"({'|'.join(map(re.escape, generated))})-[a-z0-9]{{10}}")

    def unhashed(node: Any) -> Any:  # kustomize's names are the generated ones + a hash
        if isinstance(node, dict):
            return {key: unhashed(value) for key, value in node.items()}
        if isinstance(node, list):
            return [unhashed(value) for value in node]
        if isinstance(node, str) and (match := suffixed.fullmatch(node)):
            return match[1]
        return node

    theirs = [unhashed(doc) for doc in yaml.safe_load_all(built) if doc]

    def key(resource: Resource) -> str:
        return f"{resource['kind']}/{resource['metadata']['name']}"

    assert sorted(theirs, key=key) == sorted(RESOURCES, key=key)


def test_the_nats_configmap_is_the_files_of_infra_nats() -> None:
    data = find("ConfigMap", "nats-config")["data"]
    files = {path.name: path.read_text() for path in (INFRA / "nats").glob("*.conf")}
    assert sorted(data) == sorted(files), "infra/kustomization.yaml lists every nats/*.conf"
    assert data == files


def config_reads(name: str, seen: set[str] | None = None) -> tuple[set[str], set[str]]:
    """(variables referenced, variables defined) by the NATS config file ``name`` and
    the files it includes. Quoted strings ("$JS.API...") and comments are no references."""
    seen = set() if seen is None else seen
    seen.add(name)
    code = "\n".join(line.split("#", 1)[0]
                     for line in (INFRA / "nats" / name).read_text().splitlines())
    code = re.sub(r'"[^"]*"', '""', code)
    used = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", code))
    defined = set(re.findall(r"^\s*([A-Z][A-Z0-9_]*)\s*[:=]", code, re.MULTILINE))
    for included in re.findall(r"^\s*include\s+\"?([^\s\"]+)", code, re.MULTILINE):
        if Path(included).name not in seen:
            more_used, more_defined = config_reads(Path(included).name, seen)
            used |= more_used
            defined |= more_defined
    return used, defined


def test_nats_runs_the_secure_config_with_every_variable_it_reads() -> None:
    nats = find("StatefulSet", "nats")
    server = container(nats, "nats")
    assert server["args"] == ["-c", "/etc/nats/node-secure.conf"]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    assert mounts["config"] == "/etc/nats"
    volumes = {v["name"]: v for v in nats["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "nats-config"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert server["image"] == compose["x-nats"]["image"].split(":-", 1)[1].rstrip("}")

    used, defined = config_reads("node-secure.conf")
    env = environment(server, "nats-0", example_secrets())
    unset = used - defined - set(env)
    assert not unset, f"node-secure.conf reads {sorted(unset)}: not set"
    assert "NATS_GATEWAY_PASSWORD" in env
    # JetStream's store is the volume claimed for each server
    assert mounts["jetstream"] == env["NATS_STORE_DIR"]
    claims = [c["metadata"]["name"] for c in nats["spec"]["volumeClaimTemplates"]]
    assert claims == ["jetstream"]


def test_every_nats_server_routes_to_every_server_by_its_stable_name() -> None:
    nats = find("StatefulSet", "nats")
    headless = find("Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    secrets = example_secrets()
    env = environment(container(nats, "nats"), "nats-1", secrets)
    assert env["NATS_SERVER_NAME"] == "nats-1"
    routes = sorted(value for name, value in env.items() if re.fullmatch(r"NATS_ROUTE_\d+", name))
    user, password = env["NATS_ROUTE_USER"], secrets["NATS_ROUTE_PASSWORD"]
    assert env["NATS_ROUTE_PASSWORD"] == password
    assert routes == [
        f"nats://{user}:{password}@nats-{i}.{headless['metadata']['name']}:{env['NATS_ROUTE_PORT']}"
        for i in range(nats["spec"]["replicas"])
    ]
    assert nats["spec"]["replicas"] == 3


def test_nats_probes_ask_the_monitoring_port_for_its_health() -> None:
    server = container(find("StatefulSet", "nats"), "nats")
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    env = environment(server, "nats-0", example_secrets())
    assert ports["monitor"] == int(env["NATS_HTTP_PORT"]) == 8222
    assert ports["client"] == int(env["NATS_CLIENT_PORT"])
    assert ports["cluster"] == int(env["NATS_ROUTE_PORT"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert server[probe]["httpGet"]["port"] == "monitor", probe
        assert server[probe]["httpGet"]["path"].partition("?")[0] == "/healthz", probe


def test_secret_keys_referenced_are_exactly_the_examples() -> None:
    example = set(read_env_file(SECRET_EXAMPLE))
    refs = list(secret_key_refs())
    assert {ref["name"] for ref in refs} == {"gateway-secrets"}
    assert {ref["key"] for ref in refs} == example
    assert set(find("Secret", "gateway-secrets")["data"]) == example
    assert all(value == "" for value in read_env_file(SECRET_EXAMPLE).values()), \
        "the example carries no value"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/k8s/secret.env"], cwd=REPO,
                             timeout=30)
    assert ignored.returncode == 0, "git must ignore infra/k8s/secret.env"


def gateway_environment() -> dict[str, str]:
    return environment(container(find("Deployment", "gateway"), "gateway"),
                       "gateway-7c9d8f6b5-x2k4q", example_secrets())


def test_the_gateway_environment_is_one_gateway_serve_accepts() -> None:
    env = gateway_environment()
    secret_variables = {name for name in env
                        if cfg.read_secrets({name: "x" * 40}) != cfg.Secrets()}
    settings = {variable for _flag, variable, _default, _help in cfg.describe()}
    unknown = set(env) - secret_variables - settings
    assert not unknown, f"`gateway serve` reads no {sorted(unknown)}"

    conf = cfg.from_args(argparse.Namespace(), env)
    assert cfg.unsealed_bus(conf) is None
    assert conf.backend == "nats" and not conf.recovery
    assert conf.node_id == "gateway-7c9d8f6b5-x2k4q"  # one per replica
    assert conf.host == conf.admin_host == "0.0.0.0"
    # other gateways forward this one's sessions to it at its pod's address
    assert conf.advertise_url == ""
    assert conf.secrets.nats_user == "gateway"
    assert conf.secrets.nats_password == example_secrets()["NATS_GATEWAY_PASSWORD"]
    assert conf.secrets.cluster_key == example_secrets()["GATEWAY_CLUSTER_KEY"]
    client_service = find("Service", "nats")["spec"]["ports"][0]
    assert conf.nats_urls == (f"nats://nats:{client_service['port']}",)

    ports = {p["name"]: p["containerPort"]
             for p in container(find("Deployment", "gateway"), "gateway")["ports"]}
    assert ports == {"http": conf.port, "admin": conf.admin_port}
    # the kubelet's probes name the pod's address in their Host header
    assert RequestGuard(conf).host_allowed(f"10.244.1.7:{conf.port}")


def test_the_gateways_are_configured_as_compose_configures_them() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    # no Redis Cluster here; the balancer compose puts in front is the Service here,
    # which hands over the clients' own addresses (externalTrafficPolicy: Local)
    left_out = {"REDIS_URL", "REDIS_USERNAME", "REDIS_PASSWORD", "GATEWAY_TRUSTED_PROXIES"}
    missing = set(compose["x-gateway-env"]) - left_out - set(gateway_environment())
    assert not missing, f"compose's gateways have {sorted(missing)}, these not"
    job = find("Job", "jetstream-provision")
    init = compose["services"]["jetstream-init"]
    box = container(job, "provision")
    assert box["command"] == init["command"] == ["python", "-m", "gateway", "provision"]
    assert set(init["environment"]) == {var["name"] for var in box["env"]}
    assert box["image"] == container(find("Deployment", "gateway"), "gateway")["image"] == \
        compose["x-gateway-image"]["image"].split(":-", 1)[1].rstrip("}")


def test_the_public_service_has_no_affinity_and_no_operator_port() -> None:
    public = find("Service", "gateway")["spec"]
    assert public.get("sessionAffinity", "None") == "None"
    assert [(p["port"], p["targetPort"]) for p in public["ports"]] == [(80, "http")]
    admin = find("Service", "gateway-admin")["spec"]
    assert admin["type"] == "ClusterIP"
    assert [(p["port"], p["targetPort"]) for p in admin["ports"]] == [(9001, "admin")]


def test_a_gateway_is_ready_while_its_broker_is_and_drains_within_its_grace() -> None:
    deployment = find("Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    gateway = container(deployment, "gateway")
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # the page: a NATS outage makes /healthz 503 and must not restart every gateway
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/", "port": "http"}
    assert (gateway_app.STATIC / "index.html").is_file()
    assert deployment["spec"]["replicas"] == 2
    pause = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    shutdown = (pause + gateway_app.SOCKETS_CLOSE_TIMEOUT + REQUESTS_SHUTDOWN_TIMEOUT
                + gateway_app.BROKER_CLOSE_TIMEOUT)
    assert pod["terminationGracePeriodSeconds"] > shutdown


def test_the_pods_run_as_nobody_on_a_read_only_root() -> None:
    assert re.search(r"^USER nobody$", (INFRA / "Dockerfile").read_text(), re.MULTILINE)
    for workload, pod in pods():
        if workload["metadata"]["name"] == "nats":
            continue  # the NATS image's own user
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == NOBODY
        for box in pod["containers"]:
            assert box["securityContext"]["readOnlyRootFilesystem"] is True
            assert box["securityContext"]["allowPrivilegeEscalation"] is False


def test_selectors_find_their_pods_and_budgets_allow_one_down() -> None:
    labels = {w["metadata"]["name"]: pod_labels
              for w, _pod in pods()
              if (pod_labels := w["spec"]["template"]["metadata"]["labels"])}
    for workload, _pod in pods():
        selector = workload["spec"].get("selector", {}).get("matchLabels")
        if selector:
            assert selector.items() <= labels[workload["metadata"]["name"]].items()
    selects = {"Service/gateway": "gateway", "Service/gateway-admin": "gateway",
               "Service/nats": "nats", "Service/nats-routes": "nats",
               "PodDisruptionBudget/gateway": "gateway", "PodDisruptionBudget/nats": "nats"}
    for what, workload_name in selects.items():
        kind, name = what.split("/")
        spec = find(kind, name)["spec"]
        selector = spec["selector"]["matchLabels"] if kind == "PodDisruptionBudget" \
            else spec["selector"]
        assert selector.items() <= labels[workload_name].items(), what
        if kind == "PodDisruptionBudget":
            assert spec["maxUnavailable"] == 1, what
