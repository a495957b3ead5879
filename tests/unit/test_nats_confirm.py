"""A subscription is confirmed only by a PONG to a PING sent after its SUB.

nats-py's ``flush()`` writes its PING straight to the socket while ``subscribe()``
leaves the SUB in the client's pending buffer for the flusher task: the PING can
reach the server first, and its PONG then "confirms" a subscription the server has
not seen (a join acked while the room's traffic does not reach this node yet). A
fake NATS server records the order in which commands arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nats_adapter.brokers.base import BrokerError
from nats_adapter.brokers.nats import NatsBroker
from tests.helpers import wait_for_condition

INFO = {"server_id": "fake", "version": "2.10.0", "proto": 1, "headers": True,
        "max_payload": 1 << 20, "host": "127.0.0.1", "port": 0}


class FakeNats:
    """Answers every PING with a PONG and records the commands it reads."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.answering = True  # False: a server that reads on but answers no PING
        self.unanswered = 0

    async def answer_again(self) -> None:
        """Answer the PINGs left unanswered (late), and the next ones at once."""
        self.answering = True
        for writer in self.writers:
            writer.write(b"PONG\r\n" * self.unanswered)
            await writer.drain()
        self.unanswered = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(f"INFO {json.dumps(INFO)}\r\n".encode())
        await writer.drain()
        while line := await reader.readline():
            command = line.decode().strip()
            self.commands.append(command)
            if command.startswith("PUB "):  # its payload line
                self.commands.append((await reader.readline()).decode().strip())
            if command == "PING" and not self.answering:
                self.unanswered += 1
            elif command == "PING":
                writer.write(b"PONG\r\n")
                await writer.drain()


class Handler:
    def __init__(self) -> None:
        self.connected = False

    async def on_message(self, channel: str, data: bytes, seq: int | None = None) -> None:
        pass

    def on_connection_state(self, connected: bool) -> None:
        self.connected = connected


@contextlib.asynccontextmanager
async def broker_on(fake: FakeNats, **options: Any) -> AsyncIterator[NatsBroker]:
    server = await asyncio.start_server(fake.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    broker = NatsBroker([f"nats://127.0.0.1:{port}"], **options)
    handler = Handler()
    try:
        await broker.start(handler, "sio.node.fake")
        await wait_for_condition(lambda: handler.connected, "the broker to connect")
        yield broker
    finally:
        await broker.close()
        for writer in fake.writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_subscribe_returns_after_a_pong_to_a_ping_sent_after_its_sub() -> None:
    fake = FakeNats()
    async with broker_on(fake) as broker:
        await broker.subscribe("sio.room.lobby")
        # everything the server had read when subscribe() returned: the last PING
        # (whose PONG released it) must come after the SUB
        seen = list(fake.commands)
        sub = next(i for i, c in enumerate(seen) if c.startswith("SUB sio.room.lobby "))
        last_ping = max(i for i, c in enumerate(seen) if c == "PING")
        assert last_ping > sub, seen


async def test_the_subscribes_of_one_turn_share_one_confirmation_round() -> None:
    """Join churn: the SUBs of one loop turn go out together and one PING round
    after them confirms them all, instead of a round (two PINGs) each."""
    fake = FakeNats()
    async with broker_on(fake) as broker:
        before = fake.commands.count("PING")
        channels = [f"sio.room.r{i}" for i in range(20)]

        async def join(channel: str) -> None:
            await broker.subscribe(channel)
            seen = list(fake.commands)  # what the server had read when confirmed
            sub = next(i for i, c in enumerate(seen) if c.startswith(f"SUB {channel} "))
            assert max(j for j, c in enumerate(seen) if c == "PING") > sub, seen

        await asyncio.gather(*(join(channel) for channel in channels))
        assert fake.commands.count("PING") - before <= 2  # one round for 20
        # a subscribe of a later turn gets a round of its own, after its SUB
        await join("sio.room.later")


async def test_an_unconfirmed_subscribe_raises_and_the_next_one_is_confirmed() -> None:
    fake = FakeNats()
    async with broker_on(fake, confirm_timeout=0.2) as broker:
        fake.answering = False
        with pytest.raises(BrokerError, match="did not confirm the subscription"):
            await broker.subscribe("sio.room.unanswered")
        await fake.answer_again()
        await broker.subscribe("sio.room.answered")


async def test_a_publish_is_confirmed_by_a_pong_to_a_ping_sent_after_it() -> None:
    """What a chat's ack says: the server read the chat. The publishes of one loop
    turn share one confirmation round."""
    fake = FakeNats()
    async with broker_on(fake) as broker:
        before = fake.commands.count("PING")

        async def chat(i: int) -> None:
            await broker.publish("sio.room.lobby", f"chat {i}".encode())
            await broker.confirm_published()
            seen = list(fake.commands)  # what the server had read when confirmed
            assert max(j for j, c in enumerate(seen) if c == "PING") \
                > seen.index(f"chat {i}"), seen

        await asyncio.gather(*(chat(i) for i in range(20)))
        assert fake.commands.count("PING") - before <= 2  # one round for 20


async def test_an_unconfirmed_publish_raises_and_late_pongs_leave_the_connection_working(
        ) -> None:
    """A chat the server does not confirm in time is refused. The PONGs that come
    late must not break the client: nats-py's ``flush(timeout=)`` cancels its future
    on a timeout and the late PONG then stops nats-py's read loop (a deaf
    connection), so the next confirmation would never come."""
    fake = FakeNats()
    async with broker_on(fake, publish_confirm_timeout=0.2) as broker:
        fake.answering = False
        await broker.publish("sio.room.lobby", b"into the void")
        with pytest.raises(BrokerError, match="did not confirm the publish"):
            await broker.confirm_published()
        await fake.answer_again()
        await broker.publish("sio.room.lobby", b"later")
        await broker.confirm_published()
