"""NATS past one cluster, locally: a supercluster and a leaf-node topology.

- :class:`NatsSupercluster`: two full meshes (``infra/nats/supercluster.conf``) joined
  by NATS gateways; gateway ``i`` is served by cluster ``i % 2``.
- :class:`NatsLeafTopology`: a hub cluster (``infra/nats/hub.conf``) and leaf servers
  (``infra/nats/leaf.conf``) that dial it; gateway ``i`` connects to leaf ``i % leaves``.

Both are :class:`LocalCluster` s of :class:`NatsNode` s, so the launcher supervises
their nodes like those of a single mesh. Both require credentials, made up per
topology: clients (the gateways, :meth:`gateway_env`) log in as ``gateway``; routes,
NATS gateway links and leaf connections as ``route``.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .children import INFRA, LocalCluster, wait_settled
from .nats_cluster import NatsCluster, NatsNode

SUPERCLUSTER_CONFIG = INFRA / "nats" / "supercluster.conf"
HUB_CONFIG = INFRA / "nats" / "hub.conf"
LEAF_CONFIG = INFRA / "nats" / "leaf.conf"
GATEWAY_PORT = "NATS_GATEWAY_PORT"
LEAF_PORT = "NATS_LEAF_PORT"
#: the NATS topologies the launcher starts (mesh: one full mesh, NatsCluster)
TOPOLOGIES = ("mesh", "supercluster", "leaf")


def _logins() -> tuple[dict[str, str], tuple[str, str]]:
    """(the clients' NATS_USER / NATS_PASSWORD, the links' (user, password))."""
    return ({"NATS_USER": "gateway", "NATS_PASSWORD": secrets.token_hex(16)},
            ("route", secrets.token_hex(16)))


def _with_login(url: str, login: tuple[str, str]) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{login[0]}:{login[1]}@{rest}"


def _split_ports(ports: Sequence[int] | None, sizes: Sequence[int]) -> list[list[int] | None]:
    """Client ports for each part, in node order, from one list for every node."""
    if ports is None:
        return [None for _ in sizes]
    if len(ports) != sum(sizes):
        raise ValueError(f"client_ports must name one port per node ({sum(sizes)})")
    out: list[list[int] | None] = []
    start = 0
    for size in sizes:
        out.append(list(ports[start:start + size]))
        start += size
    return out


@dataclass
class NatsSupercluster(LocalCluster[NatsNode]):
    """Two local NATS clusters of ``size`` nodes each, joined by NATS gateways.

    Node names are ``{cluster}-{n}`` (``east-1`` ...). Each node's gateway listener is
    in :attr:`NatsNode.ports` under ``NATS_GATEWAY_PORT``.
    """

    workdir: Path
    size: int = 3
    host: str = "127.0.0.1"
    names: tuple[str, str] = ("east", "west")
    #: client ports of every node, east's then west's (default: free ports)
    client_ports: list[int] | None = None
    clusters: list[NatsCluster] = field(default_factory=list)
    nodes: list[NatsNode] = field(default_factory=list)
    client_login: dict[str, str] = field(default_factory=dict, repr=False)
    link_login: tuple[str, str] = field(default=("", ""), repr=False)

    def __post_init__(self) -> None:
        self.client_login, self.link_login = _logins()
        if len(set(self.names)) != 2:
            raise ValueError(f"a supercluster here joins two named clusters, got {self.names}")
        ports = _split_ports(self.client_ports, [self.size, self.size])
        self.clusters = [
            NatsCluster(self.workdir, size=self.size, host=self.host, cluster_name=name,
                        config=SUPERCLUSTER_CONFIG, name_prefix=name, listeners=(GATEWAY_PORT,),
                        client_ports=ports[k], route_auth=self.link_login,
                        env=dict(self.client_login))
            for k, name in enumerate(self.names)
        ]
        # every node of both clusters lists both clusters, each by one seed node's
        # gateway URL; the other nodes of a cluster are learnt from it
        seeds: dict[str, str] = {}
        for k, cluster in enumerate(self.clusters):
            seeds[f"NATS_GATEWAY_{k + 1}_NAME"] = cluster.cluster_name
            seeds[f"NATS_GATEWAY_{k + 1}_URL"] = _with_login(self.gateway_url(cluster.nodes[0]),
                                                             self.link_login)
        for cluster in self.clusters:
            cluster.env.update(seeds)
        self.nodes = [n for c in self.clusters for n in c.nodes]

    def gateway_url(self, node: NatsNode) -> str:
        return f"nats://{self.host}:{node.ports[GATEWAY_PORT]}"

    def cluster_of(self, node: NatsNode) -> NatsCluster:
        return next(c for c in self.clusters if node in c.nodes)

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        cluster = self.cluster_of(node)
        cluster.start_node(cluster.nodes.index(node))

    def start(self, timeout: float = 30.0) -> None:
        for i in range(len(self.nodes)):
            self.start_node(i)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for both meshes and for the gateway connections: every node has its
        outbound connection to the other cluster (to one node there, picked by the
        server), so every node of a cluster is some node's inbound connection."""
        for cluster in self.clusters:
            cluster.wait_ready(timeout)
        wait_settled("the NATS gateways between the clusters", self.links_snapshot,
                      self.children, timeout)

    def links_snapshot(self) -> list[tuple[str, str, int]] | None:
        """(node, the server id its outbound gateway connection reaches, its inbound
        connections) for every node, or None while a link is missing."""
        out = []
        for cluster in self.clusters:
            other = next(c for c in self.clusters if c is not cluster)
            inbound_total = 0
            for node in cluster.nodes:
                gwz = node.varz("gatewayz")
                if gwz is None:
                    return None
                outbound = (gwz.get("outbound_gateways") or {}).get(other.cluster_name) or {}
                inbound = (gwz.get("inbound_gateways") or {}).get(other.cluster_name) or []
                if not outbound.get("connection"):
                    return None
                inbound_total += len(inbound)
                out.append((node.name, str(outbound["connection"].get("name")), len(inbound)))
            if inbound_total < other.size:
                return None
        return out

    def gateway_args(self, index: int = 0) -> list[str]:
        return ["--nats-url", ",".join(self.clusters[index % 2].urls)]

    def gateway_env(self, index: int = 0) -> dict[str, str]:
        return dict(self.client_login)


@dataclass
class NatsLeafTopology(LocalCluster[NatsNode]):
    """A hub cluster of ``hub_size`` nodes and ``leaves`` leaf servers dialling it.

    Node names are ``hub-{n}`` and ``leaf-{n}``; the hub's leaf-node listeners are in
    :attr:`NatsNode.ports` under ``NATS_LEAF_PORT``. Gateways connect to leaf servers
    only.
    """

    workdir: Path
    hub_size: int = 3
    leaves: int = 2
    host: str = "127.0.0.1"
    #: client ports of every node, the hub's then the leaves' (default: free ports)
    client_ports: list[int] | None = None
    hub: NatsCluster = field(init=False)
    #: the leaf servers (not routed to each other: leaf.conf has no cluster block)
    leaf_cluster: NatsCluster = field(init=False)
    nodes: list[NatsNode] = field(default_factory=list)
    client_login: dict[str, str] = field(default_factory=dict, repr=False)
    link_login: tuple[str, str] = field(default=("", ""), repr=False)

    def __post_init__(self) -> None:
        self.client_login, self.link_login = _logins()
        if self.leaves < 1:
            raise ValueError(f"a leaf topology needs at least 1 leaf server, got {self.leaves}")
        ports = _split_ports(self.client_ports, [self.hub_size, self.leaves])
        self.hub = NatsCluster(self.workdir, size=self.hub_size, host=self.host,
                               cluster_name="hub", config=HUB_CONFIG, name_prefix="hub",
                               listeners=(LEAF_PORT,), client_ports=ports[0],
                               route_auth=self.link_login, env=dict(self.client_login))
        self.leaf_cluster = NatsCluster(self.workdir, size=self.leaves, host=self.host,
                                        cluster_name="leaf", config=LEAF_CONFIG,
                                        name_prefix="leaf", client_ports=ports[1],
                                        env=dict(self.client_login))
        # leaf.conf names three hub URLs; a smaller hub repeats its own
        hub_urls = [_with_login(self.leaf_url(n), self.link_login) for n in self.hub.nodes]
        for i in range(3):
            self.leaf_cluster.env[f"NATS_HUB_{i + 1}"] = hub_urls[i % len(hub_urls)]
        self.nodes = [*self.hub.nodes, *self.leaf_cluster.nodes]

    @property
    def leaf_nodes(self) -> list[NatsNode]:
        return self.leaf_cluster.nodes

    def leaf_url(self, hub_node: NatsNode) -> str:
        return f"nats://{self.host}:{hub_node.ports[LEAF_PORT]}"

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        if node in self.hub.nodes:
            self.hub.start_node(self.hub.nodes.index(node))
        else:
            self.leaf_cluster.start_node(self.leaf_nodes.index(node))

    def start(self, timeout: float = 30.0) -> None:
        for i in range(len(self.nodes)):
            self.start_node(i)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait for the hub's mesh and for every leaf server's connection to the hub."""
        self.hub.wait_ready(timeout)
        wait_settled("the leaf servers' connections to the hub", self.links_snapshot,
                      self.children, timeout)

    def links_snapshot(self) -> list[tuple[str, int]] | None:
        """(leaf, leaf-node connections) per leaf server, or None while one has none."""
        out = []
        for leaf in self.leaf_nodes:
            leafz = leaf.varz("leafz")
            if leafz is None or not leafz.get("leafs"):
                return None
            out.append((leaf.name, len(leafz["leafs"])))
        return out

    def gateway_args(self, index: int = 0) -> list[str]:
        return ["--nats-url", self.leaf_nodes[index % self.leaves].url]

    def gateway_env(self, index: int = 0) -> dict[str, str]:
        return dict(self.client_login)
