"""The ``scale`` scenario: the many-rooms workload at 2, 4 and 8 gateways.

The load grows with the cluster, as when a service adds gateways for more users:
each gateway holds the same number of sockets, the cluster has the same number of
rooms per gateway (2-20 members each, drawn uniformly from all sockets, so a room's
members sit on any gateways), and the same message rate per gateway, spread over the
rooms with Zipf-like weights (a few busy rooms, many quiet ones).

Measured per gateway, the same way for every broker: messages and bytes received
from the broker (bytes on the gateway's broker sockets, from the kernel: see
``sockets.py``; messages from the gateway's own counter of what its broker client
handed it), split into room traffic and the cluster API's heartbeats; wasted
receptions; CPU per delivery. Per broker node: messages, bytes (client and
cluster-internal sockets), CPU, subscriptions. NATS runs with 3 and with 5 nodes;
each gateway is pinned to one NATS node (gateway i to node i % N) so that the route
traffic is reproducible. Every configuration is set beside the capacity model's
prediction (``tools/capacity``) for the same room sizes, rates, gateways and nodes.
"""

from __future__ import annotations

import random
import time
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
    stop_all,
    wait_gateways,
)
from nats_adapter.naming import ChannelNames
from tools.capacity import model

from .backends import GATEWAY_BACKEND, start_system_gateway
from .broker_traffic import broker_ports
from .harness import LoadGenProcess, cpu_seconds, log, metrics
from .sockets import SocketSnapshot, Traffic

#: the systems compared (redis-cluster-classic receives what stock-redis does)
SYSTEMS = ("nats", "redis-sharded", "stock-redis")
HEARTBEAT_INTERVAL = 2.0


@dataclass(frozen=True)
class ScaleParams:
    gateway_counts: tuple[int, ...]
    nats_nodes: tuple[int, ...]
    sockets_per_gateway: int
    rooms_per_gateway: int
    #: chat messages per second per gateway
    rate_per_gateway: float
    seconds: float
    seed: int = 7

    @classmethod
    def of(cls, quick: bool, seed: int = 7) -> ScaleParams:
        if quick:
            return cls((2, 4), (3, 5), 24, 12, 20.0, 2.0, seed)
        return cls((2, 4, 8), (3, 5), 250, 125, 40.0, 10.0, seed)

    def describe(self) -> dict[str, Any]:
        return {"gateways": "/".join(map(str, self.gateway_counts)),
                "nats_nodes": "/".join(map(str, self.nats_nodes)),
                "sockets_per_gateway": self.sockets_per_gateway,
                "rooms_per_gateway": self.rooms_per_gateway, "members_per_room": "2-20",
                "msgs_per_s_per_gateway": self.rate_per_gateway, "seconds": self.seconds,
                "rate": "Zipf-like over rooms; members on any gateway"}


@dataclass
class Layout:
    """Rooms, their members (socket indexes; socket i is on gateway i % gateways) and
    the paced send plan, the same for every system at one gateway count."""

    gateways: int
    sockets: int
    members: dict[str, list[int]]
    #: (offset seconds, sender socket, room)
    plan: list[tuple[float, int, str]]
    #: a short warm-up plan, sent before measuring
    warmup: list[tuple[float, int, str]]

    def gateway_of(self, sock: int) -> int:
        return sock % self.gateways

    def sent_per_room(self) -> dict[str, int]:
        out = dict.fromkeys(self.members, 0)
        for _, _, room in self.plan:
            out[room] += 1
        return out

    def published_by(self) -> list[int]:
        """Chats sent by the sockets of each gateway."""
        out = [0] * self.gateways
        for _, sender, _ in self.plan:
            out[self.gateway_of(sender)] += 1
        return out

    def receptions_by(self, system: str) -> list[int]:
        """Room messages each gateway should receive from the broker: one per message of
        a room it has a member in (with Redis its own too), or every message (stock)."""
        out = [0] * self.gateways
        for _, sender, room in self.plan:
            origin = self.gateway_of(sender)
            here = {self.gateway_of(m) for m in self.members[room] if m != sender}
            for g in range(self.gateways):
                if system == "stock-redis" or g in here - {origin} or \
                        (g == origin and system == "redis-sharded"):
                    out[g] += 1
        return out

    def deliveries_by(self) -> list[int]:
        """Deliveries each gateway makes (every member but the sender)."""
        out = [0] * self.gateways
        for _, sender, room in self.plan:
            for m in self.members[room]:
                if m != sender:
                    out[self.gateway_of(m)] += 1
        return out


def make_layout(gateways: int, p: ScaleParams) -> Layout:
    rng = random.Random(p.seed * 1000 + gateways)
    sockets = p.sockets_per_gateway * gateways
    members = {f"scale-{r}": rng.sample(range(sockets), rng.randint(2, 20))
               for r in range(p.rooms_per_gateway * gateways)}
    names = list(members)
    rng.shuffle(names)  # busy rooms of every size
    weights = [1 / (k + 1) for k in range(len(names))]
    total = int(p.rate_per_gateway * gateways * p.seconds)

    def plan(count: int, seconds: float) -> list[tuple[float, int, str]]:
        out = []
        for m, room in enumerate(rng.choices(names, weights, k=count)):
            out.append((round(m * seconds / count, 4), rng.choice(members[room]), room))
        return out

    warmup_seconds = max(0.5, p.seconds / 10)
    return Layout(gateways, sockets, members, plan(total, p.seconds),
                  plan(max(gateways, int(total * warmup_seconds / p.seconds)), warmup_seconds))


# -- brokers -------------------------------------------------------------------------


@dataclass
class ScaleBroker:
    system: str
    nats_nodes: int
    workdir: Path
    cluster: LocalCluster[Any] | None = None

    @property
    def label(self) -> str:
        return f"nats ({self.nats_nodes} nodes)" if self.system == "nats" else self.system

    def start(self) -> None:
        if self.system == "nats":
            self.cluster = NatsCluster(self.workdir / f"nats{self.nats_nodes}",
                                       size=self.nats_nodes)
        elif self.system == "redis-sharded":
            self.cluster = RedisCluster(self.workdir / "redis", size=3)
        else:
            self.cluster = RedisServer(self.workdir / "stock")
        self.cluster.start()

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()

    @property
    def nodes(self) -> list[Any]:
        assert self.cluster is not None
        return list(self.cluster.nodes)

    def client_ports(self) -> set[int]:
        assert self.cluster is not None
        return broker_ports(self.cluster)[0]

    def all_ports(self) -> set[int]:
        """Client ports and the ports between broker nodes (routes, the cluster bus)."""
        assert self.cluster is not None
        return broker_ports(self.cluster)[1]

    def gateway_args(self, index: int) -> list[str]:
        if isinstance(self.cluster, NatsCluster):
            # pinned: gateway i to node i % N, so routes carry what the model expects
            return ["--nats-url", self.nodes[index % len(self.nodes)].url]
        assert self.cluster is not None
        return self.cluster.gateway_args(index)

    def counters(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for node in self.nodes:
            figures: dict[str, float] = {"cpu_s": cpu_seconds(node.child.pid)} \
                if node.child is not None else {}
            if isinstance(self.cluster, NatsCluster):
                varz = node.varz("varz") or {}
                for key in ("in_msgs", "out_msgs", "in_bytes", "out_bytes", "subscriptions",
                            "mem"):
                    figures[key] = float(varz.get(key, 0))
                routes = (node.varz("routez") or {}).get("routes") or []
                figures["route_out_msgs"] = float(sum(r.get("out_msgs", 0) for r in routes))
                figures["route_out_bytes"] = float(sum(r.get("out_bytes", 0) for r in routes))
                conns = (node.varz("connz?limit=4096") or {}).get("connections") or []
                figures["client_subscriptions"] = float(
                    sum(c.get("subscriptions", 0) for c in conns))
            else:
                stats = node.info("stats")
                calls = 0
                for line in node.cli("INFO", "commandstats").splitlines():
                    if line.startswith(("cmdstat_publish:", "cmdstat_spublish:")):
                        calls += int(line.split("calls=")[1].split(",")[0])
                figures["in_msgs"] = float(calls)
                figures["channels"] = float(stats.get("pubsub_channels", 0)) + \
                    float(stats.get("pubsubshard_channels", 0))
                subs = 0
                for line in node.cli("CLIENT", "LIST").splitlines():
                    for part in line.split():
                        if part.startswith(("sub=", "ssub=")):
                            subs += int(part.split("=", 1)[1])
                figures["subscriptions"] = float(subs)
            out[node.name] = figures
        return out


# -- one configuration ------------------------------------------------------------------


@dataclass
class Snap:
    at: float
    sockets: SocketSnapshot
    gateway: dict[str, dict[str, float]]
    cpu: dict[str, float]
    broker: dict[str, dict[str, float]]


def snap(gws: list[GatewayNode], broker: ScaleBroker) -> Snap:
    sockets = SocketSnapshot.take(broker.all_ports())
    return Snap(time.monotonic(), sockets, {g.node_id: metrics(g.url) for g in gws},
                {g.node_id: cpu_seconds(g.child.pid) for g in gws if g.child is not None},
                broker.counters())


def run_config(lg: LoadGenProcess, broker: ScaleBroker, gateways: int, p: ScaleParams,
               workdir: Path) -> dict[str, Any]:
    """One system at one gateway count: start the gateways, load, measure, stop."""
    layout = make_layout(gateways, p)
    idle = broker.counters()  # interest the broker holds with no gateway connected
    gws: list[GatewayNode] = []
    try:
        backend = GATEWAY_BACKEND[broker.system]
        for i in range(gateways):
            gws.append(start_system_gateway(workdir, f"scale-{broker.system}{broker.nats_nodes}-"
                                            f"{gateways}-{i + 1}", free_ports(1)[0], backend,
                                            broker.gateway_args(i)))
        wait_gateways(gws, timeout=90)
        lg.call(op="connect", urls=[g.url for g in gws], count=layout.sockets)
        pairs = [[i, room] for room, ms in layout.members.items() for i in ms]
        for k in range(0, len(pairs), 5000):
            failed = lg.call(op="join", pairs=pairs[k:k + 5000])["failures"]
            if failed:
                raise RuntimeError(f"{failed} joins refused")
        lg.call(op="paced", plan=layout.warmup, timeout=60)
        time.sleep(0.5)  # the warm-up's last deliveries land first (a measurement boundary)
        before = snap(gws, broker)
        result = lg.call(op="paced", plan=layout.plan, timeout=120)
        after = snap(gws, broker)
        lg.call(op="close")
        return figures(layout, broker, gws, idle, before, after, result)
    finally:
        stop_all([g.child for g in gws])


def figures(layout: Layout, broker: ScaleBroker, gws: list[GatewayNode],
            idle: dict[str, dict[str, float]], before: Snap, after: Snap,
            result: dict[str, Any]) -> dict[str, Any]:
    window = after.at - before.at
    published_chats = layout.published_by()
    deliveries = layout.deliveries_by()
    expected = layout.receptions_by(broker.system)
    ports = broker.client_ports()

    def delta(node: str, name: str) -> float:
        return after.gateway[node].get(name, 0.0) - before.gateway[node].get(name, 0.0)

    per_gateway: list[dict[str, Any]] = []
    for i, gw in enumerate(gws):
        assert gw.child is not None
        node = gw.node_id
        wire: Traffic = before.sockets.between(after.sockets, {gw.child.pid}, peer=ports)
        received = delta(node, "gateway_broker_messages_received_total")
        beats = delta(node, "gateway_cluster_messages_received_total")
        published = delta(node, "gateway_broker_messages_published_total")
        # Redis hands every publication back to its publisher (heartbeats too): what
        # came back of this gateway's own non-chat publications is not room traffic
        own_beats = published - published_chats[i] if broker.system == "redis-sharded" \
            else 0.0
        room = received - beats - own_beats
        echo = delta(node, "gateway_broker_messages_echo_total") - own_beats \
            if broker.system == "redis-sharded" else \
            (published_chats[i] if broker.system == "stock-redis" else 0.0)
        cpu = after.cpu[node] - before.cpu[node]
        per_gateway.append({
            "gateway": node,
            "room_msgs": int(room), "room_msgs_expected": expected[i],
            "echo_msgs": int(echo),
            "heartbeat_msgs": int(beats), "own_heartbeat_echoes": int(own_beats),
            "wasted_msgs": int(delta(node, "gateway_broker_messages_unwanted_total")),
            "app_bytes": int(delta(node, "gateway_broker_bytes_received_total")),
            "heartbeat_bytes": int(delta(node, "gateway_cluster_bytes_received_total")),
            "socket_bytes_received": wire.received, "socket_bytes_sent": wire.sent,
            "broker_sockets": wire.sockets, "vanished_sockets": wire.vanished,
            "chats_published": published_chats[i], "deliveries": deliveries[i],
            "cpu_s": round(cpu, 3),
            "cpu_s_per_1000_deliveries": round(1000 * cpu / deliveries[i], 4)
            if deliveries[i] else None,
        })
    nodes: dict[str, dict[str, Any]] = {}
    for node in broker.nodes:
        b0, b1 = before.broker[node.name], after.broker[node.name]
        d = {k: b1[k] - b0.get(k, 0.0) for k in b1 if k not in ("subscriptions", "mem",
                                                                   "channels",
                                                                   "client_subscriptions")}
        pids = {node.child.pid} if node.child is not None else set()
        port = {node.client_port if isinstance(broker.cluster, NatsCluster) else node.port}
        clients = before.sockets.between(after.sockets, pids, local=port)
        everything = before.sockets.between(after.sockets, pids)
        gateways_here = sum(1 for i in range(len(gws))
                            if isinstance(broker.cluster, NatsCluster)
                            and i % len(broker.nodes) == broker.nodes.index(node))
        nodes[node.name] = {
            **{k: round(v, 3) if k == "cpu_s" else int(v) for k, v in d.items()},
            "subscriptions": int(b1.get("subscriptions", 0)),
            "subscriptions_over_idle": int(b1.get("subscriptions", 0)
                                           - idle[node.name].get("subscriptions", 0)),
            "client_subscriptions": int(b1.get("client_subscriptions", 0)),
            "channels": int(b1.get("channels", 0)),
            "mem_bytes": int(b1.get("mem", 0)),
            "client_socket_bytes_in": clients.received, "client_socket_bytes_out": clients.sent,
            "cluster_socket_bytes_in": everything.received - clients.received,
            "cluster_socket_bytes_out": everything.sent - clients.sent,
            "gateways": gateways_here,
        }
    delivered = result["delivered"]
    gw_cpu = sum(g["cpu_s"] for g in per_gateway)
    broker_cpu = sum(n.get("cpu_s", 0.0) for n in nodes.values())
    out: dict[str, Any] = {
        "system": broker.label, "backend": broker.system, "gateways": len(gws),
        "nats_nodes": broker.nats_nodes if broker.system == "nats" else None,
        "sockets": layout.sockets, "rooms": len(layout.members),
        "memberships": sum(len(m) for m in layout.members.values()),
        "messages": result["messages"], "expected": result["expected"],
        "delivered": delivered, "lost": result["lost"], "duplicated": result["duplicated"],
        "misdelivered": result["misdelivered"], "failures": result.get("failures", 0),
        "seconds": round(window, 3),
        "latency_ms": result["latency_ms"],
        "gateway_cpu_s_per_1000_deliveries": round(1000 * gw_cpu / delivered, 4)
        if delivered else None,
        "broker_cpu_s_per_1000_deliveries": round(1000 * broker_cpu / delivered, 4)
        if delivered else None,
        "per_gateway": per_gateway,
        "broker_nodes": nodes,
    }
    out["mean"] = means(out)
    workload = workload_of(layout, broker, out)
    out["workload"] = workload_dict(workload)
    out["model"] = model.predict(workload).as_dict()
    out["validation"] = validate(out)
    return out


def means(run: dict[str, Any]) -> dict[str, float]:
    """Per gateway per second (mean over gateways), and per broker node per second."""
    seconds = run["seconds"] or 1.0
    gws = run["per_gateway"]
    n = len(gws) or 1

    def avg(key: str) -> float:
        return float(sum(g[key] for g in gws)) / n / seconds

    room = avg("room_msgs")
    out = {
        "room_msgs_per_s": room, "echo_msgs_per_s": avg("echo_msgs"),
        "heartbeat_msgs_per_s": avg("heartbeat_msgs"), "wasted_msgs_per_s": avg("wasted_msgs"),
        "socket_bytes_per_s": avg("socket_bytes_received"),
        "deliveries_per_s": avg("deliveries"),
        "receptions_per_delivery": room / avg("deliveries") if avg("deliveries") else 0.0,
    }
    nats = [v for v in run["broker_nodes"].values() if v.get("gateways")]
    if run["backend"] == "nats" and nats:
        k = len(nats)
        out["nats_route_msgs_per_s"] = sum(v["route_out_msgs"] for v in nats) / k / seconds
        out["nats_client_msgs_out_per_s"] = sum(v["out_msgs"] - v["route_out_msgs"]
                                                for v in nats) / k / seconds
        out["nats_interest_entries"] = sum(v["subscriptions_over_idle"] for v in nats) / k
    nodes = run["broker_nodes"].values()
    # NATS counts its own system account's interest too: over idle is what gateways cost
    out["broker_subscriptions_per_node"] = sum(v["subscriptions_over_idle"]
                                               for v in nodes) / len(nodes)
    return {k: round(v, 3) for k, v in out.items()}


def workload_of(layout: Layout, broker: ScaleBroker, run: dict[str, Any]) -> model.Workload:
    """The model's input for this run: the traffic per room size (from the plan), the
    sockets, gateways and NATS nodes, and the payload sizes the gateways counted."""
    seconds = run["seconds"]
    sent = layout.sent_per_room()
    rooms = list(layout.members)
    classes = model.from_rooms([len(layout.members[r]) for r in rooms],
                               [sent[r] / seconds for r in rooms])
    names = ChannelNames()
    channel = sum(len(names.room("/", r)) for r in rooms) / len(rooms)
    gws = run["per_gateway"]
    beats = sum(g["heartbeat_msgs"] for g in gws)
    beat_bytes = sum(g["heartbeat_bytes"] for g in gws)
    heartbeat = beat_bytes / beats if beats else 150.0
    # what the gateways' counters saw of room messages: all bytes less the heartbeats
    # (and, with Redis, less their own heartbeats handed back)
    room_bytes = sum(g["app_bytes"] - g["heartbeat_bytes"]
                     - heartbeat * g["own_heartbeat_echoes"] for g in gws)
    room_msgs = sum(g["room_msgs"] for g in gws) or 1
    payload = dict(model.Wire().payload)
    payload[broker.system] = room_bytes / room_msgs
    return model.Workload(classes=classes, sockets=layout.sockets, gateways=layout.gateways,
                          nats_nodes=broker.nats_nodes if broker.system == "nats" else 1,
                          heartbeat_interval=HEARTBEAT_INTERVAL,
                          wire=model.Wire(payload=payload, heartbeat=heartbeat,
                                          channel=channel))


def workload_dict(w: model.Workload) -> dict[str, Any]:
    return {"sockets": w.sockets, "gateways": w.gateways, "nats_nodes": w.nats_nodes,
            "heartbeat_interval": w.heartbeat_interval,
            "classes": [[c.size, c.rooms, round(c.rate, 4)] for c in w.classes],
            "wire": {"payload": {k: round(v, 1) for k, v in w.wire.payload.items()},
                     "heartbeat": round(w.wire.heartbeat, 1),
                     "channel": round(w.wire.channel, 1)}}


def workload_from_dict(d: dict[str, Any]) -> model.Workload:
    return model.Workload(
        classes=tuple(model.RoomClass(int(s), float(n), float(r)) for s, n, r in d["classes"]),
        sockets=int(d["sockets"]), gateways=int(d["gateways"]),
        nats_nodes=int(d["nats_nodes"]), heartbeat_interval=float(d["heartbeat_interval"]),
        wire=model.Wire(payload=dict(d["wire"]["payload"]), heartbeat=d["wire"]["heartbeat"],
                        channel=d["wire"]["channel"]))


#: (measured key in "mean", model path, what) compared for every run
CHECKS = (
    ("room_msgs_per_s", ("gateway", "room_msgs"), "room messages per gateway per s"),
    ("wasted_msgs_per_s", ("gateway", "wasted_msgs"), "wasted receptions per gateway per s"),
    ("heartbeat_msgs_per_s", ("gateway", "heartbeat_msgs"), "heartbeats per gateway per s"),
    ("socket_bytes_per_s", ("gateway", "bytes"), "broker bytes per gateway per s (socket)"),
    ("deliveries_per_s", ("gateway", "deliveries"), "deliveries per gateway per s"),
    ("nats_route_msgs_per_s", ("nats", "route_msgs_out"), "route messages per NATS server per s"),
    ("nats_client_msgs_out_per_s", ("nats", "client_msgs_out"),
     "messages to gateways per NATS server per s"),
    ("nats_interest_entries", ("nats", "interest_entries"), "interest entries per NATS server"),
)


def validate(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Measured against predicted for one run: value, prediction, error in percent."""
    rows = []
    predicted = run["model"]
    for key, (part, name), what in CHECKS:
        if key not in run["mean"]:
            continue
        if part == "gateway":
            value = predicted["gateway"][run["backend"]][name]
        else:
            value = predicted["nats"][name]
        measured = run["mean"][key]
        if value == 0 and measured == 0:
            error: float | None = 0.0
        elif value == 0:
            error = None
        else:
            error = round(100 * (measured - value) / value, 1)
        rows.append({"what": what, "key": key, "measured": measured,
                     "predicted": round(value, 3), "error_pct": error})
    return rows


# -- the scenario -----------------------------------------------------------------------


def run_scale(backend: str, workdir: Path, quick: bool, seed: int) -> dict[str, Any]:
    """Every configuration of one benchmarked system (NATS: each node count)."""
    if backend not in SYSTEMS:
        return {"skipped": "the scale scenario compares nats, redis-sharded and stock-redis"}
    p = ScaleParams.of(quick, seed)
    runs = []
    for nodes in (p.nats_nodes if backend == "nats" else (0,)):
        broker = ScaleBroker(backend, nodes, workdir)
        log(f"{backend}: scale: starting {broker.label}")
        broker.start()
        try:
            for count in p.gateway_counts:
                log(f"{backend}: scale: {broker.label}, {count} gateways")
                lg = LoadGenProcess()
                try:
                    runs.append(run_config(lg, broker, count, p, workdir))
                finally:
                    lg.stop()
        finally:
            broker.stop()
    return {"params": p.describe(), "runs": runs}
