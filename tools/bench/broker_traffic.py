"""Broker traffic in the bench's scenarios, counted the same way for every broker, and
the brokers' own count of what they handed each gateway.

Bytes are counted by the kernel on the sockets (``ss -tin``, see ``sockets.py``), as
the scale scenario does, whatever the broker's protocol:

- gateway-broker bytes: received and sent on every gateway's sockets to a broker
  node's client port;
- all broker-node bytes: received and sent on every socket of the broker node
  processes, that is the same gateway traffic seen from the brokers plus what crosses
  between broker nodes (NATS routes, the Redis Cluster bus), counted at both ends.

Wasted receptions (room messages a gateway received without a member of the room)
are counted by the gateways themselves; :func:`cross_check` counts them again from
the broker's side, with the load generator's record of who was in which room on which
gateway:

- NATS: ``/connz?subs=detail`` gives, per client connection, how many messages each
  subscription was handed; a gateway's connections are found by their ports
  (``ss``). Per gateway, the room subjects' messages less the ones it needed (the
  room had a member there other than the sender, and the sender was elsewhere: NATS
  has no echo) are its wasted receptions by the broker's count.
- Redis keeps no per-connection message counts (7.0): what it has is the number of
  subscribers of each channel (``PUBSUB SHARDNUMSUB``, ``PUBSUB NUMSUB``), so its
  count is for all gateways together: for each room, the chats sent to it times its
  channel's subscribers, less one echo per chat (the sender's own gateway is
  subscribed and gets its publication back), less the receptions the gateways needed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.processes import GatewayNode, LocalCluster, NatsCluster, RedisCluster
from nats_adapter.naming import ChannelNames

from .backends import RECOVERY as RECOVERY_BACKENDS
from .sockets import SocketSnapshot

#: the start of every room subject of the default namespace (NATS, redis-sharded)
#: room subjects of the default namespace, without and with connection state recovery
_ROOM_CHANNEL_PREFIX = tuple(ChannelNames(stored=stored).room("/", "x")[:-1]
                             for stored in (False, True))


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


def _nats_room_msgs(before: BrokerView, after: BrokerView, ports: set[int],
                    subjects: set[str]) -> tuple[int, int, bool]:
    """(room-subject messages, all messages) NATS sent to the connections whose client
    port is in ``ports``, and whether no subscription to one of ``subjects`` (the rooms
    sent to) ended during the phase, taking its count with it."""
    room = total = 0
    steady = True
    for key, old in before.nats_conns.items():
        if old["port"] in ports:
            now = after.nats_conns.get(key, {}).get("room_subs", {})
            steady &= not any(subject in subjects and sid not in now
                              for sid, (subject, _) in old["room_subs"].items())
    for key, conn in after.nats_conns.items():
        if conn["port"] not in ports:
            continue
        old = before.nats_conns.get(key) or {"out_msgs": 0, "room_subs": {}}
        total += conn["out_msgs"] - old["out_msgs"]
        room += sum(n - old["room_subs"].get(sid, ("", 0))[1]
                    for sid, (_, n) in conn["room_subs"].items())
    return room, total, steady


def _gateway_ports(v: BrokerView, pid: int) -> set[int]:
    return {k.local_port for k in v.sockets.counts if k.pid == pid
            and k.peer_port in v.client_ports}


def room_channels(backend: str, rooms: Iterable[str]) -> dict[str, str]:
    """room -> the channel its chats are published on, per system."""
    if backend in ("stock-redis", "redis-cluster-classic"):
        return dict.fromkeys(rooms, "socketio")
    if backend == "node-peer":  # @socket.io/redis-adapter's dynamic channels
        return {r: f"socket.io#/#{r}#" for r in rooms}
    # with connection state recovery, gateways receive room traffic on the live
    # subjects JetStream republishes stored messages to
    names = ChannelNames(stored=backend in RECOVERY_BACKENDS)
    return {r: names.room("/", r) for r in rooms}


def redis_subscribers(cluster: LocalCluster[Any], channels: Iterable[str], shard: bool
                      ) -> dict[str, int]:
    """Subscribers of each channel, summed over the nodes (each counts its own)."""
    wanted = sorted(set(channels))
    out = dict.fromkeys(wanted, 0)
    if not wanted:
        return out
    for node in cluster.nodes:
        lines = node.cli("PUBSUB", "SHARDNUMSUB" if shard else "NUMSUB", *wanted).splitlines()
        for name, count in zip(lines[::2], lines[1::2], strict=False):
            if name in out:
                out[name] += int(count)
    return out


def cross_check(before: BrokerView, after: BrokerView, result: dict[str, Any],
                wasted_by_gateway: dict[str, int]) -> dict[str, Any]:
    """Wasted receptions by the broker's count beside the gateways' own (see the module
    docstring); ``agree`` is False when the two differ."""
    stored = after.backend in RECOVERY_BACKENDS
    needed = result.get("needed_per_gateway_stored" if stored else "needed_per_gateway") or []
    sent = result.get("sent_per_room") or {}
    backend, cluster = after.backend, after.cluster
    if cluster is None or len(needed) != len(after.gateway_pids):
        return {"skipped": "no per-gateway record of this phase"}
    gateway_total = sum(wasted_by_gateway.values())
    if isinstance(cluster, NatsCluster):
        per_gateway: dict[str, dict[str, int]] = {}
        steady_all = True
        subjects = set(room_channels(backend, sent).values())
        for (node_id, pid), need in zip(after.gateway_pids.items(), needed, strict=True):
            ports = _gateway_ports(after, pid) | _gateway_ports(before, pid)
            room, total, steady = _nats_room_msgs(before, after, ports, subjects)
            steady_all &= steady
            per_gateway[node_id] = {
                "broker_room_msgs": room, "broker_msgs": total, "needed": need,
                "wasted_by_broker": room - need,
                "wasted_by_gateway": wasted_by_gateway.get(node_id, 0)}
        by_broker = sum(g["wasted_by_broker"] for g in per_gateway.values())
        out: dict[str, Any] = {
            "source": "NATS /connz: messages per subscription on room subjects, per "
                      "gateway connection",
            "wasted_by_broker": by_broker, "wasted_by_gateways": gateway_total,
            "per_gateway": per_gateway,
            "agree": all(g["wasted_by_broker"] == g["wasted_by_gateway"]
                         for g in per_gateway.values())}
        if not steady_all:  # a subscription ended: its count went with it
            out = {**out, "agree": None,
                   "note": "subscriptions changed during the phase: not comparable"}
        return out
    shard = backend in ("redis-sharded", "node-peer")
    channels = room_channels(backend, sent)
    subscribers = redis_subscribers(cluster, channels.values(), shard)
    chats = sum(sent.values())
    receptions = sum(n * subscribers[channels[room]] for room, n in sent.items())
    by_broker = receptions - chats - sum(needed)
    return {"source": f"Redis PUBSUB {'SHARDNUMSUB' if shard else 'NUMSUB'}: subscribers "
                      "of each room's channel x chats sent to the room, less one echo per "
                      "chat (all gateways together: Redis counts no messages per "
                      "connection)",
            "broker_room_receptions": receptions, "echoes": chats, "needed": sum(needed),
            "wasted_by_broker": by_broker, "wasted_by_gateways": gateway_total,
            "agree": by_broker == gateway_total}
