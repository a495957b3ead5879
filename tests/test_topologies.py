"""NATS past one cluster: a supercluster (NATS gateways) and leaf nodes, on real servers.

Gateways run as ``python -m gateway serve`` processes, with heartbeats 30 s apart so
that nothing but the test's own chats moves on the inter-cluster links while a test
counts what crosses them (``/gatewayz`` and ``/leafz`` of the servers).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.processes import (
    GatewayNode,
    LocalCluster,
    NatsLeafTopology,
    NatsNode,
    NatsSupercluster,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
    wait_until,
)
from tests.conftest import ERROR_COUNTERS
from tests.helpers import (
    SioClient,
    connect_all,
    first_delivery_after,
    metrics_of,
    running,
    wait_for_condition,
)

#: heartbeats of the test gateways: none falls inside a test's counting window
QUIET_HEARTBEAT = "30"


@pytest.fixture
def supercluster(tmp_path: Path) -> Iterator[NatsSupercluster]:
    with running(NatsSupercluster(tmp_path / "nats", size=2)) as topology:
        yield topology


@pytest.fixture
def leaf(tmp_path: Path) -> Iterator[NatsLeafTopology]:
    # a hub of one node: stopping it cuts every leaf off from the others
    with running(NatsLeafTopology(tmp_path / "nats", hub_size=1, leaves=2)) as topology:
        yield topology


@pytest.fixture
def gateways(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[GatewayNode]]:
    """Three gateways on the test's topology: gw-1 and gw-3 on the first cluster (or
    leaf server), gw-2 on the second."""
    topology: LocalCluster[Any] = request.getfixturevalue(request.param)
    gws: list[GatewayNode] = []
    try:
        for i, port in enumerate(free_ports(3)):
            index = 0 if i == 2 else i
            gws.append(start_gateway(tmp_path / "gw", f"topo-gw-{i + 1}", port, "nats",
                                     topology.gateway_args(index),
                                     extra=["--heartbeat-interval", QUIET_HEARTBEAT],
                                     env=topology.gateway_env(index)))
        wait_gateways(gws)
        errors = [_errors(g) for g in gws]
        yield gws
        assert [_errors(g) for g in gws] == errors, "a gateway counted an error"
    finally:
        stop_all([g.child for g in gws])


def _errors(gw: GatewayNode) -> dict[str, float]:
    metrics = metrics_of(gw.url)
    return {name: metrics.get(name, 0.0) for name in ERROR_COUNTERS.values()}


def link_messages(topology: NatsSupercluster | NatsLeafTopology) -> int:
    """Messages that crossed the links between clusters (or leaf servers and the hub),
    counted once each: as sent by the server on the sending side."""
    total = 0
    if isinstance(topology, NatsSupercluster):
        for node in topology.nodes:
            gwz = node.varz("gatewayz") or {}
            for outbound in (gwz.get("outbound_gateways") or {}).values():
                total += int((outbound.get("connection") or {}).get("out_msgs", 0))
    else:
        for node in topology.nodes:
            for conn in (node.varz("leafz") or {}).get("leafs") or []:
                total += int(conn.get("out_msgs", 0))
    return total


async def chat_all(sender: SioClient, receiver: SioClient, room: str, count: int) -> None:
    texts = [f"{room}-{k}" for k in range(count)]
    for text in texts:
        await sender.chat(room, text)
    await receiver.wait_for(lambda c: all(t in c.texts() for t in texts),
                            what=f"{count} chats in {room}")


async def across_and_home(topology: NatsSupercluster | NatsLeafTopology,
                          gws: Sequence[GatewayNode], clients: list[SioClient]) -> None:
    """A room with members on both sides crosses the link both ways; a room whose
    members are all on one side (two gateways there) sends nothing across."""
    a, b, c, d = await connect_all(clients, [("a", gws[0].url), ("b", gws[1].url),
                                             ("c", gws[0].url), ("d", gws[2].url)])
    for client, room in ((a, "across"), (b, "across"), (c, "home"), (d, "home")):
        await client.join(room)
    # interest reaches the other side over the link asynchronously: probe until it has
    await first_delivery_after(a, b, "across", 10)
    await first_delivery_after(b, a, "across", 10)
    await first_delivery_after(c, d, "home", 10)
    before = link_messages(topology)
    await chat_all(a, b, "across", 10)
    await chat_all(b, a, "across", 10)
    # the link's counters are the servers' own, read over HTTP: poll until they show it
    await wait_for_condition(lambda: link_messages(topology) - before >= 20,
                             "20 messages to cross the link")
    crossed = link_messages(topology) - before
    assert crossed >= 20, f"only {crossed} messages crossed for 20 chats across"
    before = link_messages(topology)
    await chat_all(c, d, "home", 20)
    await chat_all(d, c, "home", 20)
    await asyncio.sleep(0.5)  # a window for what would cross to show (not a wait)
    # the 40 chats would cross 40 times; the gateways' registry heartbeats (one per
    # gateway every few seconds) do cross, and may fall in this window
    crossed = link_messages(topology) - before
    assert crossed < 10, f"a room living on one side crossed the link ({crossed} messages)"


@pytest.mark.parametrize("gateways", ["supercluster"], indirect=True)
async def test_supercluster_carries_rooms_across_and_keeps_local_rooms_home(
        supercluster: NatsSupercluster, gateways: list[GatewayNode],
        clients: list[SioClient]) -> None:
    for node in supercluster.nodes:
        gwz = node.varz("gatewayz?accs=1")
        modes = {acc["name"]: acc["interest_mode"]
                 for out in gwz["outbound_gateways"].values() for acc in out["accounts"]}
        assert modes["$G"] == "Interest-Only", f"{node.name}: {modes}"
    await across_and_home(supercluster, gateways, clients)


@pytest.mark.parametrize("gateways", ["leaf"], indirect=True)
async def test_leaf_nodes_carry_rooms_across_and_keep_local_rooms_home(
        leaf: NatsLeafTopology, gateways: list[GatewayNode], clients: list[SioClient]) -> None:
    for gw, leaf_node in zip(gateways, [*leaf.leaf_nodes, leaf.leaf_nodes[0]], strict=True):
        assert gw.healthz()[1]["broker"]["server"] == leaf_node.url, "gateways use leaves"
    await across_and_home(leaf, gateways, clients)


async def in_one_room(gws: Sequence[GatewayNode], clients: list[SioClient]
                      ) -> list[SioClient]:
    """A client on each gateway, all in the room "link", which carries chats both ways
    between the sides."""
    made = await connect_all(clients, [(f"c{i + 1}", gw.url) for i, gw in enumerate(gws)])
    for client in made:
        await client.join("link")
    await first_delivery_after(made[0], made[1], "link", 10)
    await first_delivery_after(made[1], made[0], "link", 10)
    return made


def _by_server_id(nodes: Sequence[NatsNode]) -> dict[str, NatsNode]:
    return {node.varz("varz")["server_id"]: node for node in nodes}


def _serving(topology: NatsSupercluster | NatsLeafTopology, gw: GatewayNode) -> NatsNode:
    url = gw.healthz()[1]["broker"]["server"]
    return next(n for n in topology.nodes if n.url == url)


def _kill(node: NatsNode) -> None:
    assert node.child is not None
    node.child.signal(signal.SIGKILL)
    node.child.popen.wait(10)


@pytest.mark.parametrize("gateways", ["supercluster"], indirect=True)
async def test_supercluster_link_killed_and_restored(
        supercluster: NatsSupercluster, gateways: list[GatewayNode],
        clients: list[SioClient]) -> None:
    a, b, c = await in_one_room(gateways, clients)
    west = supercluster.clusters[1]
    # the west server at the far end of the link gw-1's messages take
    origin = _serving(supercluster, gateways[0])
    far_id = origin.varz("gatewayz")["outbound_gateways"]["west"]["connection"]["name"]
    far = _by_server_id(west.nodes)[far_id]
    _kill(far)
    # the link comes back through the other west node (and gw-2 moves to it if it
    # was on the killed one): delivery resumes both ways
    await first_delivery_after(a, b, "link", 30)
    await first_delivery_after(b, a, "link", 30)
    supercluster.start_node(supercluster.nodes.index(far))
    supercluster.wait_ready()
    await first_delivery_after(a, b, "link", 30)
    await first_delivery_after(b, a, "link", 30)

    # the whole west cluster gone: east keeps serving its own members
    for node in west.nodes:
        _kill(node)
    await first_delivery_after(a, c, "link", 10)
    for node in west.nodes:
        supercluster.start_node(supercluster.nodes.index(node))
    supercluster.wait_ready()
    wait_until(lambda: gateways[1].healthz()[0] == 200, 30, "gw-2 back on west")
    await first_delivery_after(a, b, "link", 30)
    await first_delivery_after(b, a, "link", 30)


@pytest.mark.parametrize("gateways", ["leaf"], indirect=True)
async def test_leaf_link_cut_and_restored(leaf: NatsLeafTopology, gateways: list[GatewayNode],
                                          clients: list[SioClient]) -> None:
    a, b, c = await in_one_room(gateways, clients)
    hub = leaf.hub.nodes[0]
    _kill(hub)
    # cut off from the hub, each leaf server still serves its own gateways, and
    # nothing reaches the other leaf (NATS is at most once: those messages are gone)
    await first_delivery_after(a, c, "link", 10)
    await a.chat("link", "while-cut")
    await asyncio.sleep(0.5)  # a window for it to arrive, were it not lost (not a wait)
    assert "while-cut" not in b.texts()
    assert all(gw.healthz()[0] == 200 for gw in gateways), "gateways keep their leaf server"
    leaf.start_node(leaf.nodes.index(hub))
    leaf.wait_ready()
    # the leaves dial the hub again and tell it their interest: delivery resumes
    await first_delivery_after(a, b, "link", 30)
    await first_delivery_after(b, a, "link", 30)


@pytest.mark.parametrize("topology", ["supercluster", "leaf"])
async def test_every_server_of_a_topology_requires_a_login(
        topology: str, request: pytest.FixtureRequest) -> None:
    """Secured like the mesh: no anonymous client on any server (its gateways log in)."""
    import nats
    import nats.errors

    servers: NatsSupercluster | NatsLeafTopology = request.getfixturevalue(topology)
    for node in servers.nodes:
        with pytest.raises(nats.errors.Error):
            await nats.connect(node.url, allow_reconnect=False, connect_timeout=2,
                               max_reconnect_attempts=0)
    login = servers.gateway_env()
    nc = await nats.connect(servers.nodes[-1].url, user=login["NATS_USER"],
                            password=login["NATS_PASSWORD"], allow_reconnect=False)
    await nc.close()
