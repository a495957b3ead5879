"""In-process broker: nodes that share one :class:`MemoryBus` talk to each other.

For a single node with no broker (``--backend memory``) and for fast tests of the
core with several nodes in one process. Delivery is in-order per channel and at
most once; like NATS with no-echo, a node never receives its own publications.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .base import Broker, BrokerError, BrokerHandler


class MemoryBus:
    """The shared "broker" of a set of :class:`MemoryBroker` objects (one per node)."""

    def __init__(self) -> None:
        self.subscribers: dict[str, set[MemoryBroker]] = {}


class MemoryBroker(Broker):
    name = "memory"
    echoes = False  # no-echo

    def __init__(self, bus: MemoryBus | None = None) -> None:
        self.bus = bus if bus is not None else MemoryBus()
        self._handler: BrokerHandler | None = None
        self._channels: set[str] = set()
        self._queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._reader is not None and not self._reader.done()

    async def start(self, handler: BrokerHandler, control_channel: str) -> None:
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
        self.bus.subscribers.setdefault(channel, set()).add(self)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        subs = self.bus.subscribers.get(channel)
        if subs is not None:
            subs.discard(self)
            if not subs:
                del self.bus.subscribers[channel]

    async def publish(self, channel: str, data: bytes) -> None:
        if not self.connected:
            raise BrokerError("memory broker is not started")
        for broker in self.bus.subscribers.get(channel, ()):
            if broker is not self:
                broker._queue.put_nowait((channel, data))

    async def close(self) -> None:
        for channel in list(self._channels):
            await self.unsubscribe(channel)
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    def info(self) -> dict[str, Any]:
        return {"subscriptions": len(self._channels)}
