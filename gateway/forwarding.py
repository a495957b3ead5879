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
- a websocket upgrade becomes a websocket to the owner, and messages are relayed
  both ways until either side closes (ping and pong are engine.io packets, so they
  cross the relay like any other).

The session itself never moves: the owner keeps its sockets, rooms and queue, so
nothing is lost or delivered twice on the way. A request for a node that is not
alive (or a sid of no node's shape) gets what engine.io answers for a session it
does not know, ``400 {"code": 1, "message": "Session ID unknown"}``; the client
then opens a new session (or recovers it, with ``--recovery``). A request another
gateway already forwarded (``X-Gateway-Hop``) is never forwarded again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import web

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
        owner = eio_sid_owner(request.query.get("sid"))
        if owner is None or owner == self.owners.node_tag:
            return await handler(request)  # engine.io's to serve (or refuse)
        if HOP_HEADER in request.headers:
            self.counts["refused_second_hop"] += 1
            return unknown_session()
        url = await self.owner_url(owner)
        if url is None:
            self.counts["refused_unknown_node"] += 1
            return unknown_session()
        target = url + request.path_qs
        try:
            if request.headers.get("Upgrade", "").lower() == "websocket":
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
