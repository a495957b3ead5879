"""The edges of a gateway an attacker reaches first (issue 21, item 6): malformed
packets, grants, operator endpoints, forwarded addresses, key guessing, secrets,
engine.io sessions and recovery CONNECTs.

Against ``python -m gateway serve`` processes on the session's NATS cluster, with
raw clients that send what a library would not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.processes import GatewayNode, free_ports, start_gateway, stop_all, wait_gateways
from tests.conftest import broker_args
from tests.helpers import SioClient, connect_all, metrics_of
from tests.test_bad_input import raw_socket

API_KEY = "edges-api-key-5d2c1f0e9a8b7c6d"


def refused(gw: GatewayNode, reason: str) -> float:
    return metrics_of(gw.url).get(
        f'gateway_requests_refused_total{{backend="nats",node="{gw.node_id}",'
        f'reason="{reason}"}}', 0.0)


@pytest.fixture(scope="module")
def edge_gateway(workdir: Path, request: pytest.FixtureRequest) -> Iterator[GatewayNode]:
    port = free_ports(1)[0]
    gw = start_gateway(workdir / "edges", "edge-gw", port, "nats", broker_args("nats", request),
                       env={"GATEWAY_API_KEY": API_KEY})
    try:
        wait_gateways([gw])
        yield gw
    finally:
        stop_all([gw.child])


# -- malformed packets ---------------------------------------------------------------

#: Socket.IO packets no client library sends: each must close its socket
MALFORMED = ['42["chat",', "42[", "42", "42[]", "42[1]", '42[null,"x"]', "42{}", '42"x"',
             "4garbage", "43", "43[1]", "44x", "47", "48", "4" + "[" * 3000, '42["join"',
             "4{}", "4null", "4true", "4[1]"]
#: engine.io packets no client sends: over polling they end the session with a 400
ENGINEIO_GARBAGE = ["x", "9", "garbage", "\x00", "4x\x1ey", "-1"]


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """Whether the gateway hangs up on ``ws`` (engine.io's CLOSE, then the close frame)."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type == aiohttp.WSMsgType.TEXT and msg.data in ("1", "2"):
            if msg.data == "2":  # a ping that crossed: answer and go on waiting
                await ws.send_str("3")
            continue
        return msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING)


async def _polling_session(session: aiohttp.ClientSession, url: str) -> str:
    base = f"{url}/socket.io/?EIO=4&transport=polling"
    async with session.get(base) as resp:
        opening = await resp.text()
    sid = opening.split('"sid":"', 1)[1].split('"', 1)[0]
    async with session.post(f"{base}&sid={sid}", data="40") as resp:
        assert resp.status == 200
    async with session.get(f"{base}&sid={sid}") as resp:
        assert (await resp.text()).startswith("40{")
    return sid


async def _polling_closed(session: aiohttp.ClientSession, url: str, sid: str) -> bool:
    """Whether the session is gone: its next poll gets engine.io's CLOSE or a 400."""
    base = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with session.get(base) as resp:
            body = await resp.text()
            if resp.status == 400 or "1" in body.split("\x1e"):
                return True
    return False


async def test_malformed_packets_close_the_socket_and_are_counted_not_logged(
        edge_gateway: GatewayNode, clients: list[SioClient]) -> None:
    """400 malformed packets (``42["chat",`` and others), over websocket and over
    polling: each closes its socket, is counted, and the log gets no traceback (it
    got ~2.3 KB of traceback twice per packet, and the socket stayed open)."""
    assert edge_gateway.child is not None
    log = edge_gateway.child.log_path
    size = log.stat().st_size
    before = refused(edge_gateway, "malformed")
    (member,) = await connect_all(clients, [("member", edge_gateway.url)])
    await member.join("calm")
    async with aiohttp.ClientSession() as session:
        for i in range(200):
            ws = await raw_socket(edge_gateway.url, session)
            await ws.send_str(MALFORMED[i % len(MALFORMED)])
            assert await _closed(ws), f"left open after {MALFORMED[i % len(MALFORMED)]!r}"
            await ws.close()
        for i in range(200):
            frame = MALFORMED[i % len(MALFORMED)]
            sid = await _polling_session(session, edge_gateway.url)
            async with session.post(
                    f"{edge_gateway.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                    data=frame) as resp:
                await resp.read()
            assert await _polling_closed(session, edge_gateway.url, sid), \
                f"polling session left open after {frame!r}"
        for frame in ENGINEIO_GARBAGE:
            sid = await _polling_session(session, edge_gateway.url)
            async with session.post(
                    f"{edge_gateway.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                    data=frame) as resp:
                assert resp.status == 400, (frame, resp.status, await resp.text())
            assert await _polling_closed(session, edge_gateway.url, sid), frame
    assert refused(edge_gateway, "malformed") - before >= 400
    text = log.read_text(errors="replace")[size:]
    assert "Traceback" not in text, text[:3000]
    assert log.stat().st_size - size < 4096, text[:3000]
    # the well-behaved member never noticed
    assert member.sio.connected
    assert (await member.call("chat", {"room": "calm", "text": "fine"}))["ok"] is True
