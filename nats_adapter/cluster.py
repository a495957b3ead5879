"""The cluster-wide server API: fetch, join, leave, disconnect, server-side emits,
broadcasts with acks and room sizes across every node, without waiting on the dead.

It rides on the cluster protocol (:mod:`.rpc`): requests go to every live node on
``{prefix}.cluster`` and a call returns as soon as every node alive when it was
sent has answered, said bye or missed its heartbeats. Room channels cannot carry a
counted request (who is subscribed is not known), which is why requests use the
cluster channel even when they select a room. If a node does not answer in time
(it is stopped, partitioned, or died just now), the call raises
:class:`ClusterTimeoutError` within its timeout, carrying what the others answered
and which nodes did not.

Unlike Node's socket.io adapters: a node with no handler for a server-side event
answers at once ("not handled") instead of letting the caller wait out the
timeout; fetches return partial results (on the error) instead of nothing; a
recipient of an acked broadcast that disconnects before answering stops being
waited for.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from . import codec, compat
from .hub import LocalHub
from .rpc import ClusterRpc, ClusterTimeoutError, PendingAcks, PendingCall
from .sids import is_sid
from .types import EncodedPacket

__all__ = ["ClusterApi", "ClusterNode", "ClusterTimeoutError", "RemoteSocket", "SocketOwner",
           "session_data"]

logger = logging.getLogger(__name__)

#: the largest reply part, in bytes of msgpack (the broker's limit is 1 MiB)
REPLY_PART_BYTES = 256 * 1024
#: ack ids of acked broadcasts: far above python-socketio's per-sid counters
_BROADCAST_ACK_IDS = 1 << 40
#: events python-socketio and socket.io reserve; never server-side events
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting",
                             "newListener", "removeListener"})


class SocketOwner(Protocol):
    """What a :class:`RemoteSocket` acts through (the node's manager)."""

    @property
    def server(self) -> Any: ...

    async def emit(self, event: str, data: Any, namespace: str | None = None,
                   room: Any = None, skip_sid: Any = None,
                   callback: Callable[..., Any] | None = None, to: Any = None,
                   **kwargs: Any) -> None: ...

    async def enter_room(self, sid: str, namespace: str, room: str,
                         eio_sid: str | None = None) -> None: ...

    async def leave_room(self, sid: str, namespace: str, room: str) -> None: ...


class ClusterNode(SocketOwner, Protocol):
    """What the cluster API needs from its node, beyond the protocol."""

    hub: LocalHub

    def basic_leave_room(self, sid: str, namespace: str, room: str | None) -> None: ...

    def expect_ack(self, sid: str, ack_id: int, callback: Callable[..., Any]) -> None:
        """Call ``callback`` with ``sid``'s ack of ``ack_id``; forgotten after the
        callback timeout."""

    def event_packet(self, namespace: str, data: list[Any], ack_id: int | None
                     ) -> EncodedPacket:
        """An encoded EVENT packet."""


@dataclass
class RemoteSocket:
    """A socket on any node of the cluster, as :meth:`ClusterApi.fetch_sockets` found it.

    ``handshake`` holds what the socket connected with: ``address``, ``headers``
    (lower-case names), ``query``, ``url``, ``secure``, ``time`` (ISO 8601) and
    ``issued`` (ms since the epoch). ``data`` is the socket's python-socketio session
    when it can travel (msgpack types only), else empty.
    """

    sid: str
    namespace: str
    node: str
    rooms: list[str]
    data: dict[str, Any] = field(default_factory=dict)
    handshake: dict[str, Any] = field(default_factory=dict)
    #: the engine.io session and its transport ("websocket" or "polling")
    client_id: str = ""
    transport: str = ""
    _manager: SocketOwner | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.sid

    def _mgr(self) -> SocketOwner:
        if self._manager is None:
            raise RuntimeError("this RemoteSocket is not bound to a manager")
        return self._manager

    async def emit(self, event: str, data: Any = None) -> None:
        """Send ``event`` to this socket, wherever it is."""
        await self._mgr().emit(event, data, namespace=self.namespace, to=self.sid)

    async def call(self, event: str, data: Any = None, timeout: float = 60.0) -> Any:
        """Send ``event`` and return the socket's ack (``socketio.exceptions.TimeoutError``
        if none comes within ``timeout`` seconds)."""
        server = self._mgr().server
        return await server.call(event, data, to=self.sid, namespace=self.namespace,
                                 timeout=timeout)

    async def join(self, room: str) -> None:
        await self._mgr().enter_room(self.sid, self.namespace, room)

    async def leave(self, room: str) -> None:
        await self._mgr().leave_room(self.sid, self.namespace, room)

    async def disconnect(self) -> None:
        await self._mgr().server.disconnect(self.sid, namespace=self.namespace)


def session_data(server: Any, eio_sid: str, namespace: str) -> dict[str, Any]:
    """The python-socketio session of a local socket when it can travel (msgpack
    types only), else empty."""
    data = compat.engineio_session(server, eio_sid).get(namespace)
    if not isinstance(data, dict) or not data:
        return {}
    try:
        msgpack.packb(data, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return {}
    return data


def _ack_value(args: list[Any]) -> Any:
    # python-socketio's shape: one argument as itself, several as a tuple
    return args[0] if len(args) == 1 else tuple(args)


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


def _check_names(what: str, names: list[str] | None, max_chars: int) -> list[str] | None:
    if names is None:
        return None
    for name in names:
        if not isinstance(name, str) or not name or (len(name) > max_chars and not is_sid(name)):
            raise ValueError(f"{what}: {name!r:.80} is not a room name of 1-{max_chars} "
                             "characters or a sid")
    return names


class ClusterApi:
    """The cluster-wide server API of one node (the manager offers its methods).

    ``rooms`` (``to``) selects the sockets in any of those rooms (a sid-shaped name
    selects that socket; None: every socket of the namespace) and ``except_rooms``
    removes the sockets in any of those (rooms or sids), as Node's
    ``io.in(...).except(...)`` does. ``local=True`` limits a call to this node.
    """

    def __init__(self, node: ClusterNode, rpc: ClusterRpc, *, max_room_chars: int,
                 max_rooms: int) -> None:
        self.node = node
        self.rpc = rpc
        self.hub = node.hub
        self.max_room_chars = max_room_chars
        self.max_rooms = max_rooms
        self._server_handlers: dict[tuple[str, str], Callable[..., Any]] = {}
        self._broadcast_ack_ids = itertools.count(_BROADCAST_ACK_IDS)
        #: (sid, ack id) -> (requester tag, request id) for acked broadcasts in flight
        self._broadcast_acks: dict[tuple[str, int], tuple[str, str]] = {}
        rpc.register(codec.ClusterOp.FETCH, self._serve_fetch)
        rpc.register(codec.ClusterOp.JOIN, self._serve_apply)
        rpc.register(codec.ClusterOp.LEAVE, self._serve_apply)
        rpc.register(codec.ClusterOp.DISCONNECT, self._serve_apply)
        rpc.register(codec.ClusterOp.BCAST, self._serve_bcast)
        rpc.register(codec.ClusterOp.SERVER_EMIT, self._serve_server_emit, answers=False)

    # -- presence of nodes ---------------------------------------------------------

    @property
    def host_id(self) -> str:
        return self.rpc.host_id

    def server_count(self) -> int:
        """Nodes alive in the cluster, this one included."""
        return 1 + len(self.rpc.peers)

    def nodes(self) -> list[dict[str, Any]]:
        """The other nodes alive: tag, name, host, pid, start time, seconds since heard."""
        return self.rpc.peers.describe()

    # -- fetch_sockets / room_size / room_members ----------------------------------------

    def local_selection(self, sel: codec.Selection) -> dict[str, str]:
        """sid -> engine.io sid of this node's sockets in ``sel``."""
        chosen = self.hub.targets(sel.ns, sel.rooms, frozenset())
        if sel.except_:
            for sid in self.hub.targets(sel.ns, sel.except_, frozenset()):
                chosen.pop(sid, None)
        return chosen

    async def fetch_sockets(self, room: str | Iterable[str] | None = None,
                            namespace: str = "/", *,
                            except_rooms: str | Iterable[str] | None = None,
                            local: bool = False, timeout: float = 5.0) -> list[RemoteSocket]:
        """Every socket in ``room`` (a room, several, or None: all) on every node."""
        rooms = _check_names("room", _as_list(room), self.max_room_chars)
        excluded = _check_names("except_rooms", _as_list(except_rooms), self.max_room_chars)
        sel = codec.Selection(namespace, rooms, excluded)
        pending = await self.rpc.request(codec.Fetch(sel, "full"), timeout, local)
        found = [self._remote(item) for item in self._describe(sel)]
        for tag, parts in pending.replies.items():
            for part in parts:
                for item in part if isinstance(part, list) else ():
                    if isinstance(item, dict):
                        found.append(self._remote(item, tag))
        self.rpc.check(pending, found, timeout)
        return found

    async def room_size(self, room: str, namespace: str = "/", *, timeout: float = 5.0) -> int:
        """How many sockets are in ``room`` across the cluster."""
        rooms = _check_names("room", [room], self.max_room_chars)
        sel = codec.Selection(namespace, rooms)
        pending = await self.rpc.request(codec.Fetch(sel, "count"), timeout)
        counts = [len(self.local_selection(sel))]
        counts += [part for parts in pending.replies.values() for part in parts
                   if isinstance(part, int)]
        self.rpc.check(pending, sum(counts), timeout,
                       f"no answer from {', '.join(self.rpc.missing(pending))}")
        return sum(counts)

    async def room_members(self, room: str, namespace: str = "/", *,
                           timeout: float = 5.0) -> list[str]:
        """The sids in ``room`` across the cluster."""
        rooms = _check_names("room", [room], self.max_room_chars)
        sel = codec.Selection(namespace, rooms)
        pending = await self.rpc.request(codec.Fetch(sel, "ids"), timeout)
        sids = list(self.local_selection(sel))
        for parts in pending.replies.values():
            for part in parts:
                sids += [s for s in part if isinstance(s, str)] if isinstance(part, list) else []
        self.rpc.check(pending, sids, timeout,
                       f"no answer from {', '.join(self.rpc.missing(pending))}")
        return sids

    def _describe(self, sel: codec.Selection) -> list[dict[str, Any]]:
        out = []
        server = self.node.server
        for sid, eio_sid in self.local_selection(sel).items():
            try:
                transport = server.eio.transport(eio_sid)
            except KeyError:  # gone since it was selected
                continue
            out.append({"sid": sid, "ns": sel.ns, "rooms": self.hub.rooms_of(sid, sel.ns),
                        "data": session_data(server, eio_sid, sel.ns),
                        "handshake": self._handshake(eio_sid), "eio": eio_sid,
                        "transport": transport})
        return out

    def _handshake(self, eio_sid: str) -> dict[str, Any]:
        environ = compat.connection_environ(self.node.server, eio_sid)
        request = environ.get("aiohttp.request")
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                   if isinstance(k, str) and k.startswith("HTTP_") and isinstance(v, str)}
        issued = self.hub.connected_at(eio_sid)
        return {
            "address": getattr(request, "remote", None) or environ.get("REMOTE_ADDR", ""),
            "headers": headers,
            "query": environ.get("QUERY_STRING", ""),
            "url": environ.get("RAW_URI", ""),
            "secure": environ.get("wsgi.url_scheme") == "https",
            "issued": int(issued * 1000),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(issued)),
        }

    def _remote(self, item: Mapping[str, Any], tag: str | None = None) -> RemoteSocket:
        rooms = item.get("rooms")
        data = item.get("data")
        handshake = item.get("handshake")
        return RemoteSocket(str(item.get("sid")), str(item.get("ns")),
                            self.rpc.peers.name(tag) if tag else self.host_id,
                            [r for r in rooms if isinstance(r, str)] if isinstance(rooms, list)
                            else [],
                            data if isinstance(data, dict) else {},
                            handshake if isinstance(handshake, dict) else {},
                            str(item.get("eio", "")), str(item.get("transport", "")),
                            self.node)

    # -- sockets_join / sockets_leave / disconnect_sockets --------------------------------

    async def sockets_join(self, rooms: str | Iterable[str], to: str | Iterable[str] | None
                           = None, namespace: str = "/", *,
                           except_rooms: str | Iterable[str] | None = None,
                           local: bool = False, timeout: float = 5.0) -> int:
        """Put the selected sockets (``to``) in ``rooms`` on every node; returns how many
        sockets were selected. Returns once every node has applied it (so an emit to
        the rooms right after reaches them)."""
        return await self._room_op(codec.Join, rooms, to, namespace, except_rooms, local,
                                   timeout)

    async def sockets_leave(self, rooms: str | Iterable[str], to: str | Iterable[str] | None
                            = None, namespace: str = "/", *,
                            except_rooms: str | Iterable[str] | None = None,
                            local: bool = False, timeout: float = 5.0) -> int:
        """Take the selected sockets out of ``rooms`` on every node; returns how many."""
        return await self._room_op(codec.Leave, rooms, to, namespace, except_rooms, local,
                                   timeout)

    async def disconnect_sockets(self, to: str | Iterable[str] | None = None,
                                 namespace: str = "/", *,
                                 except_rooms: str | Iterable[str] | None = None,
                                 close: bool = False, local: bool = False,
                                 timeout: float = 5.0) -> int:
        """Disconnect the selected sockets on every node (``close``: also close their
        engine.io connection, every namespace of it); returns how many."""
        selection = _check_names("to", _as_list(to), self.max_room_chars)
        excluded = _check_names("except_rooms", _as_list(except_rooms), self.max_room_chars)
        body = codec.Disconnect(codec.Selection(namespace, selection, excluded), close)
        pending = await self.rpc.request(body, timeout, local)
        return self._total(pending, await self._apply(body), timeout)

    async def _room_op(self, kind: type[codec.Join] | type[codec.Leave],
                       rooms: str | Iterable[str], to: str | Iterable[str] | None,
                       namespace: str, except_rooms: str | Iterable[str] | None, local: bool,
                       timeout: float) -> int:
        targets = _check_names("rooms", _as_list(rooms), self.max_room_chars) or []
        if any(is_sid(r) for r in targets):
            raise ValueError("rooms to join or leave cannot be sids")
        selection = _check_names("to", _as_list(to), self.max_room_chars)
        excluded = _check_names("except_rooms", _as_list(except_rooms), self.max_room_chars)
        body = kind(codec.Selection(namespace, selection, excluded), targets)
        pending = await self.rpc.request(body, timeout, local)
        return self._total(pending, await self._apply(body), timeout)

    def _total(self, pending: PendingCall, local_count: int, timeout: float) -> int:
        total = local_count + sum(part for parts in pending.replies.values() for part in parts
                                  if isinstance(part, int))
        self.rpc.check(pending, total, timeout)
        return total

    async def _apply(self, body: codec.Join | codec.Leave | codec.Disconnect) -> int:
        """Apply a join / leave / disconnect to this node's selected sockets."""
        ns = body.sel.ns
        chosen = self.local_selection(body.sel)
        server = self.node.server
        if isinstance(body, codec.Disconnect):
            for sid, eio_sid in chosen.items():
                if body.close:
                    await server.eio.disconnect(eio_sid)
                else:
                    await server.disconnect(sid, namespace=ns, ignore_queue=True)
            return len(chosen)
        for sid in chosen:
            for room in body.targets:
                if isinstance(body, codec.Leave):
                    self.node.basic_leave_room(sid, ns, room)
                elif room in self.hub.rooms_of(sid, ns) or \
                        len(self.hub.rooms_of(sid, ns)) < self.max_rooms:
                    await self.node.enter_room(sid, ns, room)
        return len(chosen)

    # -- server-side events ------------------------------------------------------------

    def on_server_event(self, event: str, handler: Callable[..., Any] | None = None,
                        namespace: str = "/") -> Any:
        """Register ``handler(*args)`` for ``event`` sent by other nodes with
        :meth:`server_side_emit`; its return value (awaited if needed) is this node's
        reply. Also usable as a decorator: ``@manager.on_server_event("event")``."""
        if event in RESERVED_EVENTS:
            raise ValueError(f"{event!r} is a reserved event name")

        def register(func: Callable[..., Any]) -> Callable[..., Any]:
            self._server_handlers[(namespace, event)] = func
            return func

        return register(handler) if handler is not None else register

    async def server_side_emit(self, event: str, *args: Any, namespace: str = "/",
                               callback: Callable[[list[Any]], Any] | None = None,
                               timeout: float | None = None) -> list[Any] | None:
        """Run ``event``'s server-side handler on every other node.

        Without ``callback`` or ``timeout``, fire-and-forget (returns None). With
        either, waits (``timeout`` default 5 s) for every live node: returns the
        replies of the nodes that have a handler (nodes without one answer at once
        and are not waited for) and passes them to ``callback`` too.
        """
        if event in RESERVED_EVENTS:
            raise ValueError(f"{event!r} is a reserved event name")
        body = codec.ServerEmit(namespace, event, list(args))
        if callback is None and timeout is None:
            if self.rpc.peers.tags():
                await self.rpc.notice(body)
            return None
        wait = 5.0 if timeout is None else timeout
        pending = await self.rpc.request(body, wait)
        replies = [part["result"] for parts in pending.replies.values() for part in parts
                   if isinstance(part, dict) and part.get("handled")]
        self.rpc.check(pending, replies, wait)
        if callback is not None:
            result = callback(replies)
            if inspect.isawaitable(result):
                await result
        return replies

    async def _run_server_handler(self, body: codec.ServerEmit) -> dict[str, Any]:
        handler = self._server_handlers.get((body.ns, body.event))
        if handler is None:
            return {"handled": False}
        try:
            result = handler(*body.args)
            if inspect.isawaitable(result):
                result = await result
            msgpack.packb(result, use_bin_type=True)
        except Exception as exc:
            logger.exception("server-side handler for %r failed", body.event)
            return {"handled": True, "result": None, "error": type(exc).__name__}
        return {"handled": True, "result": result}

    # -- broadcast with acks ----------------------------------------------------------

    async def emit_with_acks(self, event: str, data: Any = None, to: str | Iterable[str] | None
                             = None, namespace: str = "/", *,
                             except_rooms: str | Iterable[str] | None = None,
                             skip_sid: str | Iterable[str] | None = None,
                             timeout: float = 5.0) -> list[Any]:
        """Emit to the selected sockets on every node and return every recipient's ack
        (one entry per socket, in python-socketio's shape: one argument as itself,
        several as a tuple). A recipient that disconnects first is not waited for;
        :class:`ClusterTimeoutError` carries the acks that came in time."""
        selection = _check_names("to", _as_list(to), self.max_room_chars)
        excluded = [*(_check_names("except_rooms", _as_list(except_rooms),
                                   self.max_room_chars) or []),
                    *(_as_list(skip_sid) or [])]
        args = list(data) if isinstance(data, tuple) else ([] if data is None else [data])
        body = codec.Bcast(codec.Selection(namespace, selection, excluded or None), event, args)
        rpc = self.rpc
        expected = rpc.peers.tags()
        req_id, pending = rpc.open(expected | {rpc.node_tag}, acks=True)
        assert isinstance(pending, PendingAcks)
        rpc.stats.cluster_requests += 1
        try:
            if expected:
                await rpc.publish_request(req_id, body)
            pending.count(rpc.node_tag, await self._deliver_with_acks(rpc.node_tag, req_id,
                                                                      body))
            if not await pending.wait(timeout):
                rpc.stats.cluster_timeouts += 1
            rpc.check(pending, [_ack_value(a) for a in pending.acks], timeout,
                      f"not every recipient answered within {timeout:g} s")
            return [_ack_value(a) for a in pending.acks]
        finally:
            rpc.close(req_id)
            for key in [k for k, v in self._broadcast_acks.items() if v[1] == req_id]:
                del self._broadcast_acks[key]

    async def _deliver_with_acks(self, requester: str, req_id: str, body: codec.Bcast) -> int:
        """Write one packet (one ack id) to every selected local socket; their acks go
        to ``requester``. Returns how many it went to."""
        chosen = self.local_selection(body.sel)
        if not chosen:
            return 0
        ack_id = next(self._broadcast_ack_ids)
        for sid in chosen:
            self.node.expect_ack(sid, ack_id, _BroadcastAck(self, sid, ack_id))
            self._broadcast_acks[(sid, ack_id)] = (requester, req_id)
        pkt = self.node.event_packet(body.sel.ns, [body.event, *body.args], ack_id)
        await self.hub.deliver_to(chosen.values(), pkt)
        return len(chosen)

    async def broadcast_acked(self, sid: str, ack_id: int, args: list[Any] | None) -> None:
        """``sid`` answered the acked broadcast ``ack_id`` (None: it went away)."""
        entry = self._broadcast_acks.pop((sid, ack_id), None)
        if entry is None:
            return
        requester, req_id = entry
        if requester == self.rpc.node_tag:
            pending = self.rpc.pending(req_id)
            if pending is not None:
                pending.ack(requester, args)
            return
        await self.rpc.reply(requester, req_id, codec.BcastAck(sid, args))

    def forget_ack(self, sid: str, ack_id: int) -> None:
        """``sid``'s ack of ``ack_id`` will not come (its callback expired)."""
        self._broadcast_acks.pop((sid, ack_id), None)

    def recipient_gone(self, sid: str, spawn: Callable[[Any], None]) -> None:
        """``sid`` disconnected: report its outstanding broadcast acks as gone."""
        if not self._broadcast_acks:
            return
        for s, ack_id in [key for key in self._broadcast_acks if key[0] == sid]:
            spawn(self.broadcast_acked(s, ack_id, None))

    # -- serving requests ----------------------------------------------------------------

    async def _serve_fetch(self, origin: str, req_id: str | None, body: codec.Fetch) -> None:
        assert req_id is not None
        if body.fmt == "count":
            await self.rpc.reply(origin, req_id, codec.Reply(
                len(self.local_selection(codec.Selection(body.sel.ns, body.sel.rooms)))))
        elif body.fmt == "ids":
            await self.rpc.reply(origin, req_id, codec.Reply(
                list(self.local_selection(body.sel))))
        else:
            await self._send_parts(origin, req_id,
                                   self._describe(body.sel))

    async def _serve_apply(self, origin: str, req_id: str | None,
                           body: codec.Join | codec.Leave | codec.Disconnect) -> None:
        assert req_id is not None
        await self.rpc.reply(origin, req_id, codec.Reply(await self._apply(body)))

    async def _serve_bcast(self, origin: str, req_id: str | None, body: codec.Bcast) -> None:
        assert req_id is not None
        n = await self._deliver_with_acks(origin, req_id, body)
        await self.rpc.reply(origin, req_id, codec.BcastCount(n))

    async def _serve_server_emit(self, origin: str, req_id: str | None,
                                 body: codec.ServerEmit) -> None:
        result = await self._run_server_handler(body)
        if req_id is not None:
            await self.rpc.reply(origin, req_id, codec.Reply(result))

    async def _send_parts(self, to: str, req_id: str, items: list[Any]) -> None:
        part: list[Any] = []
        size = 0
        for item in items:
            item_size = len(msgpack.packb(item, use_bin_type=True))
            if part and size + item_size > REPLY_PART_BYTES:
                await self.rpc.reply(to, req_id, codec.Reply(part, last=False))
                part, size = [], 0
            part.append(item)
            size += item_size
        await self.rpc.reply(to, req_id, codec.Reply(part))


class _BroadcastAck:
    """The callback python-socketio calls with a recipient's ack of an acked broadcast."""

    __slots__ = ("ack_id", "api", "sid")

    def __init__(self, api: ClusterApi, sid: str, ack_id: int) -> None:
        self.api = api
        self.sid = sid
        self.ack_id = ack_id

    async def __call__(self, *args: Any) -> None:
        await self.api.broadcast_acked(self.sid, self.ack_id, list(args))
