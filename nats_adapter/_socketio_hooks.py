"""The python-socketio internals connection state recovery hooks into.

python-socketio has no place for a manager to see a client's CONNECT auth (which
carries ``pid`` and ``offset`` on a reconnect), to add ``pid`` to the CONNECT reply,
or to tell an engine.io-level close (recoverable: the network went away) from a
namespace disconnect (final). This module wraps three of its private methods on one
server instance, after checking they are there with the expected signatures; nothing
else in the package touches python-socketio internals.
"""

from __future__ import annotations

from typing import Any, Protocol

from socketio import packet as sio_packet

from . import compat


class RecoveryHooks(Protocol):
    """What the hooks call; implemented by the manager."""

    async def before_connect(self, eio_sid: str, namespace: str, auth: Any) -> None: ...

    def after_connect(self, eio_sid: str, namespace: str) -> None: ...

    async def send_connect_reply(self, eio_sid: str, pkt: Any, send: Any) -> None: ...

    def engine_closing(self, eio_sid: str) -> None: ...

    def engine_closed(self, eio_sid: str) -> None: ...


def missing(server: Any) -> list[str]:
    """What the hooks need from python-socketio that ``server`` lacks (the privates
    are probed in :mod:`nats_adapter.compat`, ``socketio.recovery_hooks``)."""
    out = []
    problem = compat.problem("socketio.recovery_hooks")
    if problem is not None:
        out.append(problem)
    handlers = getattr(getattr(server, "eio", None), "handlers", None)
    if not isinstance(handlers, dict) or "disconnect" not in handlers:
        out.append("engine.io AsyncServer.handlers['disconnect']")
    return out


def install(server: Any, hooks: RecoveryHooks) -> None:
    """Route ``server``'s connects, CONNECT replies and engine.io closes through ``hooks``.

    Raises ``RuntimeError`` naming what is missing when this python-socketio lacks an
    internal the hooks need (recovery cannot work without them).
    """
    problems = missing(server)
    if problems:
        raise RuntimeError("connection state recovery needs python-socketio internals this "
                           f"version lacks: {'; '.join(problems)}")
    handle_connect = server._handle_connect
    send_packet = server._send_packet
    on_engine_close = server.eio.handlers["disconnect"]

    async def _handle_connect(eio_sid: str, namespace: str | None, data: Any) -> None:
        ns = namespace or "/"
        await hooks.before_connect(eio_sid, ns, data)
        try:
            await handle_connect(eio_sid, namespace, data)
        finally:
            hooks.after_connect(eio_sid, ns)

    async def _send_packet(eio_sid: str, pkt: Any) -> None:
        if pkt.packet_type == sio_packet.CONNECT and isinstance(pkt.data, dict):
            await hooks.send_connect_reply(eio_sid, pkt, send_packet)
        else:
            await send_packet(eio_sid, pkt)

    async def _on_engine_close(eio_sid: str, reason: Any = None) -> Any:
        hooks.engine_closing(eio_sid)
        try:
            return await on_engine_close(eio_sid, reason)
        finally:
            hooks.engine_closed(eio_sid)

    server._handle_connect = _handle_connect
    server._send_packet = _send_packet
    server.eio.on("disconnect", _on_engine_close)
