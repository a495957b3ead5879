"""A subscription is confirmed only by a PONG to a PING sent after its SUB.

nats-py's ``flush()`` writes its PING straight to the socket while ``subscribe()``
leaves the SUB in the client's pending buffer for the flusher task: the PING can
reach the server first, and its PONG then "confirms" a subscription the server has
not seen (a join acked while the room's traffic does not reach this node yet). A
fake NATS server records the order in which commands arrive.
"""

from __future__ import annotations

import asyncio
import json

from nats_adapter.brokers.nats import NatsBroker
from tests.helpers import wait_for_condition

INFO = {"server_id": "fake", "version": "2.10.0", "proto": 1, "headers": True,
        "max_payload": 1 << 20, "host": "127.0.0.1", "port": 0}


class FakeNats:
    """Answers every PING with a PONG and records the commands it reads."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(f"INFO {json.dumps(INFO)}\r\n".encode())
        await writer.drain()
        while line := await reader.readline():
            command = line.decode().strip()
            self.commands.append(command)
            if command == "PING":
                writer.write(b"PONG\r\n")
                await writer.drain()


class Handler:
    def __init__(self) -> None:
        self.connected = False

    async def on_message(self, channel: str, data: bytes, seq: int | None = None) -> None:
        pass

    def on_connection_state(self, connected: bool) -> None:
        self.connected = connected


async def test_subscribe_returns_after_a_pong_to_a_ping_sent_after_its_sub() -> None:
    fake = FakeNats()
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    broker = NatsBroker([f"nats://127.0.0.1:{port}"])
    handler = Handler()
    try:
        await broker.start(handler, "sio.node.fake")
        await wait_for_condition(lambda: handler.connected, "the broker to connect")
        await broker.subscribe("sio.room.lobby")
        # everything the server had read when subscribe() returned: the last PING
        # (whose PONG released it) must come after the SUB
        seen = list(fake.commands)
        sub = next(i for i, c in enumerate(seen) if c.startswith("SUB sio.room.lobby "))
        last_ping = max(i for i, c in enumerate(seen) if c == "PING")
        assert last_ping > sub, seen
    finally:
        await broker.close()
        for writer in fake.writers:
            writer.close()
        server.close()
        await server.wait_closed()
