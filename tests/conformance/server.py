"""The server the socket.io maintainers' protocol test suites expect, in Python.

``python tests/conformance/server.py {sio,eio} {ours,stock} PORT`` serves, as the
protocol docs describe (pingInterval 300 ms, pingTimeout 200 ms, maxPayload 1e6):

- ``sio``: Socket.IO at ``/socket.io/``; on connection to ``/`` or ``/custom`` it
  emits ``auth`` with the handshake's auth; ``message`` is echoed as
  ``message-back``, ``message-with-ack`` acked with its arguments.
- ``eio``: a raw Engine.IO echo server at ``/engine.io/``.

``ours`` runs python-socketio with this project's manager (``MemoryManager``: the
fast path and lean websocket connections), or for ``eio`` engine.io with the fast
path installed; ``stock`` runs python-socketio / python-engineio untouched.
"""

from __future__ import annotations

import sys
from typing import Any

import engineio
import socketio
from aiohttp import web

from nats_adapter import MemoryManager
from nats_adapter._engineio import install

OPTIONS: dict[str, Any] = {"async_mode": "aiohttp", "ping_interval": 0.3, "ping_timeout": 0.2,
                           "max_http_buffer_size": 1_000_000, "cors_allowed_origins": "*"}


def socketio_app(ours: bool) -> web.Application:
    manager = MemoryManager() if ours else None
    # always_connect: the CONNECT reply goes out before the handler's "auth" emit
    sio = socketio.AsyncServer(client_manager=manager, always_connect=True, **OPTIONS)

    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        namespace = "/custom" if sid in sio.manager.rooms.get("/custom", {}).get(None, {}) \
            else "/"
        await sio.emit("auth", auth if auth is not None else {}, to=sid, namespace=namespace)

    async def message(sid: str, *args: Any) -> None:
        await sio.emit("message-back", args, to=sid)

    async def message_with_ack(sid: str, *args: Any) -> Any:
        return args

    for namespace in ("/", "/custom"):
        sio.on("connect", connect, namespace=namespace)
    sio.on("message", message)
    sio.on("message-with-ack", message_with_ack)
    app = web.Application()
    sio.attach(app)
    return app


def engineio_app(ours: bool) -> web.Application:
    eio = engineio.AsyncServer(**OPTIONS)
    if ours:
        install(eio)

    async def message(sid: str, data: Any) -> None:
        await eio.send(sid, data)

    eio.on("message", message)
    app = web.Application()
    eio.attach(app)
    return app


def main() -> None:
    suite, kind, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    app = (socketio_app if suite == "sio" else engineio_app)(kind == "ours")
    web.run_app(app, host="127.0.0.1", port=port, print=lambda *a: print(*a, flush=True),
                shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
