"""The one websocket session loop: an engine.io session on a lean connection.

An idle socket on aiohttp's websocket costs ~16 KB before engine.io adds anything:
the request handler, its HTTP parser and task, the websocket reader and writer,
a task waiting on the reader. Here aiohttp still answers every HTTP request,
long-polling and the websocket handshake's routing; once engine.io hands a
websocket request to its websocket class, :func:`take_over` answers the
handshake itself and moves the TCP connection to a :class:`LeanWebSocket`: an
``asyncio.Protocol`` holding only the engine.io socket, with wsproto (a
maintained sans-I/O parser) reading frames, no task while nothing arrives, and
pings and timeouts of every connection driven by one
:class:`~nats_adapter._engineio.heartbeat.Heartbeat`. It serves sessions that
start on websocket and sessions that upgrade from long-polling (the one upgrade
probe of the package: :meth:`LeanWebSocket.on_message`).

python-socketio and python-engineio keep their public API: handlers, ``emit``,
``disconnect``, sessions, and packets go through engine.io's socket and queue as
before; the queue is written out synchronously as packets are put, so shared
frames (:mod:`nats_adapter.hub`) and queued packets stay in order.

Differences from engine.io's own websocket path: the handshake environ kept by
python-socketio loses ``aiohttp.request``, ``wsgi.input`` and ``wsgi.errors``
(which would keep the whole aiohttp request alive; headers, query and path stay);
a server-side close sends engine.io's CLOSE packet and then closes the websocket;
permessage-deflate is never negotiated.

Per-socket state lives in :class:`Sessions` (a side table owned by the server's
fast path, keyed by engine.io sid), never in attributes set on engine.io's objects.
The privates used here are listed and probed in :mod:`nats_adapter.compat`
(``aiohttp.take_over``, ``asyncio.raw_socket``, ``wsproto.idle_parser``,
``socketio.environ``).
"""

from __future__ import annotations

import asyncio
import logging
import socket as socket_module
from collections import deque
from typing import Any, Protocol

from engineio import exceptions
from engineio import packet as eio_packet
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from .. import compat
from .frames import (
    BINARY,
    PING_FRAME,
    PROBE_FRAME,
    TEXT,
    accept_key,
    close_frame,
    frame,
    is_pong,
    read_text_frame,
    switching_protocols,
)
from .heartbeat import Heartbeat, spawn

logger = logging.getLogger(__name__)

#: environ keys that hold the aiohttp request (and through it its connection) alive
_HEAVY_ENVIRON_KEYS = ("aiohttp.request", "wsgi.input", "wsgi.errors")

_PROBING, _UPGRADING, _OPEN, _CLOSED = range(4)

#: a connection stops reading while this many received packets wait to be handled,
#: or after a packet of this many bytes, until they are
INBOX_PAUSE_PACKETS = 16
INBOX_PAUSE_BYTES = 32 * 1024

#: what a writer's ``offer`` answers: the frame was written; the socket cannot take a
#: shared frame now (queue it instead); its send buffer is past the bound
WRITTEN, NOT_NOW, FULL = 1, 0, -1


class Closable(Protocol):
    """A websocket the server can hang up (a lean connection, or aiohttp's)."""

    @property
    def closed(self) -> bool: ...

    async def close(self, *, code: int = ...) -> Any: ...


class Sessions:
    """The side table of one engine.io server's websockets, by engine.io sid.

    ``websockets``: every session's open websocket, lean or aiohttp's (to hang up
    at shutdown or on a slow consumer). ``writers``: the lean connections that may
    take shared frames (emptied for good when the fast path is disabled).
    """

    def __init__(self, heartbeat: Heartbeat | None) -> None:
        self.websockets: dict[str, Closable] = {}
        self.writers: dict[str, LeanWebSocket] = {}
        self.heartbeat = heartbeat
        #: the writes of this server's lean connections
        self.writes = WriteBatch()
        #: whether new lean connections may take shared frames
        self.direct = True

    def is_lean(self, sid: str) -> bool:
        return type(self.websockets.get(sid)) is LeanWebSocket

    def lean(self, sid: str) -> LeanWebSocket | None:
        ws = self.websockets.get(sid)
        return ws if type(ws) is LeanWebSocket else None


def _raw_socket(transport: asyncio.Transport) -> socket_module.socket | None:
    """The socket under asyncio's selector transport, whose ``write`` sends on it
    when nothing is buffered (``_sock``, private); None for any other transport."""
    if not _RAW_SOCKET:
        return None
    sock = getattr(transport, "_sock", None)
    return sock if type(sock) is socket_module.socket else None


def may_take_shared_frame(socket: Any, transport: asyncio.WriteTransport) -> bool:
    """Whether a frame shared by several sockets may be written to ``socket``'s
    ``transport`` now: its session runs on websocket, nothing waits in its engine.io
    queue or is still being written from it (acks and other events stay in order),
    and the transport is not closing."""
    queue = socket.queue
    return bool(socket.upgraded and not queue.items and not queue.in_flight
                and not transport.is_closing())


_IDLE_PARSER = compat.check("wsproto.idle_parser")
_RAW_SOCKET = compat.check("asyncio.raw_socket")


def _parser_idle(conn: Connection) -> bool:
    proto = conn._proto
    decoder = proto._frame_decoder
    return (decoder.header is None and not len(decoder.buffer)
            and proto._message_decoder.opcode is None
            and conn.state is ConnectionState.OPEN)


def reduce_environ(environ: dict[str, Any] | None) -> None:
    """Drop what keeps the handshake's aiohttp request alive (see the module doc)."""
    if environ is not None:
        for key in _HEAVY_ENVIRON_KEYS:
            environ.pop(key, None)


async def receive_packet(socket: Any, pkt: eio_packet.Packet) -> bool:
    """Hand one received packet to engine.io's socket, as its own websocket loop does
    (unknown packets ignored, errors logged); False once the socket is closed, or when
    the packet's type is none of engine.io's (the client does not speak the protocol:
    closing it costs less than the traceback engine.io would log for it)."""
    if not 0 <= pkt.packet_type < len(eio_packet.packet_names):
        return False
    try:
        await socket.receive(pkt)
    except exceptions.UnknownPacketError:
        pass
    except exceptions.SocketIsClosedError:
        return False
    except Exception:
        logger.exception("%s: receive error", socket.sid)
    return True


class WriteBatch:
    """Frames written to lean connections during one turn of the event loop, sent
    with one ``send`` per connection at the start of the next.

    Each ``send`` of a small frame costs more in the kernel (TCP, loopback, packet
    filters) than the Python that produced it; a connection that gets several
    frames in one turn (a busy room, a batch of messages from the broker, an event
    and its ack) gets them in one segment. Every write of a connection goes through
    its :meth:`LeanWebSocket.write`, so the order of its frames is kept; one that
    closes sends what waits first (:meth:`LeanWebSocket.send_pending`).
    """

    __slots__ = ("frames", "pending", "scheduled", "sends")

    def __init__(self) -> None:
        self.pending: list[LeanWebSocket] = []
        self.scheduled = False
        #: frames written, and ``send`` calls made for them (a metric of coalescing)
        self.frames = 0
        self.sends = 0

    def add(self, conn: LeanWebSocket) -> None:
        self.pending.append(conn)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        pending, self.pending = self.pending, []
        for conn in pending:
            try:
                conn.send_pending()
            except Exception:  # one broken connection must not hold up the others
                logger.exception("sending to %s failed", conn.sid)
                conn.transport.abort()


class LeanWebSocket(asyncio.Protocol):
    """One engine.io session's websocket connection (see the module docstring)."""

    __slots__ = ("gen", "heartbeat", "inbox", "out", "out_bytes", "parser", "parts",
                 "receiver", "server", "sessions", "size", "sock", "socket", "state",
                 "transport", "waiting_pong")

    def __init__(self, socket: Any, transport: asyncio.Transport, sessions: Sessions,
                 heartbeat: Heartbeat) -> None:
        self.socket = socket
        self.server = socket.server
        self.transport = transport
        #: the TCP socket under a plain selector transport (None for TLS, or another
        #: event loop's transports): what :meth:`send_pending` sends on directly
        self.sock = _raw_socket(transport)
        self.sessions = sessions
        self.heartbeat = heartbeat
        self.gen = 0
        self.state = _OPEN
        self.parser: Connection | None = None
        #: text or binary message being received in several frames, and its size
        self.parts: list[Any] | None = None
        self.size = 0
        self.inbox: deque[Any] | None = None
        self.receiver: asyncio.Task[None] | None = None
        self.waiting_pong = False
        #: frames written this turn of the loop, sent at its end (:class:`WriteBatch`)
        self.out: list[bytes] | None = None
        self.out_bytes = 0

    @property
    def sid(self) -> str:
        return str(self.socket.sid)

    @property
    def closed(self) -> bool:
        return self.state == _CLOSED or self.transport.is_closing()

    # -- set-up ------------------------------------------------------------------

    def start(self, upgrading: bool) -> None:
        socket = self.socket
        if upgrading:  # engine.io keeps pinging the session by polling meanwhile
            self.state = _PROBING
            socket.upgrading = True  # engine.io answers polls with a NOOP from now on
            self.heartbeat.deadline(self)
            return
        socket.connected = True
        socket.upgraded = True
        self._open()

    def _open(self) -> None:
        socket = self.socket
        self.state = _OPEN
        socket.last_ping = None  # timeouts are the heartbeat's from now on, not engine.io's
        sessions = self.sessions
        sessions.websockets[socket.sid] = self
        if sessions.direct:  # shared frames come through offer(), then write()
            sessions.writers[socket.sid] = self
        socket.queue.on_put = self.flush
        self.flush()
        self.heartbeat.ping_later(self)

    # -- writing -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send ``data`` at the end of this turn of the loop, after what was written
        before it."""
        out = self.out
        if out is None:
            self.out = [data]
            self.sessions.writes.add(self)
        else:
            out.append(data)
        self.out_bytes += len(data)

    def offer(self, socket: Any, frame: bytes, max_buffer: int) -> int:
        """:meth:`write` a frame shared by several sockets if this session (``socket``
        is its engine.io socket) may take it now (:func:`may_take_shared_frame`):
        :data:`WRITTEN`, :data:`NOT_NOW`, or :data:`FULL` (past ``max_buffer``)."""
        transport = self.transport
        if not may_take_shared_frame(socket, transport):
            return NOT_NOW
        if transport.get_write_buffer_size() + self.out_bytes > max_buffer:
            return FULL
        self.write(frame)
        return WRITTEN

    def send_pending(self) -> None:
        """Hand what :meth:`write` holds to the kernel now, in one send."""
        out = self.out
        if out is None:
            return
        self.out = None
        self.out_bytes = 0
        transport = self.transport
        if transport.is_closing():
            return
        writes = self.sessions.writes
        writes.frames += len(out)
        writes.sends += 1
        data = out[0] if len(out) == 1 else b"".join(out)
        sock = self.sock
        if sock is not None and not transport.get_write_buffer_size():
            # what asyncio's write() does first, without its checks: ~0.3 us of the
            # ~1.5 us of Python per recipient; the rest, if any, goes through it
            try:
                sent = sock.send(data)
            except OSError:  # would block, or failed: the transport's write meets a
                sent = 0  # failure again and closes the connection
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + self.out_bytes

    def flush(self) -> None:
        """Write out what engine.io queued, in order; called on every put."""
        socket = self.socket
        if self.state != _OPEN:
            return
        write = self.write
        for pkt in socket.queue.take():
            if pkt is None:
                self.hang_up(CloseReason.NORMAL_CLOSURE)
                return
            encoded = pkt.encode()
            if isinstance(encoded, str):
                write(frame(TEXT, encoded.encode()))
            else:
                write(frame(BINARY, encoded))
            if pkt.packet_type == eio_packet.CLOSE:
                self.hang_up(CloseReason.NORMAL_CLOSURE)
                return
        # what engine.io queues is written at once, so a client that stops reading
        # grows the transport's buffer instead of the queue: bounded the same way
        limits = socket.queue.limits
        if limits is not None and self.get_write_buffer_size() > limits.max_bytes:
            limits.overflows += 1
            logger.warning("closing a connection that stopped reading: %d bytes unsent",
                           self.get_write_buffer_size())
            self.out = None
            self.transport.abort()

    def hang_up(self, code: int = CloseReason.NORMAL_CLOSURE) -> None:
        """Send a websocket close and close the connection (after what is buffered)."""
        transport = self.transport
        if not transport.is_closing():
            self.send_pending()
            transport.write(close_frame(code))
            transport.close()

    async def close(self, code: int = 1000) -> None:
        """Close the websocket (shutdown: :func:`nats_adapter.shutdown.close_websockets`)."""
        self.hang_up(code)

    # -- reading -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            # An idle socket's only traffic is its PONG, one 7-byte frame every ping
            # interval; reading it here costs ~1 us against ~20 us through wsproto
            # (a new parser and a parse), most of an idle socket's CPU. Anything else
            # goes to wsproto.
            if self.state == _OPEN and is_pong(data):
                self._pong()
                return
            data = self._read_simple(data)
            if not data:
                return
            parser = Connection(ConnectionType.SERVER)
        parser.receive_data(data)
        self._parse(parser)

    def _read_simple(self, data: bytes) -> bytes:
        """Handle the one-frame text messages ``data`` starts with (most of what a
        client sends: :func:`read_text_frame`); what is left for wsproto (from the
        first frame that is not one, or is incomplete). Nothing is left once the
        connection closes; what comes after a message that paused reading waits in
        a parser until the packets waiting are handled, as in :meth:`_parse`."""
        limit = self.server.max_http_buffer_size
        transport = self.transport
        start = 0
        while (read := read_text_frame(data, start, limit)) is not None:
            message, start = read
            self.on_message(message)
            if transport.is_closing():
                return b""
            if not transport.is_reading():
                if start < len(data):
                    parser = Connection(ConnectionType.SERVER)
                    parser.receive_data(data[start:])
                    self.parser = parser
                return b""
        return data[start:] if start else data

    def _parse(self, parser: Connection) -> bool:
        """Handle what ``parser`` holds; False when it stopped early, reading paused
        (the rest stays in the parser until the packets waiting are handled)."""
        limit = self.server.max_http_buffer_size
        for event in parser.events():
            if isinstance(event, TextMessage | BytesMessage):
                self.size += len(event.data)
                if self.size > limit:  # engine.io: "packet is too large"
                    self.hang_up(CloseReason.MESSAGE_TOO_BIG)
                    return False
                if not event.message_finished:
                    if self.parts is None:
                        self.parts = []
                    self.parts.append(event.data)
                    continue
                message = event.data if isinstance(event.data, str) else bytes(event.data)
                if self.parts is not None:
                    self.parts.append(message)
                    message = ("" if isinstance(message, str) else b"").join(self.parts)
                    self.parts = None
                self.size = 0
                self.on_message(message)
            elif isinstance(event, Ping):
                self.write(parser.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.send_pending()
                if parser.state is not ConnectionState.CLOSED:
                    self.transport.write(parser.send(event.response()))
                self.transport.close()
                return False
            if self.transport.is_closing():
                return False
            if not self.transport.is_reading():
                self.parser = parser
                return False
        self.parser = None if _IDLE_PARSER and _parser_idle(parser) else parser
        return True

    def on_message(self, message: str | bytes) -> None:
        state = self.state
        if state == _OPEN:
            if message == "3":
                self._pong()
                return
            try:
                pkt = eio_packet.Packet(encoded_packet=message)
            except Exception:
                logger.info("%s: undecodable engine.io packet; closing", self.sid)
                self.hang_up(CloseReason.PROTOCOL_ERROR)
                return
            inbox = self.inbox
            if inbox is None:
                inbox = self.inbox = deque()
            inbox.append(pkt)
            # a client may send faster than its packets are handled: stop reading from
            # it until they are (as aiohttp's reader does), so what waits stays small
            if (len(inbox) >= INBOX_PAUSE_PACKETS or len(message) >= INBOX_PAUSE_BYTES) \
                    and self.transport.is_reading():
                self.transport.pause_reading()
            if self.receiver is None:
                self.receiver = asyncio.get_running_loop().create_task(self._receive())
        elif state == _PROBING and message == "2probe":
            self.write(PROBE_FRAME)
            queue = self.socket.queue
            if queue.polled:  # a long-poll is waiting: end it (else no NOOP is needed)
                queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))
            self.state = _UPGRADING
        elif state == _UPGRADING and message == "5":
            self._upgraded()
        elif state in (_PROBING, _UPGRADING):
            logger.info("%s: failed websocket upgrade, got %r", self.sid, message[:20])
            self._abandon_upgrade()

    def _pong(self) -> None:
        """The client answered a ping: the next one is due an interval from now."""
        self.waiting_pong = False
        self.heartbeat.ping_later(self)

    def _upgraded(self) -> None:
        socket = self.socket
        socket.upgrading = False
        socket.upgraded = True
        # what polling requests took was answered before the client sent UPGRADE
        socket.queue.in_flight = 0
        connect = self.server.handlers.get("connect")
        stored = getattr(getattr(connect, "__self__", None), "environ", None)
        if isinstance(stored, dict):
            reduce_environ(stored.get(socket.sid))
        self._open()

    def _abandon_upgrade(self) -> None:
        """The session keeps polling; this websocket goes."""
        self.socket.upgrading = False
        self.state = _CLOSED
        self.gen += 1
        self.hang_up(CloseReason.POLICY_VIOLATION)

    async def _receive(self) -> None:
        """Hand received packets to engine.io one after another, then end."""
        socket = self.socket
        inbox = self.inbox
        try:
            while inbox:
                if not await receive_packet(socket, inbox.popleft()):
                    break
                if socket.closed:
                    self.hang_up(CloseReason.NORMAL_CLOSURE)
                    break
        finally:
            self.receiver = None
            if not inbox:
                self.inbox = None
                if not self.transport.is_reading():
                    # next round: the handlers just started run first
                    asyncio.get_running_loop().call_soon(self._resume)

    def _resume(self) -> None:
        """Handle what the parser kept while reading was paused, then read again."""
        transport = self.transport
        if self.state != _OPEN or transport.is_closing() or transport.is_reading():
            return
        parser = self.parser
        if parser is None or self._parse(parser):
            transport.resume_reading()

    # -- timers and the end ------------------------------------------------------

    def on_timer(self) -> None:
        socket = self.socket
        if self.state in (_PROBING, _UPGRADING):
            logger.info("%s: websocket upgrade timed out", self.sid)
            self._abandon_upgrade()
        elif self.state != _OPEN:
            return
        elif socket.closed:
            self.hang_up(CloseReason.NORMAL_CLOSURE)
        elif self.waiting_pong:
            logger.info("%s: client is gone (no pong), closing", self.sid)
            spawn(socket.close(wait=False, abort=False, reason=self.server.reason.PING_TIMEOUT))
        else:
            self.waiting_pong = True
            self.write(PING_FRAME)
            self.heartbeat.deadline(self)

    def connection_lost(self, exc: Exception | None) -> None:
        state, self.state = self.state, _CLOSED
        self.gen += 1  # no heartbeat entry of this connection is live any more
        self.inbox = None
        self.out = None
        socket = self.socket
        if state != _OPEN:  # the session never moved here: it goes on polling
            if state != _CLOSED:
                socket.upgrading = False
            return
        sessions = self.sessions
        if sessions.websockets.get(socket.sid) is self:
            del sessions.websockets[socket.sid]
        if sessions.writers.get(socket.sid) is self:
            del sessions.writers[socket.sid]
        socket.queue.on_put = None
        spawn(self._end_session())

    async def _end_session(self) -> None:
        socket = self.socket
        await socket.close(wait=False, abort=True,
                           reason=self.server.reason.TRANSPORT_CLOSE)
        sockets = self.server.sockets
        if sockets.get(socket.sid) is socket:
            del sockets[socket.sid]


def take_over(socket: Any, environ: dict[str, Any], sessions: Sessions
              ) -> LeanWebSocket | None:
    """Answer the websocket handshake of ``environ`` and serve ``socket``'s session on
    a :class:`LeanWebSocket`; None (nothing done) when the request is not a valid
    handshake aiohttp holds for an upgrade, so aiohttp's path answers it instead."""
    request = environ.get("aiohttp.request")
    if request is None:
        return None
    heartbeat = sessions.heartbeat
    assert heartbeat is not None, "lean connections need the heartbeat"
    accept = accept_key(request.method, request.headers)
    transport = request.transport
    handler = request.protocol
    if accept is None or transport is None or transport.is_closing() \
            or handler._payload_parser is not None or not handler._upgraded:
        return None
    upgrading = bool(socket.connected)
    transport, tail = compat.detach_connection(request)
    transport.write(switching_protocols(accept))
    conn = LeanWebSocket(socket, transport, sessions, heartbeat)
    transport.set_protocol(conn)
    if not transport.is_reading():
        transport.resume_reading()
    reduce_environ(environ)
    conn.start(upgrading)
    if tail:
        conn.data_received(tail)
    return conn


def close_second_websocket(eio: Any, sessions: Sessions, request: Any) -> bool:
    """Answer a websocket handshake for a session that already runs on a lean
    websocket by opening and at once closing it, as Node's engine.io does (engine.io
    answers 400, which clients report as a failed request). True when done so."""
    if getattr(request, "method", None) != "GET" or request.query.get("transport") != "websocket":
        return False
    socket = eio.sockets.get(request.query.get("sid", ""))
    if socket is None or not sessions.is_lean(socket.sid):
        return False
    accept = accept_key(request.method, request.headers)
    handler = request.protocol
    if accept is None or request.transport is None or handler._payload_parser is not None \
            or not handler._upgraded:
        return False
    transport, _ = compat.detach_connection(request)
    transport.write(switching_protocols(accept) + close_frame(CloseReason.POLICY_VIOLATION))
    transport.close()
    return True
