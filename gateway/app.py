"""The aiohttp application of one gateway node."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import socketio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .chat import ChatProtocol
from .config import GatewayConfig
from .metrics import make_registry
from .types import GatewayManager

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CLIENT_JS = Path("node_modules") / "socket.io-client" / "dist" / "socket.io.min.js"

MANAGER_KEY = web.AppKey("manager", GatewayManager)
SIO_KEY = web.AppKey("sio", socketio.AsyncServer)
CONFIG_KEY = web.AppKey("config", GatewayConfig)
CHAT_KEY = web.AppKey("chat", ChatProtocol)


def make_manager(config: GatewayConfig) -> GatewayManager:
    """The client manager for ``config.backend``; concrete backends load only here."""
    linger = config.unsubscribe_linger
    if config.backend == "nats":
        from nats_adapter.nats_transport import NatsManager

        return NatsManager(list(config.nats_urls), unsubscribe_linger=linger,
                           connection_name=config.node_id)
    if config.backend == "redis-sharded":
        from nats_adapter.redis_transport import RedisShardedManager

        return RedisShardedManager(config.redis_url, unsubscribe_linger=linger)
    if config.backend == "stock-redis":
        from .stock import StockRedisManager

        return StockRedisManager(config.redis_url)
    from nats_adapter.memory_transport import MemoryManager

    return MemoryManager(unsubscribe_linger=linger)


def find_client_js(config: GatewayConfig) -> Path | None:
    """socket.io-client's browser bundle, installed by npm; None when it is not installed."""
    if config.client_js:
        path = Path(config.client_js)
        return path if path.is_file() else None
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / CLIENT_JS).is_file():
            return base / CLIENT_JS
    return None


def create_app(config: GatewayConfig, manager: GatewayManager | None = None) -> web.Application:
    manager = manager if manager is not None else make_manager(config)
    cors: Any = list(config.cors_origins) if config.cors_origins else None
    if config.cors_origins == ("*",):
        cors = "*"
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=manager,
        cors_allowed_origins=cors,
        max_http_buffer_size=config.limits.max_message_bytes,
    )
    app = web.Application()
    sio.attach(app)
    chat = ChatProtocol(sio, manager, config.limits)
    registry = make_registry(config.node_id, manager, chat)
    app[MANAGER_KEY] = manager
    app[SIO_KEY] = sio
    app[CONFIG_KEY] = config
    app[CHAT_KEY] = chat
    client_js = find_client_js(config)

    async def healthz(request: web.Request) -> web.Response:
        connected = manager.transport.connected
        body = {
            "node_id": config.node_id,
            "backend": config.backend,
            "broker_connected": connected,
            "connections": manager.participants_count(),
            "rooms": manager.room_count(),
            "broker": manager.transport.info(),
        }
        return web.json_response(body, status=200 if connected else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC / "index.html")

    async def vendor_client(request: web.Request) -> web.StreamResponse:
        if client_js is None:
            raise web.HTTPNotFound(
                text="socket.io-client is not installed: run `npm ci` in the repository"
            )
        return web.FileResponse(client_js)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.router.add_get("/vendor/socket.io.min.js", vendor_client)
    app.router.add_static("/static/", STATIC)

    async def start_manager(app: web.Application) -> None:
        await manager.start()

    async def close_sockets(app: web.Application) -> None:
        # aiohttp has stopped accepting connections. Closing the engine.io transport
        # (not a Socket.IO disconnect, which clients take as final) makes every
        # socket.io-client reconnect, through the load balancer, to another node.
        if sio.eio.sockets:
            logger.info("closing %d sockets so clients reconnect elsewhere",
                        len(sio.eio.sockets))
            await sio.eio.disconnect()
        await sio.shutdown()

    async def stop_manager(app: web.Application) -> None:
        await manager.close()  # drains: what was published reaches the broker

    app.on_startup.append(start_manager)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop_manager)
    return app
