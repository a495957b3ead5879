"""engine.io's per-socket packet queue, bounded and counting what is in flight.

:class:`CountingQueue` replaces the ``asyncio.Queue`` engine.io makes for each socket
(``AsyncServer.create_queue``): a lean websocket writes it out as packets are put
(:meth:`CountingQueue.take`, ``on_put``), and a shared frame may be written to a
socket only while nothing waits here or is still in flight
(:func:`nats_adapter._engineio.connection.may_take_shared_frame`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engineio import packet as eio_packet

logger = logging.getLogger(__name__)


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

    __slots__ = ("_bytes", "_getters", "_joiners", "_unfinished", "in_flight", "items",
                 "limits", "on_put", "overflowed", "ping_interval_ms")

    def __init__(self, maxsize: int = 0, limits: QueueLimits | None = None,
                 ping_interval_ms: int | None = None) -> None:
        self.ping_interval_ms = ping_interval_ms
        self.items: list[Any] | None = None
        self._getters: list[asyncio.Future[None]] | None = None
        self._joiners: list[asyncio.Future[None]] | None = None
        self._unfinished = 0
        self._bytes = 0
        self.in_flight = 0
        self.on_put: Any = None
        self.limits = limits
        self.overflowed = False

    @property
    def polled(self) -> bool:
        """Whether a reader (a long-poll) waits for a packet."""
        return bool(self._getters)

    def qsize(self) -> int:
        return len(self.items) if self.items else 0

    def empty(self) -> bool:
        return not self.items

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
        if self.items is None:
            self.items = []
        limits = self.limits
        if item is not None and limits is not None:
            data = getattr(item, "data", None)
            self._bytes += len(data) if isinstance(data, (str, bytes)) else 0
            if len(self.items) >= limits.max_items or self._bytes > limits.max_bytes:
                self.overflowed = True
                limits.overflows += 1
                logger.warning("closing a connection that stopped reading: %d packets, "
                               "%d bytes unsent", len(self.items), self._bytes)
                item = None
        self.items.append(item)
        self._unfinished += 1
        self._wake_getter()
        if self.on_put is not None:
            self.on_put()

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        items = self.items
        if not items:
            raise asyncio.QueueEmpty
        item = items.pop(0)
        if not items:
            self.items = None
            self._bytes = 0
        if item is not None:
            self.in_flight += 1
            if self._bytes:
                data = getattr(item, "data", None)
                self._bytes -= len(data) if isinstance(data, (str, bytes)) else 0
        return item

    async def get(self) -> Any:
        while not self.items:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(fut)
            try:
                await fut
            except BaseException:
                if self._getters is not None and fut in self._getters:
                    self._getters.remove(fut)
                elif self.items:
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
        items = self.items
        if not items:
            return []
        self.items = None
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


def self_test() -> str | None:
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
