"""Broker traffic in the bench's scenarios, counted the same way for every broker, and
what the brokers count per connection.

Bytes are counted by the kernel on the sockets (``ss -tin``, see ``sockets.py``), as
the scale scenario does, whatever the broker's protocol:

- gateway-broker bytes: received and sent on every gateway's sockets to a broker
  node's client port;
- all broker-node bytes: received and sent on every socket of the broker node
  processes, that is the same gateway traffic seen from the brokers plus what crosses
  between broker nodes (NATS routes, the Redis Cluster bus), counted at both ends.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nats_adapter.naming import ChannelNames

from ..processes import GatewayNode, LocalCluster, NatsCluster, RedisCluster
from .sockets import SocketSnapshot

#: the start of every room subject of the default namespace (NATS, redis-sharded)
_ROOM_CHANNEL_PREFIX = ChannelNames().room("/", "x")[:-1]


def broker_ports(cluster: LocalCluster[Any]) -> tuple[set[int], set[int]]:
    """(client ports, every port: client ports and those between the broker nodes,
    NATS routes or the Redis Cluster bus at port + 10000)."""
    if isinstance(cluster, NatsCluster):
        clients = {n.client_port for n in cluster.nodes}
        return clients, clients | {n.route_port for n in cluster.nodes}
    clients = {n.port for n in cluster.nodes}
    bus = {p + 10000 for p in clients} if isinstance(cluster, RedisCluster) else set()
    return clients, clients | bus


@dataclass
class BrokerView:
    """One moment of the gateway<->broker traffic: socket counters, and (NATS) each
    client connection's per-subscription message counts."""

    #: the benchmarked system (a bench backend's name) and its broker nodes
    backend: str
    cluster: LocalCluster[Any] | None
    sockets: SocketSnapshot
    #: gateway node id -> pid, in the order the load generator numbers the gateways
    gateway_pids: dict[str, int]
    broker_pids: dict[str, int]
    client_ports: set[int]
    #: (node, cid) -> {"port": client's port, "out_msgs": n,
    #: "room_subs": {sid: (subject, messages)}}
    nats_conns: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)


def view(backend: str, gateways: Sequence[GatewayNode], cluster: LocalCluster[Any] | None
         ) -> BrokerView:
    """Take the sockets' counters first: the broker queries that follow open sockets
    of their own (redis-cli) that must not fall inside a measurement."""
    if cluster is None:
        return BrokerView(backend, None, SocketSnapshot(), {}, {}, set())
    clients, every = broker_ports(cluster)
    out = BrokerView(backend, cluster, SocketSnapshot.take(every),
                     {g.node_id: g.child.pid for g in gateways if g.child is not None},
                     {n.name: n.child.pid for n in cluster.nodes if n.child is not None},
                     clients)
    if isinstance(cluster, NatsCluster):
        for node in cluster.nodes:
            connz = node.varz("connz?subs=detail&limit=4096") or {}
            for c in connz.get("connections") or []:
                subs = c.get("subscriptions_list_detail") or []
                out.nats_conns[(node.name, int(c["cid"]))] = {
                    "port": int(c.get("port", 0)), "out_msgs": int(c.get("out_msgs", 0)),
                    "room_subs": {str(s["sid"]): (str(s["subject"]), int(s.get("msgs", 0)))
                                  for s in subs if str(s.get("subject", "")).startswith(
                                      _ROOM_CHANNEL_PREFIX)}}
    return out


def traffic(before: BrokerView, after: BrokerView, delivered: int) -> dict[str, Any]:
    """Bytes between two views, per delivery."""
    gateway = vanished = 0
    for pid in after.gateway_pids.values():
        t = before.sockets.between(after.sockets, {pid}, peer=after.client_ports)
        gateway += t.received + t.sent
        vanished += t.vanished
    nodes = inter = 0
    for pid in after.broker_pids.values():
        every = before.sockets.between(after.sockets, {pid})
        clients = before.sockets.between(after.sockets, {pid}, local=after.client_ports)
        nodes += every.received + every.sent
        inter += every.received + every.sent - clients.received - clients.sent

    def per(n: int) -> float | None:
        return round(n / delivered, 2) if delivered else None

    return {"broker_bytes_counted": "on the sockets (ss -tin)",
            "broker_bytes_total": gateway, "broker_bytes_per_delivery": per(gateway),
            "broker_node_bytes_total": nodes, "broker_node_bytes_per_delivery": per(nodes),
            "broker_inter_node_bytes_total": inter, "broker_sockets_vanished": vanished}
