"""Acks that tell the truth, leaves that are always honoured, losses that show.

Against real brokers: a broker that stops confirming subscriptions (SIGSTOP), join
and leave bursts read back from the broker's own monitoring, and a NATS slow
consumer counted on /metrics.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from gateway.processes import NatsCluster, RedisCluster
from nats_adapter import NatsManager
from tests.conftest import TEST_LINGER, start_node
from tests.helpers import (
    Node,
    SioClient,
    connect_all,
    freeze,
    nats_subjects,
    owner_of,
    read_metric,
    running,
    wait_for_condition,
)


@pytest.fixture
def nats1(tmp_path: Path) -> Iterator[NatsCluster]:
    with running(NatsCluster(tmp_path / "nats", size=1)) as cluster:
        yield cluster


@pytest.fixture
def redis3(tmp_path: Path) -> Iterator[RedisCluster]:
    with running(RedisCluster(tmp_path / "redis", size=3)) as cluster:
        yield cluster


@pytest.fixture
async def stopped_broker_node(request: pytest.FixtureRequest, tmp_path: Path
                              ) -> AsyncIterator[tuple[Node, str, list[int]]]:
    """A gateway (subscribe timeout 1 s), a room name, and the PID(s) of the broker
    node(s) that must confirm that room's subscription."""
    backend: str = request.param
    room = f"stuck-{uuid.uuid4().hex[:6]}"
    if backend == "nats":
        cluster: NatsCluster | RedisCluster = request.getfixturevalue("nats1")
        extra: dict[str, object] = {"nats_urls": tuple(cluster.urls)}
    else:
        cluster = request.getfixturevalue("redis3")
        extra = {"redis_url": cluster.nodes[0].url}
    node = await start_node(backend, f"stuck-{backend}", {**extra, "subscribe_timeout": 1.0})
    try:
        if isinstance(cluster, NatsCluster):
            pids = [n.child.pid for n in cluster.nodes if n.child is not None]
        else:
            owner = owner_of(cluster.nodes, node.manager.channels.room("/", room))
            assert owner.child is not None
            pids = [owner.child.pid]
        yield node, room, pids
    finally:
        await node.runner.cleanup()


@pytest.mark.parametrize("stopped_broker_node", ["nats", "redis-sharded"], indirect=True)
@pytest.mark.expected_errors("subscription_errors")
async def test_join_is_refused_while_the_broker_does_not_confirm(
        stopped_broker_node: tuple[Node, str, list[int]], clients: list[SioClient]) -> None:
    node, room, pids = stopped_broker_node
    (c,) = await connect_all(clients, [("c", node)])
    await c.join("warm-up")  # the broker answers: joins are acked ok
    for pid in pids:
        await freeze(pid)  # frozen: it neither answers nor closes connections
    try:
        started = time.monotonic()
        ack = await c.call("join", room, timeout=10)
        waited = time.monotonic() - started
        assert ack["ok"] is False and ack["error"].startswith("room unavailable:"), ack
        assert 0.9 <= waited < 3.0, f"refused after {waited:.1f} s; subscribe_timeout is 1 s"
        # the refused join left nothing behind: the socket is not in the room
        assert room not in node.manager.get_rooms(c.sid, "/")
        refused = await c.call("chat", {"room": room, "text": "x"})
        assert refused["ok"] is False and "not a member" in refused["error"]
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    # once the broker answers again, the same join succeeds
    deadline = time.monotonic() + 10
    while True:
        ack = await c.call("join", room, timeout=10)
        if ack["ok"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)  # poll interval
    assert ack == {"ok": True, "room": room}
    assert await read_metric(node.url, "gateway_requests_refused_total") >= 1


async def test_leaves_are_always_honoured_and_interest_returns_to_baseline(
        nodes: list[Node], clients: list[SioClient], request: pytest.FixtureRequest) -> None:
    tag = uuid.uuid4().hex[:6]
    rooms = [f"burst-{tag}-{i}" for i in range(20)]
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    pairs = [(c, rooms[i % len(rooms)]) for c in (a, b) for i in range(100)]
    # 100 join/leave pairs per socket in a burst: every leave is acked ok
    for c, room in pairs:
        assert (await c.call("join", room))["ok"] is True
        assert await c.call("leave", room) == {"ok": True, "room": room}
    # a flood of leaves past any join limit is still honoured
    acks = await asyncio.gather(*(a.call("leave", room) for room in rooms * 10))
    assert all(ack["ok"] for ack in acks), acks
    channels = [nodes[0].manager.channels.room("/", room) for room in rooms]

    def still_held() -> dict[str, object]:
        """What the broker still holds of these rooms, by gateway or master."""
        if nodes[0].config.backend == "nats":
            cluster: NatsCluster = request.getfixturevalue("nats_cluster")
            monitors = [n.monitor_url for n in cluster.nodes]
            return {node.node_id: held for node in nodes[:2]
                    if (held := nats_subjects(monitors, node.node_id) & set(channels))}
        redis: RedisCluster = request.getfixturevalue("redis_cluster")
        out: dict[str, object] = {}
        for master in redis.nodes:
            reply = master.cli("PUBSUB", "SHARDNUMSUB", *channels).split()
            counts = dict(zip(reply[::2], map(int, reply[1::2]), strict=True))
            if any(counts.values()):
                out[master.name] = counts
        return out

    # released once the linger has passed
    await wait_for_condition(lambda: not still_held(), "the rooms' subscriptions to go",
                             timeout=TEST_LINGER + 10)
    assert not still_held()


def _flood(url: str, subject: str, count: int) -> None:
    async def publish() -> None:
        nc = await nats.connect(url)
        try:
            for i in range(count):
                await nc.publish(subject, b"x" * 64 + str(i).encode())
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(publish())


@pytest.mark.expected_errors("dropped_malformed")
async def test_a_nats_slow_consumer_is_counted_on_metrics(
        nats1: NatsCluster, clients: list[SioClient]) -> None:
    manager = NatsManager(nats1.urls, pending_msgs_limit=10, connection_name="slow")
    node = await start_node("nats", "slow", {"nats_urls": tuple(nats1.urls)}, manager=manager)
    try:
        (c,) = await connect_all(clients, [("c", node)])
        await c.join("slow")
        subject = manager.channels.room("/", "slow")
        flood = threading.Thread(target=_flood, args=(nats1.urls[0], subject, 500))
        # the node's event loop is held up (by this join) while 500 messages arrive:
        # nats-py keeps at most 10 waiting per subscription and drops the rest
        flood.start()
        flood.join()

        async def counted() -> bool:
            return await read_metric(node.url, "gateway_broker_losses_total") > 0

        await wait_for_condition(counted, "the dropped messages to be counted")
        lost = await read_metric(node.url, "gateway_broker_losses_total")
        assert lost > 0
        text = (await asyncio.to_thread(_metrics_text, node.url))
        assert 'reason="slow_consumer"' in text
    finally:
        await node.runner.cleanup()


def _metrics_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return resp.read().decode()
