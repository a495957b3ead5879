"""What one chat, and one join/leave, costs on one gateway, stage by stage.

``python -m tools.bench.stages`` starts one nats-server and one gateway (the
service's own app: its chat protocol, packet checks, lean websockets, a sealed
bus) in this process, connects raw websocket clients to it, and times each stage
of the per-message path alone, with the objects the gateway itself uses: the
websocket frame parse, engine.io and Socket.IO decoding, the tasks an event is
dispatched through, the chat handler, the packet's JSON, the envelope, its seal,
the publish, the local delivery and the ack. Then the whole chat, sent by a client
and acked, for comparison with the sum (the whole includes the raw client's own
work and the event loop's), and joins and leaves: of a room already subscribed,
and of rooms new to the node (a broker subscription each), one at a time and many
in one turn of the loop.

Each stage runs thousands of times; the table shows microseconds per call (the
median of ``--repeat`` rounds). Absolute figures depend on the machine: compare
rows within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from engineio import packet as eio_packet
from socketio import packet as sio_packet
from wsproto.connection import Connection, ConnectionType

from gateway.app import CHAT_KEY, MANAGER_KEY, SIO_KEY, create_app
from gateway.config import GatewayConfig, Limits, Secrets
from gateway.processes import free_ports
from nats_adapter import codec
from nats_adapter._engineio.frames import read_text_frame

CHAT_BODY = {"room": "room-1", "text": "hello"}


def masked(payload: bytes) -> bytes:
    """A client's text frame, masked with a zero key (valid; masking is a no-op)."""
    n = len(payload)
    head = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    return head + b"\0\0\0\0" + payload


class RawClient:
    """A websocket client on a bare TCP connection that speaks just enough Engine.IO
    and Socket.IO for the stages: pre-built frames out, payloads in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\n"
                     f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"websocket handshake refused: {head[:80]!r}")
        client = cls(reader, writer)
        await client.text()  # engine.io OPEN
        client.send("40")
        connected = await client.text()
        if not connected.startswith("40"):
            raise RuntimeError(f"Socket.IO CONNECT refused: {connected!r}")
        return client

    async def text(self) -> str:
        while True:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            payload = await self.reader.readexactly(n)
            if b0 & 0x0F == 0x1:
                text = payload.decode()
                if text == "2":  # engine.io PING
                    self.send("3")
                    continue
                return text

    async def until(self, prefix: str) -> str:
        while True:
            text = await self.text()
            if text.startswith(prefix):
                return text

    def send(self, text: str) -> None:
        self.writer.write(masked(text.encode()))

    async def close(self) -> None:
        self.writer.close()
        await asyncio.gather(self.writer.wait_closed(), return_exceptions=True)


@dataclass
class Gateway:
    port: int
    app: web.Application

    @property
    def sio(self) -> Any:
        return self.app[SIO_KEY]

    @property
    def manager(self) -> Any:
        return self.app[MANAGER_KEY]

    @property
    def chat(self) -> Any:
        return self.app[CHAT_KEY]


@contextlib.asynccontextmanager
async def nats_server() -> AsyncIterator[str]:
    port = free_ports(1)[0]
    binary = Path(sys.executable).with_name("nats-server")
    proc = await asyncio.create_subprocess_exec(
        str(binary), "-a", "127.0.0.1", "-p", str(port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.returncode is not None:
                    raise RuntimeError("nats-server did not start") from None
                await asyncio.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()  # this process's own child, by its handle
        await proc.wait()


@contextlib.asynccontextmanager
async def gateway(nats_url: str) -> AsyncIterator[Gateway]:
    port = free_ports(1)[0]
    config = GatewayConfig(backend="nats", nats_urls=(nats_url,), port=port, node_id="stages",
                           log_level="WARNING", secrets=Secrets(cluster_key="k" * 32),
                           # as the bench's gateways (tools/bench/harness.py): no rate limits
                           limits=Limits(chat_rate=1e6, chat_burst=1_000_000, join_rate=1e6,
                                         join_burst=1_000_000))
    app = create_app(config)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield Gateway(port, app)
    finally:
        await runner.cleanup()


def timed(fn: Callable[[], Any], n: int) -> float:
    """Microseconds per call of ``fn``."""
    start = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - start) / n / 1000


#: calls timed in one go; between chunks the clients read what was sent to them
CHUNK = 100


async def timed_async(fn: Callable[[], Awaitable[Any]], n: int,
                      after: Callable[[], Any] | None = None) -> float:
    """Microseconds per call of ``fn`` (and ``after``, once per call); the loop runs
    between chunks of calls, untimed, so clients keep reading."""
    spent = 0
    for done in range(0, n, CHUNK):
        start = time.perf_counter_ns()
        for _ in range(min(CHUNK, n - done)):
            await fn()
            if after is not None:
                after()
        spent += time.perf_counter_ns() - start
        await asyncio.sleep(0.001)  # a measurement boundary: the clients read
    return spent / n / 1000


class Table:
    def __init__(self, repeat: int) -> None:
        self.repeat = repeat
        self.rows: list[tuple[str, str, float]] = []

    async def add(self, group: str, name: str, measure: Callable[[], Awaitable[float]]) -> None:
        rounds = []
        for _ in range(self.repeat):
            gc.collect()
            rounds.append(await measure())
        self.rows.append((group, name, statistics.median(rounds)))

    def markdown(self) -> str:
        lines = ["| path | stage | us |", "|---|---|---|"]
        lines += [f"| {group} | {name} | {us:.2f} |" for group, name, us in self.rows]
        return "\n".join(lines)


async def chat_stages(gw: Gateway, table: Table, n: int) -> None:
    sio, manager, chat = gw.sio, gw.manager, gw.chat
    sender, other = await RawClient.connect(gw.port), await RawClient.connect(gw.port)
    for client in (sender, other):
        client.send('420["join","room-1"]')
        await client.until("430")
    sid = next(s for s, _ in manager.get_participants("/", "room-1"))
    # what the other client gets is read as it comes (its acks, chats, deliveries)
    drain = asyncio.get_running_loop().create_task(_drain(other))
    other_eio = next(e for s, e in manager.get_participants("/", "room-1") if s != sid)
    event = '42["chat",{"room":"room-1","text":"hello"}]'
    frame = masked(event.encode())
    message = {"room": "room-1", "text": "hello", "from": sid, "id": "0123456789abcdef",
               "ts": 1_700_000_000_000}
    pkt = sio.packet_class(sio_packet.EVENT, namespace="/", data=["chat", message]).encode()
    channel = manager.channels.room("/", "room-1")
    bus = manager.bus

    def parse() -> None:
        parser = Connection(ConnectionType.SERVER)
        parser.receive_data(frame)
        list(parser.events())

    async def sync(fn: Callable[[], Any]) -> float:
        return timed(fn, n)

    g = "chat"
    await table.add(g, "websocket frame parse (wsproto)", lambda: sync(parse))
    await table.add(g, "websocket frame parse (lean: a one-frame text message)", lambda: sync(
        lambda: read_text_frame(frame, 0, 1 << 16)))
    await table.add(g, "engine.io decode", lambda: sync(
        lambda: eio_packet.Packet(encoded_packet=event)))
    await table.add(g, "Socket.IO decode (JSON, checks)", lambda: sync(
        lambda: sio.packet_class(encoded_packet=event[1:])))

    async def nothing() -> None:
        return None

    async def tasks() -> float:
        loop = asyncio.get_running_loop()
        start = time.perf_counter_ns()
        pending = [loop.create_task(nothing()) for _ in range(n)]
        await asyncio.gather(*pending)
        return (time.perf_counter_ns() - start) / n / 1000

    await table.add(g, "one task (create, run); an event takes 2 + its receive loop's",
                    tasks)

    class NoEmit:
        """The server, but an emit that does nothing: the handler's own work."""

        def __getattr__(self, name: str) -> Any:
            return getattr(sio, name)

        async def emit(self, *args: Any, **kwargs: Any) -> None:
            return None

    async def handler_alone() -> float:
        chat.sio = NoEmit()
        try:
            return await timed_async(lambda: chat.on_chat(sid, dict(CHAT_BODY)), n)
        finally:
            chat.sio = sio

    await table.add(g, "chat handler (checks, id; emit not included)", handler_alone)
    await table.add(g, "event packet encode (JSON)", lambda: sync(
        lambda: sio.packet_class(sio_packet.EVENT, namespace="/",
                                 data=["chat", message]).encode()))
    envelope = codec.EmitMessage("", "/", ["room-1"], [], pkt, channel_room=True)
    await table.add(g, "envelope encode (msgpack)", lambda: sync(lambda: bus.encode(envelope)))
    data = bus.encode(envelope)
    assert data is not None
    await table.add(g, "envelope seal (HMAC)", lambda: sync(lambda: bus.seal(data, channel)))
    sealed = bus.seal(data, channel)

    async def publish() -> float:
        us = await timed_async(lambda: manager.broker.publish(channel, sealed), n)
        await manager.broker.confirm_published()
        return us

    await table.add(g, "publish (nats-py, buffered)", publish)
    await table.add(g, "local delivery, 1 recipient (frame built, written)", lambda: timed_async(
        lambda: manager.hub.deliver("/", ["room-1"], frozenset((sid,)), pkt), n))
    await table.add(g, "manager.emit (encode, envelope, seal, publish, delivery)",
                    lambda: timed_async(lambda: manager.emit(
                        "chat", message, room="room-1", skip_sid=sid), n))
    ack = sio.packet_class(sio_packet.ACK, namespace="/", id=1,
                           data=[{"ok": True, "id": "0123456789abcdef"}])
    writes = manager.websocket_writes

    await table.add(g, "ack: encode, engine.io send, frame, socket send", lambda: timed_async(
        lambda: sio.eio.send(other_eio, ack.encode()), n, writes.flush))
    # drain what the other client got meanwhile, then the whole path
    ids = iter(range(100_000, 10_000_000))

    async def whole() -> float:
        count = max(200, n // 10)
        cpu = time.process_time()
        for _ in range(count):
            k = next(ids)
            sender.send(f'42{k}["chat",{{"room":"room-1","text":"hello"}}]')
            await sender.until(f"43{k}[")
        return (time.process_time() - cpu) / count * 1e6

    await table.add(g, "whole chat, client to ack (process CPU, raw clients included)", whole)
    drain.cancel()
    await asyncio.gather(drain, return_exceptions=True)
    await sender.close()
    await other.close()


async def _drain(client: RawClient) -> None:
    while True:
        await client.text()


async def join_stages(gw: Gateway, table: Table, n: int) -> None:
    manager, chat = gw.manager, gw.chat
    clients = [await RawClient.connect(gw.port) for _ in range(2)]
    clients[0].send('420["join","steady"]')
    await clients[0].until("430")
    sid = next(s for s, _ in manager.get_participants("/", "steady"))
    g = "join/leave"

    async def join_leave_subscribed() -> float:
        # the other client keeps "steady" subscribed: no broker operation
        start = time.perf_counter_ns()
        for _ in range(n):
            await chat.on_leave(sid, "steady")
            await chat.on_join(sid, "steady")
        return (time.perf_counter_ns() - start) / n / 2 / 1000

    other_sid = next(s for s, _ in manager.get_participants("/", None) if s != sid)
    await chat.on_join(other_sid, "steady")
    await table.add(g, "join or leave of a subscribed room (handler, hub)",
                    join_leave_subscribed)
    rounds = iter(range(1_000_000))

    async def new_rooms(batch: int) -> float:
        count = max(batch, min(n // 20, 400))
        chat.join_limiter.forget(sid)
        r = next(rounds)
        rooms = [f"new-{r}-{i}" for i in range(count)]
        cpu = time.process_time()
        for k in range(0, count, batch):
            chat.join_limiter.forget(sid)
            acks = await asyncio.gather(*(chat.on_join(sid, room)
                                          for room in rooms[k:k + batch]))
            assert all(a["ok"] for a in acks), acks
            for room in rooms[k:k + batch]:
                await chat.on_leave(sid, room)
        return (time.process_time() - cpu) / count * 1e6

    await table.add(g, "join of a room new to the node + leave, one at a time (CPU)",
                    lambda: new_rooms(1))
    await table.add(g, "join of a room new to the node + leave, 50 in one turn (CPU)",
                    lambda: new_rooms(50))
    for client in clients:
        await client.close()


async def main_async(n: int, repeat: int) -> Table:
    table = Table(repeat)
    async with nats_server() as url, gateway(url) as gw:
        await gw.manager.start()
        await chat_stages(gw, table, n)
        await join_stages(gw, table, n)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.stages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=5000, help="calls per stage and round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the median is shown")
    args = parser.parse_args(argv)
    table = asyncio.run(main_async(args.n, args.repeat))
    print(table.markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
