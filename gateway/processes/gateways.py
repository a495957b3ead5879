"""Gateway nodes (``python -m gateway serve``) as child processes."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .children import REPO_ROOT, Child, http_json, spawn, wait_until


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
    node.child = spawn(node_id, argv, workdir, env=env, cwd=REPO_ROOT)
    return node


def wait_gateways(nodes: Sequence[GatewayNode], timeout: float = 20.0) -> None:
    children = [n.child for n in nodes if n.child is not None]
    wait_until(lambda: all(n.healthz()[0] == 200 for n in nodes), timeout,
               "gateways to answer /healthz", children)
