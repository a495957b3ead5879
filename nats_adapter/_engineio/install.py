"""Installing the fast path on one engine.io server, and what it needs at run time.

Stock python-socketio creates an asyncio task per recipient, and every packet then
wakes that socket's engine.io writer task. For websocket sessions on aiohttp the
node instead builds each websocket frame once and writes the same bytes to every
recipient's lean connection (see :class:`nats_adapter.hub.Fanout`, which decides
when, and :mod:`.connection`).

:func:`install` consults :mod:`nats_adapter.compat` for every private it uses.
What is missing turns off only what needs it, and the stock path serves instead:

- engine.io's server or socket not as expected: nothing is installed (engine.io's
  own queue, ping tasks and websocket loop, python-socketio's delivery);
- aiohttp's request handler not as expected, or websocket compression on: no lean
  connections, hence no shared frames; websockets run engine.io's own loop on
  aiohttp (never a second loop of ours); the bounded queue and ping timers stay;
- ``AsyncSocket._send_ping`` not as expected: engine.io's ping task per socket.

An error inside the lean path at run time turns shared frames off for good, with one
warning (:meth:`FastPath.disable`); ``/healthz`` says why (:meth:`FastPath.report`).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Iterable
from typing import Any

from .. import compat
from .connection import Sessions, close_second_websocket, take_over
from .heartbeat import Heartbeat, ping_later
from .polling import PollingRules
from .queue import CountingQueue, QueueLimits, self_test

logger = logging.getLogger(__name__)

#: the features of :mod:`nats_adapter.compat` this package reports on
LEAN = "aiohttp.take_over"
POLLING = "engineio.polling"

#: engine.io server -> its fast path
_installed: weakref.WeakKeyDictionary[Any, FastPath] = weakref.WeakKeyDictionary()


class FastPath:
    """The fast path installed on one engine.io server."""

    def __init__(self, eio: Any, sessions: Sessions, queue_limits: QueueLimits | None,
                 off: dict[str, str]) -> None:
        self.eio = eio
        self.sessions = sessions
        self.queue_limits = queue_limits
        #: Node's long-polling rules, before engine.io sees a request; None when
        #: engine.io is not as they expect (``engineio.polling``)
        self.polling: PollingRules | None = None
        #: feature -> why it is off on this server (configuration, a run-time error)
        self.off = off

    @property
    def enabled(self) -> bool:
        """Whether shared frames go straight to lean connections."""
        return self.sessions.direct and self.sessions.heartbeat is not None

    @property
    def heartbeat(self) -> Heartbeat | None:
        """The lean connections' heartbeat; None without lean connections."""
        return self.sessions.heartbeat

    def disable(self, reason: str) -> None:
        """Every socket takes engine.io's queue from now on, and no new websocket is
        taken over."""
        if not self.sessions.direct:
            return
        self.sessions.direct = False
        self.sessions.writers.clear()
        self.off[LEAN] = f"disabled at run time: {reason}"
        logger.warning("fast fan-out disabled for this server (%s); delivery continues on "
                       "engine.io's public path", reason)

    def report(self) -> dict[str, dict[str, Any]]:
        """:func:`nats_adapter.compat.report`, with what is off on this server."""
        return compat.report(self.off)


def fast_paths(fastpath: FastPath | None) -> dict[str, dict[str, Any]]:
    """Which fast paths are active and, for the others, why not (for /healthz)."""
    if fastpath is not None:
        return fastpath.report()
    return compat.report({"engineio.server": "not installed (not an aiohttp engine.io "
                          "server, or engine.io not as expected)"})


def fastpath_of(eio: Any) -> FastPath | None:
    return _installed.get(eio)


def install(eio: Any, *, compression: bool = False, close_timeout: float = 2.0,
            queue_limits: QueueLimits | None = None) -> FastPath | None:
    """Prepare an engine.io ``AsyncServer`` (aiohttp mode) for lean connections and
    shared frames (see the module docstring).

    Also sets whether websocket connections may negotiate permessage-deflate
    (``compression``, which rules lean connections out; engine.io offers no switch
    for it), how long a close waits for the client's answer (``close_timeout``), and
    bounds every socket's queue with ``queue_limits`` (:class:`CountingQueue`).
    Returns None, changing nothing, when the server is not aiohttp-based or engine.io
    is not as expected (logged once).
    """
    if getattr(eio, "async_mode", None) != "aiohttp":
        return None
    problem = compat.problem("engineio.server") or self_test()
    if problem:
        logger.warning("fast fan-out not installed; engine.io's public path serves instead "
                       "(%s)", problem)
        return None
    off: dict[str, str] = {}
    lean = compat.problem(LEAN)
    if compression:
        off[LEAN] = "websocket compression is on (shared frames are only valid uncompressed)"
    elif lean is not None:
        logger.warning("lean websocket connections not available (%s); websockets run on "
                       "engine.io's own path", lean)
    sessions = Sessions(None)
    if lean is None and not compression:
        sessions.heartbeat = Heartbeat(eio, sessions.is_lean)
    fastpath = FastPath(eio, sessions, queue_limits, off)
    _installed[eio] = fastpath
    heartbeat = sessions.heartbeat
    if heartbeat is not None:
        # the heartbeat also checks polling sessions' ping timeouts, which engine.io's
        # service task did with a wake-up (and a wait_for) per socket
        eio.start_service_task = False
        handle_request = eio.handle_request

        async def handle_request_lean(*args: Any, **kwargs: Any) -> Any:
            if fastpath.enabled and args and close_second_websocket(eio, sessions, args[0]):
                from aiohttp import web

                return web.Response()  # never sent: the connection is no longer aiohttp's
            return await handle_request(*args, **kwargs)

        # before python-socketio's attach() routes requests to it
        eio.handle_request = handle_request_lean
    if compat.check(POLLING):
        _install_polling_rules(eio, fastpath)
    eio._async = {**eio._async,
                  "websocket": _websocket_class(eio._async["websocket"], fastpath,
                                                compression, close_timeout)}
    interval_ms = round((eio.ping_interval + getattr(eio, "ping_interval_grace_period", 0))
                        * 1000)

    def create_queue(*args: Any, **kwargs: Any) -> CountingQueue:
        return CountingQueue(*args, **{"ping_interval_ms": interval_ms, "limits": queue_limits,
                                       **kwargs})

    eio.create_queue = create_queue
    if compat.check("engineio.ping_timer"):
        start_task = eio.start_background_task
        is_lean = sessions.is_lean

        def start_background_task(target: Any, *args: Any, **kwargs: Any) -> Any:
            # engine.io keeps a task per socket asleep for the whole ping interval; a
            # timer does the same job without a task's memory
            if getattr(target, "__name__", "") == "_send_ping" and not args and not kwargs:
                if heartbeat is not None:
                    # every session's first ping passes here: the heartbeat's check of
                    # polling sessions (engine.io's service task is off) starts with it
                    heartbeat.start_sweep()
                return ping_later(target.__self__, eio.ping_interval, is_lean)
            return start_task(target, *args, **kwargs)

        eio.start_background_task = start_background_task
    return fastpath


def _install_polling_rules(eio: Any, fastpath: FastPath) -> None:
    """Serve every request of ``eio`` through :class:`PollingRules`, for every method
    (engine.io routes GET, POST and OPTIONS only: aiohttp answered others 405)."""
    rules = fastpath.polling = PollingRules(eio)
    handle_request = eio.handle_request

    async def handle_request_polling(request: Any) -> Any:
        return await rules.serve(request, handle_request)

    eio.handle_request = handle_request_polling
    eio._async = {**eio._async,
                  "translate_request": rules.translate_request(eio._async["translate_request"])}
    attach = eio.attach

    def attach_every_method(app: Any, *args: Any, **kwargs: Any) -> Any:
        attached = attach(app, *args, **kwargs)
        resources = {route.resource for route in app.router.routes()
                     if route.handler is handle_request_polling and route.resource is not None}
        for resource in resources:
            resource.add_route("*", handle_request_polling)
        return attached

    eio.attach = attach_every_method


def _websocket_class(base: Any, fastpath: FastPath, compression: bool,
                     close_timeout: float) -> type:
    """engine.io's aiohttp websocket class, taking its connections over when it can."""
    options: dict[str, Any] = ({"compress": compression, "timeout": close_timeout}
               if compat.check("aiohttp.websocket_options") else {})
    sessions = fastpath.sessions

    class WebSocket(base):  # type: ignore[misc]
        """A lean connection when possible; else engine.io's own, remembered (by sid)
        so that shutdown can hang it up."""

        async def __call__(self, environ: dict[str, Any]) -> Any:
            from aiohttp import web

            socket = getattr(self.handler, "__self__", None)
            if fastpath.enabled and socket is not None:
                taken = await _take_over(self, socket, environ, fastpath)
                if taken is not None:
                    return taken
            # timeout: how long a close waits for the client's close frame (aiohttp's
            # default, 10 s, held every shutdown that long when a client did not answer)
            self._sock = web.WebSocketResponse(max_msg_size=self.server.max_http_buffer_size,
                                               **options)
            await self._sock.prepare(environ["aiohttp.request"])
            self.environ = environ
            sid = getattr(socket, "sid", None)
            if sid is not None:
                sessions.websockets[sid] = self._sock
            try:
                await self.handler(self)  # engine.io's own session loop
            finally:
                if sid is not None and sessions.websockets.get(sid) is self._sock:
                    del sessions.websockets[sid]
            return self._sock

    return WebSocket


async def _take_over(ws: Any, socket: Any, environ: dict[str, Any], fastpath: FastPath
                     ) -> Any:
    """Serve this websocket on a lean connection. Returns the (never sent) response
    for aiohttp once the connection is taken over, or None when engine.io's own
    websocket should serve it."""
    from aiohttp import web

    if socket.upgraded or not isinstance(socket.queue, CountingQueue):
        return None
    request = environ["aiohttp.request"]
    try:
        conn = take_over(socket, environ, fastpath.sessions)
    except Exception as exc:
        fastpath.disable(f"websocket take-over failed: {exc!r}")
        if request.transport is not None:
            return None  # still aiohttp's: engine.io's websocket serves it
        # the connection was already detached from aiohttp, and is lost
        await socket.close(wait=False, abort=True, reason=ws.server.reason.TRANSPORT_ERROR)
        return web.Response()
    if conn is None:
        return None
    assert fastpath.heartbeat is not None
    fastpath.heartbeat.start_sweep()
    # aiohttp's handler no longer has the connection: this response is never sent
    return web.Response()


def websocket_of(socket: Any) -> Any:
    """The open websocket of an engine.io socket, if the fast path knows it."""
    fastpath = _installed.get(socket.server)
    return None if fastpath is None else fastpath.sessions.websockets.get(socket.sid)


async def close_session(socket: Any, reason: str) -> None:
    """Close an engine.io session and hang up its websocket, if it has one."""
    await socket.close(wait=False, abort=True, reason=reason)
    ws = websocket_of(socket)
    if ws is not None and not ws.closed:
        await ws.close(code=1008)


async def close_websockets(sockets: Iterable[Any], code: int = 1001) -> int:
    """Hang up the websocket of each engine.io socket ("going away" by default).

    engine.io's own close only sends its CLOSE packet and then waits for the client
    to hang up, which holds a server shutdown until the client does. Returns how
    many were closed.
    """
    open_ws = [ws for s in sockets if (ws := websocket_of(s)) is not None and not ws.closed]
    await asyncio.gather(*(ws.close(code=code) for ws in open_ws), return_exceptions=True)
    return len(open_ws)
