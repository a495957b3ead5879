"""The NATS broker's shared inbox: one queue and one task for all room subscriptions.

Against a real nats-server: messages of every subscription reach the handler in
order with no task per subscription; a node that falls behind drops past its
limit and counts it; without the nats-py behaviour the inbox relies on, each
subscription gets its own queue and task again and delivery is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import nats
import pytest

from gateway.processes import NatsCluster
from nats_adapter.brokers import nats as nats_broker
from nats_adapter.brokers.nats import NatsBroker
from tests.helpers import wait_for_condition


class Recorder:
    """A BrokerHandler that records what arrives, optionally held up by ``gate``."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.gate: asyncio.Event | None = None
        self.changed = asyncio.Event()

    async def on_message(self, channel: str, data: bytes) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.messages.append((channel, data))
        self.changed.set()

    def on_connection_state(self, connected: bool) -> None:
        pass

    async def wait_count(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.messages) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def publisher(nats_cluster: NatsCluster) -> AsyncIterator[nats.NATS]:
    # on the broker's server (see start): a subscription the broker's flush confirmed
    # is then one this server routes to at once; on another server, publishes right
    # after could go out before the routes carry the interest, and be dropped
    nc = await nats.connect(servers=nats_cluster.urls[:1])
    try:
        yield nc
    finally:
        await nc.close()


async def start(cluster: NatsCluster, handler: Recorder, **kwargs: object) -> NatsBroker:
    broker = NatsBroker(cluster.urls[:1], connection_name="inbox-test", **kwargs)  # type: ignore[arg-type]
    await broker.start(handler, "inbox-test.control")
    return broker


async def subscribe_and_publish(broker: NatsBroker, publisher: nats.NATS, rooms: int,
                                per_room: int) -> None:
    for r in range(rooms):
        await broker.subscribe(f"inbox-test.room-{r}")
    for k in range(per_room):
        for r in range(rooms):
            await publisher.publish(f"inbox-test.room-{r}", f"{r}:{k}".encode())
    await publisher.flush()


def in_order(handler: Recorder, rooms: int, per_room: int) -> bool:
    got = {r: [int(d.split(b":")[1]) for c, d in handler.messages
               if c == f"inbox-test.room-{r}"] for r in range(rooms)}
    return all(got[r] == list(range(per_room)) for r in range(rooms))


async def test_every_subscription_shares_one_task(nats_cluster: NatsCluster,
                                                  publisher: nats.NATS) -> None:
    handler = Recorder()
    broker = await start(nats_cluster, handler)
    try:
        tasks = len(asyncio.all_tasks())
        await subscribe_and_publish(broker, publisher, rooms=50, per_room=20)
        assert len(asyncio.all_tasks()) <= tasks + 1, "a task per subscription"
        await handler.wait_count(1000)
        assert in_order(handler, 50, 20)
        await broker.unsubscribe("inbox-test.room-0")
        await publisher.publish("inbox-test.room-0", b"0:late")
        # a marker on a room still subscribed, published after: once it is handled, the
        # late message has had its chance (one connection delivers in order)
        await publisher.publish("inbox-test.room-1", b"1:marker")
        await publisher.flush()
        await handler.wait_count(1001)
        assert handler.messages[-1] == ("inbox-test.room-1", b"1:marker")
        assert len(handler.messages) == 1001, "a message after unsubscribe was delivered"
    finally:
        await broker.close()


async def test_a_node_that_falls_behind_drops_and_counts(nats_cluster: NatsCluster,
                                                         publisher: nats.NATS) -> None:
    handler = Recorder()
    handler.gate = asyncio.Event()  # the node is stuck
    broker = await start(nats_cluster, handler, pending_msgs_limit=10)
    try:
        await subscribe_and_publish(broker, publisher, rooms=1, per_room=50)
        # stuck with room for 10 (plus the one in the handler), it drops the rest as
        # they arrive: at least 30 of the 50 before it is let go
        await wait_for_condition(lambda: broker.losses()["slow_consumer"] >= 30,
                                 "the stuck node to drop what it cannot hold", timeout=10)
        handler.gate.set()
        await wait_for_condition(
            lambda: len(handler.messages) + broker.losses()["slow_consumer"] == 50,
            "every message handled or counted as dropped", timeout=10)
        drops = broker.losses()["slow_consumer"]
        assert drops >= 30 and len(handler.messages) + drops == 50
    finally:
        await broker.close()


async def test_without_the_inbox_each_subscription_has_its_own_task(
        nats_cluster: NatsCluster, publisher: nats.NATS, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # a nats-py release that no longer hands future subscriptions' messages to set_result
    monkeypatch.setattr(nats_broker, "shared_inbox_problem", lambda: "changed dispatch")
    handler = Recorder()
    with caplog.at_level(logging.WARNING):
        broker = await start(nats_cluster, handler)
    try:
        assert "own queue and task (changed dispatch)" in caplog.text
        tasks = len(asyncio.all_tasks())
        await subscribe_and_publish(broker, publisher, rooms=10, per_room=20)
        assert len(asyncio.all_tasks()) >= tasks + 10
        await handler.wait_count(200)
        assert in_order(handler, 10, 20)
    finally:
        await broker.close()


def test_this_nats_py_supports_the_inbox() -> None:
    assert nats_broker.shared_inbox_problem() is None
