"""The direct-write fan-out path: per-socket order and exactly-once, with and without it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from socketio import packet as sio_packet

from nats_adapter import compat
from nats_adapter._engineio import fastpath_of
from tests.conftest import start_node
from tests.helpers import Node, NodeClient, SioClient, connect_all, wait_for_condition


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = await start_node("memory", "fanout-gw", {})
    try:
        yield n
    finally:
        await n.runner.cleanup()


async def interleave(node: Node, clients: list[SioClient], count: int) -> None:
    """Even numbers by room broadcast (direct path), odd ones through engine.io's queue."""
    members = await connect_all(clients, [(f"m{i}", node) for i in range(3)])
    for m in members:
        await m.join("order")
    eio_sid = node.manager.eio_sid_from_sid(members[0].sid, "/")
    for k in range(count):
        if k % 2 == 0:
            await node.sio.emit("seq", k, to="order")
        else:
            await node.sio._send_packet(eio_sid, sio_packet.Packet(
                sio_packet.EVENT, namespace="/", data=["seq", k]))
    await members[0].wait_for(lambda c: len(c.received("seq")) >= count, what="all numbers")
    await members[1].wait_for(lambda c: len(c.received("seq")) >= count // 2, what="evens")
    await asyncio.sleep(0.2)  # a window for a duplicate to show (not a wait)
    assert members[0].received("seq") == list(range(count)), "order or exactly-once broken"
    evens = list(range(0, count, 2))
    assert members[1].received("seq") == evens
    assert members[2].received("seq") == evens


@pytest.fixture
def probes() -> Iterator[None]:
    """Probe the upstream privates afresh (a test takes one away), and again after."""
    compat.reset()
    yield
    compat.reset()


async def fast_paths(node: Node) -> dict[str, Any]:
    """What /healthz (its operator details: asked from loopback) says of the fast paths."""
    async with aiohttp.ClientSession() as session, session.get(node.url + "/healthz") as resp:
        body = await resp.json()
    return dict(body["fast_paths"])


@pytest.mark.parametrize("connections", ["lean", "stock"])
async def test_direct_writes_keep_order_with_queued_packets(
        connections: str, monkeypatch: pytest.MonkeyPatch, clients: list[SioClient],
        probes: None) -> None:
    """Shared frames and engine.io's queue, interleaved, on lean connections (which
    write the queue out as packets are put); and, where lean connections are not
    available (an asyncio without Transport.set_protocol), on engine.io's own
    websocket, where every packet takes the queue."""
    if connections == "stock":
        monkeypatch.delattr(asyncio.BaseTransport, "set_protocol")
    n = await start_node("memory", f"order-{connections}-gw", {})
    try:
        assert n.manager.fast_fanout == (connections == "lean")
        fan = n.manager.fanout
        assert fan is not None
        await interleave(n, clients, 2000)
        sessions = fastpath_of(n.sio.eio)
        assert sessions is not None
        lean = [sessions.sessions.is_lean(sid) for sid in n.sio.eio.sockets]
        assert all(lean) if connections == "lean" else not any(lean)
        if connections == "lean":
            assert fan.direct > 0, "the direct path was never taken"
        else:
            assert fan.direct == 0 and fan.queued > 0
            paths = await fast_paths(n)
            assert paths["aiohttp.take_over"]["active"] is False
            assert "asyncio Transport.set_protocol" in paths["aiohttp.take_over"]["reason"]
            assert paths["engineio.server"]["active"] is True
        assert fan.slow_consumers_dropped == 0
    finally:
        await n.runner.cleanup()


async def test_a_missing_internal_means_no_fast_path_and_correct_delivery(
        monkeypatch: pytest.MonkeyPatch, clients: list[SioClient],
        caplog: pytest.LogCaptureFixture, probes: None) -> None:
    # an engine.io release without an exception class the lean connection catches
    import engineio.exceptions

    monkeypatch.delattr(engineio.exceptions, "UnknownPacketError")
    n = await start_node("memory", "fallback-gw", {})
    try:
        assert not n.manager.fast_fanout
        assert "engineio exceptions.UnknownPacketError" in caplog.text
        await interleave(n, clients, 500)
        assert n.manager.fanout is not None and n.manager.fanout.direct == 0
        paths = await fast_paths(n)
        assert paths["engineio.server"]["active"] is False
        assert "engineio exceptions.UnknownPacketError" in paths["engineio.server"]["reason"]
        assert "stock engine.io" in paths["engineio.server"]["fallback"]
    finally:
        await n.runner.cleanup()


async def test_an_error_inside_the_fast_path_falls_back_for_good(
        monkeypatch: pytest.MonkeyPatch, clients: list[SioClient],
        caplog: pytest.LogCaptureFixture) -> None:
    n = await start_node("memory", "broken-fastpath-gw", {})
    try:
        assert n.manager.fast_fanout
        early = await connect_all(clients, [("early", n)])  # set up on the fast path
        await early[0].join("order")

        # a private attribute that a new aiohttp renamed, met at the next handshake
        def detach(request: object) -> object:
            raise AttributeError("'RequestHandler' object has no attribute '_message_tail'")

        monkeypatch.setattr(compat, "detach_connection", detach)
        await interleave(n, clients, 500)  # the handshakes succeed, delivery is exact
        assert not n.manager.fast_fanout
        assert caplog.text.count("fast fan-out disabled") == 1
        fan = n.manager.fanout
        assert fan is not None
        direct = fan.direct
        await n.sio.emit("seq", "after", to="order")
        await early[0].wait_for(lambda c: "after" in c.received("seq"), what="the emit")
        assert fan.direct == direct, "a socket kept the fast path after it was disabled"
        reason = (await fast_paths(n))["aiohttp.take_over"]
        assert reason["active"] is False and "_message_tail" in reason["reason"]
    finally:
        await n.runner.cleanup()


async def test_clients_offering_deflate_get_plain_frames(node: Node, clients: list[SioClient]
                                                         ) -> None:
    (sender,) = await connect_all(clients, [("sender", node)])
    await sender.join("deflate")
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(node.url.replace("http", "ws")
                                      + "/socket.io/?EIO=4&transport=websocket", compress=15)
        assert ws.compress == 0, "permessage-deflate must not be negotiated"
        assert (await ws.receive_str()).startswith("0{")
        await ws.send_str("40")
        assert (await ws.receive_str()).startswith("40{")
        await ws.send_str('421["join","deflate"]')
        assert await ws.receive_str() == '431[{"ok":true,"room":"deflate"}]'
        await sender.chat("deflate", "uncompressed")
        msg = await ws.receive_str()
        assert msg.startswith('42["chat",{"room":"deflate","text":"uncompressed"')
        await ws.close()


@pytest.mark.parametrize("transports", [["polling"], ["polling", "websocket"]])
async def test_polling_and_upgraded_sessions_keep_order(node: Node, transports: list[str]
                                                        ) -> None:
    """A polling session always takes engine.io's queue; an upgraded one takes shared
    frames once upgraded, in order with what it queued."""
    client = SioClient("poller")
    fan = node.manager.fanout
    assert fan is not None
    try:
        await client.sio.connect(node.url, transports=transports, wait_timeout=5)
        await client.join("polling-order")
        eio_sid = node.manager.eio_sid_from_sid(client.sid, "/")
        direct = fan.direct
        for k in range(300):
            if k % 2 == 0:
                await node.sio.emit("seq", k, to="polling-order")
            else:
                await node.sio._send_packet(eio_sid, sio_packet.Packet(
                    sio_packet.EVENT, namespace="/", data=["seq", k]))
            # python-engineio's client refuses a long-poll payload of more than 16
            # packets ("Too many packets in payload"), so a polling burst is kept short
            if k % 8 == 0:
                await asyncio.sleep(0.01)
        await client.wait_for(lambda c: len(c.received("seq")) >= 300, what="all numbers")
        await asyncio.sleep(0.2)  # a window for a duplicate to show (not a wait)
        assert client.received("seq") == list(range(300))
        assert client.sio.transport() == transports[-1]
        assert (fan.direct > direct) == (transports[-1] == "websocket")
    finally:
        await client.close()  # over polling too: the CLOSE ends the pending long-poll


async def test_socketio_client_default_mode_keeps_order_across_the_upgrade(
        node: Node, node_bin: str) -> None:
    """socket.io-client's default mode (polling, then websocket) under a burst that runs
    through every client's upgrade: each gets every number from its join on, once and
    in order, and once upgraded the shared-frame path serves it."""
    fan = node.manager.fanout
    assert fan is not None and node.manager.fast_fanout
    room = "upgrade-burst"
    sent = 0
    stop = asyncio.Event()

    async def burst() -> None:
        # even numbers by room broadcast (direct once a socket may take it), odd ones
        # through each member's engine.io queue: both paths race the upgrade
        nonlocal sent
        while not stop.is_set():
            members = dict(node.manager.hub.members("/", room))
            if sent % 2 == 0:
                await node.sio.emit("seq", sent, to=room)
            else:
                for eio_sid in members.values():
                    await node.sio._send_packet(eio_sid, sio_packet.Packet(
                        sio_packet.EVENT, namespace="/", data=["seq", sent]))
            sent += 1
            if sent % 4 == 0:
                await asyncio.sleep(0.002)  # paces the burst

    clients: list[NodeClient] = []
    task = asyncio.get_running_loop().create_task(burst())
    try:
        for i in range(4):
            client = await NodeClient.start(node_bin, node.url, f"default-{i}",
                                            transports=("polling", "websocket"))
            clients.append(client)
            assert await client.call("join", room) == {"ok": True, "room": room}
        for client in clients:
            await client.wait_for(lambda c: c.upgraded, what="the upgrade to websocket")
        direct = fan.direct
        # the burst goes on over the upgraded sessions
        await wait_for_condition(lambda: fan.direct - direct >= len(clients) * 10,
                                 "direct writes to the upgraded sockets")
        stop.set()
        await task
        assert fan.direct - direct >= len(clients) * 10, "upgraded sockets took no direct writes"
        last = sent - 1
        for client in clients:
            await client.wait_for(lambda c: last in c.received("seq"), timeout=10,
                                  what="the last number")
        await asyncio.sleep(0.3)  # a window for a duplicate to show (not a wait)
        for client in clients:
            got = client.received("seq")
            assert got == list(range(got[0], got[0] + len(got))), \
                f"{client.name}: numbers lost, repeated or reordered"
            assert got[-1] == last
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
