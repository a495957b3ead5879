"""Lean websocket connections (nats_adapter._engineio) as clients see them.

A python-socketio server with this project's manager, in this event loop, with
engine.io timings short enough to watch pings and timeouts (interval 0.3 s,
timeout 0.2 s); clients speak Engine.IO/Socket.IO over real TCP connections.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import socketio
from aiohttp import web

from gateway.processes import free_ports
from nats_adapter import MemoryManager
from nats_adapter._engineio import fastpath_of
from tools.bench.loadgen import LoadGen


@dataclass
class Server:
    url: str
    sio: socketio.AsyncServer
    runner: web.AppRunner
    disconnects: list[tuple[str, str]] = field(default_factory=list)
    environs: dict[str, dict[str, Any]] = field(default_factory=dict)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with serving() as srv:
        yield srv


@contextlib.asynccontextmanager
async def serving(ping_interval: float = 0.3, ping_timeout: float = 0.2
                  ) -> AsyncIterator[Server]:
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=MemoryManager(),
                               ping_interval=ping_interval, ping_timeout=ping_timeout,
                               max_http_buffer_size=4096)
    port = free_ports(1)[0]
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    srv = Server(f"http://127.0.0.1:{port}", sio, runner)

    @sio.on("connect")
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        srv.environs[sid] = environ

    @sio.on("disconnect")
    async def disconnect(sid: str, reason: str) -> None:
        srv.disconnects.append((sid, reason))

    @sio.on("echo")
    async def echo(sid: str, *args: Any) -> Any:
        return args

    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield srv
    finally:
        await runner.cleanup()


def lean_sockets(sio: socketio.AsyncServer) -> list[Any]:
    fastpath = fastpath_of(sio.eio)
    assert fastpath is not None
    return [s for s in sio.eio.sockets.values() if fastpath.sessions.is_lean(s.sid)]


async def until(predicate: Any, timeout: float = 5.0, what: str = "the condition") -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (valid, and masking is then a no-op)."""
    assert len(payload) < 126
    return bytes(((0x80 if fin else 0) | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class RawClient:
    """A websocket client on a bare TCP connection, for frames aiohttp will not send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, url: str, query: str = "") -> RawClient:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /socket.io/?EIO=4&transport=websocket{query} HTTP/1.1\r\n"
                     f"Host: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame; (-1, b"") at end of stream."""
        try:
            b0, b1 = await self.reader.readexactly(2)
        except asyncio.IncompleteReadError:
            return -1, b""
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        return b0 & 0x0F, await self.reader.readexactly(n)

    async def text(self) -> str:
        while True:
            opcode, payload = await self.frame()
            if opcode == 0x1:
                return payload.decode()
            assert opcode != -1 and opcode != 0x8, "closed"

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def close(self) -> None:
        self.writer.close()
        await asyncio.gather(self.writer.wait_closed(), return_exceptions=True)


async def test_idle_sockets_keep_no_task_and_no_aiohttp_connection(server: Server) -> None:
    gen = LoadGen()
    await server.sio.manager.start()  # the node's own tasks (broker reader, heartbeats)
    tasks = len(asyncio.all_tasks())
    await gen.connect([server.url], 40, False)
    await gen.connect([server.url], 10, False, upgrade=True)
    assert len(lean_sockets(server.sio)) == 50
    aiohttp_server = server.runner.server
    assert aiohttp_server is not None and len(aiohttp_server.connections) == 0
    answered = gen.pings_answered
    await until(lambda: gen.pings_answered >= answered + 4 * 50,
                what="four pings answered per socket")
    assert len(asyncio.all_tasks()) <= tasks + 2, "a task per idle socket"
    assert gen.unexpected_closes == 0 and len(lean_sockets(server.sio)) == 50
    assert server.disconnects == []
    sid = next(iter(server.environs))
    environ = server.sio.get_environ(sid)
    assert "aiohttp.request" not in environ and "wsgi.input" not in environ
    assert environ["HTTP_HOST"].startswith("127.0.0.1:") and "EIO=4" in environ["QUERY_STRING"]
    gen.closing = True
    for sock in gen.sockets:
        sock.close()
    await until(lambda: not server.sio.eio.sockets, what="every session to end")
    assert {reason for _, reason in server.disconnects} == {"transport close"}


async def test_a_client_that_stops_answering_pings_is_dropped(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url.replace("http", "ws")
                                      + "/socket.io/?EIO=4&transport=websocket")
        opened = json.loads((await ws.receive_str())[1:])
        assert opened["pingInterval"] == 300 and opened["pingTimeout"] == 200
        await ws.send_str("40")
        assert (await ws.receive_str()).startswith("40{")
        assert await ws.receive_str() == "2"  # a ping, never answered
        async with asyncio.timeout(2):
            texts = [msg.data async for msg in ws if msg.type == aiohttp.WSMsgType.TEXT]
        assert texts == ["1"], "the server closes the session with engine.io's CLOSE"
    await until(lambda: server.disconnects, what="the disconnect handler")
    assert server.disconnects[0][1] == "ping timeout"
    assert not server.sio.eio.sockets


async def test_fragmented_binary_and_oversized_messages(server: Server) -> None:
    client = await RawClient.connect(server.url)
    try:
        assert (await client.text()).startswith("0{")
        client.send(masked(0x1, b"40"))
        assert (await client.text()).startswith("40{")
        # one Socket.IO EVENT with an ack, in three frames
        client.send(masked(0x1, b'421["ec', fin=False) + masked(0x0, b'ho",', fin=False)
                    + masked(0x0, b'"hi"]'))
        assert await client.text() == '431["hi"]'
        # an event with a binary attachment: a text frame, then a binary frame
        client.send(masked(0x1, b'451-2["echo",{"_placeholder":true,"num":0}]')
                    + masked(0x2, b"\x01\x02\x03"))
        assert await client.text() == '461-2[{"_placeholder":true,"num":0}]'
        assert await client.frame() == (0x2, b"\x01\x02\x03")
        # a websocket ping is answered with a pong
        client.send(masked(0x9, b"hey"))
        while (got := await client.frame())[0] == 0x1:
            pass  # engine.io pings may come first
        assert got == (0xA, b"hey")
        # past max_http_buffer_size (4096 bytes), the connection is closed (1009)
        for _ in range(50):
            client.send(masked(0x0 if _ else 0x1, b"4" * 100, fin=False))
        while (got := await client.frame())[0] == 0x1:
            pass
        assert got == (0x8, (1009).to_bytes(2, "big"))
    finally:
        await client.close()
    await until(lambda: not server.sio.eio.sockets, what="the session to end")


def masked_with(key: bytes, payload: bytes) -> bytes:
    """A final client text frame masked with ``key``."""
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0xFE)) + n.to_bytes(2, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def test_frames_are_read_whole_split_and_batched_with_any_mask(server: Server) -> None:
    """One-frame text messages (read without wsproto) with random masks, several in
    one write, one split across writes, a long one (16-bit length), text past
    ASCII; then a frame of invalid UTF-8, which closes the connection (1007) as
    wsproto says."""
    client = await RawClient.connect(server.url)
    try:
        assert (await client.text()).startswith("0{")
        client.send(masked_with(os.urandom(4), b"40"))
        assert (await client.text()).startswith("40{")
        texts = ["hi", "é 🎉" * 40, "x" * 300, "", "y" * 125, "z" * 126]
        frames = [masked_with(os.urandom(4), f'42{i}["echo",{json.dumps(t)}]'.encode())
                  for i, t in enumerate(texts)]
        client.send(b"".join(frames[:3]) + frames[3][:5])
        acks = []
        while len(acks) < 3:  # the first three answered: the split frame's start is in
            text = await client.text()
            if text.startswith("43"):
                acks.append(text)
        client.send(frames[3][5:] + b"".join(frames[4:]))
        while len(acks) < len(texts):
            text = await client.text()
            if text.startswith("43"):
                acks.append(text)
        assert [json.loads(a[a.index("["):])[0] for a in acks] == texts
        assert [a[2:a.index("[")] for a in acks] == [str(i) for i in range(len(texts))]
        client.send(masked_with(os.urandom(4), b'42["echo","\xff"]'))
        while (got := await client.frame())[0] == 0x1:
            pass
        assert got[0] == 0x8 and got[1][:2] == (1007).to_bytes(2, "big"), got
    finally:
        await client.close()


async def test_a_flood_is_read_at_the_pace_it_is_handled_and_nothing_is_lost() -> None:
    """5,000 events with acks in one burst: the connection stops reading while packets
    wait to be handled (a client cannot make the node hold its whole burst), and
    every ack still comes back, in order."""
    # this raw client answers no pings: a slow machine must not time it out mid-burst
    async with serving(ping_interval=30, ping_timeout=30) as server:
        client = await RawClient.connect(server.url)
        try:
            assert (await client.text()).startswith("0{")
            client.send(masked(0x1, b"40"))
            assert (await client.text()).startswith("40{")
            count = 5000
            client.send(b"".join(masked(0x1, f'42{i}["echo",{i}]'.encode()) for i in range(count)))
            acks = []
            while len(acks) < count:
                text = await asyncio.wait_for(client.text(), 10)
                if text.startswith("43"):
                    acks.append(text)
            assert acks == [f"43{i}[{i}]" for i in range(count)]
            assert len(lean_sockets(server.sio)) == 1 and server.disconnects == []
        finally:
            await client.close()


async def test_server_disconnect_sends_close_then_hangs_up(server: Server) -> None:
    client = await RawClient.connect(server.url)
    try:
        assert (await client.text()).startswith("0{")
        client.send(masked(0x1, b"40"))
        sid = json.loads((await client.text())[2:])["sid"]
        await server.sio.disconnect(sid)
        texts = []
        while (got := await client.frame())[0] == 0x1:
            texts.append(got[1].decode())
        assert [t for t in texts if t != "2"] == ["41", "1"]
        assert got[0] == 0x8
        assert await client.frame() == (-1, b""), "the server closes the TCP connection"
    finally:
        await client.close()


async def test_frames_of_one_turn_go_out_together_in_order_before_a_close(
        server: Server) -> None:
    """What a connection is sent in one turn of the event loop (shared frames of room
    emits, an event through engine.io's queue, the disconnect) leaves in far fewer
    socket sends than frames, and arrives complete and in order before the close."""
    client = await RawClient.connect(server.url)
    try:
        assert (await client.text()).startswith("0{")
        client.send(masked(0x1, b"40"))
        sid = json.loads((await client.text())[2:])["sid"]
        await server.sio.enter_room(sid, "r")
        writes = server.sio.manager.websocket_writes
        frames, sends = writes.frames, writes.sends
        for i in range(20):
            await server.sio.emit("n", i, room="r")
        await server.sio.emit("n", 20, to=sid)
        await server.sio.disconnect(sid)
        texts = []
        while (got := await client.frame())[0] == 0x1:
            texts.append(got[1].decode())
        assert [t for t in texts if t != "2"] == \
            [f'42["n",{i}]' for i in range(21)] + ["41", "1"]
        assert got[0] == 0x8
        assert writes.frames - frames >= 23
        assert writes.sends - sends <= 3, "frames of one turn were sent one by one"
    finally:
        await client.close()


async def test_a_failed_upgrade_leaves_the_session_polling(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        base = f"{server.url}/socket.io/?EIO=4&transport=polling"
        async with session.get(base) as resp:
            eio_sid = json.loads((await resp.text())[1:])["sid"]
        url = f"{base}&sid={eio_sid}"
        async with session.post(url, data="40") as resp:
            assert resp.status == 200
        async with session.get(url) as resp:
            assert (await resp.text()).startswith("40{")
        client = await RawClient.connect(server.url, f"&sid={eio_sid}")
        client.send(masked(0x1, b"2notaprobe"))
        assert (await client.frame())[0] == 0x8
        await client.close()
        # still a polling session: an ack comes back by polling
        async with session.post(url, data='421["echo","still here"]') as resp:
            assert resp.status == 200
        async with session.get(url) as resp:
            assert '431["still here"]' in await resp.text()
        assert not lean_sockets(server.sio)


async def test_a_client_that_answers_pings_stays(server: Server) -> None:
    """aiohttp's client masks every frame with a random key, as browsers do."""
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(server.url.replace("http", "ws")
                                      + "/socket.io/?EIO=4&transport=websocket")
        assert (await ws.receive_str()).startswith("0{")
        await ws.send_str("40")
        assert (await ws.receive_str()).startswith("40{")
        for _ in range(4):  # 4 x 0.3 s: twice interval + timeout
            assert await ws.receive_str() == "2"
            await ws.send_str("3")
        await ws.send_str('421["echo","alive"]')
        assert await ws.receive_str() == '431["alive"]'
        await ws.close()
    assert all(reason != "ping timeout" for _, reason in server.disconnects)


async def test_a_polling_client_that_vanishes_is_timed_out(server: Server) -> None:
    """engine.io's service task is off; the heartbeat checks polling sessions instead,
    also on a server that never saw a websocket."""
    async with aiohttp.ClientSession() as session:
        base = f"{server.url}/socket.io/?EIO=4&transport=polling"
        async with session.get(base) as resp:
            eio_sid = json.loads((await resp.text())[1:])["sid"]
        async with session.post(f"{base}&sid={eio_sid}", data="40") as resp:
            assert resp.status == 200
        await until(lambda: server.environs, what="the connect handler")
    # the client is gone: no poll, no pong
    await until(lambda: server.disconnects, timeout=3, what="the session to time out")
    assert server.disconnects[0][1] == "ping timeout"
    await until(lambda: not server.sio.eio.sockets, timeout=2, what="the session to go")
