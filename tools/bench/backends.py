"""The systems the benchmark compares: which gateway each runs, its broker, and how
its gateways start.

``stock-redis`` gateways run python-socketio's own ``AsyncRedisManager`` behind the
same chat handlers, from the bench's own app module (:mod:`.stock`); the product
itself knows no baseline backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.processes import (
    GatewayNode,
    LocalCluster,
    NatsCluster,
    RedisCluster,
    RedisServer,
    free_ports,
    start_gateway,
)

from . import node_peer, stock
from .harness import GATEWAY_FLAGS

#: the systems compared, and the gateway each runs
#: (redis-cluster-classic: AsyncRedisManager's PUBLISH/SUBSCRIBE on a Redis Cluster)
GATEWAY_BACKEND = {"nats": "nats", "redis-sharded": "redis-sharded",
                   "stock-redis": stock.STOCK, "redis-cluster-classic": stock.STOCK}
BENCH_BACKENDS = tuple(GATEWAY_BACKEND)
#: run only when named in --backends (Node.js socket.io, see node_peer/)
OPTIONAL_BACKENDS = (node_peer.NODE_PEER,)
#: run only when named in --backends: a backend with connection state recovery (its
#: gateways get RECOVERY_FLAGS; recovery.py) -> the same backend without it
RECOVERY = {"nats-recovery": "nats"}
RECOVERY_BACKENDS = tuple(RECOVERY)
RECOVERY_FLAGS = ["--recovery", "on"]
GATEWAY_BACKEND.update(RECOVERY)


def gateway_flags(backend: str) -> list[str]:
    """Flags the gateways of bench backend ``backend`` get besides the broker's."""
    return list(RECOVERY_FLAGS) if backend in RECOVERY else []


def start_system_gateway(workdir: Path, node_id: str, port: int, gateway: str,
                         broker_args: Sequence[str], extra: Sequence[str] = ()) -> GatewayNode:
    """One gateway of kind ``gateway`` (a value of :data:`GATEWAY_BACKEND`), with the
    bench's flags: ours run ``python -m gateway serve``, stock runs :mod:`.stock`."""
    if gateway == stock.STOCK:
        return stock.start(workdir, node_id, port, broker_args, extra=GATEWAY_FLAGS)
    return start_gateway(workdir, node_id, port, gateway, broker_args,
                         extra=[*GATEWAY_FLAGS, *extra])


# -- brokers ---------------------------------------------------------------------


@dataclass
@dataclass
class Broker:
    """One benchmarked system's broker side: how to start it and read its counters."""

    name: str
    workdir: Path
    cluster: LocalCluster[Any] | None = None

    def start(self) -> None:
        if GATEWAY_BACKEND.get(self.name) == "nats":
            self.cluster = NatsCluster(self.workdir / "nats", size=3)
        elif self.name in ("redis-sharded", "redis-cluster-classic", node_peer.NODE_PEER):
            # redis-cluster-classic: AsyncRedisManager's PUBLISH/SUBSCRIBE on the same
            # cluster, each gateway on another master
            self.cluster = RedisCluster(self.workdir / "redis", size=3)
        else:
            self.cluster = RedisServer(self.workdir)
        self.cluster.start()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    def gateway(self, index: int) -> tuple[str, list[str]]:
        """(--backend, broker flags) for gateway ``index``."""
        assert self.cluster is not None
        return GATEWAY_BACKEND[self.name], [*self.cluster.gateway_args(index),
                                            *gateway_flags(self.name)]

    def counters(self) -> dict[str, dict[str, float]]:
        """Per broker node: messages and bytes in and out, from the broker itself."""
        out: dict[str, dict[str, float]] = {}
        if isinstance(self.cluster, NatsCluster):
            for node in self.cluster.nodes:
                varz = node.varz("varz") or {}
                connz = node.varz("connz?limit=4096") or {}
                out[node.name] = {k: float(varz.get(k, 0)) for k in
                                  ("in_msgs", "out_msgs", "in_bytes", "out_bytes")}
                # what crossed between this server and the gateways (routes excluded)
                conns = connz.get("connections") or []
                out[node.name]["client_in_bytes"] = float(sum(c["in_bytes"] for c in conns))
                out[node.name]["client_out_bytes"] = float(sum(c["out_bytes"] for c in conns))
        redis_nodes = [] if isinstance(self.cluster, NatsCluster) or self.cluster is None \
            else self.cluster.nodes
        for rnode in redis_nodes:
            stats = rnode.info("stats")
            calls = 0
            for line in rnode.cli("INFO", "commandstats").splitlines():
                if line.startswith(("cmdstat_publish:", "cmdstat_spublish:")):
                    calls += int(line.split("calls=")[1].split(",")[0])
            net_in = float(stats.get("total_net_input_bytes", 0))
            net_out = float(stats.get("total_net_output_bytes", 0))
            # client connections only: Redis counts the cluster bus separately
            out[rnode.name] = {"in_msgs": float(calls), "in_bytes": net_in, "out_bytes": net_out,
                               "client_in_bytes": net_in, "client_out_bytes": net_out}
        return out



def start_bench_gateway(broker: Broker, workdir: Path, node_id: str, index: int = 0,
                        extra: Sequence[str] = ()) -> GatewayNode:
    """Gateway ``index`` of ``broker``'s system (for node-peer: a Node socket.io server)."""
    if broker.name == node_peer.NODE_PEER:
        return node_peer.start(workdir, node_id, free_ports(1)[0], broker.cluster, index)
    name, args = broker.gateway(index)
    return start_system_gateway(workdir, node_id, free_ports(1)[0], name, args, extra)
