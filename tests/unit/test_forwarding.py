"""No affinity: any gateway serves any session's requests (gateway/forwarding.py).

Two whole gateway apps on the memory bus behind a round-robin TCP front (each new
connection to the next gateway, as a balancer without affinity). Clients in
socket.io's default mode (a polling handshake, then the websocket upgrade) send
their later requests and their upgrade wherever the front puts them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.app import FORWARDER_KEY
from gateway.forwarding import HOP_HEADER
from nats_adapter.sids import eio_sid_owner, new_eio_sid, new_node_tag
from tests.helpers import SioClient, wait_for_condition
from tests.unit.conftest import GatewayApp, settle
from tools.bench.front import Front

DEFAULT_MODE = ["polling", "websocket"]


@pytest.fixture
async def front(two_gateways: list[GatewayApp]) -> AsyncIterator[Front]:
    made = await Front(*(("127.0.0.1", g.port) for g in two_gateways)).start()
    try:
        yield made
    finally:
        await made.close()


async def handshake(url: str) -> str:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{url}/socket.io/?EIO=4&transport=polling") as answer:
        assert answer.status == 200
        text = await answer.text()
    assert text.startswith("0{")
    sid: str = json.loads(text[1:])["sid"]
    return sid


async def hang_up(url: str, sid: str) -> None:
    """End a hand-made session (an engine.io CLOSE, then the poll engine.io forgets a
    closed session on), so no gateway waits for it at exit."""
    url = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data="1"):
            pass
        async with http.get(url):
            pass


async def test_an_engineio_session_id_names_its_node(two_gateways: list[GatewayApp]) -> None:
    for gateway in two_gateways:
        sid = await handshake(gateway.url)
        assert eio_sid_owner(sid) == gateway.manager.node_tag
        await hang_up(gateway.url, sid)


async def test_polling_requests_of_a_session_are_served_by_any_gateway(
        two_gateways: list[GatewayApp]) -> None:
    """By hand: the handshake on one gateway, the CONNECT and the poll for its answer
    on the other; the answer is the owner's."""
    owner, other = two_gateways
    sid = await handshake(owner.url)
    async with aiohttp.ClientSession() as http:
        url = f"{other.url}/socket.io/?EIO=4&transport=polling&sid={sid}"
        async with http.post(url, data="40") as answer:
            assert answer.status == 200 and await answer.text() == "ok"  # as Node answers a POST
        async with http.get(url) as answer:
            assert answer.status == 200
            text = await answer.text()
    assert text.startswith("40{") and '"sid"' in text
    assert other.app[FORWARDER_KEY].counts["polling"] == 2
    await hang_up(other.url, sid)  # through the other gateway too
    await wait_for_condition(lambda: not owner.sio.eio.sockets, "the session to end")


@pytest.mark.parametrize("way", ["moved", "spliced", "relayed"])
async def test_default_mode_clients_chat_through_a_balancer_without_affinity(
        two_gateways: list[GatewayApp], front: Front, clients: list[SioClient],
        way: str) -> None:
    """Four clients in the default mode through the round-robin front: each connects,
    upgrades to websocket and joins; every chat reaches every other client exactly
    once, none comes back to its sender. A websocket that lands on a non-owner moves
    its session there; with moves off, it is spliced to the owner as bytes, or (where
    aiohttp's connection cannot be taken over) relayed message by message: the three
    ways are tested."""
    for g in two_gateways:
        g.app[FORWARDER_KEY].move = way == "moved"
        g.app[FORWARDER_KEY].splice = way == "spliced"
    made = [SioClient(f"c{i}", connection_per_request=True) for i in range(4)]
    clients += made
    for i, c in enumerate(made):
        front.turn = i  # handshakes on both gateways, whatever came before
        await c.connect(front.url, transports=DEFAULT_MODE)
    for c in made:
        await wait_for_condition(lambda c=c: c.sio.transport() == "websocket",
                                 f"{c.name} to upgrade")
        assert (await c.call("join", "lobby"))["ok"]
    owners = {c.sio.eio.sid[:8] for c in made}
    assert owners == {g.manager.node_tag for g in two_gateways}, "all on one gateway"
    counts = [g.app[FORWARDER_KEY].counts for g in two_gateways]
    # python-engineio's client upgrades at once: what crosses is mostly its websocket
    # (the polling requests cross in the test above and with socket.io-client)
    crossed = sum(c["moved" if way == "moved" else "websocket"] for c in counts)
    assert crossed > 0, "no upgrade crossed: the test would not test the way through"
    if way == "moved":
        assert sum(c["websocket"] for c in counts) == 0, "an upgrade was not moved"
        served = {c.sio.eio.sid for g in two_gateways for c in made
                  if c.sio.eio.sid in g.sio.eio.sockets}
        assert len(served) == len(made)
    assert all(c["websocket_spliced"] == (c["websocket"] if way == "spliced" else 0)
               for c in counts)
    for c in made:
        assert (await c.call("chat", {"room": "lobby", "text": f"from {c.name}"}))["ok"]
    for c in made:
        expected = sorted(f"from {o.name}" for o in made if o is not c)
        await c.wait_texts(expected)
    await settle(two_gateways, *made)
    for c in made:
        assert sorted(c.texts()) == sorted(f"from {o.name}" for o in made if o is not c)


@pytest.mark.parametrize("case", ["unknown node", "second hop", "forged sid of a real node"])
async def test_a_request_for_no_session_gets_a_clean_400(
        two_gateways: list[GatewayApp], case: str) -> None:
    owner, other = two_gateways
    other.app[FORWARDER_KEY].wait_for_owner = 0.1
    real = await handshake(owner.url)
    sid = {"unknown node": new_eio_sid(new_node_tag()),
           "second hop": real,
           "forged sid of a real node": new_eio_sid(owner.manager.node_tag)}[case]
    headers = {HOP_HEADER: "someone"} if case == "second hop" else {}
    async with aiohttp.ClientSession() as http, http.get(
            f"{other.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
            headers=headers) as answer:
        assert answer.status == 400
        body = await answer.text()
    assert "40" not in body and real not in body
    await hang_up(owner.url, real)


@pytest.mark.parametrize("splice", [True, False], ids=["spliced", "relayed"])
async def test_a_websocket_upgrade_for_a_forged_sid_gets_the_owners_400(
        two_gateways: list[GatewayApp], splice: bool) -> None:
    """An upgrade that lands on a non-owner for a session its owner does not have:
    the owner's answer (400, Session ID unknown) comes back, and nothing is spliced."""
    owner, other = two_gateways
    forwarder = other.app[FORWARDER_KEY]
    forwarder.splice = splice  # (the owner refuses to give it first: no such session)
    sid = new_eio_sid(owner.manager.node_tag)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{other.url}/socket.io/?EIO=4&transport=websocket&sid={sid}")
    assert refused.value.status == 400
    # spliced: the owner's own answer; the relay's websocket client takes the owner's
    # refusal for a failed handshake, and answers the same 400 itself
    assert forwarder.counts["failed"] == (0 if splice else 1)
    assert forwarder.counts["websocket"] == forwarder.counts["websocket_spliced"] == 0
    assert forwarder.counts["move_failed_refused"] == 1 and not owner.sio.eio.sockets
