"""Gap repair for connected clients (--recovery): stored chats that never reach a
gateway on the way (a slow-consumer drop, its NATS server frozen until the
gateway moves to another) reach its connected clients all the same, once, in
order; where the stream no longer holds them, the clients are disconnected so they
reconnect and recovery decides.

A 3-node NATS cluster with JetStream per test (a test freezes one of its nodes).
gw-1 (the sender's) is a gateway process on nats-1; gw-2 (the receiver's) runs in
this event loop on nats-3, so a test can hold its event loop up or watch its parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js import api

from gateway.processes import (
    RUN_CLUSTER_KEY,
    GatewayNode,
    NatsCluster,
    NatsNode,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from nats_adapter import NatsManager
from nats_adapter.recovery import RecoveryOptions
from tests.conftest import TEST_HEARTBEAT, start_node
from tests.helpers import Node, SioClient, freeze, read_metric, running, wait_for_condition
from tests.test_recovery import DefaultClient

#: the stream of the default channel prefix
STREAM = "SIO_sio"


@pytest.fixture
def nats3(tmp_path: Path) -> Iterator[NatsCluster]:
    with running(NatsCluster(tmp_path / "nats", size=3)) as cluster:
        yield cluster


@pytest.fixture
def gw1(tmp_path: Path, nats3: NatsCluster) -> Iterator[GatewayNode]:
    """The sender's gateway, a process on nats-1 (never frozen)."""
    gw = start_gateway(tmp_path, f"gap-gw-1-{uuid.uuid4().hex[:4]}", free_ports(1)[0], "nats",
                       ["--nats-url", nats3.nodes[0].url],
                       extra=["--recovery", "on", "--heartbeat-interval", "0.5",
                              "--chat-rate", "1000"])
    try:
        wait_gateways([gw], timeout=40)
        yield gw
    finally:
        stop_all([gw.child])


async def start_gw2(cluster: NatsCluster, pending_msgs_limit: int | None = None) -> Node:
    """The receiver's gateway in this event loop, on nats-3, noticing a dead server
    within 2-3 s (pings every second)."""
    url = cluster.nodes[2].url
    manager = NatsManager([url], connection_name="gap-gw-2", ping_interval=1,
                          pending_msgs_limit=pending_msgs_limit, recovery=RecoveryOptions(),
                          cluster_key=RUN_CLUSTER_KEY.encode(), node_name="gap-gw-2",
                          heartbeat_interval=TEST_HEARTBEAT)
    return await start_node("nats", "gap-gw-2", {"nats_urls": (url,), "recovery": True},
                            manager=manager)


@pytest.fixture
async def gw2(nats3: NatsCluster) -> AsyncIterator[Node]:
    node = await start_gw2(nats3)
    try:
        yield node
    finally:
        await node.runner.cleanup()


def server_of(node: Node) -> str | None:
    return node.manager.broker.info().get("server")  # type: ignore[no-any-return]


async def chat_until_acked(sender: SioClient, room: str, prefix: str, count: int
                           ) -> list[str]:
    """Chat until ``count`` chats were acked ok (a JetStream election may refuse some);
    the texts acked, in order."""
    acked: list[str] = []
    tries = count + 100
    for i in range(tries):
        text = f"{prefix}-{i}"
        ack = await sender.call("chat", {"room": room, "text": text})
        if isinstance(ack, dict) and ack.get("ok"):
            acked.append(text)
            if len(acked) == count:
                return acked
    raise AssertionError(f"only {len(acked)} of {tries} chats acked ok")


@contextlib.contextmanager
def frozen_until_done(node: NatsNode) -> Iterator[None]:
    """Resume ``node`` (frozen inside) whatever happens."""
    assert node.child is not None
    try:
        yield
    finally:
        os.kill(node.child.pid, signal.SIGCONT)


def while_this_loop_waits(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` on an event loop of its own in another thread, holding up this
    thread's (the test's, which reads gw-2's client) until it is done."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(work())
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def check_once_in_order(receiver: SioClient, acked: list[str]) -> None:
    assert receiver.texts() == acked, (
        f"missing {sorted(set(acked) - set(receiver.texts()))}, "
        f"{len(receiver.texts())} received for {len(acked)} acked")
    offsets = [int(o) for o in receiver.offsets]
    assert offsets == sorted(set(offsets)), "offsets out of order or repeated"


async def test_chats_a_gateway_dropped_as_a_slow_consumer_still_reach_its_client(
        nats3: NatsCluster, gw1: GatewayNode) -> None:
    gw2 = await start_gw2(nats3, pending_msgs_limit=10)
    receiver = SioClient("receiver", offsets=True)
    sender = SioClient("sender")
    room = f"gaps-{uuid.uuid4().hex[:6]}"
    try:
        await receiver.connect(gw2.url)
        await receiver.join(room)
        await sender.connect(gw1.url)
        await sender.join(room)
        acked = await chat_until_acked(sender, room, "warm-up", 1)
        await receiver.wait_texts(acked)
        burst: list[str] = []

        async def chat_burst() -> None:
            other = await SioClient("burst").connect(gw1.url)
            try:
                await other.join(room)
                burst.extend(await chat_until_acked(other, room, "burst", 150))
            finally:
                await other.close()

        # gw-2's event loop (this one) is held up while 150 stored chats come back to
        # it: nats-py keeps 10 for it and drops the rest (a slow consumer)
        while_this_loop_waits(chat_burst)
        assert len(burst) == 150
        acked += burst
        # nothing more is sent: the copies dropped last are found by the subject's tail
        await receiver.wait_for(lambda c: len(c.texts()) >= len(acked),
                                what="every chat of the burst")
        acked += await chat_until_acked(sender, room, "end", 1)  # after the rest, in order
        await receiver.wait_for(lambda c: "end-0" in c.texts(), what="the last chat")
        check_once_in_order(receiver, acked)
        assert gw2.manager.broker.losses()["slow_consumer"] > 0, "nothing was dropped"
        repairs = gw2.manager.broker.repairs()
        assert repairs["gaps_detected"] > 0 and repairs["messages_repaired"] > 0, repairs
        assert repairs["gaps_unrepairable"] == 0
        assert await read_metric(gw2.url, "gateway_stream_messages_repaired_total") > 0
    finally:
        await sender.close()
        await receiver.close()
        await gw2.runner.cleanup()


async def test_chats_stored_while_a_gateways_nats_server_froze_reach_its_client(
        nats3: NatsCluster, gw1: GatewayNode, gw2: Node) -> None:
    receiver = SioClient("receiver", offsets=True)
    sender = SioClient("sender")
    room = f"gaps-{uuid.uuid4().hex[:6]}"
    frozen = nats3.nodes[2]
    assert frozen.child is not None
    try:
        await receiver.connect(gw2.url)
        await receiver.join(room)
        await sender.connect(gw1.url)
        await sender.join(room)
        acked = await chat_until_acked(sender, room, "before", 3)
        await receiver.wait_texts(acked)
        await lead_elsewhere(nats3, frozen)
        with frozen_until_done(frozen):
            await freeze(frozen.child.pid)
            # stored by the other two nodes; their copies for gw-2 wait on the frozen
            # node, which gw-2 leaves for another (it stops answering pings)
            acked += await chat_until_acked(sender, room, "frozen", 20)
            await wait_for_condition(lambda: server_of(gw2) not in (None, frozen.url),
                                     "gw-2 to reconnect to another NATS node", timeout=30)
            # nothing is sent from here on: what gw-2 missed is read after the reconnect
            await receiver.wait_for(lambda c: len(c.texts()) >= len(acked), timeout=20,
                                    what="the chats stored while gw-2 was cut off")
        acked += await chat_until_acked(sender, room, "after", 3)
        await receiver.wait_for(lambda c: "after-2" in c.texts(), what="the last chat")
        check_once_in_order(receiver, acked)
        repairs = gw2.manager.broker.repairs()
        assert repairs["messages_repaired"] >= 1 and repairs["gaps_unrepairable"] == 0, repairs
    finally:
        await sender.close()
        await receiver.close()


async def lead_elsewhere(cluster: NatsCluster, avoid: NatsNode) -> None:
    """Make sure the stream's leader is not on ``avoid`` (to be frozen): chats are
    then stored, by the other two, while it is frozen."""
    nc = await nats.connect(cluster.nodes[0].url)
    try:
        js = nc.jetstream()

        async def leader() -> str | None:
            info = await js.stream_info(STREAM)
            return info.cluster.leader if info.cluster is not None else None

        async def elsewhere() -> bool:
            return await leader() not in (None, avoid.name)

        if await leader() == avoid.name:
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}", b"", timeout=5)
        await wait_for_condition(elsewhere, "the stream's leader to be elsewhere")
    finally:
        await nc.close()


async def purge(url: str, stream: str, within: float = 20.0) -> None:
    """Purge ``stream`` (retried while JetStream elects a leader)."""
    nc = await nats.connect(url)
    try:
        deadline = time.monotonic() + within
        while True:
            try:
                await nc.jetstream().purge_stream(stream)
                return
            except (TimeoutError, nats.errors.Error):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


async def test_chats_the_stream_no_longer_holds_disconnect_the_client_to_recover(
        nats3: NatsCluster, gw1: GatewayNode, gw2: Node, node_bin: str) -> None:
    receiver = await DefaultClient.start(node_bin, gw2.url, "receiver")
    sender = SioClient("sender")
    room = f"gaps-{uuid.uuid4().hex[:6]}"
    frozen = nats3.nodes[2]
    assert frozen.child is not None
    try:
        ack = await receiver.call("join", room)
        assert ack == {"ok": True, "room": room}, ack
        await sender.connect(gw1.url)
        await sender.join(room)
        await chat_until_acked(sender, room, "before", 1)
        await receiver.wait_for(lambda c: len(c.chats()) == 1, what="the first chat")
        await lead_elsewhere(nats3, frozen)
        with frozen_until_done(frozen):
            await freeze(frozen.child.pid)
            await chat_until_acked(sender, room, "lost", 3)
            await purge(nats3.nodes[0].url, STREAM)  # gone before gw-2 could read them
            await chat_until_acked(sender, room, "stored", 1)
            await wait_for_condition(lambda: server_of(gw2) not in (None, frozen.url),
                                     "gw-2 to reconnect to another NATS node", timeout=30)
            # gw-2 finds chats it cannot read back: the client is disconnected (the
            # transport closes), reconnects by itself, and gets a new session
            await receiver.wait_for(lambda c: len(c.connects()) == 2, timeout=20,
                                    what="the client to be disconnected and reconnect")
        disconnects = [e for e in receiver.events if e["type"] == "disconnect"]
        assert [e["reason"] for e in disconnects] == ["transport close"], disconnects
        assert receiver.connects()[1]["recovered"] is False
        assert await read_metric(gw2.url, "gateway_stream_gaps_unrepairable_total") >= 1
        assert await read_metric(gw2.url, "gateway_sessions_gap_disconnects_total") >= 1
    finally:
        await sender.close()
        await receiver.close()


async def test_the_stream_names_each_copys_predecessor_on_its_subject(
        nats3: NatsCluster) -> None:
    """What gap repair relies on: nats-server re-publishes a stored message with its
    sequence and that of the message stored before it on the same subject (0 for the
    subject's first)."""
    nc = await nats.connect(nats3.nodes[0].url)
    try:
        js = nc.jetstream()

        async def created() -> bool:  # once JetStream has elected its leaders
            try:
                await js.add_stream(api.StreamConfig(
                    name="GAPCHECK", subjects=["gapcheck.store.>"], num_replicas=3,
                    republish=api.RePublish(src="gapcheck.store.>", dest="gapcheck.live.>")))
            except (TimeoutError, nats.errors.Error):
                return False
            return True

        await wait_for_condition(created, "the stream to be created", timeout=30)
        copies: list[tuple[str, str, str]] = []

        async def copied(msg: Msg) -> None:
            headers = msg.headers or {}
            copies.append((msg.subject, headers.get("Nats-Sequence", ""),
                           headers.get("Nats-Last-Sequence", "")))

        await nc.subscribe("gapcheck.live.>", cb=copied)
        await nc.flush()
        for subject in "abaab":
            await js.publish(f"gapcheck.store.{subject}", b"x")
        await wait_for_condition(lambda: len(copies) == 5, "the re-published copies")
        assert copies == [("gapcheck.live.a", "1", "0"), ("gapcheck.live.b", "2", "0"),
                          ("gapcheck.live.a", "3", "1"), ("gapcheck.live.a", "4", "3"),
                          ("gapcheck.live.b", "5", "2")]
    finally:
        await nc.close()


async def test_a_client_whose_chats_were_purged_unread_gets_nothing_newer_before_it_recovers(
        nats3: NatsCluster, gw1: GatewayNode, node_bin: str) -> None:
    """Copies dropped here as a slow consumer, then purged from the stream before they
    could be read: the client is disconnected to recover, and the chat stored after
    the purge, which shows the loss, does not reach it first (its offset would let the
    restore skip the loss): it comes back with a new session."""
    gw2 = await start_gw2(nats3, pending_msgs_limit=10)
    receiver = await DefaultClient.start(node_bin, gw2.url, "receiver")
    sender = SioClient("sender")
    room = f"gaps-{uuid.uuid4().hex[:6]}"
    try:
        ack = await receiver.call("join", room)
        assert ack == {"ok": True, "room": room}, ack
        await sender.connect(gw1.url)
        await sender.join(room)
        await chat_until_acked(sender, room, "before", 1)
        await receiver.wait_for(lambda c: len(c.chats()) == 1, what="the first chat")

        async def burst_purge_chat() -> None:
            other = await SioClient("burst").connect(gw1.url)
            try:
                await other.join(room)
                await chat_until_acked(other, room, "purged", 60)
                await purge(nats3.nodes[0].url, STREAM)
            finally:
                await other.close()

        # gw-2's event loop (this one) is held up meanwhile: it keeps 10 copies and
        # drops the rest, which the purge then takes from the stream
        while_this_loop_waits(burst_purge_chat)
        # the first chat stored after the purge names no predecessor: gw-2 finds the
        # stream no longer holds what came after the copies it kept
        await chat_until_acked(sender, room, "newer", 1)
        await receiver.wait_for(lambda c: len(c.connects()) == 2, timeout=20,
                                what="the client to be disconnected and reconnect")
        assert receiver.connects()[1]["recovered"] is False
        texts = [m["text"] for m, _ in receiver.chats()]
        assert "newer-0" not in texts, texts
        assert await read_metric(gw2.url, "gateway_stream_gaps_unrepairable_total") >= 1
    finally:
        await sender.close()
        await receiver.close()
        await gw2.runner.cleanup()
