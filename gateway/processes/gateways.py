"""Gateway nodes (``python -m gateway serve``) as child processes."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SEALED_BACKENDS
from .children import REPO_ROOT, Child, http_json, spawn, wait_until

#: the cluster key of the gateways this process starts (one per run: the tests', the
#: bench's), unless the caller gives its own or asks for --insecure-bus
RUN_CLUSTER_KEY = secrets.token_urlsafe(32)
_ON = ("1", "on", "true", "yes")


@dataclass
class GatewayNode:
    node_id: str
    host: str
    port: int
    child: Child | None = None

    @property
    def name(self) -> str:
        return self.node_id

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def ready(self) -> bool:
        return self.healthz()[0] == 200

    def healthz(self) -> tuple[int, Any]:
        return http_json(f"{self.url}/healthz")


def gateway_argv(node_id: str, host: str, port: int, backend: str,
                 extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--backend", backend, "--host", host,
            "--port", str(port), "--node-id", node_id, *extra]


def start_gateway(workdir: Path, node_id: str, port: int, backend: str, broker_args: Sequence[str],
                  host: str = "127.0.0.1", extra: Sequence[str] = (),
                  env: dict[str, str] | None = None) -> GatewayNode:
    node = GatewayNode(node_id, host, port)
    argv = gateway_argv(node_id, host, port, backend, [*broker_args, *extra])
    node.child = spawn(node_id, argv, workdir, env=sealing_env(backend, env, extra),
                       cwd=REPO_ROOT)
    return node


def sealing_env(backend: str, env: Mapping[str, str] | None,
                extra: Sequence[str] = ()) -> dict[str, str]:
    """``env`` plus GATEWAY_CLUSTER_KEY=RUN_CLUSTER_KEY for a gateway on a multi-node
    backend that has no key (in ``env`` or this process's environment) and was not
    told --insecure-bus: ``serve`` refuses to run such a gateway unsealed."""
    out = dict(env or {})
    merged = {**os.environ, **out}
    insecure = "--insecure-bus" in extra or \
        merged.get("GATEWAY_INSECURE_BUS", "").lower() in _ON
    if backend in SEALED_BACKENDS and not insecure and not (
            merged.get("GATEWAY_CLUSTER_KEY") or merged.get("GATEWAY_CLUSTER_KEY_FILE")):
        out["GATEWAY_CLUSTER_KEY"] = RUN_CLUSTER_KEY
    return out


def wait_gateways(nodes: Sequence[GatewayNode], timeout: float = 20.0) -> None:
    children = [n.child for n in nodes if n.child is not None]
    wait_until(lambda: all(n.healthz()[0] == 200 for n in nodes), timeout,
               "gateways to answer /healthz", children)
