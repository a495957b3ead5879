"""The baseline users run today: python-socketio's own ``AsyncRedisManager``.

The benchmark's ``stock-redis`` gateways: the gateway's app and chat handlers with this
manager, served by this module (``python -m tools.bench.stock``, the gateway's flags;
the product has no such backend). Its behaviour is python-socketio's, untouched; this
subclass only counts what it receives so the benchmark can report broker traffic and
wasted receptions the same way for every backend. Pointed at a Redis Cluster node,
the same manager is classic cluster pub/sub (PUBLISH copied to every node over the
cluster bus).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import socketio

from gateway import config as cfg
from gateway.cli import serve
from gateway.processes import REPO_ROOT, GatewayNode, spawn
from nats_adapter.stats import ManagerStats

#: what /healthz names as the backend of a stock gateway
STOCK = "stock-redis"


class _BrokerView:
    """The part of the broker interface /healthz and /metrics read."""

    name = STOCK

    def __init__(self, manager: StockRedisManager) -> None:
        self._manager = manager

    @property
    def connected(self) -> bool:
        return bool(getattr(self._manager, "connected", False))

    def info(self) -> dict[str, Any]:
        return {"url": self._manager.redis_url.split("@")[-1], "channel": self._manager.channel}

    def losses(self) -> dict[str, int]:
        return {}

    def repairs(self) -> dict[str, int]:
        return {}


class StockRedisManager(socketio.AsyncRedisManager):  # type: ignore[misc]
    name = STOCK

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

    async def confirm_published(self) -> None:
        """Redis's PUBLISH returned once Redis took it: nothing left to confirm."""

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


def start(workdir: Path, node_id: str, port: int, broker_args: Sequence[str],
          host: str = "127.0.0.1", extra: Sequence[str] = ()) -> GatewayNode:
    """A stock gateway as a child process (``broker_args``: ``--redis-url URL``)."""
    node = GatewayNode(node_id, host, port)
    argv = [sys.executable, "-m", "tools.bench.stock", "--host", host, "--port", str(port),
            "--node-id", node_id, *broker_args, *extra]
    node.child = spawn(node_id, argv, workdir, cwd=REPO_ROOT)
    return node


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gateway serve`` with python-socketio's AsyncRedisManager on
    ``--redis-url`` (one Redis, or a Redis Cluster node for classic cluster pub/sub)."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench.stock",
                                     description="a gateway on python-socketio's "
                                                 "AsyncRedisManager (the bench's baseline)")
    cfg.add_arguments(parser)  # --backend and the NATS flags are there, and ignored
    args = parser.parse_args(argv)
    try:
        conf = cfg.from_args(args)
    except cfg.ConfigError as exc:
        print(f"stock gateway: error: {exc}", file=sys.stderr)
        return 2
    conf = dataclasses.replace(conf, backend=STOCK)
    return serve(conf, StockRedisManager(conf.redis_url))


if __name__ == "__main__":
    sys.exit(main())
