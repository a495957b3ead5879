"""Every upstream private this package touches, each with its feature probe.

The gateway is faster and lighter than stock python-socketio because a few of its
paths use internals of the libraries under it: python-engineio, python-socketio,
aiohttp (and asyncio, wsproto under it), nats-py and redis-py. This module is the
one list of them. Each :class:`Private` names the feature, the private names it
uses, what runs instead when they are not there, and a probe that checks they
exist with the expected shape (attributes, signatures, and where a shape says too
little, a small behaviour run on a throwaway object) — never by reading another
library's source text, nor by version numbers (which say nothing of privates).

A feature whose probe fails is not used: the stock path serves instead, and the
reason is kept (:func:`problem`). :func:`report` is what ``/healthz`` shows
operators: which fast paths are active and, for the others, why not. A feature
may also be turned off at run time by its owner (an error inside patched code,
a configuration that rules it out): that is the owner's record, merged in by
:func:`report`'s ``overrides``.

It lives at the package's top rather than inside ``_engineio/`` because the
brokers (nats-py, redis-py) and the recovery hooks (python-socketio) use it too,
and no broker may import the websocket package.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

__all__ = ["PRIVATES", "Private", "check", "connection_environ", "engineio_session", "problem",
           "report", "reset"]


@dataclass(frozen=True)
class Private:
    """One feature built on upstream privates."""

    #: feature id, ``<library>.<feature>``
    name: str
    library: str
    #: the private names it touches
    uses: tuple[str, ...]
    #: what serves instead when the probe fails
    fallback: str
    #: problems found (empty: the privates are there as expected)
    probe: Callable[[], list[str]]


def _params(func: Any) -> list[str]:
    try:
        return list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return []


class _Problems(list[str]):
    def need(self, ok: bool, what: str) -> None:
        if not ok:
            self.append(what)


# -- python-engineio -----------------------------------------------------------------

def _engineio_server() -> list[str]:
    """What the install and the lean connection need of engine.io's server and socket."""
    from engineio import async_server, async_socket, exceptions
    from engineio import packet as eio_packet

    p = _Problems()
    server = async_server.AsyncServer(async_mode="aiohttp")
    for name in ("create_queue", "start_background_task", "ping_interval", "ping_timeout",
                 "max_http_buffer_size", "sockets", "reason", "handlers", "handle_request",
                 "start_service_task"):
        p.need(hasattr(server, name), f"engineio AsyncServer.{name}")
    p.need(hasattr(getattr(server, "reason", None), "TRANSPORT_CLOSE"),
           "engineio AsyncServer.reason.TRANSPORT_CLOSE")
    base = getattr(server, "_async", {}).get("websocket")
    p.need(base is not None and _params(base)[:2] == ["handler", "server"],
           "engineio AsyncServer._async['websocket'](handler, server)")
    for name in ("send", "wait", "close"):
        p.need(callable(getattr(base, name, None)), f"engineio aiohttp WebSocket.{name}")
    sock_cls = async_socket.AsyncSocket
    for name in ("receive", "send", "close", "check_ping_timeout", "handle_post_request"):
        p.need(callable(getattr(sock_cls, name, None)), f"engineio AsyncSocket.{name}")
    p.need({"wait", "abort", "reason"} <= set(_params(getattr(sock_cls, "close", None))),
           "engineio AsyncSocket.close(wait, abort, reason)")
    _socket_state(p, sock_cls, server)
    p.need("encoded_packet" in _params(eio_packet.Packet), "engineio Packet(encoded_packet=)")
    for name in ("PING", "PONG", "NOOP", "UPGRADE", "MESSAGE", "OPEN", "CLOSE"):
        p.need(hasattr(eio_packet, name), f"engineio packet.{name}")
    p.need(isinstance(getattr(eio_packet, "packet_names", None), list),
           "engineio packet.packet_names")
    for name in ("UnknownPacketError", "SocketIsClosedError"):
        p.need(hasattr(exceptions, name), f"engineio exceptions.{name}")
    return p


def _socket_state(p: _Problems, sock_cls: Any, server: Any) -> None:
    """An ``AsyncSocket(server, sid)`` has the state flags, queue and session read."""
    try:
        sock = sock_cls(server, "probe")
    except Exception as exc:
        p.append(f"engineio AsyncSocket(server, sid): {exc!r}")
    else:
        for name in ("queue", "last_ping", "connected", "upgrading", "upgraded", "closing",
                     "closed", "session"):
            p.need(hasattr(sock, name), f"engineio AsyncSocket.{name}")


def _engineio_handover() -> list[str]:
    """A session moved between nodes (:mod:`nats_adapter.handover`): engine.io's
    sockets are ``AsyncSocket(server, sid)`` kept in ``server.sockets``, with the
    state flags, queue and session a move reads and sets; python-socketio sends
    every packet through ``_send_packet(eio_sid, pkt)`` and keeps ``environ``."""
    import socketio
    from engineio import async_server, async_socket

    p = _Problems()
    server = async_server.AsyncServer(async_mode="aiohttp")
    p.need(isinstance(getattr(server, "sockets", None), dict), "engineio AsyncServer.sockets")
    sock_cls = async_socket.AsyncSocket
    p.need(_params(sock_cls)[:2] == ["server", "sid"], "engineio AsyncSocket(server, sid)")
    p.need(callable(getattr(sock_cls, "schedule_ping", None)),
           "engineio AsyncSocket.schedule_ping")
    _socket_state(p, sock_cls, server)
    p.need(_params(getattr(socketio.AsyncServer, "_send_packet", None))[1:3]
           == ["eio_sid", "pkt"], "socketio AsyncServer._send_packet(eio_sid, pkt)")
    p.need(_params(getattr(socketio.AsyncServer, "_handle_connect", None))[1:4]
           == ["eio_sid", "namespace", "data"],
           "socketio AsyncServer._handle_connect(eio_sid, namespace, data)")
    p.need(isinstance(getattr(socketio.AsyncServer(), "environ", None), dict),
           "socketio AsyncServer.environ (dict)")
    return p


def _engineio_generate_id() -> list[str]:
    """engine.io names a new session by calling its server's ``generate_id()`` (no
    arguments, a str back); the node sets it per server so ids name the node."""
    from engineio import async_server

    p = _Problems()
    server = async_server.AsyncServer(async_mode="aiohttp")
    p.need(_params(getattr(async_server.AsyncServer, "generate_id", None)) == ["self"],
           "engineio AsyncServer.generate_id(self)")
    generate = getattr(server, "generate_id", None)
    p.need(callable(generate) and isinstance(generate(), str),
           "engineio AsyncServer.generate_id() -> str")
    return p


def _engineio_ping_timer() -> list[str]:
    """engine.io starts each ping as ``start_background_task(socket._send_ping)``."""
    from engineio import async_socket

    p = _Problems()
    sock_cls = async_socket.AsyncSocket
    p.need(_params(getattr(sock_cls, "_send_ping", None)) == ["self"],
           "engineio AsyncSocket._send_ping(self)")
    p.need(getattr(getattr(sock_cls, "_send_ping", None), "__name__", "") == "_send_ping",
           "engineio AsyncSocket._send_ping named _send_ping")
    p.need(callable(getattr(sock_cls, "schedule_ping", None)),
           "engineio AsyncSocket.schedule_ping")
    return p


def _engineio_polling() -> list[str]:
    """What :class:`~nats_adapter._engineio.polling.PollingRules` needs: engine.io's
    aiohttp ``translate_request`` (wrapped so engine.io reads a POST's body from
    bytes read before it) keeps the request's method, length and ``wsgi.input``;
    its payload decoder raises on what it cannot decode."""
    from aiohttp.test_utils import make_mocked_request
    from engineio import async_server
    from engineio import payload as eio_payload

    p = _Problems()
    server = async_server.AsyncServer(async_mode="aiohttp")
    translate: Any = getattr(server, "_async", {}).get("translate_request")
    p.need(callable(translate) and _params(translate) == ["request"],
           "engineio AsyncServer._async['translate_request'](request)")
    for name in ("transports", "attach", "reason"):
        p.need(hasattr(server, name), f"engineio AsyncServer.{name}")
    for name in ("PING_TIMEOUT", "TRANSPORT_ERROR"):
        p.need(hasattr(getattr(server, "reason", None), name),
               f"engineio AsyncServer.reason.{name}")
    if p:
        return p
    request = make_mocked_request("POST", "/engine.io/?EIO=4&transport=polling",
                                  headers={"Content-Length": "2"})
    environ = translate(request)
    p.need(isinstance(environ, dict) and environ.get("REQUEST_METHOD") == "POST"
           and environ.get("CONTENT_LENGTH") == "2" and "wsgi.input" in environ,
           "engineio translate_request gives REQUEST_METHOD, CONTENT_LENGTH, wsgi.input")
    try:
        eio_payload.Payload(encoded_payload="x")
    except ValueError:
        pass
    else:
        p.append("engineio Payload(encoded_payload=) raises ValueError on a bad packet")
    return p


# -- aiohttp, asyncio, wsproto ---------------------------------------------------------

#: what aiohttp's request handler must have for a connection to be taken from it
HANDLER_SLOTS = ("_message_tail", "_upgraded", "_payload_parser", "_manager")


def _aiohttp_take_over() -> list[str]:
    import aiohttp.web_protocol
    from aiohttp import web_request

    p = _Problems()
    handler = aiohttp.web_protocol.RequestHandler
    slots = {name for cls in handler.__mro__ for name in getattr(cls, "__slots__", ())}
    for name in HANDLER_SLOTS:
        p.need(name in slots, f"aiohttp RequestHandler.{name}")
    for name in ("connection_lost", "transport"):
        p.need(hasattr(handler, name), f"aiohttp RequestHandler.{name}")
    for name in ("protocol", "transport"):
        p.need(hasattr(web_request.BaseRequest, name), f"aiohttp BaseRequest.{name}")
    p.need(hasattr(asyncio.Transport, "set_protocol"), "asyncio Transport.set_protocol")
    return p


def _aiohttp_websocket_options() -> list[str]:
    from aiohttp import web

    p = _Problems()
    p.need({"max_msg_size", "compress", "timeout"} <= set(_params(web.WebSocketResponse)),
           "aiohttp WebSocketResponse(max_msg_size, compress, timeout)")
    return p


def _asyncio_raw_socket() -> list[str]:
    """A selector transport keeps its socket as ``_sock`` (sent on directly when its
    buffer is empty, as its own ``write`` does first)."""
    from asyncio import selector_events

    p = _Problems()
    cls = getattr(selector_events, "_SelectorTransport", None)
    p.need(cls is not None and "sock" in _params(cls), "asyncio _SelectorTransport(sock)")
    return p


def _wsproto_idle_parser() -> list[str]:
    from wsproto.connection import Connection, ConnectionType

    conn = Connection(ConnectionType.SERVER)
    proto = getattr(conn, "_proto", None)
    decoder = getattr(proto, "_frame_decoder", None)
    messages = getattr(proto, "_message_decoder", None)
    p = _Problems()
    p.need(decoder is not None and hasattr(decoder, "header") and hasattr(decoder, "buffer"),
           "wsproto Connection._proto._frame_decoder.header/buffer")
    p.need(messages is not None and hasattr(messages, "opcode"),
           "wsproto Connection._proto._message_decoder.opcode")
    return p


# -- python-socketio -------------------------------------------------------------------

def _socketio_recovery_hooks() -> list[str]:
    import socketio

    p = _Problems()
    server = socketio.AsyncServer
    p.need(_params(getattr(server, "_handle_connect", None))[1:4]
           == ["eio_sid", "namespace", "data"],
           "socketio AsyncServer._handle_connect(eio_sid, namespace, data)")
    p.need(_params(getattr(server, "_send_packet", None))[1:3] == ["eio_sid", "pkt"],
           "socketio AsyncServer._send_packet(eio_sid, pkt)")
    return p


def _socketio_namespace_error() -> list[str]:
    """A CONNECT goes through ``AsyncServer._handle_connect``; which namespaces a
    server takes is read from ``handlers``, ``namespace_handlers`` and ``namespaces``;
    packets go out through ``_send_packet`` built by ``packet_class``."""
    import socketio

    p = _Problems()
    server = socketio.AsyncServer
    p.need(_params(getattr(server, "_handle_connect", None))[1:4]
           == ["eio_sid", "namespace", "data"],
           "socketio AsyncServer._handle_connect(eio_sid, namespace, data)")
    p.need(_params(getattr(server, "_send_packet", None))[1:3] == ["eio_sid", "pkt"],
           "socketio AsyncServer._send_packet(eio_sid, pkt)")
    instance = server()
    for name, kind in (("handlers", dict), ("namespace_handlers", dict),
                       ("namespaces", (list, str))):
        p.need(isinstance(getattr(instance, name, None), kind),
               f"socketio AsyncServer.{name}")
    p.need(callable(getattr(instance, "packet_class", None)), "socketio AsyncServer.packet_class")
    return p


def _socketio_environ() -> list[str]:
    """python-socketio keeps each connection's environ in ``server.environ`` (read for
    fetched sockets' handshakes and trimmed by the lean connection)."""
    import socketio

    p = _Problems()
    p.need(isinstance(getattr(socketio.AsyncServer(), "environ", None), dict),
           "socketio AsyncServer.environ (dict)")
    return p


def _socketio_admin() -> list[str]:
    """The cluster-wide Admin UI overrides the handlers ``InstrumentedAsyncServer``
    registers for the UI's requests (by method name) and reads its settings."""
    from socketio.async_admin import InstrumentedAsyncServer

    p = _Problems()
    expected = {"admin_connect": ["self", "sid", "environ", "client_auth"],
                "admin_enter_room": ["self", "_", "namespace", "room", "room_filter"],
                "admin_leave_room": ["self", "_", "namespace", "room", "room_filter"],
                "admin_disconnect": ["self", "_", "namespace", "close", "room_filter"]}
    for name, params in expected.items():
        p.need(_params(vars(InstrumentedAsyncServer).get(name)) == params,
               f"socketio InstrumentedAsyncServer.{name}({', '.join(params[1:])})")
    p.need({"auth", "mode", "read_only", "namespace"}
           <= set(_params(InstrumentedAsyncServer.__init__)),
           "socketio InstrumentedAsyncServer(auth, mode, read_only, namespace)")
    p.need(callable(getattr(InstrumentedAsyncServer, "instrument", None)),
           "socketio InstrumentedAsyncServer.instrument")
    return p


# -- nats-py ---------------------------------------------------------------------------

def _nats_shared_inbox() -> list[str]:
    """A subscription made with ``future=`` gets each message by ``future.set_result``
    (meant for one reply; the inbox takes many) and never reads its own queue."""
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription

    p = _Problems()
    p.need("future" in _params(Client.subscribe), "nats-py Client.subscribe(future=)")
    p.need(_params(getattr(Client, "_process_msg", None))
           == ["self", "sid", "subject", "reply", "data", "headers"],
           "nats-py Client._process_msg(sid, subject, reply, data, headers)")
    for name in ("_drain", "unsubscribe", "pending_msgs"):
        p.need(hasattr(Subscription, name), f"nats-py Subscription.{name}")
    if p:
        return p
    try:
        with ThreadPoolExecutor(1) as pool:  # a loop of its own, whatever runs here
            got = pool.submit(asyncio.run, _nats_dispatch()).result(timeout=5)
    except Exception as exc:
        return [f"nats-py future dispatch: {exc!r}"]
    p.need(got == [b"probe"], "nats-py hands a future subscription's messages to set_result")
    return p


async def _nats_dispatch() -> list[bytes]:
    from nats.aio.client import Client
    from nats.aio.subscription import Subscription

    got: list[bytes] = []

    class Inbox:
        def cancelled(self) -> bool:
            return False

        def done(self) -> bool:
            return False

        def set_result(self, msg: Any) -> None:
            got.append(msg.data)

    nc = Client()
    sub = Subscription(nc, 1, "probe", future=Inbox())  # type: ignore[arg-type]
    if not hasattr(sub, "_pending_queue"):
        raise AttributeError("Subscription._pending_queue")
    nc._subs[1] = sub
    await nc._process_msg(1, b"probe", b"", b"probe", b"")
    return got


def _nats_socket() -> list[str]:
    """The TCP socket under nats-py's connection: ``Client._transport._io_writer``."""
    from nats.aio.client import Client
    from nats.aio.transport import TcpTransport

    p = _Problems()
    p.need(hasattr(Client(), "_transport"), "nats-py Client._transport")
    try:
        transport = TcpTransport()  # type: ignore[no-untyped-call]
    except Exception as exc:
        return [f"nats-py TcpTransport(): {exc!r}"]
    p.need(hasattr(transport, "_io_writer"), "nats-py TcpTransport._io_writer")
    return p


def _nats_server_info() -> list[str]:
    """The server's INFO nats-py keeps (``Client._server_info``, a dict): its name."""
    from nats.aio.client import Client

    p = _Problems()
    p.need(isinstance(getattr(Client(), "_server_info", None), dict),
           "nats-py Client._server_info (a dict)")
    return p


# -- redis-py --------------------------------------------------------------------------

def _redis_resubscribe_per_slot() -> list[str]:
    """A reconnected ``PubSub`` re-subscribes its shard channels through
    ``_resubscribe_shard_channels``; ``ClusterPubSub``'s groups them per slot (as
    redis-py does for its own per-node connections) and runs on a ``PubSub``."""
    from redis.asyncio.client import PubSub
    from redis.asyncio.cluster import ClusterPubSub

    p = _Problems()
    for cls in (PubSub, ClusterPubSub):  # ClusterPubSub's own, not the one it inherits
        method = vars(cls).get("_resubscribe_shard_channels")
        p.need(inspect.iscoroutinefunction(method) and _params(method) == ["self"],
               f"redis-py {cls.__name__}._resubscribe_shard_channels(self)")
    for name in ("_resubscribe", "ssubscribe", "on_connect"):
        p.need(callable(getattr(PubSub, name, None)), f"redis-py PubSub.{name}")
    p.need(len(_params(getattr(PubSub, "_resubscribe", None))) == 3,
           "redis-py PubSub._resubscribe(subscribed, subscribe_fn)")
    return p


PRIVATES: dict[str, Private] = {p.name: p for p in (
    Private("engineio.server", "python-engineio",
            ("AsyncServer._async['websocket']", "AsyncServer.create_queue",
             "AsyncServer.start_background_task", "AsyncServer.start_service_task",
             "AsyncServer.handle_request", "AsyncSocket.queue/connected/upgrading/upgraded/"
             "closing/closed/last_ping/session",
             "AsyncSocket.handle_post_request (wrapped per socket by gateway.app)"),
            "stock engine.io: its queue, its ping task per socket, its websocket loop",
            _engineio_server),
    Private("engineio.generate_id", "python-engineio",
            ("AsyncServer.generate_id (set per server)",),
            "engine.io's own session ids, which name no node: a request of a session "
            "another gateway owns is refused (the balancer then needs affinity)",
            _engineio_generate_id),
    Private("engineio.handover", "python-engineio",
            ("AsyncServer.sockets", "AsyncSocket(server, sid)", "AsyncSocket.queue/session/"
             "connected/upgrading/upgraded/closing/closed/schedule_ping",
             "socketio AsyncServer._send_packet/_handle_connect (wrapped)",
             "socketio AsyncServer.environ"),
            "a websocket upgrade for a session another gateway owns is spliced to the owner "
            "(the session does not move)", _engineio_handover),
    Private("engineio.ping_timer", "python-engineio",
            ("AsyncSocket._send_ping", "AsyncSocket.schedule_ping"),
            "engine.io's ping task per socket", _engineio_ping_timer),
    Private("engineio.polling", "python-engineio",
            ("AsyncServer._async['translate_request'] (wrapped)", "AsyncSocket.last_ping",
             "payload.Payload"),
            "python-engineio's own long-polling answers: a request without transport served "
            "as polling, 405 for other methods, duplicate polls served, an undecodable POST "
            "kept, a ping timeout noticed late, 'OK'", _engineio_polling),
    Private("aiohttp.take_over", "aiohttp",
            (*(f"RequestHandler.{n}" for n in HANDLER_SLOTS), "RequestHandler.connection_lost",
             "BaseRequest.protocol"),
            "stock engine.io websockets on aiohttp (no shared frames, a task per socket)",
            _aiohttp_take_over),
    Private("aiohttp.websocket_options", "aiohttp",
            ("WebSocketResponse(compress=, timeout=)",),
            "engine.io's own aiohttp websocket (deflate offered, 10 s close wait)",
            _aiohttp_websocket_options),
    Private("asyncio.raw_socket", "asyncio", ("_SelectorTransport._sock",),
            "every lean write goes through transport.write", _asyncio_raw_socket),
    Private("wsproto.idle_parser", "wsproto",
            ("Connection._proto._frame_decoder", "Connection._proto._message_decoder"),
            "every lean connection keeps its parser (~1.7 KB more per socket)",
            _wsproto_idle_parser),
    Private("socketio.recovery_hooks", "python-socketio",
            ("AsyncServer._handle_connect", "AsyncServer._send_packet"),
            "connection state recovery refuses to start", _socketio_recovery_hooks),
    Private("socketio.namespace_error", "python-socketio",
            ("AsyncServer._handle_connect", "AsyncServer._send_packet"),
            "python-socketio's CONNECT_ERROR \"Unable to connect\" for an unknown namespace "
            "(socket.io-client reads no message from it)", _socketio_namespace_error),
    Private("socketio.environ", "python-socketio", ("AsyncServer.environ",),
            "fetched sockets carry an empty handshake; lean websockets keep the request",
            _socketio_environ),
    Private("socketio.admin", "python-socketio",
            ("InstrumentedAsyncServer.admin_connect/admin_enter_room/admin_leave_room/"
             "admin_disconnect (overridden)", "InstrumentedAsyncServer.auth/mode/read_only/"
             "admin_namespace"),
            "python-socketio's own Admin UI handlers: this gateway's sockets only, its own "
            "login check", _socketio_admin),
    Private("nats.shared_inbox", "nats-py",
            ("Client._process_msg", "Subscription._pending_queue", "subscribe(future=)"),
            "a queue and a task per subscription (nats-py's callback subscriptions)",
            _nats_shared_inbox),
    Private("nats.socket", "nats-py", ("Client._transport", "TcpTransport._io_writer"),
            "no TCP_USER_TIMEOUT: reconnecting after a partition may take minutes",
            _nats_socket),
    Private("nats.server_info", "nats-py", ("Client._server_info",),
            "restores read the stream through consumers (no direct gets: which server "
            "holds a current replica is unknown)", _nats_server_info),
    Private("redis.resubscribe_per_slot", "redis-py",
            ("PubSub._resubscribe_shard_channels", "ClusterPubSub._resubscribe_shard_channels"),
            "redis-py's one SSUBSCRIBE for all channels on reconnect (CROSSSLOT when they "
            "span slots)", _redis_resubscribe_per_slot),
)}

_results: dict[str, str | None] = {}


# -- reading through the probes ----------------------------------------------------------

def engineio_session(server: Any, eio_sid: str) -> dict[str, Any]:
    """The engine.io session of connection ``eio_sid`` (python-socketio keeps each
    namespace's user session in it), read where a synchronous caller can't await
    ``eio.get_session``; empty when the connection is gone or the probe failed."""
    if server is None or not check("engineio.server"):
        return {}
    socket = server.eio.sockets.get(eio_sid)
    session = getattr(socket, "session", None)
    return session if isinstance(session, dict) else {}


def nats_server_name(client: Any) -> str:
    """The name of the NATS server ``client`` is connected to, from the INFO nats-py
    keeps; empty when unknown or the probe failed."""
    if not check("nats.server_info"):
        return ""
    info = getattr(client, "_server_info", None)
    name = info.get("server_name") if isinstance(info, dict) else None
    return name if isinstance(name, str) else ""


def connection_environ(server: Any, eio_sid: str) -> dict[str, Any]:
    """The WSGI-style environ python-socketio keeps for connection ``eio_sid``; empty
    when it is gone or the probe failed."""
    if server is None or not check("socketio.environ"):
        return {}
    environ = server.environ.get(eio_sid)
    return environ if isinstance(environ, dict) else {}



def movable_socket(server: Any, eio_sid: str) -> Any:
    """The engine.io socket of ``eio_sid`` if its session may move to another node: it
    is connected on long-polling, not upgrading, not closing (``engineio.handover``);
    None otherwise."""
    if server is None or not check("engineio.handover"):
        return None
    socket = server.eio.sockets.get(eio_sid)
    if socket is None or not socket.connected or socket.upgrading or socket.upgraded \
            or socket.closing or socket.closed:
        return None
    return socket


def new_socket(server: Any, eio_sid: str, session: dict[str, Any]) -> Any:
    """A connected engine.io socket for the session ``eio_sid`` moved here (not yet
    served: see :func:`serve_socket`)."""
    from engineio import async_socket

    socket = async_socket.AsyncSocket(server.eio, eio_sid)
    socket.connected = True
    socket.session = session
    return socket


def serve_socket(server: Any, socket: Any, environ: dict[str, Any]) -> None:
    """Serve the moved session of ``socket`` from now on: engine.io knows it (its
    requests, its upgrade), python-socketio has its environ, and it is pinged."""
    server.eio.sockets[socket.sid] = socket
    server.environ[socket.sid] = environ
    socket.schedule_ping()


def forget_socket(server: Any, socket: Any) -> list[Any]:
    """Forget the session of ``socket`` (moved to another node) without a disconnect
    event: returns the packets it had queued but not sent; a long-poll waiting for
    them gets a NOOP (as engine.io ends a poll on upgrade)."""
    from engineio import packet as eio_packet

    queue = socket.queue
    queued = [p for p in queue.take() if p is not None]
    socket.closing = socket.closed = True  # no ping, no timeout, no disconnect from here
    if server.eio.sockets.get(socket.sid) is socket:
        del server.eio.sockets[socket.sid]
    server.environ.pop(socket.sid, None)
    # whether or not a poll waits: one woken for what was just taken, but not yet
    # running, would wait again (for nothing, until it times out)
    queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))
    return queued


def unserve_socket(server: Any, socket: Any) -> None:
    """Undo :func:`serve_socket` (nothing of the session was sent yet)."""
    socket.closing = socket.closed = True
    if server.eio.sockets.get(socket.sid) is socket:
        del server.eio.sockets[socket.sid]
    server.environ.pop(socket.sid, None)


def detachable(request: Any) -> bool:
    """Whether aiohttp holds ``request`` as an upgrade whose connection can be taken
    from it (the handler slots the ``aiohttp.take_over`` probe checks)."""
    if not check("aiohttp.take_over"):
        return False
    handler = request.protocol
    transport = request.transport
    return transport is not None and not transport.is_closing() \
        and handler._payload_parser is None and handler._upgraded is True


def detach_connection(request: Any) -> tuple[asyncio.Transport, bytes]:
    """Take ``request``'s connection away from aiohttp: its handler forgets it (and
    its server's connection list drops it) without closing it. Returns the transport
    and the bytes aiohttp had read past the handshake."""
    handler = request.protocol
    transport = request.transport
    tail = bytes(handler._message_tail)
    handler._message_tail = b""
    handler.transport = None  # so that nothing aiohttp does next touches the connection
    handler.connection_lost(None)
    return transport, tail


def problem(name: str) -> str | None:
    """Why feature ``name`` cannot be used here, or None when its privates are there.
    Probed once per process (:func:`reset` forgets)."""
    if name not in _results:
        try:
            found = PRIVATES[name].probe()
        except Exception as exc:  # a probe that breaks is a missing feature
            found = [f"probe failed: {exc!r}"]
        _results[name] = "missing: " + "; ".join(found) if found else None
    return _results[name]


def check(name: str) -> bool:
    """Whether feature ``name`` may be used."""
    return problem(name) is None


def reset() -> None:
    """Probe again on next use (for tests that change an upstream attribute)."""
    _results.clear()


def report(overrides: Mapping[str, str | None] | None = None) -> dict[str, dict[str, Any]]:
    """Every feature: ``{"active": bool, "library": ..., "reason": why not (if not),
    "fallback": what serves instead}``. ``overrides`` adds features, or turns some
    off, with the reason their owner knows (a run-time error, the configuration)."""
    out: dict[str, dict[str, Any]] = {}
    extra = dict(overrides or {})
    for name, private in PRIVATES.items():
        override = extra.pop(name, None)
        reason = problem(name) or override
        out[name] = {"active": reason is None, "library": private.library}
        if reason is not None:
            out[name].update(reason=reason, fallback=private.fallback)
    for name, reason in extra.items():
        out[name] = {"active": reason is None}
        if reason is not None:
            out[name]["reason"] = reason
    return out
