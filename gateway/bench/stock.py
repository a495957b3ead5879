"""The baseline users run today: python-socketio's own ``AsyncRedisManager``.

Used by the benchmark (``--backend stock-redis``) behind the same chat handlers.
Its behaviour is python-socketio's, untouched; this subclass only counts what it
receives so the benchmark can report broker traffic and wasted receptions the
same way for every backend. Pointed at a Redis Cluster node, the same manager is
classic cluster pub/sub (PUBLISH copied to every node over the cluster bus).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import socketio

from nats_adapter.stats import ManagerStats


class _BrokerView:
    """The part of the broker interface /healthz and /metrics read."""

    name = "stock-redis"

    def __init__(self, manager: StockRedisManager) -> None:
        self._manager = manager

    @property
    def connected(self) -> bool:
        return bool(getattr(self._manager, "connected", False))

    def info(self) -> dict[str, Any]:
        return {"url": self._manager.redis_url.split("@")[-1], "channel": self._manager.channel}

    def losses(self) -> dict[str, int]:
        return {}


class StockRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    name = "stock-redis"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.stats = ManagerStats()
        self.broker = _BrokerView(self)
        self.subscriptions: list[str] = [self.channel]

    async def start(self) -> None:
        """Create the Redis client up front (python-socketio would on the first request)."""
        self._redis_connect()

    async def close(self) -> None:
        """python-socketio gives this manager no shutdown."""

    async def _listen(self) -> AsyncIterator[Any]:
        async for data in super()._listen():
            self.stats.received += 1
            self.stats.received_bytes += len(data)
            yield data

    async def _publish(self, data: Any) -> Any:
        self.stats.published += 1
        return await super()._publish(data)

    async def _handle_emit(self, message: dict[str, Any]) -> None:
        room = message.get("room")
        namespace = message.get("namespace") or "/"
        if message.get("host_id") != self.host_id and room is not None \
                and not any(True for _ in self.get_participants(namespace, room)):
            self.stats.unwanted += 1
        await super()._handle_emit(message)

    def participants_count(self) -> int:
        return sum(len(ns.get(None) or ()) for ns in self.rooms.values())

    def room_count(self) -> int:
        # python-socketio gives every socket a room named after its sid
        return sum(len(ns) - 1 - len(ns.get(None) or ()) for ns in self.rooms.values())
