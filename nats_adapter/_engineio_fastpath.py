"""The private python-engineio and aiohttp internals behind the fast fan-out path.

Stock python-socketio creates an asyncio task per recipient, and every packet then
wakes that socket's engine.io writer task. For websocket sessions on aiohttp the
node instead builds each websocket frame once and writes the same bytes to every
recipient's transport (see :class:`nats_adapter.hub.Fanout`, which decides when).
That needs a hold of each socket's asyncio transport and an exact count of what
is still queued or in flight, which engine.io does not expose: this module
patches a server to provide both, and nothing else in the package touches
engine.io or aiohttp internals.

:func:`install` checks that every attribute, method and signature it relies on
is there (:func:`missing_features`) and otherwise leaves the server untouched;
no socket then gets a direct writer (its ``fanout_writer``) and every packet takes
the public path (engine.io's queue), which is always correct, only slower. An error
inside the patched code at run time turns the fast path off for good, with one
warning (:meth:`FastPath.disable`).

A socket qualifies for direct writes once its session runs on websocket: from
the start, or after an upgrade from long-polling has completed (the client's
UPGRADE packet came, so nothing a polling request took is still on its way:
socket.io-client sends UPGRADE only after its last poll has returned), and while
the connection does not compress (a shared frame is only valid uncompressed).
A write is made only while nothing waits in its engine.io queue, nothing taken
from it is still being written (acks and other events stay in order), and the
transport is not closing: the writer's ``offer`` checks, per frame
(:class:`DirectWrites`, or :class:`nats_adapter._lean_websocket.LeanWebSocket`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

from engineio import exceptions
from engineio import packet as eio_packet

from . import _lean_websocket as lean

logger = logging.getLogger(__name__)

def text_frame(payload: bytes) -> bytes:
    """An unmasked, final websocket text frame (server to client)."""
    return lean.frame(0x1, payload)


class QueueLimits:
    """Bounds on every socket's engine.io queue, whatever puts into it (broadcasts,
    acks, replies, pings), so a client that stops reading cannot grow the node's
    memory: past them its connection is closed, and what it misses is dropped."""

    __slots__ = ("max_bytes", "max_items", "overflows")

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        #: connections closed for overflowing (a metric)
        self.overflows = 0


class CountingQueue:
    """engine.io's per-socket packet queue, lighter, bounded, counting what is in flight.

    The subset of ``asyncio.Queue`` that python-engineio uses (put, put_nowait, get,
    get_nowait, task_done, join, qsize, empty), in a few slots and a list that
    exists only while packets wait: ``asyncio.Queue`` holds four deques, about 3 KB
    for every idle socket. ``in_flight`` counts packets taken but not yet written;
    ``on_put`` is called after every put. Past ``limits`` the queue takes nothing
    more but a final ``None``, which makes engine.io close the connection.

    ``ping_interval_ms``, when given, is written into the session's OPEN packet (the
    first one put): engine.io advertises ``int(interval) * 1000``, so an interval of
    0.3 s reaches clients as 0 and they give up on the server at once.
    """

    __slots__ = ("_bytes", "_getters", "_items", "_joiners", "_unfinished", "in_flight",
                 "limits", "on_put", "overflowed", "ping_interval_ms")

    def __init__(self, maxsize: int = 0, limits: QueueLimits | None = None,
                 ping_interval_ms: int | None = None) -> None:
        self.ping_interval_ms = ping_interval_ms
        self._items: list[Any] | None = None
        self._getters: list[asyncio.Future[None]] | None = None
        self._joiners: list[asyncio.Future[None]] | None = None
        self._unfinished = 0
        self._bytes = 0
        self.in_flight = 0
        self.on_put: Any = None
        self.limits = limits
        self.overflowed = False

    def qsize(self) -> int:
        return len(self._items) if self._items else 0

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return False

    def put_nowait(self, item: Any) -> None:
        if self.overflowed:
            return  # the connection is closing: nothing more is sent
        if self.ping_interval_ms is not None:
            ms, self.ping_interval_ms = self.ping_interval_ms, None
            if getattr(item, "packet_type", None) == eio_packet.OPEN \
                    and isinstance(item.data, dict):
                item.data["pingInterval"] = ms
                item.encode_cache = None
        if self._items is None:
            self._items = []
        limits = self.limits
        if item is not None and limits is not None:
            data = getattr(item, "data", None)
            self._bytes += len(data) if isinstance(data, (str, bytes)) else 0
            if len(self._items) >= limits.max_items or self._bytes > limits.max_bytes:
                self.overflowed = True
                limits.overflows += 1
                logger.warning("closing a connection that stopped reading: %d packets, "
                               "%d bytes unsent", len(self._items), self._bytes)
                item = None
        self._items.append(item)
        self._unfinished += 1
        self._wake_getter()
        if self.on_put is not None:
            self.on_put()

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        items = self._items
        if not items:
            raise asyncio.QueueEmpty
        item = items.pop(0)
        if not items:
            self._items = None
            self._bytes = 0
        if item is not None:
            self.in_flight += 1
            if self._bytes:
                data = getattr(item, "data", None)
                self._bytes -= len(data) if isinstance(data, (str, bytes)) else 0
        return item

    async def get(self) -> Any:
        while not self._items:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(fut)
            try:
                await fut
            except BaseException:
                if self._getters is not None and fut in self._getters:
                    self._getters.remove(fut)
                elif self._items:
                    self._wake_getter()  # we were woken but leave: pass the item on
                raise
        return self.get_nowait()

    def _wake_getter(self) -> None:
        getters = self._getters
        while getters:
            fut = getters.pop(0)
            if not fut.done():
                fut.set_result(None)
                break
        if not getters:
            self._getters = None

    def task_done(self) -> None:
        if self._unfinished <= 0:
            raise ValueError("task_done() called too many times")
        self._unfinished -= 1
        if self._unfinished == 0 and self._joiners:
            for fut in self._joiners:
                if not fut.done():
                    fut.set_result(None)
            self._joiners = None

    def take(self) -> list[Any]:
        """Everything queued, in order, marked done (for a writer that writes it all
        out at once; nothing stays in flight)."""
        items = self._items
        if not items:
            return []
        self._items = None
        self._bytes = 0
        self._unfinished -= len(items)
        if self._unfinished == 0 and self._joiners:
            for fut in self._joiners:
                if not fut.done():
                    fut.set_result(None)
            self._joiners = None
        return items

    async def join(self) -> None:
        if self._unfinished > 0:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._joiners is None:
                self._joiners = []
            self._joiners.append(fut)
            await fut


def _params(func: Any) -> set[str]:
    try:
        return set(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return set()


def missing_features(eio: Any) -> list[str]:
    """What the patched path needs from python-engineio and aiohttp that ``eio`` lacks.

    Checks the attributes, methods and signatures used below (not version
    numbers, which say nothing about private attributes).
    """
    from aiohttp import http_websocket, web
    from engineio import async_socket

    missing: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            missing.append(what)

    sock_cls = async_socket.AsyncSocket
    for name in ("receive", "send", "close", "_send_ping", "_websocket_handler"):
        need(callable(getattr(sock_cls, name, None)), f"engineio AsyncSocket.{name}")
    need({"wait", "abort", "reason"} <= _params(getattr(sock_cls, "close", None)),
         "engineio AsyncSocket.close(wait, abort, reason)")
    need(_params(getattr(sock_cls, "_send_ping", None)) == {"self"},
         "engineio AsyncSocket._send_ping(self)")
    for name in ("create_queue", "start_background_task", "ping_interval", "ping_timeout",
                 "max_http_buffer_size", "sockets", "reason"):
        need(hasattr(eio, name), f"engineio AsyncServer.{name}")
    need(hasattr(getattr(eio, "reason", None), "TRANSPORT_CLOSE"),
         "engineio AsyncServer.reason.TRANSPORT_CLOSE")
    base = getattr(eio, "_async", {}).get("websocket")
    need(base is not None and {"handler", "server"} <= _params(base),
         "engineio aiohttp WebSocket(handler, server)")
    for name in ("send", "wait", "close"):
        need(callable(getattr(base, name, None)), f"engineio aiohttp WebSocket.{name}")
    need("encoded_packet" in _params(eio_packet.Packet), "engineio Packet(encoded_packet=)")
    for name in ("UnknownPacketError", "SocketIsClosedError"):
        need(hasattr(exceptions, name), f"engineio exceptions.{name}")
    need({"max_msg_size", "compress", "timeout"} <= _params(web.WebSocketResponse),
         "aiohttp WebSocketResponse(max_msg_size, compress, timeout)")
    writer = getattr(http_websocket, "WebSocketWriter", None)
    need({"transport", "compress"} <= _params(writer), "aiohttp WebSocketWriter(transport, "
         "compress)")
    return missing


def _self_test() -> str | None:
    """Check CountingQueue against the subset of asyncio.Queue engine.io uses."""
    q = CountingQueue()
    q.put_nowait("a")
    q.put_nowait(None)
    if q.qsize() != 2 or q.empty() or q.get_nowait() != "a" or q.in_flight != 1:
        return "CountingQueue does not count what it holds"
    q.task_done()
    if q.get_nowait() is not None or not q.empty() or q.in_flight != 1:
        return "CountingQueue lost its order"
    q.task_done()
    try:
        q.task_done()
    except ValueError:
        return None
    return "CountingQueue.task_done does not check its count"


class FastPath:
    """The fast path installed on one engine.io server; turns itself off for good
    (with one warning) on the first error in the code it patched."""

    def __init__(self, eio: Any, heartbeat: lean.Heartbeat | None = None) -> None:
        self.eio = eio
        self.enabled = True
        self.queue_limits: QueueLimits | None = None
        #: drives lean websocket connections; None when they are not available
        self.heartbeat = heartbeat

    def disable(self, reason: str) -> None:
        """Every socket takes the public path from now on."""
        if not self.enabled:
            return
        self.enabled = False
        logger.warning("fast fan-out disabled for this server (%s); delivery continues on "
                       "engine.io's public path", reason)
        for socket in list(self.eio.sockets.values()):
            if getattr(socket, "fanout_writer", None) is not None:
                socket.fanout_writer = None


def install(eio: Any, *, compression: bool = False, close_timeout: float = 2.0,
            queue_limits: QueueLimits | None = None) -> FastPath | None:
    """Prepare an engine.io ``AsyncServer`` (aiohttp mode) for direct frame writes.

    Also sets whether websocket connections may negotiate permessage-deflate
    (``compression``; engine.io offers no switch for it), and bounds every socket's
    queue with ``queue_limits`` (:class:`CountingQueue`). Returns None, changing
    nothing, when the server is not aiohttp-based or lacks a feature the fast path
    needs (logged once); then every packet takes engine.io's public path.
    """
    if getattr(eio, "async_mode", None) != "aiohttp":
        return None
    problems = missing_features(eio)
    failed = _self_test()
    if failed:
        problems.append(failed)
    if problems:
        logger.warning("fast fan-out not installed; engine.io's public path serves instead. "
                       "Missing: %s", "; ".join(problems))
        return None
    lean_missing = lean.missing_features()
    if lean_missing:
        logger.warning("lean websocket connections not available (missing: %s); "
                       "websockets stay on aiohttp", "; ".join(lean_missing))
    fastpath = FastPath(eio, None if lean_missing or compression else lean.Heartbeat(eio))
    fastpath.queue_limits = queue_limits
    if fastpath.heartbeat is not None:
        # the heartbeat also checks polling sessions' ping timeouts, which engine.io's
        # service task did with a wake-up (and a wait_for) per socket
        eio.start_service_task = False
        handle_request = eio.handle_request

        async def handle_request_lean(*args: Any, **kwargs: Any) -> Any:
            if fastpath.enabled and args and lean.close_second_websocket(eio, args[0]):
                from aiohttp import web

                return web.Response()  # never sent: the connection is no longer aiohttp's
            return await handle_request(*args, **kwargs)

        # before python-socketio's attach() routes requests to it
        eio.handle_request = handle_request_lean
    base = eio._async["websocket"]

    class FanoutWebSocket(base):  # type: ignore[misc, valid-type]
        """engine.io's aiohttp websocket, remembered by its socket for direct writes."""

        async def __call__(self, environ: dict[str, Any]) -> Any:
            from aiohttp.web import WebSocketResponse

            request = environ["aiohttp.request"]
            heartbeat = fastpath.heartbeat
            if heartbeat is not None and fastpath.enabled:
                taken = await _take_over(self, environ, heartbeat, fastpath)
                if taken is not None:
                    return taken
            # timeout: how long a close waits for the client's close frame (aiohttp's
            # default, 10 s, held every shutdown that long when a client did not answer)
            self._sock = WebSocketResponse(max_msg_size=self.server.max_http_buffer_size,
                                           compress=compression, timeout=close_timeout)
            await self._sock.prepare(request)
            self.environ = environ
            socket = None
            if fastpath.enabled:
                try:
                    socket = _direct_session(self, fastpath)
                except Exception as exc:
                    fastpath.disable(f"websocket set-up failed: {exc!r}")
                    socket = None
            if socket is None:
                await self.handler(self)
                return self._sock
            try:
                await _lean_session(socket, self)  # closes the socket however it ends
            except Exception as exc:
                fastpath.disable(f"session loop failed: {exc!r}")
            return self._sock

        async def send(self, message: Any) -> None:
            try:
                await super().send(message)
            finally:
                queue = getattr(self, "counted_queue", None)
                if queue is not None and queue.in_flight > 0:
                    queue.in_flight -= 1

    eio._async = {**eio._async, "websocket": FanoutWebSocket}
    interval_ms = round((eio.ping_interval + getattr(eio, "ping_interval_grace_period", 0))
                        * 1000)

    def create_queue(*args: Any, **kwargs: Any) -> CountingQueue:
        return CountingQueue(*args, **{"ping_interval_ms": interval_ms, "limits": queue_limits,
                                       **kwargs})

    eio.create_queue = create_queue
    start_task = eio.start_background_task

    def start_background_task(target: Any, *args: Any, **kwargs: Any) -> Any:
        # engine.io keeps a task per socket asleep for the whole ping interval; a
        # timer does the same job without a task's memory
        if getattr(target, "__name__", "") == "_send_ping" and not args and not kwargs:
            socket = target.__self__
            if fastpath.heartbeat is not None:
                # every session's first ping passes here: the heartbeat's check of
                # polling sessions (engine.io's service task is off) starts with the first
                fastpath.heartbeat.start_sweep()
            loop = asyncio.get_running_loop()
            return loop.call_later(eio.ping_interval, _send_ping, socket)
        return start_task(target, *args, **kwargs)

    eio.start_background_task = start_background_task
    return fastpath


async def _take_over(ws: Any, environ: dict[str, Any], heartbeat: lean.Heartbeat,
                     fastpath: FastPath) -> Any:
    """Serve this websocket on a :class:`~nats_adapter._lean_websocket.LeanWebSocket`.

    Returns the (never sent) response for aiohttp once the connection is taken over,
    or None when aiohttp's websocket should serve it.
    """
    from aiohttp import web

    socket = getattr(ws.handler, "__self__", None)
    if socket is None or socket.upgraded or not isinstance(socket.queue, CountingQueue):
        return None
    request = environ["aiohttp.request"]
    try:
        conn = lean.take_over(socket, environ, heartbeat)
    except Exception as exc:
        fastpath.disable(f"websocket take-over failed: {exc!r}")
        if request.transport is not None:
            return None  # still aiohttp's: its websocket serves it
        # the connection was already detached from aiohttp, and is lost
        await socket.close(wait=False, abort=True, reason=ws.server.reason.TRANSPORT_ERROR)
        return web.Response()
    if conn is None:
        return None
    heartbeat.start_sweep()
    # aiohttp's handler no longer has the connection: this response is never sent
    return web.Response()


async def close_session(socket: Any, reason: str) -> None:
    """Close an engine.io session and hang up its websocket, if it has one."""
    await socket.close(wait=False, abort=True, reason=reason)
    ws = getattr(socket, "fanout_ws", None)
    if ws is not None and not ws.closed:
        await ws.close(code=1008)


def _writer_transport(ws: Any) -> Any:
    """The asyncio transport under an aiohttp websocket, if frames go out uncompressed."""
    writer = ws._writer
    if writer is None or writer.compress:
        return None  # a shared frame is only valid while nothing compresses frames
    return writer.transport


def _direct_session(ws: Any, fastpath: FastPath) -> Any:
    """The engine.io socket behind ``ws`` if its session can run the lean loop; None if
    not (a session that was upgraded already, or a queue that is not ours)."""
    socket = getattr(ws.handler, "__self__", None)
    if socket is None or socket.upgraded or not isinstance(socket.queue, CountingQueue):
        return None
    _writer_transport(ws._sock)  # fail here, at set-up, if aiohttp moved its writer
    return socket


def _enable_direct_writes(socket: Any, ws: Any) -> None:
    """From now on ``socket`` may get shared frames written to its transport."""
    socket.fanout_ws = ws._sock
    ws.counted_queue = socket.queue
    transport = _writer_transport(ws._sock)
    socket.fanout_writer = DirectWrites(transport) if transport is not None else None


def _send_ping(socket: Any) -> None:
    """engine.io's ``AsyncSocket._send_ping`` after its sleep, as a timer callback."""
    if getattr(socket, "lean", None) is not None:
        return  # a lean connection's heartbeat pings it
    if not socket.closing and not socket.closed:
        socket.last_ping = time.time()
        socket.queue.put_nowait(eio_packet.Packet(eio_packet.PING))


async def _upgrade(socket: Any, ws: Any, timeout: float) -> bool:
    """The probe exchange that moves a polling session to this websocket.

    As ``AsyncSocket._websocket_handler``'s upgrade branch, except that the NOOP
    which ends a pending long-poll is queued only while a poll waits for it (else it
    would reach the client over the websocket, after the upgrade). True once the
    client's UPGRADE came; False leaves the session polling.
    """
    socket.upgrading = True  # engine.io answers further polls with a NOOP from now on
    try:
        async with asyncio.timeout(timeout):
            probe = eio_packet.Packet(encoded_packet=await ws.wait())
            if probe.packet_type != eio_packet.PING or probe.data != "probe":
                logger.info("%s: failed websocket upgrade, no probe", socket.sid)
                return False
            await ws.send(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
            if socket.queue._getters:  # a long-poll is waiting: end it
                socket.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))
            done = eio_packet.Packet(encoded_packet=await ws.wait())
            if done.packet_type != eio_packet.UPGRADE:
                logger.info("%s: failed websocket upgrade, no UPGRADE packet", socket.sid)
                return False
    except (TimeoutError, OSError, ValueError, IndexError, TypeError):
        return False  # timed out, closed, or not engine.io: the session keeps polling
    finally:
        socket.upgrading = False
    socket.upgraded = True
    # what polling requests took was answered before the client sent UPGRADE
    socket.queue.in_flight = 0
    return True


async def _lean_session(socket: Any, ws: Any) -> None:
    """engine.io's websocket session loop, for a session that starts on websocket or
    has just been upgraded from long-polling.

    The same protocol as ``AsyncSocket._websocket_handler``, with three tasks fewer
    per idle socket: the receive waits under ``asyncio.timeout`` instead of
    ``wait_for`` on a new task, and a writer task runs only while packets are queued
    instead of waiting on the queue forever.
    """
    server = socket.server
    if socket.connected:  # it polled until now
        if not await _upgrade(socket, ws, server.ping_interval + server.ping_timeout):
            await ws.close()
            return
    else:
        socket.connected = True
        socket.upgraded = True
    _enable_direct_writes(socket, ws)
    queue = socket.queue
    loop = asyncio.get_running_loop()
    writer_task: asyncio.Task[None] | None = None

    async def drain() -> None:
        """Send what the queue holds, then end: a writer exists only while there is work."""
        nonlocal writer_task
        while not queue.empty():
            packets = []
            closing = False
            while not queue.empty():
                pkt = queue.get_nowait()
                queue.task_done()
                if pkt is None:
                    closing = True
                    break
                packets.append(pkt)
            try:
                for p in packets:
                    await ws.send(p.encode())
            except Exception:  # the connection is gone; the reader ends the session
                closing = True
            if closing:
                queue.on_put = None
                await ws.close()
                return
        writer_task = None  # a finished task kept per idle socket is ~0.3 KB for nothing

    def start_writer() -> None:
        nonlocal writer_task
        if writer_task is None or writer_task.done():
            writer_task = loop.create_task(drain())

    queue.on_put = start_writer
    if not queue.empty():
        start_writer()
    timeout = server.ping_interval + server.ping_timeout
    try:
        while True:
            try:
                async with asyncio.timeout(timeout):
                    data = await ws.wait()
            except (TimeoutError, OSError, asyncio.CancelledError):
                break
            if data is None:
                break
            if len(data) > server.max_http_buffer_size:
                break  # engine.io: "packet is too large"
            try:
                pkt = eio_packet.Packet(encoded_packet=data)
            except Exception:
                logger.info("%s: undecodable engine.io packet; closing", socket.sid)
                break
            if not await lean.receive_packet(socket, pkt):
                break
    finally:
        queue.put_nowait(None)
        if writer_task is not None:
            await writer_task
        queue.on_put = None
        await socket.close(wait=False, abort=True, reason=server.reason.TRANSPORT_CLOSE)


#: what a direct writer's ``offer`` answers: the frame was written; the socket cannot
#: take a shared frame now (queue it instead); its send buffer is past the bound
WRITTEN, NOT_NOW, FULL = 1, 0, -1


class DirectWrites:
    """Shared frames written to the transport under an aiohttp websocket (a session
    that does not run the lean loop); :class:`nats_adapter._lean_websocket.LeanWebSocket`
    offers the same :meth:`offer` for the others. Holds only the transport: the
    socket, which holds this, is passed in (no reference cycle)."""

    __slots__ = ("transport",)

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport

    def offer(self, socket: Any, frame: bytes, max_buffer: int) -> int:
        """Write ``frame`` now if ``socket`` may take it (see the module docstring):
        :data:`WRITTEN`, :data:`NOT_NOW` or :data:`FULL`."""
        transport = self.transport
        if not lean.may_take_shared_frame(socket, transport):
            return NOT_NOW
        if transport.get_write_buffer_size() > max_buffer:
            return FULL
        transport.write(frame)
        return WRITTEN

