"""Running the aiohttp app with a bound on concurrent connections.

aiohttp accepts connections until the process runs out of file descriptors, at
which point accepting fails for everyone (and slow requests can hold
connections to get there). Here a connection past ``max_connections`` is answered
``503`` and closed at once, and the open-file limit is raised to what the system
allows so that the bound, not the limit, is what clients meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import time
from typing import Any

from aiohttp import web

logger = logging.getLogger(__name__)

#: descriptors kept for everything that is not a client connection (broker, logs...)
RESERVED_FDS = 128

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Connection: close\r\nContent-Length: 63\r\n\r\n"
         b'{"ok": false, "error": "too many connections: try again later"}')
assert len(_BUSY.split(b"\r\n\r\n", 1)[1]) == 63


def raise_file_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


class _Busy(asyncio.Protocol):
    """Answers 503 and hangs up: the connection is over the bound."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_BUSY)
        transport.close()


class ConnectionCounts:
    """What the bound did (read by /metrics)."""

    def __init__(self) -> None:
        self.limit = 0
        #: connections refused for being over the bound
        self.refused = 0


CONNECTIONS_KEY = web.AppKey("connections", ConnectionCounts)


class ConnectionCap:
    """A protocol factory: aiohttp's handler for each connection up to ``counts.limit``."""

    def __init__(self, server: web.Server, counts: ConnectionCounts) -> None:
        self.server = server
        self.counts = counts

    def __call__(self) -> asyncio.Protocol:
        counts = self.counts
        if len(self.server.connections) >= counts.limit:
            counts.refused += 1
            if counts.refused == 1 or counts.refused % 1000 == 0:
                logger.warning("refusing connections: %d open, the bound is %d (refused %d "
                               "so far)", len(self.server.connections), counts.limit,
                               counts.refused)
            return _Busy()
        return self.server()


class GcPauses:
    """How long the interpreter's garbage collector held the event loop, per
    generation (every socket of the node waits while it runs)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        #: objects :func:`freeze_startup_objects` froze (``gc.get_freeze_count()`` walks
        #: them all: not something to do at every scrape)
        self.frozen = 0
        self._started = 0.0

    def install(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        gen = min(info["generation"], 2)
        self.collections[gen] += 1
        self.seconds[gen] += took
        if took > self.longest[gen]:
            self.longest[gen] = took


#: the collector is one per process, and so are its pauses
GC_PAUSES = GcPauses()


def freeze_startup_objects() -> int:
    """Collect once, then keep everything alive now out of the collector's sight
    (``gc.freeze``): the modules, classes and functions imported, the app, the broker
    connection. A full collection then walks only what serving has created since: in
    the benchmark's gateways ~60,000 objects fewer, and a full collection after a
    fan-out run took 7.5-8.7 ms instead of 35-39 ms. Returns how many were frozen."""
    gc.collect()
    gc.freeze()
    GC_PAUSES.frozen = gc.get_freeze_count()
    return GC_PAUSES.frozen


async def serve(app: web.Application, host: str, port: int, max_connections: int = 0,
                shutdown_timeout: float = 5.0, admin: tuple[str, int] | None = None) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut it down gracefully.

    ``max_connections`` 0 means as many as the open-file limit allows. ``admin``: the
    (host, port) of the operator listener, which serves the same app outside the bound
    (see :mod:`gateway.guards` for what only it answers).
    """
    limit = raise_file_limit()
    counts = app.get(CONNECTIONS_KEY) or ConnectionCounts()
    counts.limit = max_connections or max(limit - RESERVED_FDS, 1)
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(ConnectionCap(runner.server, counts), host, port,
                                        reuse_address=True, backlog=1024)
    listeners = [listener]
    if admin is not None:
        listeners.append(await loop.create_server(runner.server, admin[0], admin[1],
                                                  reuse_address=True))
        logger.info("operator listener on http://%s:%d", admin[0], admin[1])
    logger.info("accepting up to %d concurrent connections", counts.limit)
    logger.info("%d objects of the start-up frozen out of garbage collection",
                freeze_startup_objects())
    GC_PAUSES.install()  # after: the start-up's own full collection is not serving's pause
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for each in listeners:
            each.close()  # no new connections; then the app's shutdown hooks run
        await runner.cleanup()
        GC_PAUSES.uninstall()


def run(app: web.Application, **kwargs: Any) -> None:
    """:func:`serve` in a new event loop."""
    asyncio.run(serve(app, **kwargs))
