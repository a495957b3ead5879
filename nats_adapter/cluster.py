"""The cluster-wide server API: fetch, join, leave, disconnect, server-side emits,
broadcasts with acks and room sizes across every node, without waiting on the dead.

How it travels. Every node subscribes to ``{prefix}.cluster``; requests go there,
each node answers on the requester's own control channel, and operations on one
sid go straight to the node that owns it. Room channels cannot carry a counted
request (who is subscribed is not known), which is why requests use the cluster
channel even when they select a room.

Who must answer. Nodes announce themselves (``hello``) when they start and after
every broker reconnect, send a ``heartbeat`` every ``heartbeat_interval`` seconds,
and say ``bye`` when they close. A request waits only for the nodes alive when it
was sent, and stops waiting for one as soon as it says bye or misses its
heartbeats (``heartbeat_timeout``), so a call returns as soon as every live node
has answered. If a node does not answer in time (it is stopped, partitioned, or
died just now), the call raises :class:`ClusterTimeoutError` within its timeout,
carrying what the others answered and which nodes did not.

Unlike Node's socket.io adapters: a node with no handler for a server-side event
answers at once ("not handled") instead of letting the caller wait out the
timeout; fetches return partial results (on the error) instead of nothing; a
recipient of an acked broadcast that disconnects before answering stops being
waited for.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
from socketio import exceptions as sio_exceptions
from socketio import packet as sio_packet

from .codec import ClusterMessage
from .sids import is_sid

if TYPE_CHECKING:
    from .hub import LocalHub
    from .manager import ClusterManager
    from .naming import ChannelNames
    from .stats import ManagerStats
    from .subscriptions import RoomSubscriptions

logger = logging.getLogger(__name__)

#: the largest reply part, in bytes of msgpack (the broker's limit is 1 MiB)
REPLY_PART_BYTES = 256 * 1024
#: ack ids of acked broadcasts: far above python-socketio's per-sid counters
_BROADCAST_ACK_IDS = 1 << 40
#: events python-socketio and socket.io reserve; never server-side events
RESERVED_EVENTS = frozenset({"connect", "connect_error", "disconnect", "disconnecting",
                             "newListener", "removeListener"})


class ClusterTimeoutError(sio_exceptions.TimeoutError):  # type: ignore[misc]
    """Some node did not answer within the timeout.

    :attr:`responses` holds what the nodes that answered sent, in the shape the call
    returns; :attr:`missing` the names of the nodes that did not answer.
    """

    def __init__(self, message: str, responses: Any, missing: list[str]) -> None:
        super().__init__(message)
        self.responses = responses
        self.missing = missing


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
    _manager: ClusterManager | None = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.sid

    def _mgr(self) -> ClusterManager:
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


class Peers:
    """The other nodes known alive: heard from within ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        #: node tag -> (monotonic time last heard, its info: name, host, pid, started)
        self._nodes: dict[str, tuple[float, dict[str, Any]]] = {}

    def __contains__(self, tag: str) -> bool:
        return tag in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def saw(self, tag: str, info: Mapping[str, Any] | None = None) -> bool:
        """Record a sign of life; True when the node was not known."""
        known = self._nodes.get(tag)
        self._nodes[tag] = (time.monotonic(),
                            dict(info) if info is not None else (known[1] if known else {}))
        return known is None

    def drop(self, tag: str) -> bool:
        return self._nodes.pop(tag, None) is not None

    def expired(self) -> list[str]:
        horizon = time.monotonic() - self.timeout
        gone = [tag for tag, (seen, _) in self._nodes.items() if seen < horizon]
        for tag in gone:
            del self._nodes[tag]
        return gone

    def tags(self) -> set[str]:
        return set(self._nodes)

    def name(self, tag: str) -> str:
        entry = self._nodes.get(tag)
        name = entry[1].get("name") if entry else None
        return f"{name} ({tag})" if isinstance(name, str) and name else tag

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"tag": tag, **info, "last_seen_s": round(now - seen, 3)}
                for tag, (seen, info) in sorted(self._nodes.items())]


class Pending:
    """One request in flight: which nodes still owe an answer, and what came."""

    def __init__(self, expected: set[str]) -> None:
        self.expected = set(expected)
        #: node tag -> reply payloads, in arrival order
        self.replies: dict[str, list[Any]] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._check()

    def _check(self) -> None:
        if not self.expected and not self.done.done():
            self.done.set_result(None)

    def reply(self, tag: str, data: Any, last: bool) -> None:
        self.replies.setdefault(tag, []).append(data)
        if last:
            self.expected.discard(tag)
            self._check()

    def gone(self, tag: str) -> None:
        """The node died or left: stop waiting for it."""
        self.expected.discard(tag)
        self._check()


class PendingAcks(Pending):
    """An acked broadcast: each node first says how many it delivered to, then sends
    each recipient's ack (or that it went away)."""

    def __init__(self, expected: set[str]) -> None:
        self.counts: dict[str, int] = {}
        self.acks: list[Any] = []
        self.finished: dict[str, int] = {}
        super().__init__(expected)

    def _check(self) -> None:
        if self.done.done():
            return
        if all(tag in self.counts and self.finished.get(tag, 0) >= self.counts[tag]
               for tag in self.expected):
            self.done.set_result(None)

    def count(self, tag: str, n: int) -> None:
        self.counts[tag] = n
        self._check()

    def ack(self, tag: str, args: list[Any] | None) -> None:
        self.finished[tag] = self.finished.get(tag, 0) + 1
        if args is not None:
            self.acks.append(args)
        self._check()

    def gone(self, tag: str) -> None:
        self.expected.discard(tag)
        self._check()


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
    """The cluster-wide server API, mixed into :class:`~nats_adapter.manager.ClusterManager`.

    ``rooms`` (``to``) selects the sockets in any of those rooms (a sid-shaped name
    selects that socket; None: every socket of the namespace) and ``except_rooms``
    removes the sockets in any of those (rooms or sids), as Node's
    ``io.in(...).except(...)`` does. ``local=True`` limits a call to this node.
    """

    # provided by ClusterManager
    node_tag: str
    server: Any
    if TYPE_CHECKING:
        hub: LocalHub
        channels: ChannelNames
        stats: ManagerStats
        subscriptions: RoomSubscriptions
        _max_room_chars: int
        _max_rooms: int
        _subscribe_timeout: float
        _callback_timeout: float
        _remote_callbacks: dict[tuple[str, int], float]

        async def _publish(self, channel: str, msg: Any) -> None: ...
        def _spawn(self, coro: Any) -> None: ...
        def _generate_ack_id(self, sid: str, callback: Any) -> int: ...
        async def enter_room(self, sid: str, namespace: str, room: str,
                             eio_sid: str | None = None) -> None: ...
        def basic_leave_room(self, sid: str, namespace: str, room: str | None) -> None: ...
        def _packet_class(self) -> Any: ...
        callbacks: dict[str, dict[int, Any]]

    def _init_cluster(self, node_name: str, heartbeat_interval: float,
                      heartbeat_timeout: float | None) -> None:
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval!r}")
        self.node_name = node_name
        self._heartbeat_interval = heartbeat_interval
        self.peers = Peers(heartbeat_timeout or 3 * heartbeat_interval)
        self._pending: dict[str, Pending] = {}
        self._request_ids = itertools.count(1)
        self._server_handlers: dict[tuple[str, str], Callable[..., Any]] = {}
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._broadcast_ack_ids = itertools.count(_BROADCAST_ACK_IDS)
        #: (sid, ack id) -> (requester tag, request id) for acked broadcasts in flight
        self._broadcast_acks: dict[tuple[str, int], tuple[str, str]] = {}
        self._started_at = time.time()

    # -- presence of nodes ---------------------------------------------------------

    @property
    def host_id(self) -> str:
        """This node's name and tag (python-socketio's admin UI uses it as server id)."""
        return f"{self.node_name}/{self.node_tag}" if self.node_name else self.node_tag

    def server_count(self) -> int:
        """Nodes alive in the cluster, this one included."""
        return 1 + len(self.peers)

    def nodes(self) -> list[dict[str, Any]]:
        """The other nodes alive: tag, name, host, pid, start time, seconds since heard."""
        return self.peers.describe()

    def _info(self) -> dict[str, Any]:
        import os
        import socket

        return {"name": self.node_name, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self._started_at}

    async def _start_cluster(self) -> None:
        channel = self.channels.cluster()
        self.subscriptions.acquire(channel)  # held for the manager's whole life
        if not await self.subscriptions.ready(channel, self._subscribe_timeout):
            logger.warning("the cluster channel is not confirmed yet; cluster calls will see "
                           "other nodes once it is")
        await self._announce("hello")
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _announce(self, op: str) -> None:
        await self._publish(self.channels.cluster(),
                            ClusterMessage(self.node_tag, op, None, self._info()))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            try:
                await self._announce("heartbeat")
                for tag in self.peers.expired():
                    logger.warning("node %s missed its heartbeats; not waiting for it", tag)
                    self._node_gone(tag)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("heartbeat failed")

    async def _stop_cluster(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
            try:
                await self._announce("bye")
            except Exception:  # the broker may be gone already
                logger.debug("could not say bye", exc_info=True)
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.cancel()

    def _node_gone(self, tag: str) -> None:
        for pending in list(self._pending.values()):
            pending.gone(tag)

    def _cluster_reconnected(self) -> None:
        """The broker connection is back: peers may have forgotten this node."""
        if self._heartbeat_task is not None:
            self._spawn(self._announce("hello"))

    # -- requests --------------------------------------------------------------------

    async def _cluster_notice(self, op: str, body: dict[str, Any]) -> None:
        """Tell every other node something (no reply)."""
        await self._publish(self.channels.cluster(),
                            ClusterMessage(self.node_tag, op, None, body))

    async def _ask(self, node: str, op: str, body: dict[str, Any], timeout: float) -> Any:
        """Ask one node; its answer (raises ``asyncio.TimeoutError`` when none comes)."""
        req_id = f"{self.node_tag}:{next(self._request_ids)}"
        pending = Pending({node})
        self._pending[req_id] = pending
        try:
            await self._publish(self.channels.node(node),
                                ClusterMessage(self.node_tag, op, req_id, body))
            async with asyncio.timeout(timeout):
                await asyncio.shield(pending.done)
        finally:
            del self._pending[req_id]
        replies = pending.replies.get(node)
        return replies[0] if replies else None

    def _local_selection(self, namespace: str, rooms: list[str] | None,
                         except_rooms: list[str] | None) -> dict[str, str]:
        chosen = self.hub.targets(namespace, rooms, frozenset())
        if except_rooms:
            for sid in self.hub.targets(namespace, except_rooms, frozenset()):
                chosen.pop(sid, None)
        return chosen

    async def _request(self, op: str, body: dict[str, Any], timeout: float, local: bool,
                       pending_class: type[Pending] = Pending) -> Pending:
        """Send ``op`` to every live node; wait for all of them (see ClusterTimeoutError)."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        expected = set() if local else self.peers.tags()
        req_id = f"{self.node_tag}:{next(self._request_ids)}"
        pending = pending_class(expected)
        self._pending[req_id] = pending
        self.stats.cluster_requests += 1
        try:
            if expected:
                await self._publish(self.channels.cluster(),
                                    ClusterMessage(self.node_tag, op, req_id, body))
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(pending.done)
            except TimeoutError:
                self.stats.cluster_timeouts += 1
                pending.timed_out = True  # type: ignore[attr-defined]
            return pending
        finally:
            del self._pending[req_id]

    def _missing(self, pending: Pending) -> list[str]:
        return sorted(self.peers.name(tag) for tag in pending.expected)

    async def _reply(self, to: str, req_id: str, data: Any, op: str = "reply",
                     last: bool = True) -> None:
        await self._publish(self.channels.node(to),
                            ClusterMessage(self.node_tag, op, req_id, {"data": data,
                                                                      "last": last}))

    # -- fetch_sockets / room_size / room_members ----------------------------------------

    async def fetch_sockets(self, room: str | Iterable[str] | None = None,
                            namespace: str = "/", *,
                            except_rooms: str | Iterable[str] | None = None,
                            local: bool = False, timeout: float = 5.0) -> list[RemoteSocket]:
        """Every socket in ``room`` (a room, several, or None: all) on every node."""
        rooms = _check_names("room", _as_list(room), self._max_room_chars)
        excluded = _check_names("except_rooms", _as_list(except_rooms), self._max_room_chars)
        body = {"ns": namespace, "rooms": rooms, "except": excluded, "fmt": "full"}
        pending = await self._request("fetch", body, timeout, local)
        found = [self._remote(item) for item in self._describe(namespace, rooms, excluded)]
        for tag, parts in pending.replies.items():
            for part in parts:
                for item in part if isinstance(part, list) else ():
                    if isinstance(item, dict):
                        found.append(self._remote(item, tag))
        if getattr(pending, "timed_out", False):
            raise ClusterTimeoutError(
                f"no answer from {', '.join(self._missing(pending))} in {timeout:g} s",
                found, self._missing(pending))
        return found

    async def room_size(self, room: str, namespace: str = "/", *, timeout: float = 5.0) -> int:
        """How many sockets are in ``room`` across the cluster."""
        return sum(await self._counts(room, namespace, timeout))

    async def room_members(self, room: str, namespace: str = "/", *,
                           timeout: float = 5.0) -> list[str]:
        """The sids in ``room`` across the cluster."""
        rooms = _check_names("room", [room], self._max_room_chars)
        pending = await self._request("fetch", {"ns": namespace, "rooms": rooms,
                                                "except": None, "fmt": "ids"}, timeout, False)
        sids = list(self._local_selection(namespace, rooms, None))
        for parts in pending.replies.values():
            for part in parts:
                sids += [s for s in part if isinstance(s, str)] if isinstance(part, list) else []
        if getattr(pending, "timed_out", False):
            raise ClusterTimeoutError(f"no answer from {', '.join(self._missing(pending))}",
                                      sids, self._missing(pending))
        return sids

    async def _counts(self, room: str, namespace: str, timeout: float) -> list[int]:
        rooms = _check_names("room", [room], self._max_room_chars)
        pending = await self._request("fetch", {"ns": namespace, "rooms": rooms,
                                                "except": None, "fmt": "count"}, timeout, False)
        counts = [len(self._local_selection(namespace, rooms, None))]
        counts += [part for parts in pending.replies.values() for part in parts
                   if isinstance(part, int)]
        if getattr(pending, "timed_out", False):
            raise ClusterTimeoutError(f"no answer from {', '.join(self._missing(pending))}",
                                      sum(counts), self._missing(pending))
        return counts

    def _describe(self, namespace: str, rooms: list[str] | None,
                  except_rooms: list[str] | None) -> list[dict[str, Any]]:
        out = []
        sockets = self.server.eio.sockets if self.server else {}
        for sid, eio_sid in self._local_selection(namespace, rooms, except_rooms).items():
            eio_socket = sockets.get(eio_sid)
            out.append({"sid": sid, "ns": namespace, "rooms": self.hub.rooms_of(sid, namespace),
                        "data": self._session_data(eio_sid, namespace),
                        "handshake": self._handshake(eio_sid), "eio": eio_sid,
                        "transport": "websocket" if getattr(eio_socket, "upgraded", False)
                        else "polling"})
        return out

    def _session_data(self, eio_sid: str, namespace: str) -> dict[str, Any]:
        eio_socket = self.server.eio.sockets.get(eio_sid) if self.server else None
        session = getattr(eio_socket, "session", None) or {}
        data = session.get(namespace) if isinstance(session, dict) else None
        if not isinstance(data, dict) or not data:
            return {}
        try:
            msgpack.packb(data, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            return {}
        return data

    def _handshake(self, eio_sid: str) -> dict[str, Any]:
        environ = (getattr(self.server, "environ", None) or {}).get(eio_sid) or {}
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

    def _remote(self, item: dict[str, Any], tag: str | None = None) -> RemoteSocket:
        rooms = item.get("rooms")
        data = item.get("data")
        handshake = item.get("handshake")
        return RemoteSocket(str(item.get("sid")), str(item.get("ns")),
                            self.peers.name(tag) if tag else self.host_id,
                            [r for r in rooms if isinstance(r, str)] if isinstance(rooms, list)
                            else [],
                            data if isinstance(data, dict) else {},
                            handshake if isinstance(handshake, dict) else {},
                            str(item.get("eio", "")), str(item.get("transport", "")),
                            self)  # type: ignore[arg-type]

    # -- sockets_join / sockets_leave / disconnect_sockets --------------------------------

    async def sockets_join(self, rooms: str | Iterable[str], to: str | Iterable[str] | None
                           = None, namespace: str = "/", *,
                           except_rooms: str | Iterable[str] | None = None,
                           local: bool = False, timeout: float = 5.0) -> int:
        """Put the selected sockets (``to``) in ``rooms`` on every node; returns how many
        sockets were selected. Returns once every node has applied it (so an emit to
        the rooms right after reaches them)."""
        return await self._room_op("join", rooms, to, namespace, except_rooms, local, timeout)

    async def sockets_leave(self, rooms: str | Iterable[str], to: str | Iterable[str] | None
                            = None, namespace: str = "/", *,
                            except_rooms: str | Iterable[str] | None = None,
                            local: bool = False, timeout: float = 5.0) -> int:
        """Take the selected sockets out of ``rooms`` on every node; returns how many."""
        return await self._room_op("leave", rooms, to, namespace, except_rooms, local, timeout)

    async def disconnect_sockets(self, to: str | Iterable[str] | None = None,
                                 namespace: str = "/", *,
                                 except_rooms: str | Iterable[str] | None = None,
                                 close: bool = False, local: bool = False,
                                 timeout: float = 5.0) -> int:
        """Disconnect the selected sockets on every node (``close``: also close their
        engine.io connection, every namespace of it); returns how many."""
        selection = _check_names("to", _as_list(to), self._max_room_chars)
        excluded = _check_names("except_rooms", _as_list(except_rooms), self._max_room_chars)
        body = {"ns": namespace, "rooms": selection, "except": excluded, "close": close}
        pending = await self._request("disconnect", body, timeout, local)
        count = await self._apply("disconnect", body)
        return self._total(pending, count, timeout)

    async def _room_op(self, op: str, rooms: str | Iterable[str],
                       to: str | Iterable[str] | None, namespace: str,
                       except_rooms: str | Iterable[str] | None, local: bool,
                       timeout: float) -> int:
        targets = _check_names("rooms", _as_list(rooms), self._max_room_chars) or []
        if any(is_sid(r) for r in targets):
            raise ValueError("rooms to join or leave cannot be sids")
        selection = _check_names("to", _as_list(to), self._max_room_chars)
        excluded = _check_names("except_rooms", _as_list(except_rooms), self._max_room_chars)
        body = {"ns": namespace, "rooms": selection, "except": excluded, "targets": targets}
        pending = await self._request(op, body, timeout, local)
        count = await self._apply(op, body)
        return self._total(pending, count, timeout)

    def _total(self, pending: Pending, local_count: int, timeout: float) -> int:
        total = local_count + sum(part for parts in pending.replies.values() for part in parts
                                  if isinstance(part, int))
        if getattr(pending, "timed_out", False):
            raise ClusterTimeoutError(
                f"no answer from {', '.join(self._missing(pending))} in {timeout:g} s", total,
                self._missing(pending))
        return total

    async def _apply(self, op: str, body: dict[str, Any]) -> int:
        """Apply a join / leave / disconnect to this node's selected sockets."""
        ns = body["ns"]
        chosen = self._local_selection(ns, body["rooms"], body["except"])
        if op == "disconnect":
            for sid, eio_sid in chosen.items():
                if body.get("close"):
                    await self.server.eio.disconnect(eio_sid)
                else:
                    await self.server.disconnect(sid, namespace=ns, ignore_queue=True)
            return len(chosen)
        for sid in chosen:
            for room in body["targets"]:
                if op == "leave":
                    self.basic_leave_room(sid, ns, room)
                elif room in self.hub.rooms_of(sid, ns) or \
                        len(self.hub.rooms_of(sid, ns)) < self._max_rooms:
                    await self.enter_room(sid, ns, room)
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
        body = {"ns": namespace, "event": event, "args": list(args)}
        if callback is None and timeout is None:
            if self.peers.tags():
                await self._publish(self.channels.cluster(),
                                    ClusterMessage(self.node_tag, "server_emit", None, body))
            return None
        wait = 5.0 if timeout is None else timeout
        pending = await self._request("server_emit", body, wait, False)
        replies = [part["result"] for parts in pending.replies.values() for part in parts
                   if isinstance(part, dict) and part.get("handled")]
        if getattr(pending, "timed_out", False):
            raise ClusterTimeoutError(
                f"no answer from {', '.join(self._missing(pending))} in {wait:g} s", replies,
                self._missing(pending))
        if callback is not None:
            result = callback(replies)
            if inspect.isawaitable(result):
                await result
        return replies

    async def _run_server_handler(self, body: dict[str, Any]) -> dict[str, Any]:
        handler = self._server_handlers.get((str(body.get("ns")), str(body.get("event"))))
        if handler is None:
            return {"handled": False}
        args = body.get("args")
        try:
            result = handler(*(args if isinstance(args, list) else []))
            if inspect.isawaitable(result):
                result = await result
            msgpack.packb(result, use_bin_type=True)
        except Exception as exc:
            logger.exception("server-side handler for %r failed", body.get("event"))
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
        selection = _check_names("to", _as_list(to), self._max_room_chars)
        excluded = [*(_check_names("except_rooms", _as_list(except_rooms),
                                   self._max_room_chars) or []),
                    *(_as_list(skip_sid) or [])]
        args = list(data) if isinstance(data, tuple) else ([] if data is None else [data])
        body = {"ns": namespace, "rooms": selection, "except": excluded or None,
                "event": event, "args": args}
        expected = self.peers.tags()
        req_id = f"{self.node_tag}:{next(self._request_ids)}"
        pending = PendingAcks(expected | {self.node_tag})
        self._pending[req_id] = pending
        self.stats.cluster_requests += 1
        try:
            if expected:
                await self._publish(self.channels.cluster(),
                                    ClusterMessage(self.node_tag, "bcast", req_id, body))
            pending.count(self.node_tag, await self._deliver_with_acks(self.node_tag, req_id,
                                                                       body))
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(pending.done)
            except TimeoutError:
                self.stats.cluster_timeouts += 1
                raise ClusterTimeoutError(
                    f"not every recipient answered within {timeout:g} s",
                    [_ack_value(a) for a in pending.acks], self._missing(pending)) from None
            return [_ack_value(a) for a in pending.acks]
        finally:
            del self._pending[req_id]
            for key in [k for k, v in self._broadcast_acks.items() if v[1] == req_id]:
                del self._broadcast_acks[key]

    async def _deliver_with_acks(self, requester: str, req_id: str,
                                 body: dict[str, Any]) -> int:
        """Write one packet (one ack id) to every selected local socket; their acks go
        to ``requester``. Returns how many it went to."""
        ns = body["ns"]
        chosen = self._local_selection(ns, body["rooms"], body["except"])
        if not chosen:
            return 0
        ack_id = next(self._broadcast_ack_ids)
        deadline = time.monotonic() + self._callback_timeout
        for sid in chosen:
            self.callbacks.setdefault(sid, {0: itertools.count(1)})[ack_id] = \
                _BroadcastAck(self, sid, ack_id, requester, req_id)
            self._broadcast_acks[(sid, ack_id)] = (requester, req_id)
            self._remote_callbacks[(sid, ack_id)] = deadline  # swept if never answered
        pkt = self._packet_class()(sio_packet.EVENT, namespace=ns,
                                   data=[body["event"], *body["args"]], id=ack_id).encode()
        await self.hub.deliver_to(chosen.values(), pkt)
        return len(chosen)

    async def _broadcast_acked(self, requester: str, req_id: str, sid: str,
                               args: list[Any] | None) -> None:
        if requester == self.node_tag:
            pending = self._pending.get(req_id)
            if isinstance(pending, PendingAcks):
                pending.ack(self.node_tag, args)
            return
        await self._reply(requester, req_id, {"sid": sid, "args": args}, op="bcast_ack")

    def _broadcast_recipient_gone(self, sid: str) -> None:
        """``sid`` disconnected: report its outstanding broadcast acks as gone."""
        for (s, ack_id), (requester, req_id) in list(self._broadcast_acks.items()):
            if s == sid:
                del self._broadcast_acks[(s, ack_id)]
                self._spawn(self._broadcast_acked(requester, req_id, sid, None))

    # -- handling what arrives ---------------------------------------------------------

    async def _on_cluster(self, msg: ClusterMessage) -> None:
        """A cluster message from another node (already checked as well formed)."""
        origin, op = msg.origin, msg.op
        if op == "bye":
            self.peers.drop(origin)
            self._node_gone(origin)
            return
        info = msg.body if op in ("hello", "heartbeat") else None
        if self.peers.saw(origin, info) and op != "hello":
            logger.info("node %s is in the cluster", self.peers.name(origin))
        if op == "hello":
            logger.info("node %s joined the cluster", self.peers.name(origin))
            await self._publish(self.channels.node(origin),
                                ClusterMessage(self.node_tag, "heartbeat", None, self._info()))
            recovery = getattr(self, "recovery", None)
            for sid, tag in list(recovery.adopted.items()) if recovery is not None else ():
                if tag == self.node_tag:  # sids restored here: where direct messages go
                    await self._publish(self.channels.node(origin), ClusterMessage(
                        self.node_tag, "adopt", None, {"sid": sid}))
            return
        if op == "heartbeat":
            return
        if op in ("adopt", "disown"):
            recovery = getattr(self, "recovery", None)
            sid = msg.body.get("sid")
            if recovery is not None and isinstance(sid, str):
                if op == "adopt":
                    recovery.adopted[sid] = origin
                elif recovery.adopted.get(sid) == origin:
                    del recovery.adopted[sid]
            return
        if op in ("reply", "bcast_count", "bcast_ack"):
            self._on_reply(msg)
            return
        # a request: run it off the broker's reader (joins wait for subscriptions)
        self._spawn(self._serve(msg))

    def _on_reply(self, msg: ClusterMessage) -> None:
        pending = self._pending.get(msg.req_id or "")
        if pending is None:
            return  # answered after the caller stopped waiting
        data, last = msg.body.get("data"), msg.body.get("last") is not False
        if msg.op == "reply":
            pending.reply(msg.origin, data, last)
        elif isinstance(pending, PendingAcks) and isinstance(data, dict):
            if msg.op == "bcast_count" and isinstance(data.get("n"), int):
                pending.count(msg.origin, data["n"])
            elif msg.op == "bcast_ack":
                args = data.get("args")
                pending.ack(msg.origin, args if isinstance(args, list) else None)

    async def _serve(self, msg: ClusterMessage) -> None:
        try:
            await self._serve_request(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.dropped_failed += 1
            logger.exception("cluster request %s from %s failed", msg.op,
                             self.peers.name(msg.origin))

    async def _serve_request(self, msg: ClusterMessage) -> None:
        body, req_id, origin = msg.body, msg.req_id, msg.origin
        if msg.op == "server_emit":
            result = await self._run_server_handler(body)
            if req_id is not None:
                await self._reply(origin, req_id, result)
            return
        if req_id is None:
            return
        if msg.op == "fetch":
            fmt = body.get("fmt")
            if fmt == "count":
                await self._reply(origin, req_id,
                                  len(self._local_selection(body["ns"], body["rooms"], None)))
            elif fmt == "ids":
                await self._reply(origin, req_id, list(self._local_selection(
                    body["ns"], body["rooms"], body["except"])))
            else:
                await self._send_parts(origin, req_id,
                                       self._describe(body["ns"], body["rooms"], body["except"]))
        elif msg.op in ("join", "leave", "disconnect"):
            await self._reply(origin, req_id, await self._apply(msg.op, body))
        elif msg.op == "bcast":
            n = await self._deliver_with_acks(origin, req_id, body)
            await self._reply(origin, req_id, {"n": n}, op="bcast_count")
        elif msg.op == "release":
            await self._reply(origin, req_id, await self._release(body["sid"], body["ns"]))

    async def _release(self, sid: str, namespace: str) -> bool:
        """Another node restores ``sid``'s session: drop the connection still here (its
        client has left it), without keeping its session."""
        recovery = getattr(self, "recovery", None)
        if recovery is not None:
            recovery.pids.pop(sid, None)
        if self.hub.is_local(sid, namespace):
            await self.server.disconnect(sid, namespace=namespace, ignore_queue=True)
        return True

    async def _send_parts(self, to: str, req_id: str, items: list[Any]) -> None:
        part: list[Any] = []
        size = 0
        for item in items:
            item_size = len(msgpack.packb(item, use_bin_type=True))
            if part and size + item_size > REPLY_PART_BYTES:
                await self._reply(to, req_id, part, last=False)
                part, size = [], 0
            part.append(item)
            size += item_size
        await self._reply(to, req_id, part, last=True)


class _BroadcastAck:
    """The callback python-socketio calls with a recipient's ack of an acked broadcast."""

    __slots__ = ("ack_id", "manager", "req_id", "requester", "sid")

    def __init__(self, manager: ClusterApi, sid: str, ack_id: int, requester: str,
                 req_id: str) -> None:
        self.manager = manager
        self.sid = sid
        self.ack_id = ack_id
        self.requester = requester
        self.req_id = req_id

    async def __call__(self, *args: Any) -> None:
        if self.manager._broadcast_acks.pop((self.sid, self.ack_id), None) is None:
            return
        await self.manager._broadcast_acked(self.requester, self.req_id, self.sid, list(args))


def check_cluster_body(op: str, body: dict[str, Any], max_room_chars: int) -> str | None:
    """Why a cluster request ``body`` is not well formed; None if it is."""
    ops = {"hello", "heartbeat", "bye", "reply", "bcast_count", "bcast_ack", "fetch", "join",
           "leave", "disconnect", "server_emit", "bcast", "adopt", "disown", "release"}
    if op not in ops:
        return f"unknown cluster operation {op!r:.40}"
    if op in ("hello", "heartbeat", "bye", "reply", "bcast_count", "bcast_ack"):
        return None
    if op in ("adopt", "disown", "release") and not is_sid(body.get("sid")):
        return f"{op} needs a sid"
    if op in ("adopt", "disown"):
        return None
    if not isinstance(body.get("ns"), str):
        return "namespace must be a string"
    if op == "server_emit":
        if not isinstance(body.get("event"), str) or not isinstance(body.get("args"), list):
            return "server_emit needs an event name and a list of arguments"
        return None
    for key in ("rooms", "except"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or len(value) > 10_000 or not all(
                isinstance(r, str) and r and (len(r) <= max_room_chars or is_sid(r))
                for r in value):
            return f"{key} must be a list of room names or sids"
    if op in ("join", "leave"):
        targets = body.get("targets")
        if not isinstance(targets, list) or len(targets) > 1_000 or not all(
                isinstance(r, str) and r and len(r) <= max_room_chars and not is_sid(r)
                for r in targets):
            return "targets must be a list of room names"
    if op == "fetch" and body.get("fmt") not in ("full", "ids", "count"):
        return "unknown fetch format"
    if op == "bcast" and (not isinstance(body.get("event"), str)
                          or not isinstance(body.get("args"), list)):
        return "bcast needs an event name and a list of arguments"
    return None
