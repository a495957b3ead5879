"""Socket.IO client managers that relay room traffic between nodes through a broker.

``NatsManager`` (NATS, one subject per room) and ``RedisShardedManager`` (Redis 7
Cluster sharded pub/sub, one shard channel per room) share one node core,
:class:`~nats_adapter.manager.ClusterManager`; each transport is a small backend
behind :class:`~nats_adapter.transport.Transport`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .manager import ClusterManager, is_sid
from .stats import ManagerStats
from .transport import Transport, TransportError, TransportHandler

if TYPE_CHECKING:
    from .memory_transport import MemoryManager, MemoryTransport
    from .nats_transport import NatsManager, NatsTransport
    from .redis_transport import RedisShardedManager, RedisShardedTransport

__all__ = [
    "ClusterManager",
    "ManagerStats",
    "MemoryManager",
    "MemoryTransport",
    "NatsManager",
    "NatsTransport",
    "RedisShardedManager",
    "RedisShardedTransport",
    "Transport",
    "TransportError",
    "TransportHandler",
    "is_sid",
]

_LAZY = {
    "NatsManager": "nats_transport",
    "NatsTransport": "nats_transport",
    "RedisShardedManager": "redis_transport",
    "RedisShardedTransport": "redis_transport",
    "MemoryManager": "memory_transport",
    "MemoryTransport": "memory_transport",
}


def __getattr__(name: str) -> Any:
    # transports import their client library only when asked for
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nats_adapter' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)
