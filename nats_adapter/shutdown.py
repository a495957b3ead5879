"""Closing every websocket at shutdown, without waiting for each client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


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
