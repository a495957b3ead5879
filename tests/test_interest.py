"""Interest: a node subscribes to a room only while it has local members there.

Reads the broker's own view (NATS monitoring ``/connz?subs=1``) rather than the
gateway's, so the test proves what the cluster routes, not what the node believes.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from gateway.processes import NatsCluster
from tests.conftest import TEST_LINGER
from tests.helpers import SETTLE, Node, SioClient, connect_all, nats_subjects

# NATS only: these read nats-server's /connz. The same properties for sharded Redis,
# read from Redis's PUBSUB SHARDNUMSUB and INFO, are in test_redis_sharding.py.
pytestmark = pytest.mark.parametrize("backend", ["nats"], indirect=True)


async def wait_subjects(cluster: NatsCluster, node: Node, predicate: object,
                        timeout: float = 5.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        subjects = nats_subjects([n.monitor_url for n in cluster.nodes], node.node_id)
        if predicate(subjects):  # type: ignore[operator]
            return subjects
        if time.monotonic() > deadline:
            return subjects
        await asyncio.sleep(0.05)


async def test_only_nodes_with_members_subscribe(nodes: list[Node], nats_cluster: NatsCluster,
                                                 clients: list[SioClient]) -> None:
    room = f"interest-{uuid.uuid4().hex[:8]}"
    subject = nodes[0].manager.channels.room("/", room)
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    await a.join(room)
    await b.join(room)
    monitors = [n.monitor_url for n in nats_cluster.nodes]
    assert subject in nats_subjects(monitors, nodes[0].node_id)
    assert subject in nats_subjects(monitors, nodes[1].node_id)
    assert subject not in nats_subjects(monitors, nodes[2].node_id)

    third = nodes[2].manager.stats

    def room_traffic() -> int:  # what it received, heartbeats of the cluster API aside
        return third.received - third.cluster_received

    received_before, unwanted_before = room_traffic(), third.unwanted
    for i in range(5):
        await a.chat(room, f"m{i}")
    await b.wait_texts([f"m{i}" for i in range(5)])
    await asyncio.sleep(SETTLE)
    assert room_traffic() == received_before, "a node with no member got room traffic"
    assert third.unwanted == unwanted_before


async def test_subscription_goes_after_last_member_leaves_plus_linger(
        nodes: list[Node], nats_cluster: NatsCluster, clients: list[SioClient]) -> None:
    room = f"linger-{uuid.uuid4().hex[:8]}"
    subject = nodes[1].manager.channels.room("/", room)
    a, b = await connect_all(clients, [("a", nodes[1]), ("b", nodes[1])])
    await a.join(room)
    await b.join(room)
    await a.call("leave", room)
    # one member left: still subscribed
    subjects = nats_subjects([n.monitor_url for n in nats_cluster.nodes], nodes[1].node_id)
    assert subject in subjects
    left_at = time.monotonic()
    await b.call("leave", room)
    # during the linger the subscription stays (churn damping) ...
    await asyncio.sleep(TEST_LINGER / 3)
    subjects = nats_subjects([n.monitor_url for n in nats_cluster.nodes], nodes[1].node_id)
    assert subject in subjects, "unsubscribed before the linger"
    # ... and then it is gone from the server
    subjects = await wait_subjects(nats_cluster, nodes[1], lambda s: subject not in s)
    assert subject not in subjects
    assert time.monotonic() - left_at >= TEST_LINGER * 0.9


async def test_rejoin_within_linger_costs_no_interest_update(
        nodes: list[Node], clients: list[SioClient]) -> None:
    room = f"churn-{uuid.uuid4().hex[:8]}"
    (a,) = await connect_all(clients, [("a", nodes[2])])
    stats = nodes[2].manager.stats
    await a.join(room)
    subs_before, unsubs_before = stats.subscribe_ops, stats.unsubscribe_ops
    for _ in range(20):
        await a.call("leave", room)
        await a.call("join", room)
    assert stats.subscribe_ops == subs_before
    assert stats.unsubscribe_ops == unsubs_before
