"""In-process transport: nodes that share one :class:`MemoryHub` talk to each other.

For a single node with no broker (``--backend memory``) and for tests of the core
that need no network. Delivery is in-order per channel and at most once; like
NATS with no-echo, a node never receives its own publications.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .manager import ClusterManager
from .transport import Transport, TransportError, TransportHandler

logger = logging.getLogger(__name__)


class MemoryHub:
    """The shared "broker" of a set of :class:`MemoryTransport` objects."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[MemoryTransport]] = {}


class MemoryTransport(Transport):
    name = "memory"

    def __init__(self, hub: MemoryHub | None = None) -> None:
        self.hub = hub if hub is not None else MemoryHub()
        self._handler: TransportHandler | None = None
        self._channels: set[str] = set()
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def start(self, handler: TransportHandler, control_channel: str) -> None:
        self._handler = handler
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await self.subscribe(control_channel)
        handler.on_connection_state(True)

    async def _read(self) -> None:
        assert self._handler is not None
        while True:
            channel, data = await self._queue.get()
            await self._handler.on_message(channel, data)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        self.hub.subscribers.setdefault(channel, set()).add(self)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        subs = self.hub.subscribers.get(channel)
        if subs is not None:
            subs.discard(self)
            if not subs:
                del self.hub.subscribers[channel]

    async def publish(self, channel: str, data: bytes) -> None:
        if not self.connected:
            raise TransportError("memory transport is not started")
        for transport in self.hub.subscribers.get(channel, ()):
            if transport is not self:
                transport._queue.put_nowait((channel, data))

    async def close(self) -> None:
        for channel in list(self._channels):
            await self.unsubscribe(channel)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    def info(self) -> dict[str, Any]:
        return {"subscriptions": len(self._channels)}


class MemoryManager(ClusterManager):
    """A :class:`ClusterManager` on an in-process hub (one node unless a hub is shared)."""

    name = "memory"

    def __init__(self, hub: MemoryHub | None = None, **kwargs: Any) -> None:
        super().__init__(MemoryTransport(hub), **kwargs)
