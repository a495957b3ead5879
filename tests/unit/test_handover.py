"""A session moves to the gateway its websocket upgrade lands on (nats_adapter.handover).

Two whole gateway apps on the memory bus. The sessions under test are driven by hand,
packet by packet, as socket.io-client drives them in its default mode: a polling
handshake, CONNECT and a join on their owner A, then the websocket upgrade on B
(``2probe``, ``3probe``, ``5``), so the test decides what A holds at the moment of
the move (queued packets, a waiting long-poll) and sees every packet the client gets.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.app import FORWARDER_KEY
from nats_adapter import codec
from nats_adapter.sids import new_node_tag
from tests.helpers import SioClient, wait_for_condition
from tests.unit.conftest import SETTLE_EVENT, GatewayApp
from tests.unit.test_forwarding import handshake


class HandSession:
    """One engine.io session driven by hand; every Socket.IO packet it gets, in order."""

    def __init__(self, http: aiohttp.ClientSession, name: str) -> None:
        self.http = http
        self.name = name
        self.eio_sid = ""
        self.sid = ""
        self.packets: list[str] = []
        self.noops = 0
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        #: the last ack id used (the tests join with 1, by hand)
        self._acks = 1

    def path(self, transport: str = "polling") -> str:
        return f"/socket.io/?EIO=4&transport={transport}&sid={self.eio_sid}"

    async def open(self, url: str) -> None:
        self.eio_sid = await handshake(url)
        await self.post(url, "40")
        await self.wait(lambda: any(p.startswith("0{") for p in self.packets), url)
        self.sid = json.loads(next(p for p in self.packets if p.startswith("0{"))[1:])["sid"]

    async def post(self, url: str, payload: str) -> None:
        async with self.http.post(url + self.path(), data=payload) as answer:
            assert answer.status == 200, await answer.text()

    async def poll(self, url: str) -> None:
        async with self.http.get(url + self.path()) as answer:
            assert answer.status == 200, await answer.text()
            for pkt in (await answer.text()).split("\x1e"):
                self.take(pkt)

    def take(self, pkt: str) -> None:
        """One engine.io packet received."""
        if pkt == "6":
            self.noops += 1
        elif pkt.startswith("4"):
            self.packets.append(pkt[1:])
        self._changed.set()

    async def wait(self, done: Any, url: str | None = None, timeout: float = 5.0) -> None:
        """Until ``done()``: polling ``url``, or reading the websocket."""
        async with asyncio.timeout(timeout):
            while not done():
                if url is not None:
                    await self.poll(url)
                    continue
                self._changed.clear()
                await self._changed.wait()

    async def upgrade(self, url: str) -> None:
        self.ws = await self.http.ws_connect(url + self.path("websocket"), autoping=False)
        await self.ws.send_str("2probe")
        assert (await self.ws.receive_str()) == "3probe"

    async def upgraded(self) -> None:
        assert self.ws is not None
        await self.ws.send_str("5")
        self._reader = asyncio.ensure_future(self._read(self.ws))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                if msg.data == "2":
                    await ws.send_str("3")
                else:
                    self.take(msg.data)

    async def chat(self, text: str) -> dict[str, Any]:
        """A chat over the websocket; its ack."""
        assert self.ws is not None
        self._acks += 1
        ack_id = self._acks
        await self.ws.send_str("4" + f"2{ack_id}" + json.dumps(
            ["chat", {"room": "lobby", "text": text}]))
        head = f"3{ack_id}["
        await self.wait(lambda: any(p.startswith(head) for p in self.packets))
        answer: dict[str, Any] = json.loads(next(p for p in self.packets
                                                 if p.startswith(head))[len(head) - 1:])[0]
        return answer

    def acks(self, ack_id: int) -> int:
        return sum(p.startswith(f"3{ack_id}[") for p in self.packets)

    def events(self, name: str) -> list[Any]:
        out = []
        for pkt in self.packets:
            if pkt.startswith("2["):
                decoded = json.loads(pkt[1:])
                if decoded[0] == name:
                    out.append(decoded[1])
        return out

    def texts(self) -> list[str]:
        return [m["text"] for m in self.events("chat")]

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)) as made:
        yield made


def count_app_events(gateways: list[GatewayApp]) -> Counter[str]:
    """Calls of the application's connect and disconnect handlers, from now on."""
    calls: Counter[str] = Counter()
    for g in gateways:
        handlers = g.sio.handlers["/"]
        for event in ("connect", "disconnect"):
            inner = handlers[event]

            async def counted(*args: Any, inner: Any = inner, event: str = event) -> Any:
                calls[event] += 1
                return await inner(*args)

            handlers[event] = counted
    return calls


async def test_a_session_moves_to_where_its_upgrade_lands(
        two_gateways: list[GatewayApp], clients: list[SioClient],
        http: aiohttp.ClientSession) -> None:
    """Two sessions of A upgrade on B: one with chats queued on A and no poll
    waiting, one with a long-poll waiting on A, while peers on both gateways chat
    all along. Each keeps its sids, rooms and session data and is served by B from
    then on; every chat reaches every client once, each ack comes once, and the
    application sees no connect or disconnect for the move."""
    a, b = two_gateways
    peers = [SioClient("pa"), SioClient("pb")]
    clients += peers
    for peer, g in zip(peers, two_gateways, strict=True):
        await peer.connect(g.url)
        assert (await peer.call("join", "lobby"))["ok"]
    queued, waiting = HandSession(http, "queued"), HandSession(http, "waiting")
    for s in (queued, waiting):
        await s.open(a.url)
        await s.post(a.url, '421["join","lobby"]')
        await s.wait(lambda s=s: s.acks(1) == 1, a.url)
        await a.sio.save_session(s.sid, {"nick": s.name})
    app_events = count_app_events(two_gateways)
    # chats queued on A for `queued`; `waiting` takes them with a long-poll, and
    # waits for more
    for peer in peers:
        assert (await peer.call("chat", {"room": "lobby", "text": f"q-{peer.name}"}))["ok"]
    await waiting.wait(lambda: len(waiting.texts()) == 2, a.url)
    answered: list[Any] = []

    async def answer(*args: Any) -> None:
        answered.append(args)

    # A asks `queued` something it will answer once it is on B
    await a.sio.emit("ask", "ready?", to=queued.sid, callback=answer)
    a_queue = a.sio.eio.sockets[queued.eio_sid].queue
    await wait_for_condition(lambda: a_queue.qsize() == 3, "the chats queued on A")
    poll = asyncio.ensure_future(waiting.poll(a.url))
    await wait_for_condition(lambda: a.sio.eio.sockets[waiting.eio_sid].queue.polled,
                             "the long-poll waiting on A")

    async def chatter() -> None:  # chats while the sessions move
        for i in range(20):
            peer = peers[i % 2]
            assert (await peer.call("chat", {"room": "lobby", "text": f"d-{i}"}))["ok"]

    during = asyncio.ensure_future(chatter())
    for s in (queued, waiting):
        await s.upgrade(b.url)
    await poll  # the waiting long-poll ended, as engine.io ends one on upgrade
    for s in (queued, waiting):
        await s.poll(a.url)  # (A sends it on to B, which is upgrading it: a NOOP)
        await s.upgraded()
    await during

    forwarder = b.app[FORWARDER_KEY]
    assert forwarder.counts["moved"] == 2 and forwarder.counts["websocket"] == 0
    assert b.manager.handover.counts["moved"] == a.manager.handover.counts["given"] == 2
    for s in (queued, waiting):
        assert s.eio_sid not in a.sio.eio.sockets and s.eio_sid in b.sio.eio.sockets
        assert not a.manager.hub.is_local(s.sid, "/") and b.manager.hub.is_local(s.sid, "/")
        assert b.manager.get_rooms(s.sid, "/") == ["lobby"]
        assert await b.sio.get_session(s.sid) == {"nick": s.name}
        assert s.noops >= 1
    async with http.get(f"{b.url}/metrics") as answer:
        metrics = await answer.text()
    assert [line for line in metrics.splitlines()
            if line.startswith("gateway_session_moves_total") and 'outcome="moved"' in line
            and line.endswith(" 2.0")], metrics

    # the question A asked before the move, answered after it: the answer reaches A
    ask = next(p for p in queued.packets if p.startswith("2") and '["ask"' in p)
    assert queued.ws is not None
    await queued.ws.send_str("43" + ask[1:ask.index("[")] + '["yes"]')
    await wait_for_condition(lambda: answered == [("yes",)], "the answer on A")

    # after the move: chats both ways, over B
    for s in (queued, waiting):
        assert (await s.chat(f"from-{s.name}"))["ok"]
    for peer in peers:
        assert (await peer.call("chat", {"room": "lobby", "text": f"after-{peer.name}"}))["ok"]
    token = "done"
    for g in two_gateways:  # a direct emit reaches a moved sid from either gateway
        for s in (queued, waiting):
            await g.sio.emit(SETTLE_EVENT, token, to=s.sid)
        for peer in peers:
            await g.sio.emit(SETTLE_EVENT, token, to=peer.sid)
    for s in (queued, waiting):
        await s.wait(lambda s=s: s.events(SETTLE_EVENT).count(token) == 2)
    for peer in peers:
        await peer.wait_for(lambda r: r.received(SETTLE_EVENT).count(token) == 2)

    from_peers = [f"q-{p.name}" for p in peers] + [f"d-{i}" for i in range(20)] \
        + [f"after-{p.name}" for p in peers]
    for s, other in ((queued, waiting), (waiting, queued)):
        assert sorted(s.texts()) == sorted([*from_peers, f"from-{other.name}"]), (
            s.name, Counter(s.texts()) - Counter([*from_peers, f"from-{other.name}"]),
            Counter([*from_peers, f"from-{other.name}"]) - Counter(s.texts()), s.packets)
        assert s.acks(2) == 1  # its chat's ack, once
    for peer in peers:
        expected = [t for t in from_peers if not t.endswith(peer.name)
                    and not (t.startswith("d-") and peers[int(t[2:]) % 2] is peer)]
        assert sorted(peer.texts()) == sorted([*expected, "from-queued", "from-waiting"])
    assert app_events == Counter(), "the application saw the move"
    # a node that did not hear of the move yet sends to the old owner: sent on
    stale = new_node_tag()
    await b.manager.bus.publish(b.manager.channels.node(a.manager.node_tag),
                                codec.EmitToSidMessage(stale, "/", queued.sid, "poke",
                                                       ["late"], None))
    await queued.wait(lambda: queued.events("poke") == ["late"])
    assert set(a.manager.handover.located) == {queued.sid, waiting.sid}
    for s in (queued, waiting):
        await s.close()
    # gone from B: every gateway forgets where they were
    await wait_for_condition(lambda: not a.manager.handover.located
                             and not b.manager.handover.located, "the moves forgotten")
    assert a.manager.handover.moved_to(queued.eio_sid) is None  # its requests: a 400


async def test_with_moves_off_the_upgrade_is_spliced(
        two_gateways: list[GatewayApp], http: aiohttp.ClientSession) -> None:
    a, b = two_gateways
    b.app[FORWARDER_KEY].move = False
    s = HandSession(http, "s")
    await s.open(a.url)
    await s.upgrade(b.url)
    await s.upgraded()
    assert s.eio_sid in a.sio.eio.sockets and s.eio_sid not in b.sio.eio.sockets
    assert b.app[FORWARDER_KEY].counts["websocket_spliced"] == 1
    assert b.manager.handover.counts["moved"] == 0
    await s.close()
    await wait_for_condition(lambda: not a.sio.eio.sockets, "the session to end")


async def upgrade_is_spliced(a: GatewayApp, b: GatewayApp, http: aiohttp.ClientSession,
                             reason: str) -> None:
    """A session of A upgrading on B stays on A, spliced, the move counted as failed
    for ``reason``."""
    s = HandSession(http, "s")
    await s.open(a.url)
    await s.upgrade(b.url)
    await s.upgraded()
    assert s.eio_sid in a.sio.eio.sockets
    assert b.manager.handover.counts[f"failed_{reason}"] == 1
    assert b.app[FORWARDER_KEY].counts["websocket_spliced"] == 1
    await s.close()
    await wait_for_condition(lambda: not a.sio.eio.sockets, "the session to end")


async def test_an_owner_without_moves_keeps_the_session(
        two_gateways: list[GatewayApp], http: aiohttp.ClientSession) -> None:
    """An owner of a release without moves (it says no "move" feature): spliced."""
    a, b = two_gateways
    a.manager.rpc.features.discard("move")
    await a.manager.rpc.notice(codec.Heartbeat(a.manager.rpc.info()))
    await wait_for_condition(lambda: not b.manager.rpc.serves(a.manager.node_tag, "move"),
                             "B to hear A has no moves")
    await upgrade_is_spliced(a, b, http, "owner_cannot")


async def test_no_move_while_any_node_of_the_cluster_is_of_a_release_without_moves(
        two_gateways: list[GatewayApp], http: aiohttp.ClientSession) -> None:
    """Mid rolling upgrade a third node of the older release would go on sending a
    moved session's direct emits to its old owner: no moves until every node has
    them."""
    a, b = two_gateways
    b.manager.rpc.peers.saw("oldnode1", {"name": "old", "features": []})
    await upgrade_is_spliced(a, b, http, "cluster_cannot")


async def test_a_session_whose_data_does_not_travel_is_spliced(
        two_gateways: list[GatewayApp], http: aiohttp.ClientSession) -> None:
    """The owner refuses to give a session whose data would not survive the trip: the
    upgrade is spliced to it, and it holds nothing back."""
    a, b = two_gateways
    s = HandSession(http, "s")
    await s.open(a.url)
    await a.sio.save_session(s.sid, {"lock": asyncio.Lock()})
    await s.upgrade(b.url)
    await s.upgraded()
    assert s.eio_sid in a.sio.eio.sockets and s.eio_sid not in b.sio.eio.sockets
    assert b.manager.handover.counts["failed_refused"] == 1
    assert b.app[FORWARDER_KEY].counts["websocket_spliced"] == 1
    assert a.manager.fanout.moving == {} and b.manager.fanout.moving == {}
    await a.sio.emit("hello", "still here", to=s.sid)
    await s.wait(lambda: s.events("hello") == ["still here"])
    await s.close()
    await wait_for_condition(lambda: not a.sio.eio.sockets, "the session to end")


async def test_a_moved_session_whose_upgrade_fails_polls_on_through_its_old_owner(
        two_gateways: list[GatewayApp], http: aiohttp.ClientSession) -> None:
    """The websocket dies after the move, before the upgrade is done: the session
    keeps long-polling on the gateway it moved to, its requests that reach the old
    owner sent on there."""
    a, b = two_gateways
    s = HandSession(http, "s")
    await s.open(a.url)
    await s.upgrade(b.url)
    assert s.ws is not None and s.eio_sid in b.sio.eio.sockets
    await s.ws.close()
    await wait_for_condition(lambda: not b.sio.eio.sockets[s.eio_sid].upgrading,
                             "the upgrade to be given up")
    await b.sio.emit("hello", "polled", to=s.sid)
    await s.wait(lambda: s.events("hello") == ["polled"], a.url)
    assert a.manager.handover.moved_to(s.eio_sid) == b.manager.node_tag
    await s.post(a.url, "1")  # an engine.io CLOSE, through A
    await wait_for_condition(lambda: a.manager.handover.moved_to(s.eio_sid) is None,
                             "A to hear the session ended")
