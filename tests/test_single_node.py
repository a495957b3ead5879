"""What a single node must do on every backend, including ``memory`` (no broker)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.processes import free_ports, start_gateway, stop_all, wait_gateways
from tests.conftest import broker_config, start_node
from tests.helpers import SETTLE, Node, SioClient, connect_all


@pytest.fixture(scope="session", params=["memory", "nats", "redis-sharded"])
async def single(request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    """One gateway node on each backend, in this event loop."""
    backend = str(request.param)
    node = await start_node(backend, f"single-{backend}", broker_config(backend, request))
    try:
        yield node
    finally:
        await node.runner.cleanup()


async def test_local_chat_semantics(single: Node, clients: list[SioClient]) -> None:
    a, b, outsider = await connect_all(clients, [("a", single), ("b", single), ("o", single)])
    room = f"local-{uuid.uuid4().hex[:6]}"
    await a.join(room)
    await b.join(room)
    await a.chat(room, "local hello")
    await b.wait_texts(["local hello"])
    await asyncio.sleep(SETTLE)
    assert a.texts() == [] and outsider.texts() == []
    assert await b.call("leave", room) == {"ok": True, "room": room}
    await a.chat(room, "after leave")
    await asyncio.sleep(SETTLE)
    assert b.texts() == ["local hello"]


async def test_local_emit_targets(single: Node, clients: list[SioClient]) -> None:
    a, b, c = await connect_all(clients, [("a", single), ("b", single), ("c", single)])
    r1, r2 = f"l1-{uuid.uuid4().hex[:6]}", f"l2-{uuid.uuid4().hex[:6]}"
    for client in (a, b):
        await client.join(r1)
        await client.join(r2)
    await c.join(r2)
    await single.sio.emit("n", 1, to=[r1, r2], skip_sid=[b.sid])
    await a.wait_for(lambda x: x.received("n") == [1], what="n")
    await c.wait_for(lambda x: x.received("n") == [1], what="n")
    await asyncio.sleep(SETTLE)
    assert a.received("n") == [1] and b.received("n") == [] and c.received("n") == [1]
    c.replies["ask"] = lambda data: data * 2
    assert await single.sio.call("ask", 21, to=c.sid, timeout=5) == 42
    await single.sio.close_room(r2)
    assert single.manager.get_rooms(c.sid, "/") == []
    assert single.manager.get_rooms(a.sid, "/") == [r1]


async def test_memory_backend_serves_without_a_broker(tmp_path: Path,
                                                      clients: list[SioClient]) -> None:
    port = free_ports(1)[0]
    gw = start_gateway(tmp_path, "mem-proc", port, "memory", [])
    try:
        wait_gateways([gw])
        status, body = gw.healthz()
        assert status == 200 and body["backend"] == "memory" and body["broker_connected"]
        a, b = await connect_all(clients, [("a", gw.url), ("b", gw.url)])
        await a.join("solo")
        await b.join("solo")
        await a.chat("solo", "no broker needed")
        await b.wait_texts(["no broker needed"])
    finally:
        for client in clients:
            await client.close()
        stop_all([gw.child])
