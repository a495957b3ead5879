"""The capacity model: what a workload costs each gateway and each NATS server.

A closed-form expectation, no simulation. The workload is a set of room classes
(rooms of one size and the messages per second they carry together), sockets spread
evenly over the gateways, and room members drawn uniformly from all sockets (a load
balancer places each browser on any gateway; rooms cannot be pinned). Everything
follows from one quantity: the probability that a gateway (or a NATS server, or a
site) holds none of a room's members, the hypergeometric ``p_none``.

Per message of a room of ``s`` members, with ``G`` gateways:

- the sender's gateway publishes once;
- ``nats``: every OTHER gateway with a member receives one copy (no echo);
- ``redis-sharded``: the same, plus the sender's gateway gets its own copy back
  (Redis has no no-echo);
- ``stock-redis`` (one channel): every gateway receives every message; those with no
  member receive it for nothing (a wasted reception).

Heartbeats of the cluster-wide API: each gateway publishes one every
``heartbeat_interval`` seconds and every other gateway receives it (Redis: the sender
too), so each gateway receives ``(G - 1) / interval`` per second, whatever the rooms.

NATS servers (full mesh, gateways spread round-robin over ``N`` servers): a message
published on server ``i`` crosses one route to each other server that has a gateway
with a member, once whatever the number of gateways there. Each server keeps one
interest entry per local subscription plus one per (other server, subject with
interest there); that interest costs memory and, when it changes, CPU on every server
(:class:`NatsConstants`, measured by ``python -m tools.capacity measure``).

The model is validated against the benchmark's ``scale`` scenario, see docs/SCALING.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

BACKENDS = ("nats", "redis-sharded", "stock-redis")
#: subscriptions a gateway holds whatever its rooms: its node channel and the
#: cluster-wide API channel
FIXED_SUBSCRIPTIONS = 2
#: python-socketio's AsyncRedisManager publishes everything on this one channel
STOCK_CHANNEL = "socketio"


def p_none(pool: float, marked: float, draws: float) -> float:
    """Probability that ``draws`` items taken without replacement from ``pool`` include
    none of ``marked`` given ones (hypergeometric; real-valued arguments allowed)."""
    if draws <= 0:
        return 1.0
    if marked <= 0:
        return 1.0
    if draws > pool - marked:
        return 0.0
    return math.exp(math.lgamma(pool - marked + 1) - math.lgamma(pool - marked - draws + 1)
                    - math.lgamma(pool + 1) + math.lgamma(pool - draws + 1))


@dataclass(frozen=True)
class RoomClass:
    """``rooms`` rooms of ``size`` members each, carrying ``rate`` messages per second
    together."""

    size: int
    rooms: float
    rate: float

    def __post_init__(self) -> None:
        if self.size < 1 or self.rooms < 0 or self.rate < 0:
            raise ValueError(f"bad room class {self}")


#: what a room message's envelope adds on Redis, which hands a node its own messages
#: back: the origin that lets it drop them (a node tag, as msgpack)
ORIGIN_BYTES = 9.0


@dataclass(frozen=True)
class Wire:
    """Bytes on the wire. Payloads are the envelopes the gateways exchange (a chat of a
    few words with a short room name: measured by the benchmark); framing is each
    protocol's per-message header, computed from the channel name's length."""

    #: mean room-message payload per backend (bytes; the defaults are the benchmark's
    #: chat "hello" to a room named like "scale-123")
    payload: dict[str, float] = field(default_factory=lambda: {
        "nats": 124.0, "redis-sharded": 124.0 + ORIGIN_BYTES, "stock-redis": 319.0})
    #: mean heartbeat payload (bytes; our backends only)
    heartbeat: float = 80.0
    #: mean channel name length (``sio.room._2F.<room>``)
    channel: float = 21.0

    def frame(self, backend: str, payload: float, channel: float | None = None) -> float:
        """Bytes one received message of ``payload`` bytes takes on the broker socket."""
        ch = self.channel if channel is None else channel
        digits = len(str(int(payload)))
        if backend == "nats":  # MSG <subject> <sid> <size>\r\n<payload>\r\n
            return 4 + ch + 1 + 2 + 1 + digits + 2 + payload + 2
        # RESP2 push: *3 $8 smessage (or $7 message) $<n> <channel> $<m> <payload>
        kind = 8 if backend == "redis-sharded" else 7
        return 4 + (4 + kind + 2) + (1 + len(str(int(ch))) + 2 + ch + 2) + \
            (1 + digits + 2 + payload + 2)


@dataclass(frozen=True)
class Workload:
    classes: tuple[RoomClass, ...]
    #: connected sockets, spread evenly over the gateways
    sockets: int
    gateways: int
    nats_nodes: int = 3
    heartbeat_interval: float = 2.0
    #: membership changes per second over the whole cluster (joins; as many leaves)
    joins_per_s: float = 0.0
    wire: Wire = field(default_factory=Wire)

    def __post_init__(self) -> None:
        if self.gateways < 1 or self.nats_nodes < 1 or self.sockets < self.gateways:
            raise ValueError(f"bad workload: {self.gateways} gateways, {self.nats_nodes} "
                             f"NATS nodes, {self.sockets} sockets")

    @property
    def rate(self) -> float:
        return sum(c.rate for c in self.classes)

    @property
    def rooms(self) -> float:
        return sum(c.rooms for c in self.classes)

    @property
    def per_gateway(self) -> float:
        """Sockets per gateway."""
        return self.sockets / self.gateways

    def with_(self, **changes: object) -> Workload:
        return replace(self, **changes)  # type: ignore[arg-type]

    def servers(self) -> list[int]:
        """Gateways on each NATS server (round-robin, gateway i on server i % N)."""
        n = self.nats_nodes
        return [len(range(j, self.gateways, n)) for j in range(n)]


@dataclass
class GatewayCost:
    """Per gateway, per second (the mean over gateways)."""

    room_msgs: float
    #: own publications handed back (part of room_msgs)
    echo_msgs: float
    wasted_msgs: float
    heartbeat_msgs: float
    bytes: float
    deliveries: float
    subscriptions: float


@dataclass
class NatsCost:
    """Per NATS server with gateways, per second (the mean over those servers)."""

    #: interest entries: local subscriptions plus one per (other server, subject)
    interest_entries: float
    #: of which its own gateways' subscriptions
    local_entries: float
    #: the memory they take
    interest_bytes: float
    #: messages sent over routes (room messages and heartbeats)
    route_msgs_out: float
    #: messages to its gateways
    client_msgs_out: float
    #: messages from its gateways
    client_msgs_in: float
    #: subscribe/unsubscribe operations its gateways send it
    subscription_ops: float
    #: interest updates (RS+/RS-) it receives over routes from the others
    interest_updates_in: float
    #: CPU (cores) spent on subscription ops and interest updates
    churn_cpu: float
    #: CPU (cores) spent moving messages (in and out, clients and routes)
    message_cpu: float


@dataclass
class Prediction:
    workload: Workload
    gateway: dict[str, GatewayCost]
    nats: NatsCost
    #: per message: gateways with a member, and how many there are on average
    span: float

    def as_dict(self) -> dict[str, object]:
        return {
            "gateways": self.workload.gateways, "nats_nodes": self.workload.nats_nodes,
            "span": round(self.span, 3),
            "gateway": {b: {k: round(v, 3) for k, v in vars(c).items()}
                        for b, c in self.gateway.items()},
            "nats": {k: round(v, 3) for k, v in vars(self.nats).items()},
        }


@dataclass(frozen=True)
class NatsConstants:
    """nats-server costs, measured by ``python -m tools.capacity measure`` (nats-server
    2.15.1 here, RSS and CPU of the server processes; docs/SCALING.md)."""

    #: memory per subscription of a local client (the gateway's own connection)
    local_entry_bytes: float = 1250.0
    #: memory per subject a server learnt from another server over a route
    remote_entry_bytes: float = 700.0
    #: CPU per subscribe or unsubscribe, on the server the gateway is connected to
    subscribe_cpu_us: float = 10.0
    #: CPU per interest update (RS+ / RS-) received over a route, on every other server
    update_cpu_us: float = 4.0
    #: CPU per message a server takes in or sends out (client or route): measured 1.2 us
    #: for one in and two out on the publishing server, 0.7 us for one in and one out on
    #: a receiving one
    message_cpu_us: float = 0.4


def predict(w: Workload, nats: NatsConstants | None = None) -> Prediction:
    """Expected per-gateway and per-NATS-server costs of ``w``."""
    g, s_total, k = w.gateways, float(w.sockets), w.per_gateway
    hb = 1.0 / w.heartbeat_interval
    other_copies = 0.0  # per second, over the cluster: receptions by other gateways
    deliveries = 0.0
    span = 0.0
    subs = 0.0  # rooms with a member on one gateway
    sub_first = 0.0  # probability weight that a join makes a gateway subscribe
    for c in w.classes:
        m = c.size - 1
        hit = (g - 1) * (1 - p_none(s_total - 1, k, m))
        other_copies += c.rate * hit
        deliveries += c.rate * m
        span += c.rate * (1 + hit)
        subs += c.rooms * (1 - p_none(s_total, k, c.size))
        # a join lands on a gateway with none of the room's other members
        sub_first += c.rooms * c.size * p_none(s_total - 1, k - 1, m)
    rate = w.rate
    members = sum(c.rooms * c.size for c in w.classes) or 1.0
    span = span / rate if rate else 0.0
    wire = w.wire
    out: dict[str, GatewayCost] = {}
    for backend in BACKENDS:
        payload = wire.payload[backend]
        if backend == "stock-redis":
            room = rate  # every message, own included
            echo = rate / g
            wasted = ((g - 1) * rate - other_copies) / g
            beats = 0.0
            beat_frames = 0.0
        else:
            echo = rate / g if backend == "redis-sharded" else 0.0
            room = other_copies / g + echo
            wasted = 0.0
            beats = (g - 1) * hb
            # Redis hands a gateway its own heartbeat back too
            beat_frames = beats + (hb if backend == "redis-sharded" else 0.0)
        channel = len(STOCK_CHANNEL) if backend == "stock-redis" else None
        size = room * wire.frame(backend, payload, channel) + \
            beat_frames * wire.frame(backend, wire.heartbeat, channel=len("sio.cluster"))
        out[backend] = GatewayCost(
            room_msgs=room, echo_msgs=echo, wasted_msgs=wasted, heartbeat_msgs=beats,
            bytes=size, deliveries=deliveries / g,
            subscriptions=(subs + FIXED_SUBSCRIPTIONS) if backend != "stock-redis" else 1)
    return Prediction(w, out, _nats(w, nats or NatsConstants(), hb, sub_first / members), span)


def _nats(w: Workload, costs: NatsConstants, hb: float, p_first: float) -> NatsCost:
    """Per-server NATS costs, averaged over the servers that have gateways."""
    g, s_total, k = w.gateways, float(w.sockets), w.per_gateway
    on = w.servers()
    used = [j for j, n in enumerate(on) if n]
    sockets_on = [n * k for n in on]
    entries = local_entries = route = client_out = client_in = ops = updates = 0.0
    joins_per_gateway = w.joins_per_s / g
    # a gateway subscribes on a join that finds no local member and unsubscribes on the
    # leave of the last one (the linger absorbs quick rejoins, which this ignores)
    gw_ops = 2 * joins_per_gateway * p_first
    distinct = {j: _distinct_subjects(w, sockets_on[j], on[j]) for j in used}
    for j in used:
        local = on[j] * (sum(c.rooms * (1 - p_none(s_total, k, c.size)) for c in w.classes)
                         + FIXED_SUBSCRIPTIONS)
        local_entries += local
        entries += local + sum(distinct[i] for i in used if i != j)
        share = sockets_on[j] / s_total  # of the messages, published here
        for c in w.classes:
            m = c.size - 1
            copies = sum(1 - p_none(s_total - 1, sockets_on[i], m) for i in used if i != j)
            route += c.rate * share * copies
        # heartbeats of its gateways: one copy to every other server with gateways
        route += on[j] * hb * (len(used) - 1)
        client_in += on[j] * hb + w.rate * share
        ops += on[j] * gw_ops
    # what its gateways receive (per gateway figures of the nats backend)
    per_gw = predict_gateway_nats(w, hb)
    client_out = per_gw * sum(on[j] for j in used)
    # a server forwards interest when its first local subscriber of a subject comes
    # or its last goes: a gateway's op toggles the server's interest unless another
    # gateway of that server holds the room too
    for j in used:
        others = sum(on[i] for i in used if i != j)
        updates += others * gw_ops * _server_toggle(w, on[j])
    n = len(used) or 1
    memory = local_entries * costs.local_entry_bytes + \
        (entries - local_entries) * costs.remote_entry_bytes
    churn_cpu = (ops * costs.subscribe_cpu_us + updates * costs.update_cpu_us) / 1e6
    # a route message leaves one server and enters another: count both ends
    message_cpu = (client_in + client_out + 2 * route) * costs.message_cpu_us / 1e6
    return NatsCost(interest_entries=entries / n, local_entries=local_entries / n,
                    interest_bytes=memory / n, route_msgs_out=route / n,
                    client_msgs_out=client_out / n, client_msgs_in=client_in / n,
                    subscription_ops=ops / n, interest_updates_in=updates / n,
                    churn_cpu=churn_cpu / n, message_cpu=message_cpu / n)


def _distinct_subjects(w: Workload, sockets_here: float, gateways_here: int) -> float:
    """Subjects with interest on one server: rooms with a member on one of its gateways,
    its gateways' node channels, and the cluster channel."""
    rooms = sum(c.rooms * (1 - p_none(float(w.sockets), sockets_here, c.size))
                for c in w.classes)
    return rooms + gateways_here + 1


def _server_toggle(w: Workload, gateways_here: int) -> float:
    """Share of a gateway's subscription ops that change its server's interest: no other
    gateway of the server holds the room (weighted by membership)."""
    if gateways_here <= 1:
        return 1.0
    k = w.per_gateway
    members = sum(c.rooms * c.size for c in w.classes) or 1.0
    return sum(c.rooms * c.size * p_none(float(w.sockets) - k, (gateways_here - 1) * k,
                                         c.size - 1) for c in w.classes) / members


def predict_gateway_nats(w: Workload, hb: float) -> float:
    """Messages a gateway receives from NATS per second: room copies and heartbeats."""
    g, s_total, k = w.gateways, float(w.sockets), w.per_gateway
    copies = sum(c.rate * (g - 1) * (1 - p_none(s_total - 1, k, c.size - 1))
                 for c in w.classes)
    return copies / g + (g - 1) * hb


def span_of(size: int, gateways: int, sockets: int) -> float:
    """Gateways holding at least one member of a room of ``size`` members."""
    return gateways * (1 - p_none(float(sockets), sockets / gateways, size))


def mega_room_size(gateways: int, sockets: int, share: float = 0.95) -> int:
    """The smallest room that reaches ``share`` of the gateways: past it a per-room
    subject saves (almost) nothing over one channel for all rooms."""
    lo, hi = 1, sockets
    while lo < hi:
        mid = (lo + hi) // 2
        if span_of(mid, gateways, sockets) >= share * gateways:
            hi = mid
        else:
            lo = mid + 1
    return lo


def uniform_sizes(low: int, high: int, rooms: float, rate: float,
                  weights: Sequence[float] | None = None) -> tuple[RoomClass, ...]:
    """Rooms of ``low``..``high`` members in equal numbers; ``rate`` split evenly over
    the sizes unless ``weights`` (one per size) say otherwise."""
    sizes = list(range(low, high + 1))
    share = list(weights) if weights is not None else [1.0] * len(sizes)
    total = sum(share) or 1.0
    return tuple(RoomClass(s, rooms / len(sizes), rate * w / total)
                 for s, w in zip(sizes, share, strict=True))


def from_rooms(sizes: Iterable[int], rates: Iterable[float]) -> tuple[RoomClass, ...]:
    """Room classes from each room's size and message rate (rooms of one size are
    merged: the model needs the traffic per size, not which room carries it)."""
    by_size: dict[int, list[float]] = {}
    for size, rate in zip(sizes, rates, strict=True):
        entry = by_size.setdefault(size, [0.0, 0.0])
        entry[0] += 1
        entry[1] += rate
    return tuple(RoomClass(s, n, r) for s, (n, r) in sorted(by_size.items()))


def link_msgs(w: Workload, sites: int, site_local_share: float = 0.0) -> float:
    """Messages per second crossing between sites (NATS clusters of a supercluster, or
    leaf servers and their hub), over all links: a message crosses once to each other
    site holding a member of its room (interest-only gateways, leaf-node interest).
    ``site_local_share`` of the traffic is in rooms whose members all sit on one site
    (regional rooms), which never cross; the rest have members on any gateway."""
    if sites < 2:
        return 0.0
    s_total = float(w.sockets)
    per_site = s_total / sites
    crossing = sum(c.rate * (sites - 1) * (1 - p_none(s_total - 1, per_site, c.size - 1))
                   for c in w.classes)
    return crossing * (1 - site_local_share)


@dataclass
class TopologyInterest:
    """Interest entries and their memory on the busiest kind of NATS server."""

    topology: str
    servers: int
    entries: float
    memory_bytes: float


def topology_interest(w: Workload, sites: int = 2,
                      costs: NatsConstants | None = None) -> list[TopologyInterest]:
    """The same gateways on three NATS layouts, each server holding what nats-server 2.15
    keeps (checked on real servers, see docs/SCALING.md):

    - ``mesh``: one mesh of ``w.nats_nodes`` servers: its gateways' subscriptions, plus
      one entry per (other server, subject with interest there);
    - ``supercluster``: ``sites`` clusters of ``w.nats_nodes`` servers, the gateways
      split evenly: the same within its cluster, plus one entry per subject with interest
      anywhere in each other cluster (a gateway connection dedupes a whole cluster);
    - ``leaf``: ``sites`` leaf servers (the gateways split evenly) on a hub of
      ``w.nats_nodes`` servers: a leaf holds its gateways' subscriptions plus one entry per
      subject with interest on any other leaf; a hub server one per (leaf, subject).
    """
    c = costs or NatsConstants()
    s_total = float(w.sockets)

    def distinct(sockets_here: float, gateways_here: float) -> float:
        rooms = sum(k.rooms * (1 - p_none(s_total, sockets_here, k.size)) for k in w.classes)
        return rooms + gateways_here + 1

    def local(gateways_here: float) -> float:
        return gateways_here * (sum(k.rooms * (1 - p_none(s_total, w.per_gateway, k.size))
                                    for k in w.classes) + FIXED_SUBSCRIPTIONS)

    def entry(name: str, servers: int, own: float, learnt: float) -> TopologyInterest:
        return TopologyInterest(name, servers, own + learnt,
                                own * c.local_entry_bytes + learnt * c.remote_entry_bytes)

    n = w.nats_nodes
    out = []
    per_server = w.gateways / n
    out.append(entry("mesh", n, local(per_server),
                     (n - 1) * distinct(s_total / n, per_server)))
    per_server = w.gateways / (sites * n)
    out.append(entry("supercluster", sites * n, local(per_server),
                     (n - 1) * distinct(s_total / (sites * n), per_server)
                     + (sites - 1) * distinct(s_total / sites, w.gateways / sites)))
    per_leaf = w.gateways / sites
    leaf = entry("leaf (a leaf server)", sites, local(per_leaf),
                 distinct(s_total * (sites - 1) / sites, w.gateways - per_leaf))
    hub = entry("leaf (a hub server)", n, 0.0, sites * distinct(s_total / sites, per_leaf))
    out += [leaf, hub]
    return out
