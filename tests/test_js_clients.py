"""The official socket.io-client (Node.js) on two gateway processes."""

from __future__ import annotations

import asyncio
import uuid

from gateway.processes import GatewayNode
from tests.helpers import SETTLE, NodeClient, wait_interest_everywhere


async def test_js_clients_chat_across_gateways(gateway_procs: list[GatewayNode], node_bin: str,
                                               node_clients: list[NodeClient]) -> None:
    room = f"js-{uuid.uuid4().hex[:6]}"
    alice = await NodeClient.start(node_bin, gateway_procs[0].url, "alice")
    bob = await NodeClient.start(node_bin, gateway_procs[1].url, "bob")
    carol = await NodeClient.start(node_bin, gateway_procs[1].url, "carol")
    node_clients += [alice, bob, carol]
    assert await alice.call("join", room) == {"ok": True, "room": room}
    assert await bob.call("join", room) == {"ok": True, "room": room}
    await wait_interest_everywhere(room)
    ack = await alice.call("chat", {"room": room, "text": "hi bob"})
    assert ack["ok"] is True and isinstance(ack["id"], str)
    await bob.wait_for(lambda c: c.texts() == ["hi bob"], what="alice's chat")
    event = next(e for e in bob.events if e["type"] == "event")
    assert event["data"]["from"] == alice.sid and event["data"]["id"] == ack["id"]
    ack = await bob.call("chat", {"room": room, "text": "hi alice"})
    await alice.wait_for(lambda c: c.texts() == ["hi alice"], what="bob's chat")
    await asyncio.sleep(SETTLE)
    assert alice.texts() == ["hi alice"], "sender excluded"
    assert bob.texts() == ["hi bob"], "sender excluded"
    assert carol.texts() == [], "non-member gets nothing"


async def test_js_client_gets_clear_errors(gateway_procs: list[GatewayNode], node_bin: str,
                                           node_clients: list[NodeClient]) -> None:
    client = await NodeClient.start(node_bin, gateway_procs[0].url, "js-bad")
    node_clients.append(client)
    assert (await client.call("join", None))["error"] == "room must be a string, not null"
    assert (await client.call("join", 3.5))["error"] == "room must be a string, not number"
    assert (await client.call("join", {"a": 1}))["error"].startswith(
        "room must be a string, not null (join takes a room name, or {")
    assert (await client.call("chat", {"room": "nowhere", "text": "x"}))["ok"] is False
    assert (await client.call("frobnicate"))["error"] == "unknown event 'frobnicate'"
