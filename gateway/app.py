"""The aiohttp application of one gateway node."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import socketio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nats_adapter import FanoutLimits
from nats_adapter.shutdown import close_websockets

from .chat import ChatProtocol, json_type
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


def nats_options(config: GatewayConfig) -> dict[str, Any]:
    """nats.connect() credentials and TLS, from the environment (never from flags)."""
    secrets, options = config.secrets, dict[str, Any]()
    if secrets.nats_user:
        options["user"] = secrets.nats_user
        options["password"] = secrets.nats_password
    if secrets.nats_tls_ca:
        import ssl

        options["tls"] = ssl.create_default_context(cafile=secrets.nats_tls_ca)
    return options


def redis_options(config: GatewayConfig) -> dict[str, Any]:
    secrets, options = config.secrets, {}
    if secrets.redis_password:
        options["password"] = secrets.redis_password
    if secrets.redis_username:
        options["username"] = secrets.redis_username
    return options


def make_manager(config: GatewayConfig) -> GatewayManager:
    """The client manager for ``config.backend``; concrete backends load only here."""
    common: dict[str, Any] = {
        "unsubscribe_linger": config.unsubscribe_linger,
        "subscribe_timeout": config.subscribe_timeout,
        "fanout_limits": FanoutLimits(config.limits.max_send_buffer_bytes,
                                      config.limits.max_send_queue_packets),
    }
    if config.backend == "nats":
        from nats_adapter import NatsManager

        return NatsManager(list(config.nats_urls), connection_name=config.node_id,
                           connect_options=nats_options(config), **common)
    if config.backend == "redis-sharded":
        from nats_adapter import RedisShardedManager

        return RedisShardedManager(config.redis_url, connect_options=redis_options(config),
                                   **common)
    if config.backend == "stock-redis":
        from .bench.stock import StockRedisManager

        return StockRedisManager(config.redis_url)
    from nats_adapter import MemoryManager

    return MemoryManager(**common)


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
    app = web.Application(client_max_size=config.limits.max_message_bytes)
    sio.attach(app)
    chat = ChatProtocol(sio, manager, config)
    registry = make_registry(config.node_id, manager, chat)
    app[MANAGER_KEY] = manager
    app[SIO_KEY] = sio
    app[CONFIG_KEY] = config
    app[CHAT_KEY] = chat
    client_js = find_client_js(config)

    async def healthz(request: web.Request) -> web.Response:
        connected = manager.broker.connected
        body = {
            "node_id": config.node_id,
            "backend": config.backend,
            "broker_connected": connected,
            "connections": manager.participants_count(),
            "rooms": manager.room_count(),
            "broker": manager.broker.info(),
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

    async def publish(request: web.Request) -> web.Response:
        """POST /api/rooms/{room}/messages {"text": str, "from"?: str}: for backend services."""
        if config.auth == "jwt":
            expected = config.secrets.api_key
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
                chat.refused["unauthenticated"] += 1
                return web.json_response(
                    {"ok": False, "error": "unauthorized: send Authorization: Bearer <API key>"},
                    status=401)
        room, error = chat.check_room(request.match_info["room"])
        if room is None:
            return _bad(chat, error or "bad room")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _bad(chat, "body must be JSON")
        if not isinstance(body, dict):
            return _bad(chat, f"body must be a JSON object, not {json_type(body)}")
        problem = chat.check_text(body.get("text"))
        if problem is not None:
            return _bad(chat, problem[1])
        sender = body.get("from", "api")
        if not isinstance(sender, str) or not 1 <= len(sender) <= 64:
            return _bad(chat, "from must be a string of 1-64 characters")
        msg_id = await chat.publish(room, body["text"], sender)
        return web.json_response({"ok": True, "id": msg_id, "room": room}, status=202)

    app.router.add_post("/api/rooms/{room}/messages", publish)
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
            sockets = list(sio.eio.sockets.values())
            await sio.eio.disconnect()
            # engine.io waits for each client to hang up; hang up on them instead
            await close_websockets(sockets)
            logger.info("sockets closed")
        await sio.shutdown()

    async def stop_manager(app: web.Application) -> None:
        logger.info("draining the broker connection")
        await manager.close()  # drains: what was published reaches the broker
        logger.info("broker connection drained and closed")

    app.on_startup.append(start_manager)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop_manager)
    return app


def _bad(chat: ChatProtocol, reason: str) -> web.Response:
    chat.refused["bad_request"] += 1
    return web.json_response({"ok": False, "error": reason}, status=400)
