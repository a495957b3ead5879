"""Several nodes of the core in this process, talking over an in-process bus.

Each node is a real python-socketio ``AsyncServer`` on aiohttp with a
``MemoryManager``; all of them share one ``MemoryBus``. No broker process runs,
so this layer checks the core's routing, dedupe, linger and acks in seconds;
the same behaviour against real NATS and Redis is in ``tests/test_contract.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import pytest
import socketio
from aiohttp import web

from gateway.app import SIO_KEY, advertised_url, create_app
from gateway.config import GatewayConfig
from gateway.processes import free_ports
from nats_adapter import MemoryManager
from nats_adapter.brokers.memory import MemoryBus
from tests.helpers import SioClient

LINGER = 0.2


@dataclass
class CoreNode:
    name: str
    url: str
    sio: socketio.AsyncServer
    manager: MemoryManager
    runner: web.AppRunner


NodeFactory = Callable[..., Awaitable[CoreNode]]


@pytest.fixture
async def make_node() -> AsyncIterator[NodeFactory]:
    """Start nodes on one bus (``make_node(name, **manager_kwargs)``); all stop at teardown."""
    bus = MemoryBus()
    started: list[CoreNode] = []

    async def make(name: str, **kwargs: object) -> CoreNode:
        kwargs.setdefault("unsubscribe_linger", LINGER)
        manager = MemoryManager(bus, **kwargs)  # type: ignore[arg-type]
        sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager)
        app = web.Application()
        sio.attach(app)

        @sio.on("join")  # type: ignore[untyped-decorator]
        async def join(sid: str, room: str) -> dict[str, object]:
            await sio.enter_room(sid, room)
            return {"ok": True, "room": room}

        @sio.on("leave")  # type: ignore[untyped-decorator]
        async def leave(sid: str, room: str) -> dict[str, object]:
            await sio.leave_room(sid, room)
            return {"ok": True, "room": room}

        port = free_ports(1)[0]
        runner = web.AppRunner(app, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await manager.start()
        node = CoreNode(name, f"http://127.0.0.1:{port}", sio, manager, runner)
        started.append(node)
        return node

    try:
        yield make
    finally:
        for node in started:
            with contextlib.suppress(Exception):
                await node.runner.cleanup()
            with contextlib.suppress(Exception):
                await node.manager.close()


class HasServer(Protocol):
    @property
    def sio(self) -> socketio.AsyncServer: ...


async def settle(nodes: Sequence[HasServer], *clients: SioClient) -> None:
    """What a test waits for before it says nothing more arrived: a marker sent from
    every node to every client, after the traffic under test. Each node's memory
    broker hands messages on in the order they were published, and each socket's
    frames leave in order, so once a client has every marker, everything sent to it
    before them has arrived (a barrier, where a sleep would only guess)."""
    token = next(_markers)
    for node in nodes:
        for c in clients:
            await node.sio.emit(SETTLE_EVENT, token, to=c.sid)
    for c in clients:
        await c.wait_for(lambda r: r.received(SETTLE_EVENT).count(token) == len(nodes),
                         what="the settle markers")


SETTLE_EVENT = "_settle"
_markers = itertools.count()


@dataclass
class GatewayApp:
    """The whole gateway service (``create_app``: chat, guards, forwarding) on the
    memory bus."""

    url: str
    port: int
    app: web.Application
    manager: MemoryManager

    @property
    def sio(self) -> socketio.AsyncServer:
        return self.app[SIO_KEY]


@pytest.fixture
async def two_gateways() -> AsyncIterator[list[GatewayApp]]:
    bus = MemoryBus()
    runners: list[web.AppRunner] = []
    made: list[GatewayApp] = []
    try:
        for i in (1, 2):
            port = free_ports(1)[0]
            config = dataclasses.replace(GatewayConfig(), backend="memory", node_id=f"gw-{i}",
                                         port=port)
            manager = MemoryManager(bus, node_name=f"gw-{i}", node_url=advertised_url(config))
            app = create_app(config, manager)
            runner = web.AppRunner(app)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            made.append(GatewayApp(f"http://127.0.0.1:{port}", port, app, manager))
        yield made
    finally:
        for runner in runners:
            await runner.cleanup()
