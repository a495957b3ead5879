"""Fan-out to local sockets: one websocket frame built per emit, written to every recipient.

Stock python-socketio creates an asyncio task per recipient, and every packet then
wakes that socket's engine.io writer task. For websocket sessions on aiohttp this
module instead builds the websocket frame once and writes the same bytes to each
recipient's transport, which costs a fraction of the CPU (see BENCHMARKS.md).

This reaches into private parts of python-engineio and aiohttp, so all of that is
here, behind :func:`install`, which checks the versions it was written for and
otherwise leaves the server untouched: delivery then takes the public path
(``AsyncServer.send_packet``), which is always correct, only slower.

A direct write is only made when it cannot reorder or corrupt anything:

- the session connected over websocket directly (not upgraded from polling), so
  every packet the engine.io queue hands out goes through our websocket wrapper;
- nothing waits in the socket's engine.io queue and nothing taken from it is still
  being written (acks and other events stay in order);
- the connection does not compress (a shared frame is only valid uncompressed);
- the transport is not closing and its write buffer is below ``max_buffer`` bytes.

Otherwise the packet goes through the engine.io queue like in stock python-socketio.
The per-socket send buffer is bounded: a socket whose transport buffer or queue is
past the limit is dropped (see :class:`FanoutLimits`) instead of growing the
node's memory or delaying others.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from engineio import packet as eio_packet

logger = logging.getLogger(__name__)

#: versions the private-attribute path was written and tested against (major.minor)
SUPPORTED = {"python-engineio": ("4.",), "aiohttp": ("3.1",)}

_PACK1 = struct.Struct("!BB").pack
_PACK2 = struct.Struct("!BBH").pack
_PACK3 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final websocket text frame (server to client)."""
    n = len(payload)
    if n < 126:
        return _PACK1(0x81, n) + payload
    if n < 65536:
        return _PACK2(0x81, 126, n) + payload
    return _PACK3(0x81, 127, n) + payload


@dataclass(frozen=True, slots=True)
class FanoutLimits:
    """Per-socket bounds on what the node holds for a client that does not read.

    :param max_buffer_bytes: bytes waiting in a socket's transport buffer before it
        is considered a slow consumer.
    :param max_queued_packets: packets waiting in its engine.io queue likewise.
    """

    max_buffer_bytes: int = 1024 * 1024
    max_queued_packets: int = 1000


class CountingQueue(asyncio.Queue[Any]):
    """engine.io's per-socket queue, counting packets taken but not yet written."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.in_flight = 0

    def _get(self) -> Any:
        item = super()._get()
        if item is not None:
            self.in_flight += 1
        return item


def _versions_ok() -> bool:
    for dist, prefixes in SUPPORTED.items():
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return False
        if not version.startswith(prefixes):
            logger.warning("fast fan-out disabled: %s %s is untested (wants %s*)", dist,
                           version, "/".join(prefixes))
            return False
    return True


def install(eio: Any, *, compression: bool = False, close_timeout: float = 2.0) -> bool:
    """Prepare an engine.io ``AsyncServer`` (aiohttp mode) for direct frame writes.

    Also sets whether websocket connections may negotiate permessage-deflate
    (``compression``; engine.io offers no switch for it). Returns False, changing
    nothing, when the server is not aiohttp-based or the versions are untested.
    """
    if getattr(eio, "async_mode", None) != "aiohttp" or not _versions_ok():
        return False
    base = eio._async["websocket"]

    class FanoutWebSocket(base):  # type: ignore[misc, valid-type]
        """engine.io's aiohttp websocket, remembered by its socket for direct writes."""

        async def __call__(self, environ: dict[str, Any]) -> Any:
            from aiohttp.web import WebSocketResponse

            request = environ["aiohttp.request"]
            # timeout: how long a close waits for the client's close frame (aiohttp's
            # default, 10 s, held every shutdown that long when a client did not answer)
            self._sock = WebSocketResponse(max_msg_size=self.server.max_http_buffer_size,
                                           compress=compression, timeout=close_timeout)
            await self._sock.prepare(request)
            self.environ = environ
            socket = getattr(self.handler, "__self__", None)
            # only sessions that start on websocket: an upgraded one may have had
            # packets taken from its queue by a polling request
            if socket is not None and not socket.connected \
                    and isinstance(socket.queue, CountingQueue):
                socket.fanout_ws = self._sock
                self.counted_queue = socket.queue
            await self.handler(self)
            return self._sock

        async def send(self, message: Any) -> None:
            try:
                await super().send(message)
            finally:
                queue = getattr(self, "counted_queue", None)
                if queue is not None and queue.in_flight > 0:
                    queue.in_flight -= 1

    eio._async = {**eio._async, "websocket": FanoutWebSocket}
    eio.create_queue = lambda *a, **kw: CountingQueue(*a, **kw)
    return True


async def close_websockets(sockets: Iterable[Any], code: int = 1001) -> int:
    """Close the websocket of each engine.io socket :func:`install` tracks ("going away").

    engine.io's own close only sends its CLOSE packet and then waits for the client
    to hang up, which holds a server shutdown until the client does. Returns how
    many were closed.
    """
    open_ws = [ws for s in sockets
               if (ws := getattr(s, "fanout_ws", None)) is not None and not ws.closed]
    await asyncio.gather(*(ws.close(code=code) for ws in open_ws), return_exceptions=True)
    return len(open_ws)


class Fanout:
    """Writes packets to local engine.io sockets, directly when safe, else queued."""

    def __init__(self, eio: Any, limits: FanoutLimits | None = None) -> None:
        self.eio = eio
        self.limits = limits or FanoutLimits()
        self.direct = 0
        self.queued = 0
        self.slow_consumers_dropped = 0

    def deliver(self, eio_sids: Any, parts: list[str | bytes]) -> tuple[int, int]:
        """Send the encoded Socket.IO packet ``parts`` to every socket in ``eio_sids``.

        Returns (delivered, failed). Never suspends: queued packets are put without
        waiting (engine.io's queue is unbounded, and bounded here by the limits); the
        caller should yield to the loop when :attr:`queued` grew, so writers can run.
        """
        sockets = self.eio.sockets
        frame: bytes | None = None
        eio_pkts: list[Any] | None = None
        delivered = failed = 0
        max_buffer = self.limits.max_buffer_bytes
        single_text = len(parts) == 1 and isinstance(parts[0], str)
        for eio_sid in eio_sids:
            s = sockets.get(eio_sid)
            if s is None or s.closed or s.closing or getattr(s, "fanout_dropped", False):
                failed += 1
                continue
            ws = getattr(s, "fanout_ws", None)
            queue = s.queue
            if ws is not None and single_text and s.upgraded and not s.upgrading \
                    and queue.empty() and not queue.in_flight:
                writer = ws._writer
                transport = writer.transport if writer is not None else None
                if transport is not None and not writer.compress \
                        and not transport.is_closing():
                    if transport.get_write_buffer_size() > max_buffer:
                        self._drop(s, "send buffer full")
                        failed += 1
                        continue
                    if frame is None:
                        frame = text_frame(("4" + parts[0]).encode())  # type: ignore[operator]
                    transport.write(frame)
                    self.direct += 1
                    delivered += 1
                    continue
            if queue.qsize() >= self.limits.max_queued_packets:
                self._drop(s, "send queue full")
                failed += 1
                continue
            if eio_pkts is None:
                eio_pkts = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in parts]
            for p in eio_pkts:
                queue.put_nowait(p)
            self.queued += 1
            delivered += 1
        return delivered, failed

    def _drop(self, socket: Any, reason: str) -> None:
        """Disconnect a slow consumer: logged, counted, its memory released."""
        self.slow_consumers_dropped += 1
        socket.fanout_dropped = True
        logger.warning("dropping slow consumer %s: %s", socket.sid, reason)
        task = asyncio.get_running_loop().create_task(
            socket.close(wait=False, abort=True, reason="slow consumer"))
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[Any]] = set()
