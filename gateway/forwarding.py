"""Requests of a session another gateway owns, served through that gateway.

socket.io-client's default mode starts on HTTP long-polling: behind a balancer
without affinity, its requests after the handshake and its websocket upgrade may
reach any gateway. Engine.io session ids name their node
(:func:`nats_adapter.sids.new_eio_sid`) and every node says in its heartbeats where
it is reached over HTTP (``--advertise-url``), so a gateway that gets a request for a
session it does not own sends it to the owner:

- a polling GET or POST becomes the same request to the owner (body, query and the
  headers engine.io reads; the client's address appended to ``X-Forwarded-For``),
  whose answer goes back as it came (status, body, encoding, CORS headers);
- a websocket upgrade is sent on to the owner as it came (its handshake headers
  too, so the client and the owner agree the websocket between them); once the
  owner has answered ``101``, the client's connection is taken from aiohttp and
  the bytes are spliced both ways, unparsed, until either side closes
  (:class:`_Splice`). Where aiohttp's connection cannot be taken over, messages are
  relayed one by one over two aiohttp websockets instead (:meth:`Forwarder.relay_websocket`).
  The splice costs the relaying gateway one read and one write per chunk; the
  relay parsed, unmasked and framed every message again (the bench's
  ``no-affinity`` scenario measures both: BENCHMARKS.md).

A websocket upgrade first tries to **move** the session to the gateway it landed
on (:meth:`Owners.take_session`, :mod:`nats_adapter.handover`: sid, rooms, session
data and what the owner had queued come here, and the owner forgets it without a
disconnect), which then serves the upgrade itself: every delivery to that client is
a direct one from then on, where a splice costs the gateway in between a read and a
write for each. A session that cannot move (an owner of an older release, one that
does not answer or refuses, ``--upgrade-move off``) is spliced or relayed as above:
the owner keeps its sockets, rooms and queue, so nothing is lost or delivered twice
on the way. After a move, the old owner sends the session's requests on to its new
gateway for as long as it lives there (:meth:`Owners.moved_to`). A request for a
node that is not alive (or a sid of no node's shape) gets what engine.io answers for
a session it does not know, ``400 {"code": 1, "message": "Session ID unknown"}``;
the client then opens a new session (or recovers it, with ``--recovery``). A request
another gateway already forwarded (``X-Gateway-Hop``) is never forwarded again, but
by the old owner of a session that moved, to the gateway it moved to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from nats_adapter import compat
from nats_adapter.sids import eio_sid_owner

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: set on a forwarded request: the forwarding node's tag
HOP_HEADER = "X-Gateway-Hop"
#: request headers that describe the connection, not the request (RFC 9110, 7.6.1)
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
    "Trailer", "Transfer-Encoding", "Upgrade", "Content-Length", "Host",
    "Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Extensions",
    "Sec-WebSocket-Accept", "Sec-WebSocket-Protocol"))
#: how long a request waits for a node it does not know yet to be heard (a node's
#: first hello may arrive after a client's first request to another node)
WAIT_FOR_OWNER = 2.0


class Owners(Protocol):
    """What the forwarder needs of the node (a :class:`nats_adapter.ClusterManager`)."""

    node_tag: str

    def node_url(self, tag: str) -> str | None: ...

    def moved_to(self, eio_sid: str) -> str | None:
        """The node a session of this node moved to, while it lives there."""

    async def serving(self, eio_sid: str) -> bool:
        """Whether the session is served here (moved here included)."""

    async def take_session(self, eio_sid: str) -> str | None:
        """Move the session here; None when done, else why not."""


def unknown_session() -> web.Response:
    """What engine.io answers for a session it does not know."""
    return web.json_response({"code": 1, "message": "Session ID unknown"}, status=400)


class Forwarder:
    """The aiohttp middleware described in the module docstring."""

    def __init__(self, owners: Owners, path: str, *, read_timeout: float,
                 max_message_bytes: int) -> None:
        self.owners = owners
        self.path = path.rstrip("/") + "/"
        self.read_timeout = read_timeout
        self.max_message_bytes = max_message_bytes
        #: how long a request waits for a node it does not know yet
        self.wait_for_owner = WAIT_FOR_OWNER
        #: requests forwarded and refused, by kind (exported as metrics)
        self.counts: Counter[str] = Counter()
        self._session: aiohttp.ClientSession | None = None
        #: websockets spliced as bytes (else relayed message by message)
        self.splice = True
        #: a websocket upgrade moves its session here first (else it is spliced)
        self.move = True

    def client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5,
                                              sock_read=self.read_timeout),
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def owner_url(self, tag: str) -> str | None:
        url = self.owners.node_url(tag)
        deadline = time.monotonic() + self.wait_for_owner
        while url is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            url = self.owners.node_url(tag)
        return url

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(self.path):
            return await handler(request)
        sid = request.query.get("sid", "")
        owner = eio_sid_owner(sid)
        if owner is None:
            return await handler(request)  # engine.io's to serve (or refuse)
        moved_to = self.owners.moved_to(sid) if owner == self.owners.node_tag else None
        if moved_to is not None:
            owner = moved_to  # (one more hop: the node it moved to serves it)
        elif owner == self.owners.node_tag or await self.owners.serving(sid):
            return await handler(request)
        elif HOP_HEADER in request.headers:
            self.counts["refused_second_hop"] += 1
            return unknown_session()
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade and self.move and moved_to is None:
            problem = await self.owners.take_session(sid)
            if problem is None:
                self.counts["moved"] += 1
                return await handler(request)  # ours now: engine.io serves the upgrade
            self.counts[f"move_failed_{problem}"] += 1
        url = await self.owner_url(owner)
        if url is None:
            self.counts["refused_unknown_node"] += 1
            return unknown_session()
        target = url + request.path_qs
        try:
            if upgrade:
                # (an owner reached over TLS: the relay, whose client speaks it)
                if self.splice and target.startswith("http://") and compat.detachable(request):
                    return await self.splice_websocket(request, target)
                return await self.relay_websocket(request, target)
            return await self.forward(request, target)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # the owner went away (its sessions with it): as for any unknown session
            self.counts["failed"] += 1
            logger.info("forwarding to %s failed: %s", url, exc)
            return unknown_session()

    def headers(self, request: web.Request) -> dict[str, str]:
        out = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        out["Host"] = request.headers.get("Host", "")
        forwarded = request.headers.get("X-Forwarded-For")
        client = request.remote or ""
        # the owner then knows no operator sent this (see gateway.guards)
        out["X-Forwarded-For"] = f"{forwarded}, {client}" if forwarded else client
        out[HOP_HEADER] = self.owners.node_tag
        return out

    async def forward(self, request: web.Request, target: str) -> web.Response:
        body = await request.read()
        async with self.client().request(request.method, target, data=body or None,
                                         headers=self.headers(request),
                                         allow_redirects=False) as answer:
            content = await answer.read()
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
            self.counts["polling"] += 1
            return web.Response(status=answer.status, body=content, headers=headers)

    async def splice_websocket(self, request: web.Request, target: str) -> web.StreamResponse:
        """The upgrade, sent on to the owner as it came; on its ``101``, the client's
        connection spliced to the owner's (see the module docstring)."""
        parts = urlsplit(target)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(5):
            upstream, owner = await loop.create_connection(
                _Splice, parts.hostname or "localhost", parts.port or 80)
        handed = False
        try:
            headers = self.headers(request)
            for name in WEBSOCKET_HEADERS:
                if name in request.headers:
                    headers[name] = request.headers[name]
            headers["Connection"] = "Upgrade"
            upstream.write(f"GET {request.path_qs} HTTP/1.1\r\n".encode("latin-1") + b"".join(
                f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items()) + b"\r\n")
            async with asyncio.timeout(self.read_timeout):
                head = await owner.head
                status = _status(head)
                if status != 101:  # the owner's refusal, as the owner gave it
                    return await _answer(owner, head, status)
            client = request.transport
            if client is None or client.is_closing() or not compat.detachable(request):
                return web.Response()  # the client went away meanwhile
            client, tail = compat.detach_connection(request)
            self.counts["websocket"] += 1
            self.counts["websocket_spliced"] += 1  # (of those: spliced, not relayed)
            into_client = _Splice()
            into_client.head.set_result(b"")
            into_client.peer, into_client.spliced = upstream, True
            owner.peer = client
            client.set_protocol(into_client)
            into_client.connection_made(client)
            client.write(head + bytes(owner.buffer))
            owner.buffer.clear()
            owner.spliced = True
            if tail:
                upstream.write(tail)
            if not client.is_reading():
                client.resume_reading()
            handed = True  # now the splice's to close
            # aiohttp's handler no longer has the connection: this response is never sent
            return web.Response()
        finally:
            if not handed:
                upstream.close()

    async def relay_websocket(self, request: web.Request, target: str) -> web.StreamResponse:
        upstream = await self.client().ws_connect(
            target, headers=self.headers(request), autoping=False, autoclose=False,
            max_msg_size=self.max_message_bytes, compress=0, heartbeat=None)
        try:
            ws = web.WebSocketResponse(autoping=False, autoclose=False, compress=False,
                                       max_msg_size=self.max_message_bytes)
            await ws.prepare(request)
            self.counts["websocket"] += 1
            down = asyncio.ensure_future(_pump(ws, upstream))
            up = asyncio.ensure_future(_pump(upstream, ws))
            try:
                await asyncio.wait((down, up), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (down, up):
                    task.cancel()
                await asyncio.gather(down, up, return_exceptions=True)
                if not ws.closed:
                    await ws.close()
            return ws
        finally:
            if not upstream.closed:
                await upstream.close()


async def _pump(source: Any, sink: Any) -> None:
    """Messages from one websocket to the other, until ``source`` closes."""
    async for msg in source:
        if msg.type is aiohttp.WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is aiohttp.WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is aiohttp.WSMsgType.PING:
            await sink.ping(msg.data)
        elif msg.type is aiohttp.WSMsgType.PONG:
            await sink.pong(msg.data)
        else:  # CLOSE, CLOSING, CLOSED, ERROR
            break
    if not sink.closed:
        await sink.close()


#: the handshake headers a spliced upgrade carries to the owner as the client sent them
WEBSOCKET_HEADERS = ("Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version",
                     "Sec-WebSocket-Extensions", "Sec-WebSocket-Protocol")


class _Splice(asyncio.Protocol):
    """One side of a splice: once ``spliced``, what it reads is written to ``peer``, and
    either side's end closes both. Before (the owner's side, during the handshake) it
    keeps what it reads in ``buffer`` and resolves ``head`` with the answer's head (up
    to the blank line); ``changed`` is set at every read and at the end."""

    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.spliced = False
        self.ended = False
        self.changed = asyncio.Event()
        self.head: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.spliced:
            assert self.peer is not None
            self.peer.write(data)
            return
        self.buffer += data
        self.changed.set()
        if not self.head.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end + 4])
                del self.buffer[:end + 4]
                self.head.set_result(head)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.changed.set()
        if not self.head.done():
            self.head.set_exception(ConnectionError("the owner closed the connection"))
            self.head.exception()  # retrieved: nobody may be waiting any more
        if self.peer is not None:
            self.peer.close()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()


def _status(head: bytes) -> int:
    """The status of an HTTP answer's head (502 for a head that is none)."""
    fields = head.split(b" ", 2)
    return int(fields[1]) if len(fields) > 2 and fields[1].isdigit() else 502


async def _answer(owner: _Splice, head: bytes, status: int) -> web.Response:
    """The owner's non-``101`` answer to an upgrade (its body read by Content-Length)."""
    headers = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() not in HOP_BY_HOP:
            headers[name.strip()] = value.strip()
    length = int(head.lower().partition(b"\r\ncontent-length:")[2].split(b"\r\n", 1)[0]
                 or b"0")
    while len(owner.buffer) < length and not owner.ended:
        owner.changed.clear()
        await owner.changed.wait()
    return web.Response(status=status, body=bytes(owner.buffer[:length]), headers=headers)
