"""The aiohttp application of one gateway node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import socketio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from socketio.exceptions import ConnectionRefusedError as Refused

from nats_adapter import ClusterManager, FanoutLimits
from nats_adapter.recovery import IdentityFn
from nats_adapter.shutdown import close_websockets

from .chat import ChatProtocol, TokenRules, verify_token
from .config import GatewayConfig
from .guards import RequestGuard
from .http_api import HttpApi
from .metrics import make_registry
from .serving import CONNECTIONS_KEY, ConnectionCounts
from .types import GatewayManager

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
CLIENT_JS = Path("node_modules") / "socket.io-client" / "dist" / "socket.io.min.js"
#: seconds a shutting-down gateway waits for its broker connection to drain and close
BROKER_CLOSE_TIMEOUT = 15.0
#: seconds a shutting-down gateway waits for clients to acknowledge engine.io's close
SOCKETS_CLOSE_TIMEOUT = 3.0

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
    if secrets.redis_tls_ca:
        options["ssl_ca_certs"] = secrets.redis_tls_ca  # with a rediss:// URL
    return options


def connection_identity(config: GatewayConfig) -> IdentityFn | None:
    """Who a connection is, for connection state recovery: with ``--auth jwt`` the
    ``sub`` of the token in its CONNECT auth, verified as the connect handler will
    (a restore by another user is a new session)."""
    if config.auth != "jwt":
        return None
    rules = TokenRules(config.secrets.jwt_secret, config.jwt_leeway, config.jwt_issuer,
                       config.jwt_audience)

    def identity(auth: Any, environ: dict[str, Any]) -> str | None:
        token = auth.get("token") if isinstance(auth, dict) else None
        try:
            return verify_token(token, rules).subject
        except Refused:
            return None

    return identity


def make_manager(config: GatewayConfig) -> GatewayManager:
    """The client manager for ``config.backend``; concrete backends load only here."""
    common: dict[str, Any] = {
        "unsubscribe_linger": config.unsubscribe_linger,
        "subscribe_timeout": config.subscribe_timeout,
        "node_name": config.node_id,
        "heartbeat_interval": config.heartbeat_interval,
        "fanout_limits": FanoutLimits(config.limits.max_send_buffer_bytes,
                                      config.limits.max_send_queue_packets),
        # other nodes may do to a socket only what its client could
        "max_room_chars": config.limits.max_room_chars,
        "max_rooms_per_socket": config.limits.max_rooms_per_socket,
        "cluster_key": config.secrets.cluster_key.encode() or None,
    }
    if config.backend == "nats":
        from nats_adapter import NatsManager
        from nats_adapter.recovery import RecoveryOptions

        recovery = RecoveryOptions(config.recovery_window, identity=connection_identity(config)) \
            if config.recovery else None
        return NatsManager(list(config.nats_urls), connection_name=config.node_id,
                           connect_options=nats_options(config), recovery=recovery, **common)
    if config.backend == "redis-sharded":
        from nats_adapter import RedisShardedManager

        return RedisShardedManager(config.redis_url, connect_options=redis_options(config),
                                   **common)
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
    guard = RequestGuard(config)
    app = web.Application(client_max_size=config.limits.max_message_bytes,
                          middlewares=[guard.middleware])
    sio.attach(app)
    chat = ChatProtocol(sio, manager, config)
    refuse_binary(sio, chat)
    if config.secrets.admin_password and isinstance(manager, ClusterManager):
        # the Socket.IO Admin UI, over every gateway of the cluster
        from nats_adapter.admin import ClusterInstrumentedServer

        ClusterInstrumentedServer(sio, auth={"username": "admin",
                                             "password": config.secrets.admin_password},
                                  mode=config.admin_mode)
    connections = ConnectionCounts()
    app[CONNECTIONS_KEY] = connections
    registry = make_registry(config.node_id, manager, chat, guard, connections)
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

    api = HttpApi(chat, config)
    app.router.add_post("/api/rooms/{room}/messages", api.publish)
    app.router.add_get("/api/rooms/{room}", api.room)
    app.router.add_get("/api/rooms/{room}/messages", api.messages)
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
            # engine.io waits for each client to hang up: not for long
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SOCKETS_CLOSE_TIMEOUT):
                    await sio.eio.disconnect()
            # ...then hangs up on them
            await close_websockets(sockets)
            logger.info("sockets closed")
        await sio.shutdown()

    async def stop_manager(app: web.Application) -> None:
        logger.info("draining the broker connection")
        try:  # drains: what was published reaches the broker, if a broker answers
            async with asyncio.timeout(BROKER_CLOSE_TIMEOUT):
                await manager.close()
        except TimeoutError:
            logger.warning("the broker connection did not close within %.0f s: left behind",
                           BROKER_CLOSE_TIMEOUT)
            return
        logger.info("broker connection drained and closed")

    app.on_startup.append(start_manager)
    app.on_shutdown.append(close_sockets)
    app.on_cleanup.append(stop_manager)
    return app


def refuse_binary(sio: socketio.AsyncServer, chat: ChatProtocol) -> None:
    """Disconnect a socket that sends binary packets: the chat protocol has none, and
    python-socketio would buffer attachments until a count the client declares (up to
    ten digits) arrives."""
    handle = sio.eio.handlers["message"]
    closing: set[asyncio.Task[None]] = set()

    async def hang_up(eio_sid: str) -> None:
        socket = sio.eio.sockets.get(eio_sid)
        await sio.eio.disconnect(eio_sid)  # engine.io's CLOSE packet...
        if socket is not None:
            await close_websockets([socket])  # ...and no waiting for the client to obey

    async def on_message(eio_sid: str, data: str | bytes) -> None:
        # 5: BINARY_EVENT, 6: BINARY_ACK; bytes: an attachment
        if isinstance(data, bytes) or data[:1] in ("5", "6"):
            chat.refused["binary"] += 1
            logger.info("disconnecting %s: binary packets are not part of the chat protocol",
                        eio_sid)
            # not awaited here: this runs inside the socket's read loop, which must go on
            # reading for the close handshake to complete
            task = asyncio.get_running_loop().create_task(hang_up(eio_sid))
            closing.add(task)
            task.add_done_callback(closing.discard)
            return
        await handle(eio_sid, data)

    sio.eio.on("message", on_message)
