"""python-socketio's Admin UI instrumentation, for every gateway of a cluster.

``socketio.AsyncServer.instrument()`` reports what one process sees: its list of
sockets, and Join / Leave / Disconnect buttons that act on its own sockets only
(on a socket of another node they silently do nothing). This subclass answers
those from the whole cluster with the manager's cluster-wide API; everything
else (server stats per node, live events) already reaches an admin connected to
any node, because it travels as ordinary emits to the admin namespace.

Use it on every gateway, in place of ``sio.instrument(...)``::

    from nats_adapter.admin import ClusterInstrumentedServer
    ClusterInstrumentedServer(sio, auth={"username": "admin", "password": "..."})

Each gateway shows as its own server (its ``host_id``: node name and tag).
"""

from __future__ import annotations

import hmac
import inspect
import logging
from typing import Any

from socketio.async_admin import InstrumentedAsyncServer
from socketio.exceptions import ConnectionRefusedError as Refused

from . import compat
from .cluster import RemoteSocket
from .manager import ClusterManager

logger = logging.getLogger(__name__)


def same_credentials(given: Any, expected: dict[str, Any]) -> bool:
    """Whether ``given`` holds exactly ``expected``'s keys and values, strings
    compared in constant time (``==`` stops at the first wrong character)."""
    if not isinstance(given, dict) or set(given) != set(expected):
        return False
    same = True
    for key, value in expected.items():
        other = given[key]
        if isinstance(value, str) and isinstance(other, str):
            same &= hmac.compare_digest(value.encode("utf-8", "surrogatepass"),
                                        other.encode("utf-8", "surrogatepass"))
        else:
            same &= bool(value == other)
    return same


class ClusterInstrumentedServer(InstrumentedAsyncServer):  # type: ignore[misc]
    """:class:`socketio.async_admin.InstrumentedAsyncServer` across the cluster."""

    def __init__(self, sio: Any, *args: Any, **kwargs: Any) -> None:
        if not isinstance(sio.manager, ClusterManager):
            raise TypeError("the server's client_manager must be a ClusterManager")
        self.cluster: ClusterManager = sio.manager
        problem = compat.problem("socketio.admin")
        if problem is not None:  # the overrides below may not be what python-socketio calls
            logger.warning("the Admin UI may show and act on this gateway's sockets only "
                           "(python-socketio's own handlers): %s", problem)
        super().__init__(sio, *args, **kwargs)

    async def _authenticated(self, client_auth: Any) -> bool:
        if not self.auth:
            return True
        if isinstance(self.auth, dict):
            return same_credentials(client_auth, self.auth)
        if isinstance(self.auth, list):
            return any([same_credentials(client_auth, each) for each in self.auth])
        result = self.auth(client_auth)
        return bool(await result if inspect.isawaitable(result) else result)

    async def admin_connect(self, sid: str, environ: dict[str, Any], client_auth: Any) -> None:
        if not await self._authenticated(client_auth):
            raise Refused("authentication failed")
        self.sio.start_background_task(self._send_config, sid)

    async def _send_config(self, admin_sid: str) -> None:
        await self.sio.sleep(0.1)
        features = ["AGGREGATED_EVENTS"]
        if not self.read_only:
            features += ["EMIT", "JOIN", "LEAVE", "DISCONNECT", "MJOIN", "MLEAVE", "MDISCONNECT"]
        if self.mode == "development":
            features.append("ALL_EVENTS")
        await self.sio.emit("config", {"supportedFeatures": features}, to=admin_sid,
                            namespace=self.admin_namespace)
        if self.mode != "development":
            return
        namespaces = {ns for ns in (*self.sio.manager.get_namespaces(), *self.sio.handlers)
                      if ns != self.admin_namespace}
        sockets: list[dict[str, Any]] = []
        for ns in sorted(namespaces):
            try:
                found = await self.cluster.fetch_sockets(namespace=ns)
            except Exception as exc:  # a node that did not answer: show the others
                found = getattr(exc, "responses", None) or []
            sockets += [self.serialize_remote(s) for s in found]
        await self.sio.emit("all_sockets", sockets, to=admin_sid,
                            namespace=self.admin_namespace)

    @staticmethod
    def serialize_remote(s: RemoteSocket) -> dict[str, Any]:
        """A socket of any node in the Admin UI's format."""
        return {"id": s.sid, "clientId": s.client_id, "transport": s.transport or "websocket",
                "nsp": s.namespace, "data": s.data, "handshake": s.handshake,
                "rooms": s.rooms}

    async def admin_enter_room(self, _: str, namespace: str, room: str,
                               room_filter: str | None = None) -> None:
        await self.cluster.sockets_join(room, to=room_filter, namespace=namespace)

    async def admin_leave_room(self, _: str, namespace: str, room: str,
                               room_filter: str | None = None) -> None:
        await self.cluster.sockets_leave(room, to=room_filter, namespace=namespace)

    async def admin_disconnect(self, _: str, namespace: str, close: bool,
                               room_filter: str | None = None) -> None:
        await self.cluster.disconnect_sockets(to=room_filter, namespace=namespace,
                                              close=bool(close))
