"""The aiohttp application of one gateway node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import socketio
from aiohttp import web
from engineio import exceptions as eio_exceptions
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from socketio import packet as sio_packet
from socketio.exceptions import ConnectionRefusedError as Refused

from nats_adapter import ClusterManager, FanoutLimits
from nats_adapter.recovery import IdentityFn
from nats_adapter.shutdown import close_websockets

from .chat import REMOTE_KEY, ChatProtocol, TokenRules, verify_token
from .config import GatewayConfig
from .forwarding import Forwarder
from .guards import OPERATOR, RequestGuard, SessionsByAddress
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
FORWARDER_KEY = web.AppKey("forwarder", Forwarder)
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


def advertised_url(config: GatewayConfig) -> str:
    """Where the other gateways reach this one (``--advertise-url``, else the listening
    address, else, listening on every address, this host's)."""
    if config.advertise_url:
        return config.advertise_url
    host = config.host
    if host in ("", "0.0.0.0", "::"):
        try:
            host = socket.gethostbyname(socket.gethostname())
        except OSError:
            logger.warning("no address of this host to advertise: set --advertise-url, or "
                           "requests of this gateway's sessions that reach another fail")
            return ""
    return f"http://[{host}]:{config.port}" if ":" in host else f"http://{host}:{config.port}"


def make_manager(config: GatewayConfig) -> GatewayManager:
    """The client manager for ``config.backend``; concrete backends load only here."""
    common: dict[str, Any] = {
        "node_url": advertised_url(config),
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
        serializer=CheckedPacket,
        json=SafeJson,
    )
    guard = RequestGuard(config)
    middlewares = [guard.middleware]
    forwarder: Forwarder | None = None
    if isinstance(manager, ClusterManager):
        # any gateway serves any session: requests of another's go to the owner
        forwarder = Forwarder(manager, "/socket.io",
                              read_timeout=sio.eio.ping_interval + sio.eio.ping_timeout + 5,
                              max_message_bytes=config.limits.max_message_bytes)
        # a token's grant (--auth jwt) stays with the gateway that checked it: such
        # sessions are spliced, never moved
        forwarder.move = config.upgrade_move and config.auth == "off" \
            and not config.connect_proxy
        middlewares.append(forwarder.middleware)
    app = web.Application(client_max_size=config.limits.max_message_bytes,
                          middlewares=middlewares)
    sio.attach(app)
    chat = ChatProtocol(sio, manager, config)
    if config.otel:  # imports the OpenTelemetry SDK: only then
        from .tracing import start_tracing

        tracing = start_tracing(config.node_id)
        tracing.trace(sio, chat.on_chat, manager)
    if isinstance(manager, ClusterManager):
        manager.handover.on_given.append(chat.forget_moved)
    guard.refusals = chat.refused
    if config.secrets.admin_password and isinstance(manager, ClusterManager):
        # the Socket.IO Admin UI, over every gateway of the cluster
        from .admin_ui import GatewayAdmin

        GatewayAdmin(sio, auth={"username": "admin",
                                             "password": config.secrets.admin_password},
                                  mode=config.admin_mode)
    # after the Admin UI, which sets engine.io's connect handler of its own
    guard_packets(sio, chat, guard.sessions)
    connections = ConnectionCounts()
    app[CONNECTIONS_KEY] = connections
    registry = make_registry(config.node_id, manager, chat, guard, connections, forwarder)
    app[MANAGER_KEY] = manager
    app[SIO_KEY] = sio
    app[CONFIG_KEY] = config
    app[CHAT_KEY] = chat
    client_js = find_client_js(config)

    async def healthz(request: web.Request) -> web.Response:
        connected = manager.broker.connected
        body: dict[str, Any] = {
            "node_id": config.node_id,
            "backend": config.backend,
            "broker_connected": connected,
        }
        if request.get(OPERATOR):  # the details: for operators only (broker URLs...)
            body.update(connections=manager.participants_count(), rooms=manager.room_count(),
                        broker=manager.broker.info())
            fast_paths = getattr(manager, "fast_paths", None)
            if fast_paths is not None:  # which upstream privates are in use, and why not
                body["fast_paths"] = fast_paths()
        return web.json_response(body, status=200 if connected else 503)

    async def metrics(request: web.Request) -> web.Response:
        if not request.get(OPERATOR):
            raise web.HTTPNotFound()
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

    api = HttpApi(chat, config, guard.api_key)
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

    async def close_chat(_: web.Application) -> None:
        await chat.close()

    app.on_cleanup.append(close_chat)
    if forwarder is not None:
        app[FORWARDER_KEY] = forwarder

        async def close_forwarder(_: web.Application) -> None:
            await forwarder.close()

        app.on_cleanup.append(close_forwarder)
    if config.otel:  # last: the spans of the final deliveries are exported too
        app.on_cleanup.append(lambda _: tracing.close())
    return app


class SafeJson:
    """The ``json`` module for engine.io and Socket.IO packets, but for a document
    nested too deep, which is a ``ValueError`` like any other bad JSON (engine.io
    catches those; a ``RecursionError`` escaped it with a traceback).

    orjson does the work (a packet's JSON was the dearest step of a chat after the
    websocket parse: ``python -m tools.bench.stages``); whatever orjson refuses goes
    to the ``json`` module, which decides as before: a lone surrogate, NaN or
    Infinity in a client's packet, keys that are not strings; so does a document
    with a number of 19 digits or more (orjson reads an integer past 64 bits as a
    float, ``json`` exactly).
    What orjson writes differs from ``json`` only in spelling: characters past ASCII
    as UTF-8 rather than ``\\u`` escapes, and NaN or Infinity (not JSON) as null.
    """

    @staticmethod
    def loads(s: str | bytes, **kwargs: Any) -> Any:
        long_number = _LONG_NUMBER.search(s) if isinstance(s, str) \
            else _LONG_NUMBER_BYTES.search(s)
        if not kwargs and long_number is None:
            try:
                return orjson.loads(s)
            except orjson.JSONDecodeError:
                pass  # json decides: it accepts a little more, and says why not
        try:
            return json.loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deep") from None

    @staticmethod
    def dumps(obj: Any, **kwargs: Any) -> str:
        # python-socketio asks for compact separators, which is all orjson writes
        if not kwargs or kwargs == _COMPACT:
            try:
                return orjson.dumps(obj).decode()
            except TypeError:  # orjson.JSONEncodeError: json decides
                pass
        return json.dumps(obj, **kwargs)


_COMPACT = {"separators": (",", ":")}
#: digits enough for an integer orjson would not read exactly
_LONG_NUMBER = re.compile(r"\d{19}")
_LONG_NUMBER_BYTES = re.compile(rb"\d{19}")


class MalformedPacket(ValueError):
    """A client sent a Socket.IO packet that does not decode, or not to a packet a
    client may send."""


#: JSON values that hold nothing (no bytes) inside
_SCALARS = frozenset((str, int, float, bool, type(None)))

#: the Admin UI's namespace
ADMIN_NAMESPACE = "/admin"

#: packet types a client may send (CONNECT_ERROR is the server's)
_CLIENT_TYPES = frozenset({sio_packet.CONNECT, sio_packet.DISCONNECT, sio_packet.EVENT,
                           sio_packet.ACK, sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK})


class CheckedPacket(sio_packet.Packet):  # type: ignore[misc]
    """python-socketio's packet, whose ``decode`` raises :class:`MalformedPacket` for
    anything python-socketio would fail on further in (a bad JSON body, an event that
    is not a list headed by a name, an unknown type) instead of raising deep inside
    the server, where the traceback reaches the log and the socket stays open."""

    @classmethod
    def data_is_binary(cls, data: Any) -> bool:
        """Whether ``data`` holds bytes (then it travels as a binary packet): what
        python-socketio's check answers, without its lists and reduce at every level
        (5% of a chat's CPU: every packet built is checked)."""
        if isinstance(data, list):
            items: Iterable[Any] = data
        elif isinstance(data, dict):
            items = data.values()
        else:
            return isinstance(data, bytes | bytearray)
        for item in items:  # noqa: SIM110 (a loop costs less than any() of a generator)
            if type(item) not in _SCALARS and cls.data_is_binary(item):
                return True
        return False

    def decode(self, encoded_packet: Any) -> Any:
        try:
            count = super().decode(encoded_packet)
        except Exception as exc:  # the decoder's own: ValueError, IndexError, Recursion...
            raise MalformedPacket(f"undecodable packet ({type(exc).__name__})") from None
        data = self.data
        if self.packet_type not in _CLIENT_TYPES:
            raise MalformedPacket(f"packet type {self.packet_type} is not a client's")
        if self.packet_type in (sio_packet.EVENT, sio_packet.BINARY_EVENT) and not (
                isinstance(data, list) and data and isinstance(data[0], str)):
            raise MalformedPacket("an event must be a list headed by the event name")
        if self.packet_type in (sio_packet.ACK, sio_packet.BINARY_ACK) and not (
                isinstance(data, list) and self.id is not None):
            raise MalformedPacket("an ack must carry an id and a list")
        if self.packet_type == sio_packet.CONNECT and data is not None \
                and not isinstance(data, dict):
            raise MalformedPacket("a CONNECT's auth must be an object")
        return count


def guard_packets(sio: socketio.AsyncServer, chat: ChatProtocol,
                  sessions: SessionsByAddress | None = None) -> None:
    """Close a socket that sends a malformed or binary packet, counting it
    (``gateway_requests_refused_total{reason="malformed"|"binary"}``) and logging
    only now and then: one bad packet must not cost a traceback in the log.

    Binary packets are not part of the chat protocol, and python-socketio would
    buffer attachments until a count the client declares (up to ten digits) arrives.

    A long-polling POST whose payload engine.io cannot decode ends its session with
    a 400 (engine.io logged a traceback for it and kept the session).
    """
    handle = sio.eio.handlers["message"]
    connect = sio.eio.handlers["connect"]
    disconnect = sio.eio.handlers["disconnect"]
    sessions = sessions if sessions is not None else SessionsByAddress(0, 1e9, 1)
    closing: set[asyncio.Task[None]] = set()
    #: engine.io sockets opened by an operator (see gateway.guards)
    operators: weakref.WeakSet[Any] = weakref.WeakSet()

    async def hang_up(eio_sid: str) -> None:
        socket = sio.eio.sockets.get(eio_sid)
        if socket is None:
            return
        if socket.upgraded:  # a websocket
            await sio.eio.disconnect(eio_sid)  # engine.io's CLOSE packet...
            await close_websockets([socket])  # ...and no waiting for the client to obey
        else:  # long-polling: the CLOSE waits for the next poll, if one ever comes
            await end_polling(socket)

    async def end_polling(socket: Any) -> None:
        await socket.close(wait=False, reason=sio.eio.reason.TRANSPORT_ERROR)
        sio.eio.sockets.pop(socket.sid, None)

    def count(reason: str, eio_sid: str, why: str) -> None:
        chat.refused[reason] += 1
        n = chat.refused[reason]
        if n == 1 or n % 1000 == 0:
            logger.info("disconnecting %s: %s (%d such sockets so far)", eio_sid, why, n)

    def refuse(eio_sid: str, reason: str, why: str) -> None:
        count(reason, eio_sid, why)
        # not awaited here: this runs inside the socket's read loop, which must go on
        # reading for the close handshake to complete
        task = asyncio.get_running_loop().create_task(hang_up(eio_sid))
        closing.add(task)
        task.add_done_callback(closing.discard)

    def check_polling(socket: Any) -> None:
        post = socket.handle_post_request

        async def checked_post(environ: dict[str, Any]) -> None:
            try:
                await post(environ)
            except eio_exceptions.EngineIOError:
                raise  # engine.io's own: it ends the session, and answers 400
            except Exception:  # a payload that does not decode (ValueError, IndexError)
                count("malformed", socket.sid, "an undecodable long-polling payload")
                # closed without waiting for a poll to take the CLOSE: engine.io's
                # disconnect() next (for the EngineIOError) would wait for it
                await socket.close(wait=False, reason=sio.eio.reason.TRANSPORT_ERROR)
                raise eio_exceptions.EngineIOError("undecodable payload") from None

        socket.handle_post_request = checked_post

    # the POSTs engine.io could not decode end before it sees them (nats_adapter's
    # polling rules); counted here with the rest
    watch_polling = getattr(sio.manager, "on_undecodable_polling_payload", None)
    if watch_polling is not None:
        watch_polling(lambda eio_sid: count("malformed", eio_sid,
                                            "an undecodable long-polling payload"))

    async def on_connect(eio_sid: str, environ: dict[str, Any]) -> Any:
        request = environ.get("aiohttp.request")
        # the client's address (after the proxy rules) outlives the request, which a
        # websocket's environ drops (see nats_adapter._engineio.connection)
        environ[REMOTE_KEY] = str(getattr(request, "remote", None) or "?")
        socket = sio.eio.sockets.get(eio_sid)
        if socket is not None:
            check_polling(socket)
            if request is not None and request.get(OPERATOR):
                operators.add(socket)
        accepted = await connect(eio_sid, environ)
        if accepted is None or accepted is True:  # engine.io's test for a refusal
            sessions.opened(eio_sid, environ[REMOTE_KEY])
        return accepted

    async def on_disconnect(eio_sid: str, *args: Any) -> Any:
        try:
            return await disconnect(eio_sid, *args)
        finally:
            sessions.closed(eio_sid)
            chat.engine_closed(eio_sid)

    async def on_message(eio_sid: str, data: Any) -> None:
        # 5: BINARY_EVENT, 6: BINARY_ACK; bytes: an attachment
        if isinstance(data, bytes) or (isinstance(data, str) and data[:1] in ("5", "6")):
            refuse(eio_sid, "binary", "binary packets are not part of the chat protocol")
            return
        if not isinstance(data, str):  # engine.io decodes a message that is JSON: 4{}, 4null
            refuse(eio_sid, "malformed", "a message that is not a Socket.IO packet")
            return
        if not data:  # python-socketio would take "4" for an EVENT without data
            refuse(eio_sid, "malformed", "an empty packet")
            return
        try:
            if data[:1] == "0" and sio.eio.sockets.get(eio_sid) not in operators \
                    and CheckedPacket(encoded_packet=data).namespace == ADMIN_NAMESPACE:
                # the Admin UI's namespace: for the operator listener (or loopback / API
                # key). Decided on the decoded packet: "00-/admin" (an attachment count)
                # is a CONNECT to /admin too.
                refuse(eio_sid, "forbidden", "the Admin UI is for operators")
                return
            if data[:1] == "3" and not ack_expected(eio_sid, CheckedPacket(encoded_packet=data)):
                # python-socketio would log a warning for each one
                refuse(eio_sid, "malformed", "an ack for nothing the server asked")
                return
            await handle(eio_sid, data)
        except MalformedPacket as exc:
            refuse(eio_sid, "malformed", str(exc))

    def ack_expected(eio_sid: str, pkt: Any) -> bool:
        sid = sio.manager.sid_from_eio_sid(eio_sid, pkt.namespace or "/")
        callbacks: Any = getattr(sio.manager, "callbacks", {})
        return sid is not None and pkt.id in callbacks.get(sid, {})

    sio.eio.on("connect", on_connect)
    sio.eio.on("disconnect", on_disconnect)
    sio.eio.on("message", on_message)
