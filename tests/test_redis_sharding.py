"""Sharded Redis: a room's traffic reaches only the master that owns its slot.

Reads Redis's own counters (``INFO commandstats``, ``PUBSUB SHARDNUMSUB``) on every
master, so the test proves what the cluster does, not what the gateway believes.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from gateway.processes import RedisCluster, RedisNode
from tests.conftest import TEST_LINGER
from tests.helpers import SETTLE, Node, SioClient, connect_all, owner_of

pytestmark = pytest.mark.parametrize("backend", ["redis-sharded"], indirect=True)


def spublish_calls(node: RedisNode) -> int:
    for line in node.cli("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_spublish:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def shard_subscribers(node: RedisNode, channel: str) -> int:
    reply = node.cli("PUBSUB", "SHARDNUMSUB", channel).split()
    return int(reply[1]) if len(reply) == 2 else 0


async def test_room_traffic_reaches_only_the_owning_master(
        nodes: list[Node], redis_cluster: RedisCluster, clients: list[SioClient]) -> None:
    # a room whose master is not the cluster channel's (which carries heartbeats)
    busy = owner_of(redis_cluster.nodes, nodes[0].manager.channels.cluster())
    while True:
        room = f"shard-{uuid.uuid4().hex[:8]}"
        channel = nodes[0].manager.channels.room("/", room)
        owner = owner_of(redis_cluster.nodes, channel)
        if owner is not busy:
            break
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    await a.join(room)
    await b.join(room)
    # two gateways have members: two shard subscribers, on the owner only
    assert shard_subscribers(owner, channel) == 2
    for other in redis_cluster.nodes:
        if other is not owner:
            assert shard_subscribers(other, channel) == 0

    before = {n.name: spublish_calls(n) for n in redis_cluster.nodes}
    third = nodes[2].manager.stats
    # what it received, the cluster API's heartbeats and Redis's echoes of its own aside
    third_received = third.received - third.cluster_received - third.dropped_echo
    for i in range(10):
        await a.chat(room, f"s{i}")
    await b.wait_texts([f"s{i}" for i in range(10)])
    await asyncio.sleep(SETTLE)
    after = {n.name: spublish_calls(n) for n in redis_cluster.nodes}
    assert after[owner.name] - before[owner.name] == 10
    for other in redis_cluster.nodes:
        if other is not owner and other is not busy:
            assert after[other.name] == before[other.name], f"{other.name} saw room traffic"
    assert third.received - third.cluster_received - third.dropped_echo == third_received, \
        "a node with no member got it"


async def test_shard_subscription_goes_after_last_member_leaves(
        nodes: list[Node], redis_cluster: RedisCluster, clients: list[SioClient]) -> None:
    room = f"shard-linger-{uuid.uuid4().hex[:8]}"
    channel = nodes[2].manager.channels.room("/", room)
    owner = owner_of(redis_cluster.nodes, channel)
    (a,) = await connect_all(clients, [("a", nodes[2])])
    await a.join(room)
    assert shard_subscribers(owner, channel) == 1
    await a.call("leave", room)
    assert shard_subscribers(owner, channel) == 1, "kept during the linger"
    deadline = time.monotonic() + TEST_LINGER + 5
    while shard_subscribers(owner, channel) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert shard_subscribers(owner, channel) == 0


async def test_delivery_follows_a_slot_moved_to_another_master(
        nodes: list[Node], redis_cluster: RedisCluster, clients: list[SioClient]) -> None:
    room = f"reshard-{uuid.uuid4().hex[:8]}"
    channel = nodes[0].manager.channels.room("/", room)
    source = owner_of(redis_cluster.nodes, channel)
    target = next(n for n in redis_cluster.nodes if n is not source)
    slot = source.cli("CLUSTER", "KEYSLOT", channel).strip()
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    await a.join(room)
    await b.join(room)
    await a.chat(room, "before")
    await b.wait_texts(["before"])

    target_id = target.cli("CLUSTER", "MYID").strip()
    source_id = source.cli("CLUSTER", "MYID").strip()
    assert target.cli("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id).strip() == "OK"
    assert source.cli("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id).strip() == "OK"
    for node in (target, source):
        assert node.cli("CLUSTER", "SETSLOT", slot, "NODE", target_id).strip() == "OK"
    try:
        deadline = time.monotonic() + 10
        while shard_subscribers(target, channel) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert shard_subscribers(target, channel) == 2, "subscriptions did not follow the slot"
        assert shard_subscribers(source, channel) == 0
        await a.chat(room, "after")
        await b.wait_texts(["before", "after"])
        for node in nodes:
            assert node.manager.broker.connected
    finally:
        # give the slot back so other tests see the cluster as it was
        for node in redis_cluster.nodes:
            node.cli("CLUSTER", "SETSLOT", slot, "NODE", source_id)


async def test_remote_join_to_a_room_on_the_master_of_the_nodes_control_channel(
        nodes: list[Node], redis_cluster: RedisCluster, clients: list[SioClient]) -> None:
    """A remote enter_room arrives on the target node's control channel; when the room's
    channel lives on the same master, the confirmation of its SSUBSCRIBE comes through
    the very reader that delivered the request. The join must not wait on itself."""
    target_node = nodes[1]
    control = target_node.manager.channels.node(target_node.manager.node_tag)
    master = owner_of(redis_cluster.nodes, control)
    room = next(r for r in (f"same-master-{uuid.uuid4().hex[:8]}" for _ in range(200))
                if owner_of(redis_cluster.nodes, target_node.manager.channels.room("/", r))
                is master)
    sender, target = await connect_all(clients, [("sender", nodes[0]), ("target", target_node)])
    await sender.join(room)
    await nodes[2].sio.enter_room(target.sid, room)
    deadline = time.monotonic() + 2
    while room not in target_node.manager.get_rooms(target.sid, "/"):
        assert time.monotonic() < deadline, "the remote join never arrived"
        await asyncio.sleep(0.02)
    channel = target_node.manager.channels.room("/", room)
    assert await target_node.manager.subscriptions.ready(channel, 2.0), \
        "the room's subscription was not confirmed while the request was handled"
    await sender.chat(room, "same master")
    await target.wait_texts(["same master"], timeout=2)
