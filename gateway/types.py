"""What the service needs from a client manager: ours, or another one given to
:func:`gateway.app.create_app` (the benchmark's stock baseline)."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any, Protocol

from nats_adapter.stats import ManagerStats


class BrokerView(Protocol):
    name: str

    @property
    def connected(self) -> bool: ...

    def info(self) -> dict[str, Any]: ...

    def losses(self) -> dict[str, int]: ...

    def repairs(self) -> dict[str, int]: ...


class GatewayManager(Protocol):
    """Implemented by ``nats_adapter.ClusterManager`` and the bench's ``StockRedisManager``."""

    stats: ManagerStats

    @property
    def broker(self) -> BrokerView: ...

    @property
    def subscriptions(self) -> Sized: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def confirm_published(self) -> None: ...

    def get_rooms(self, sid: str, namespace: str) -> list[str]: ...

    def participants_count(self) -> int: ...

    def room_count(self) -> int: ...
