"""The one websocket path: everything that touches python-engineio and aiohttp internals.

- :mod:`.install`: puts the fast path on an engine.io server, feature by feature
  (:mod:`nats_adapter.compat` probes each private), and falls back to stock
  engine.io for whatever is missing;
- :mod:`.queue`: the bounded, counting per-socket packet queue;
- :mod:`.frames`: the websocket bytes the server writes itself;
- :mod:`.connection`: the lean connection, the one session loop and upgrade probe,
  and :class:`~.connection.Sessions`, the per-socket side table;
- :mod:`.heartbeat`: pings and timeouts on one timer per server.

Nothing outside this package touches engine.io's or aiohttp's internals, and no
state is set on engine.io's objects.
"""

from .connection import FULL, NOT_NOW, WRITTEN, LeanWebSocket, Sessions, WriteBatch
from .frames import text_frame
from .install import (
    FastPath,
    close_session,
    close_websockets,
    fast_paths,
    fastpath_of,
    install,
)
from .queue import CountingQueue, QueueLimits

__all__ = ["FULL", "NOT_NOW", "WRITTEN", "CountingQueue", "FastPath", "LeanWebSocket",
           "QueueLimits", "Sessions", "WriteBatch", "close_session", "close_websockets",
           "fast_paths", "fastpath_of", "install", "text_frame"]
