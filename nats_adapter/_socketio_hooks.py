"""The python-socketio internals connection state recovery hooks into, and the
answer to a CONNECT for a namespace the server does not serve.

python-socketio has no place for a manager to see a client's CONNECT auth (which
carries ``pid`` and ``offset`` on a reconnect), to add ``pid`` to the CONNECT reply,
or to tell an engine.io-level close (recoverable: the network went away) from a
namespace disconnect (final). This module wraps three of its private methods on one
server instance, after checking they are there with the expected signatures; nothing
else in the package touches python-socketio internals.

python-socketio refuses a CONNECT to a namespace it does not serve with the bare
string ``"Unable to connect"``; Node (and the protocol's test suite) answers
``{"message": "Invalid namespace"}``, and socket.io-client reads the error's
``message`` from that object (it reported ``undefined``).
:func:`answer_unknown_namespaces` answers so before python-socketio sees the CONNECT.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
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


#: the CONNECT_ERROR a client gets for a namespace the server does not serve (Node's)
INVALID_NAMESPACE = {"message": "Invalid namespace"}


def serves_namespace(server: Any, namespace: str) -> bool:
    """Whether ``server`` takes a CONNECT to ``namespace`` (python-socketio's test:
    a handler, a namespace handler, or a namespace it was told to accept)."""
    namespaces = server.namespaces
    return (namespace in server.handlers or namespace in server.namespace_handlers
            or namespaces == "*" or namespace in namespaces)


def answer_unknown_namespaces(server: Any) -> bool:
    """Refuse a CONNECT to a namespace ``server`` does not serve with Node's
    CONNECT_ERROR (see the module docstring). False, changing nothing, when
    python-socketio is not as expected (``socketio.namespace_error``)."""
    if not compat.check("socketio.namespace_error"):
        return False
    handle_connect = server._handle_connect

    async def _handle_connect(eio_sid: str, namespace: str | None, data: Any) -> None:
        ns = namespace or "/"
        if serves_namespace(server, ns):
            await handle_connect(eio_sid, namespace, data)
            return
        await server._send_packet(eio_sid, server.packet_class(
            sio_packet.CONNECT_ERROR, data=dict(INVALID_NAMESPACE), namespace=ns))

    server._handle_connect = _handle_connect
    return True


#: where a packet for a connection that moved away goes: (eio sid, encoded parts);
#: True when it was taken there
Redirect = Callable[[str, list[Any]], Awaitable[bool]]


def redirect_sends(server: Any, redirect: Redirect) -> bool:
    """Offer every packet ``server`` sends to ``redirect`` first (encoded), so what
    is sent to a session after it moved to another node (an ack of a handler still
    running) follows it there. False, changing nothing, when python-socketio is not
    as expected (``engineio.handover``)."""
    if not compat.check("engineio.handover"):
        return False
    send_packet = server._send_packet

    async def _send_packet(eio_sid: str, pkt: Any) -> None:
        if server.eio.sockets.get(eio_sid) is None:
            encoded = pkt.encode()
            if await redirect(eio_sid, encoded if isinstance(encoded, list) else [encoded]):
                return
        await send_packet(eio_sid, pkt)

    server._send_packet = _send_packet
    return True


def count_connects(server: Any, connecting: Counter[str]) -> bool:
    """Keep in ``connecting`` how many namespace CONNECTs of each engine.io session
    ``server`` is handling (a restore included: recovery's hooks are inside); False,
    changing nothing, when python-socketio is not as expected (``engineio.handover``)."""
    if not compat.check("engineio.handover"):
        return False
    handle_connect = server._handle_connect

    async def _handle_connect(eio_sid: str, namespace: str | None, data: Any) -> None:
        connecting[eio_sid] += 1
        try:
            await handle_connect(eio_sid, namespace, data)
        finally:
            connecting[eio_sid] -= 1
            if connecting[eio_sid] <= 0:
                del connecting[eio_sid]

    server._handle_connect = _handle_connect
    return True
