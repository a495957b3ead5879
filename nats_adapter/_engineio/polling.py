"""HTTP long-polling as Node's engine.io serves it, decided before python-engineio
sees a request.

Node's engine.io is the reference the socket.io maintainers' protocol suites test.
python-engineio differs from it on long-polling, and :class:`PollingRules` brings
each difference back to Node's behaviour at the request, around engine.io's
``handle_request`` (engine.io's own code then serves what passes):

- a request without a ``transport``, or with one the server does not offer: 400
  (engine.io served it as polling);
- a method other than GET, POST (and OPTIONS, the CORS preflight): 400 (aiohttp's
  router answered 405, engine.io 405 for the methods it was routed);
- a poll while another poll of the same session waits: the session ends, the
  waiting poll gets CLOSE and the second one 400 (engine.io served both, and the
  client lost what the first one took);
- a session whose PING went unanswered for longer than the ping timeout: the session
  ends and the request gets 400 (engine.io only noticed at its next send, or at the
  next sweep, and answered the poll with the PING);
- a POST whose payload does not decode: the session ends with a 400 (engine.io
  logged a traceback, answered "OK" and kept the session);
- a POST of more than 16 packets (socket.io-client's batch after a burst of
  emits): every packet is taken, as Node does (engine.io refused the payload as
  undecodable and dropped all of them);
- a POST that ends the session (a CLOSE packet) while a poll waits: the poll is
  answered NOOP at once (engine.io left it waiting ping interval + timeout);
- a POST is answered ``ok`` (engine.io: ``OK``).

The body of a POST is read here, before engine.io, to check it decodes: engine.io
then reads it from a reader over those bytes (its ``translate_request`` is wrapped,
``engineio.polling`` in :mod:`nats_adapter.compat`). A request for one session
never touches another's.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from engineio import packet as eio_packet
from engineio import payload as eio_payload

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: the body of a POST read before engine.io's handler (see the module docstring)
BODY = web.RequestKey("engineio_polling_body", bytes)

#: methods engine.io serves: polls, pushes, the CORS preflight
METHODS = frozenset({"GET", "POST", "OPTIONS"})


def refusal(code: int, message: str) -> web.Response:
    """A 400 with Node's error body: ``{"code": 0, "message": "Transport unknown"}``."""
    return web.Response(status=400, content_type="application/json",
                        text=json.dumps({"code": code, "message": message}))


class BodyReader:
    """``wsgi.input`` over bytes already read: what engine.io reads a POST from."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = len(self.data)
        out, self.data = self.data[:n], self.data[n:]
        return out


def payload_slices(body: bytes) -> list[bytes]:
    """A long-polling payload cut between packets into slices engine.io decodes: it
    refuses more than ``Payload.max_decode_packets`` (16) packets in one payload,
    which socket.io-client sends after a burst of emits (Node takes any number within
    the payload's size). Raises ``ValueError`` when the payload is not UTF-8."""
    text = body.decode("utf-8")
    most = getattr(eio_payload.Payload, "max_decode_packets", None)
    if text.startswith("d=") or not isinstance(most, int) or most < 1:
        return [body]  # JSONP's form-encoded payload: engine.io's to decode
    packets = text.split("\x1e")
    if len(packets) <= most:
        return [body]
    return ["\x1e".join(packets[i:i + most]).encode() for i in range(0, len(packets), most)]


def undecodable(slices: list[bytes]) -> str | None:
    """Why engine.io could not decode one of these slices of a long-polling payload,
    or None if it can (decoded by engine.io's own classes, as its POST handler will)."""
    try:
        for data in slices:
            eio_payload.Payload(encoded_payload=data.decode("utf-8"))
    except Exception as exc:  # engine.io's decoder raises ValueError, IndexError...
        return f"{type(exc).__name__}: {exc}"
    return None


def wants_websocket(request: web.Request) -> bool:
    """Whether a GET asks for a websocket (engine.io upgrades on these headers,
    whatever the ``transport``)."""
    connection = {s.strip() for s in request.headers.get("Connection", "").lower().split(",")}
    return "upgrade" in connection and request.headers.get("Upgrade", "").lower() == "websocket"


class PollingRules:
    """Node's long-polling rules on one engine.io server (see the module docstring)."""

    def __init__(self, eio: Any) -> None:
        self.eio = eio
        #: sessions with a poll (a GET) in engine.io's hands
        self.polls: set[str] = set()
        #: called with the sid of a session ended for an undecodable POST (the
        #: gateway counts them)
        self.on_bad_payload: Callable[[str], None] | None = None

    async def serve(self, request: web.Request, handle: Handler) -> web.StreamResponse:
        """Answer ``request`` by the rules, or hand it to engine.io's ``handle``."""
        method = request.method
        if method == "OPTIONS":
            return await handle(request)
        sid = request.query.get("sid")
        if request.query.get("transport") not in self.eio.transports:
            return refusal(0, "Transport unknown")
        if method not in METHODS:
            return refusal(3, "Bad request") if sid else refusal(2, "Bad handshake method")
        socket = self.eio.sockets.get(sid) if sid else None
        if socket is None or socket.closed or socket.upgraded:
            return await handle(request)  # engine.io answers these (new, unknown, upgraded)
        if not socket.upgrading and self._ping_overdue(socket):
            logger.info("%s: no pong within the ping timeout, closing", sid)
            await self._end(socket, self.eio.reason.PING_TIMEOUT)
            return await handle(request)  # an unknown session now: 400
        if method == "POST":
            return await self._push(request, socket, handle)
        if wants_websocket(request):
            return await handle(request)
        return await self._poll(request, socket, handle)

    def _ping_overdue(self, socket: Any) -> bool:
        last_ping = socket.last_ping
        return bool(last_ping) and time.time() - last_ping > self.eio.ping_timeout

    async def _poll(self, request: web.Request, socket: Any, handle: Handler
                    ) -> web.StreamResponse:
        sid = socket.sid
        if sid in self.polls:
            logger.info("%s: a second poll while one waits, closing", sid)
            await self._end(socket, self.eio.reason.TRANSPORT_ERROR)
            # the waiting poll answers CLOSE; this one (an unknown session now) 400
            socket.queue.put_nowait(eio_packet.Packet(eio_packet.CLOSE))
            return await handle(request)
        self.polls.add(sid)
        try:
            return await handle(request)
        finally:
            self.polls.discard(sid)

    async def _push(self, request: web.Request, socket: Any, handle: Handler
                    ) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length <= self.eio.max_http_buffer_size:
            try:
                body = await request.read()
            except ConnectionError:  # the client went away mid-body: nothing to answer
                return refusal(3, "Bad request")
            slices: list[bytes] = []
            problem: str | None
            try:
                slices = payload_slices(body[:length])
            except ValueError as exc:  # not UTF-8
                problem = f"{type(exc).__name__}: {exc}"
            else:
                problem = undecodable(slices)
            if problem is not None:
                logger.info("%s: undecodable long-polling payload (%s), closing",
                            socket.sid, problem)
                await self._end(socket, self.eio.reason.TRANSPORT_ERROR)
                if self.on_bad_payload is not None:
                    self.on_bad_payload(socket.sid)
                return await handle(request)  # an unknown session now: 400
            for data in slices[:-1]:  # engine.io takes each slice as one POST
                request[BODY] = data
                response = await handle(request)
                if response.status != 200 or socket.closed:
                    return await self._pushed(socket, response)
            request[BODY] = slices[-1]
        return await self._pushed(socket, await handle(request))

    async def _pushed(self, socket: Any, response: web.StreamResponse) -> web.StreamResponse:
        if socket.closed and socket.sid in self.polls and socket.queue.empty():
            # the client closed the session (a CLOSE packet): end the waiting poll (the
            # NOOP waits in the queue if the poll is not at the queue yet)
            socket.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))
        if response.status == 200 and isinstance(response, web.Response):
            response.body = b"ok"
        return response

    async def _end(self, socket: Any, reason: Any) -> None:
        """End ``socket``'s session: its disconnect handlers run, and engine.io forgets it."""
        await socket.close(wait=False, abort=True, reason=reason)
        if self.eio.sockets.get(socket.sid) is socket:
            del self.eio.sockets[socket.sid]

    def translate_request(self, translate: Callable[[Any], dict[str, Any]]
                          ) -> Callable[[Any], dict[str, Any]]:
        """engine.io's ``translate_request``, reading a POST's body from what
        :meth:`serve` read of it."""

        def translate_read(request: Any) -> dict[str, Any]:
            environ = translate(request)
            body = request.get(BODY) if isinstance(request, web.BaseRequest) else None
            if body is not None:
                environ["wsgi.input"] = BodyReader(body)
            return environ

        return translate_read
