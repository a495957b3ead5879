"""Socket.IO client managers that relay room traffic between nodes through a broker.

``NatsManager`` (NATS, one subject per room) and ``RedisShardedManager`` (Redis 7
Cluster sharded pub/sub, one shard channel per room) share one node core,
:class:`~nats_adapter.manager.ClusterManager`, which keeps local sockets in a
:class:`~nats_adapter.hub.LocalHub` and talks to other nodes through a
:class:`~nats_adapter.brokers.Broker`.
"""

from __future__ import annotations

from .brokers.base import Broker, BrokerError, BrokerHandler, BrokerUnconfirmed
from .hub import FanoutLimits, LocalHub
from .manager import ClusterManager
from .managers import MemoryManager, NatsManager, RedisShardedManager
from .sids import is_sid
from .stats import ManagerStats
from .subscriptions import SubscriptionError

__all__ = [
    "Broker",
    "BrokerError",
    "BrokerHandler",
    "BrokerUnconfirmed",
    "ClusterManager",
    "FanoutLimits",
    "LocalHub",
    "ManagerStats",
    "MemoryManager",
    "NatsManager",
    "RedisShardedManager",
    "SubscriptionError",
    "is_sid",
]
