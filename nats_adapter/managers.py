"""The ready-made managers: the node core wired to one broker each.

``socketio.AsyncServer(client_manager=NatsManager(servers=[...]))`` is the whole
adoption. Keyword arguments other than the broker's go to
:class:`~nats_adapter.manager.ClusterManager`. Each broker module (and its client
library) is imported only when its manager is built.
"""

from __future__ import annotations

from typing import Any

from .brokers.memory import MemoryBus
from .manager import ClusterManager


class NatsManager(ClusterManager):
    """The python-socketio client manager on a NATS cluster (one subject per room).

    ``servers`` is a list of NATS URLs or a comma-separated string; it and the
    other broker arguments are :class:`~nats_adapter.brokers.nats.NatsBroker`'s.
    """

    name = "nats"

    def __init__(
        self,
        servers: list[str] | str = "nats://127.0.0.1:4222",
        *,
        connect_options: dict[str, Any] | None = None,
        connection_name: str = "socketio-gateway",
        pending_msgs_limit: int | None = None,
        ping_interval: int = 5,
        **kwargs: Any,
    ) -> None:
        from .brokers.nats import NatsBroker

        urls = [s.strip() for s in servers.split(",")] if isinstance(servers, str) else servers
        # replies (JetStream's, with recovery) come to an inbox under the gateways' own
        # prefix, so broker permissions can confine a gateway to that prefix; with a
        # NATS user, to an inbox under that user's name, so the broker can keep each
        # user to its own (infra/nats/node-secure.conf: the role user `gateway` reads
        # `sio.inbox.gateway.>`, never the operator's `_INBOX.>`)
        inbox = f"{kwargs.get('channel_prefix', 'sio')}.inbox"
        user = (connect_options or {}).get("user")
        if user:
            inbox = f"{inbox}.{user}"
        connect_options = {"inbox_prefix": inbox, **(connect_options or {})}
        super().__init__(NatsBroker(urls, connect_options=connect_options,
                                    connection_name=connection_name,
                                    pending_msgs_limit=pending_msgs_limit,
                                    ping_interval=ping_interval), **kwargs)


class RedisShardedManager(ClusterManager):
    """The python-socketio client manager on a Redis 7 Cluster's sharded pub/sub.

    ``url`` (a seed node) and ``connect_options`` are
    :class:`~nats_adapter.brokers.redis_sharded.RedisShardedBroker`'s.
    """

    name = "redis-sharded"

    def __init__(
        self,
        url: str = "redis://127.0.0.1:7000",
        *,
        connect_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from .brokers.redis_sharded import RedisShardedBroker

        super().__init__(RedisShardedBroker(url, connect_options=connect_options), **kwargs)


class MemoryManager(ClusterManager):
    """A manager on an in-process bus: one node alone, or several sharing ``bus``."""

    name = "memory"

    def __init__(self, bus: MemoryBus | None = None, **kwargs: Any) -> None:
        from .brokers.memory import MemoryBroker

        super().__init__(MemoryBroker(bus), **kwargs)
