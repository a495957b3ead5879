"""Running the aiohttp app with a bound on concurrent connections.

aiohttp accepts connections until the process runs out of file descriptors, at
which point accepting fails for everyone (and slow requests can hold
connections to get there). Here a connection past ``max_connections`` is answered
``503`` and closed at once, and the open-file limit is raised to what the system
allows so that the bound, not the limit, is what clients meet.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
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


async def serve(app: web.Application, host: str, port: int, max_connections: int = 0,
                shutdown_timeout: float = 5.0) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, then shut it down gracefully.

    ``max_connections`` 0 means as many as the open-file limit allows.
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
    logger.info("accepting up to %d concurrent connections", counts.limit)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        listener.close()  # no new connections; then the app's shutdown hooks run
        await runner.cleanup()


def run(app: web.Application, **kwargs: Any) -> None:
    """:func:`serve` in a new event loop."""
    asyncio.run(serve(app, **kwargs))
