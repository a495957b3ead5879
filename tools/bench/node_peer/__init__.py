"""The benchmark's optional ``node-peer`` backend: Node socket.io 4.8 with
``@socket.io/redis-adapter`` in sharded mode, on the same kind of Redis 7 Cluster as
``redis-sharded``.

``server.mjs`` beside this file serves the chat protocol the load generator speaks
(join, leave, chat with acks, broadcast to the other members), so the bench drives it
exactly like a gateway and reads the same ``/healthz`` and ``/metrics``. Its packages
(socket.io, @socket.io/redis-adapter, redis v4) come from npm through the repository's
package.json and package-lock.json (``scripts/bootstrap`` runs ``npm ci``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from gateway.processes import REPO_ROOT, GatewayNode, LocalCluster, RedisCluster, spawn

NODE_PEER = "node-peer"
SERVER = Path(__file__).with_name("server.mjs")
#: what server.mjs imports, from the repository's node_modules
PACKAGES = ("socket.io", "@socket.io/redis-adapter", "redis")
#: scenarios the Node peer does not take part in, and why
SKIPPED = {
    "cluster-api": "the Node peer serves no HTTP cluster API (socket.io's fetchSockets is "
                   "not exposed over HTTP)",
    "scale": "the scale scenario compares nats, redis-sharded and stock-redis, with the "
             "capacity model's predictions for them",
}


def problem(root: Path = REPO_ROOT) -> str | None:
    """Why the Node peer cannot run here (no node, or its npm packages missing), or None."""
    if shutil.which("node") is None:
        return "node is not on PATH (the node-peer backend runs Node.js socket.io)"
    missing = [p for p in PACKAGES if not (root / "node_modules" / p / "package.json").is_file()]
    if missing:
        return (f"npm packages missing: {', '.join(missing)} (run `npm ci` in {root}, as "
                "scripts/bootstrap does)")
    return None


def start(workdir: Path, node_id: str, port: int, cluster: LocalCluster[Any] | None,
          index: int) -> GatewayNode:
    """Start one Node peer on ``port`` against the Redis Cluster ``cluster``; every master
    is a seed, starting with master ``index`` (as gateways take different seeds)."""
    why = problem()
    if why is not None:
        raise RuntimeError(f"node-peer: {why}")
    if not isinstance(cluster, RedisCluster):
        raise RuntimeError("node-peer runs on a Redis Cluster")
    node = GatewayNode(node_id, "127.0.0.1", port)
    nodes = cluster.nodes[index % len(cluster.nodes):] + cluster.nodes[:index % len(cluster.nodes)]
    seeds = [arg for n in nodes for arg in ("--redis-url", n.url)]
    node_bin = shutil.which("node") or "node"
    node.child = spawn(node_id, [node_bin, str(SERVER), "--host", node.host, "--port", str(port),
                                 "--node-id", node_id, *seeds], workdir, cwd=REPO_ROOT)
    return node
