"""Bad input gets a clear ``ok:false`` (or is dropped) and never hurts the node or others.

Runs against ``python -m gateway serve`` processes, as users run them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from gateway.processes import RUN_CLUSTER_KEY, GatewayNode, NatsCluster, http_json
from tests.helpers import SETTLE, SioClient, connect_all, seal_with

LONG_ROOM = "r" * 129
BAD_ROOMS: list[tuple[tuple[Any, ...], str]] = [
    ((), "expected one argument"),
    (("a", "b"), "expected one argument"),
    ((5,), "must be a string"),
    ((None,), "must be a string"),
    ((["a"],), "must be a string"),
    (({"room": 5},), "must be a string"),
    (({"room": "a", "history": -1},), "must"),
    (("",), "must not be empty"),
    ((LONG_ROOM,), "longer than 128"),
    (("AbCdEf12:0123456789ab",), "reserved"),
]
BAD_CHATS: list[tuple[tuple[Any, ...], str]] = [
    ((), "one object"),
    (("hello",), "one object"),
    ((["lobby", "hi"],), "one object"),
    (({"room": "lobby", "text": "a"}, "extra"), "one object"),
    (({"text": "hi"},), "must be a string"),
    (({"room": "lobby"},), "text must be a string"),
    (({"room": "lobby", "text": 5},), "text must be a string"),
    (({"room": "lobby", "text": None},), "text must be a string"),
    (({"room": "lobby", "text": "x" * (8 * 1024 + 1)},), "longer than 8192 bytes"),
    (({"room": "lobby", "text": "é" * 4097},), "longer than 8192 bytes"),
    (({"room": "", "text": "hi"},), "must not be empty"),
    (({"room": LONG_ROOM, "text": "hi"},), "longer than 128"),
    (({"room": "never-joined", "text": "hi"},), "not a member"),
]


@pytest.fixture
async def pair(gateway_procs: list[GatewayNode], clients: list[SioClient]
               ) -> tuple[SioClient, SioClient]:
    """Two well-behaved members of "lobby" on different gateways."""
    a, b = await connect_all(clients, [("a", gateway_procs[0].url), ("b", gateway_procs[1].url)])
    await a.join("lobby")
    await b.join("lobby")
    return a, b


async def assert_still_serving(procs: list[GatewayNode], a: SioClient, b: SioClient,
                               text: str) -> None:
    for proc in procs:
        assert proc.child is not None and proc.child.alive, f"{proc.node_id} died"
        assert proc.healthz()[0] == 200
    await a.chat("lobby", text)
    await b.wait_for(lambda c: text in c.texts(), what=text)


@pytest.mark.parametrize("event", ["join", "leave"])
@pytest.mark.parametrize(("args", "error"), BAD_ROOMS)
async def test_bad_room_requests_are_refused(event: str, args: tuple[Any, ...], error: str,
                                             gateway_procs: list[GatewayNode],
                                             clients: list[SioClient]) -> None:
    (c,) = await connect_all(clients, [("bad", gateway_procs[0].url)])
    ack = await c.sio.call(event, args, timeout=5)  # a tuple is sent as that many arguments
    assert ack["ok"] is False
    assert error in ack["error"]


@pytest.mark.parametrize(("args", "error"), BAD_CHATS)
async def test_bad_chats_are_refused_and_deliver_nothing(
        args: tuple[Any, ...], error: str, gateway_procs: list[GatewayNode],
        pair: tuple[SioClient, SioClient], clients: list[SioClient]) -> None:
    a, b = pair
    ack = await a.sio.call("chat", args, timeout=5)
    assert ack["ok"] is False
    assert error in ack["error"]
    await asyncio.sleep(0.1)  # a window for a wrongly relayed chat to show (not a wait)
    assert b.texts() == []


async def test_text_at_the_limit_is_accepted(gateway_procs: list[GatewayNode],
                                             pair: tuple[SioClient, SioClient]) -> None:
    a, b = pair
    text = "é" * 4096  # exactly 8 KiB of UTF-8
    await a.chat("lobby", text)
    await b.wait_for(lambda c: c.texts() == [text], what="the 8 KiB text")


async def test_unknown_events_are_refused(gateway_procs: list[GatewayNode],
                                          clients: list[SioClient]) -> None:
    (c,) = await connect_all(clients, [("c", gateway_procs[1].url)])
    for event in ["nope", "JOIN", "message", "chat2"]:
        ack = await c.sio.call(event, {"a": 1}, timeout=5)
        assert ack == {"ok": False, "error": f"unknown event {event!r}"}
    # a long name is not echoed back in full
    ack = await c.sio.call("x" * 60_000, {"a": 1}, timeout=5)
    assert ack == {"ok": False, "error": f"unknown event {'x' * 32 + '...'!r}"}


async def test_room_limit_per_socket(gateway_procs: list[GatewayNode],
                                     clients: list[SioClient]) -> None:
    (c,) = await connect_all(clients, [("many", gateway_procs[0].url)])
    for i in range(100):
        assert (await c.sio.call("join", f"many-{i}", timeout=5))["ok"] is True
    ack = await c.sio.call("join", "many-100", timeout=5)
    assert ack["ok"] is False and "too many rooms" in ack["error"]
    # re-joining a room already joined is not a new room
    assert (await c.sio.call("join", "many-5", timeout=5))["ok"] is True
    assert (await c.sio.call("leave", "many-5", timeout=5))["ok"] is True
    assert (await c.sio.call("join", "many-100", timeout=5))["ok"] is True


async def raw_socket(url: str, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    """A bare Engine.IO v4 websocket, connected to the default namespace."""
    ws = await session.ws_connect(
        url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket")
    opening = await ws.receive_str()
    assert opening.startswith("0{")
    await ws.send_str("40")
    connected = await ws.receive_str()
    assert connected.startswith("40{")
    return ws


MALFORMED_FRAMES: list[str | bytes] = [
    "42", "42[", "42[]", "42[1]", '42[null,"x"]', "42{}", '42"x"', "4", "4garbage",
    "43", "43[1]", "44", "45", "46", "47", "48", "99", "0", "6", "", "\x00\x01",
    '42["join"', '451-["join",{"_placeholder":true,"num":7}]', "4" + "[" * 5000,
    '42["chat",{"room":"lobby","text":"\\ud800"}]',  # a lone surrogate, JSON-escaped
    '42["join","\\udfff"]',
    b"\x00\xff\xfe garbage", b"",
]


async def test_malformed_packets_do_not_hurt_the_node(
        gateway_procs: list[GatewayNode], pair: tuple[SioClient, SioClient]) -> None:
    a, b = pair
    async with aiohttp.ClientSession() as session:
        for frame in MALFORMED_FRAMES:
            ws = await raw_socket(gateway_procs[0].url, session)
            await ws.send_str('420["join","lobby"]')  # a hostile member, not a stranger
            if isinstance(frame, bytes):
                await ws.send_bytes(frame)
            else:
                await ws.send_str(frame)
            await asyncio.sleep(0.02)  # paces the frames: each is read before the close
            await ws.close()
    await assert_still_serving(gateway_procs, a, b, "still alive after malformed packets")


async def test_oversize_message_closes_only_that_socket(
        gateway_procs: list[GatewayNode], pair: tuple[SioClient, SioClient]) -> None:
    a, b = pair
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(gateway_procs[1].url, session)
        await ws.send_str('42["chat",{"room":"lobby","text":"' + "x" * 200_000 + '"}]')
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING)
    await asyncio.sleep(SETTLE)
    assert b.texts() == []
    await assert_still_serving(gateway_procs, a, b, "still alive after an oversize frame")


@pytest.mark.expected_errors("dropped_malformed")
async def test_garbage_on_the_bus_is_counted_and_dropped(
        gateway_procs: list[GatewayNode], nats_cluster: NatsCluster,
        pair: tuple[SioClient, SioClient]) -> None:
    import msgpack
    import nats

    a, b = pair
    room_subject = "sio.room._2F.lobby"
    garbage = [b"", b"\xc1", b"not msgpack", msgpack.packb([1]), msgpack.packb([2, 1, "x"]),
               msgpack.packb([1, 1, "rogue", "/", ["lobby"], [], 5, None]),
               msgpack.packb({"method": "emit"}), msgpack.packb([1, 99, "x", "/", None, None]),
               msgpack.packb([1, 1, "rogue", "/", ["lobby"], [], "42"])[:-3],
               b"\x93" * 10_000]
    rogue = await nats.connect(nats_cluster.urls[2])
    try:
        for payload in garbage:
            # sealed with the gateways' key (gateway.processes gives them one): garbage
            # a holder of the key could send; unsealed it stops at the seal's check
            await rogue.publish(room_subject, seal_with(RUN_CLUSTER_KEY, payload, room_subject))
        await rogue.flush()
    finally:
        await rogue.close()
    await asyncio.sleep(SETTLE)
    for proc in gateway_procs:
        status, _ = http_json(f"{proc.url}/healthz")
        assert status == 200
    async with aiohttp.ClientSession() as session, \
            session.get(f"{gateway_procs[1].url}/metrics") as resp:
        metrics = await resp.text()
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith("gateway_broker_messages_malformed_total"))
    # all but the empty payload, which sealed is a bare seal (dropped as unsigned)
    assert float(line.rsplit(" ", 1)[1]) >= len([g for g in garbage if g])
    assert b.texts() == [], "garbage must never reach a client"
    await assert_still_serving(gateway_procs, a, b, "still alive after bus garbage")


def test_bad_cli_flags_name_the_flag(tmp_path: Any) -> None:
    import subprocess
    import sys

    cases = [
        (["serve", "--port", "x"], "--port"),
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--backend", "kafka"], "--backend"),
        (["serve", "--nats-url", "localhost"], "--nats-url"),
        (["serve", "--max-rooms", "0"], "--max-rooms"),
        (["serve", "--unsubscribe-linger", "-1"], "--unsubscribe-linger"),
        (["serve", "--redis-url", "http://x"], "--redis-url"),
        (["cluster", "--gateways", "0"], "--gateways"),
        (["cluster", "--backend", "kafka"], "--backend"),
    ]
    for argv, flag in cases:
        proc = subprocess.run([sys.executable, "-m", "gateway", *argv], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert flag in proc.stderr, (argv, proc.stderr)
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve"], capture_output=True,
                          text=True, timeout=30, env={"GATEWAY_PORT": "nope", "PATH": ""})
    assert proc.returncode == 2 and "GATEWAY_PORT" in proc.stderr


def test_healthz_json_shape(gateway_procs: list[GatewayNode]) -> None:
    status, body = http_json(f"{gateway_procs[0].url}/healthz")
    assert status == 200
    assert body["node_id"] == gateway_procs[0].node_id
    assert body["backend"] == "nats"
    assert body["broker_connected"] is True
    json.dumps(body)
