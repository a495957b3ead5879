"""The node core: a python-socketio ``AsyncManager`` that relays through a :class:`Transport`.

What it guarantees, cluster-wide, on top of python-socketio's manager:

- emit to a room, a list of rooms and/or sids, a single sid, or a namespace;
  ``skip_sid`` (one sid or a list) is applied on every node; a socket in several
  target rooms gets one copy.
- a node holds a broker subscription for a room only while it has local members
  (plus an unsubscribe linger), so it receives only traffic it can deliver.
- there is no per-socket default room. A sid names its owning node, so direct
  messages, remote ``enter_room``/``leave_room``/``disconnect`` and ``call`` acks go
  to that node's control channel only.
- local members are served directly, never through the broker.
- delivery across nodes is at most once; what the broker refuses is counted in
  :attr:`ClusterManager.stats`, never silent.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator
from functools import partial
from typing import Any

from bidict import ValueDuplicationError, bidict
from socketio import AsyncManager
from socketio import packet as sio_packet

from . import codec
from .codec import EncodedPacket
from .fanout import Fanout, FanoutLimits, install
from .naming import ChannelNames
from .stats import ManagerStats
from .subscriptions import RoomSubscriptions
from .transport import Transport, TransportError

logger = logging.getLogger(__name__)

#: Sids are ``<node tag>:<random>``; room names of this shape are reserved.
SID_RE = re.compile(r"[A-Za-z0-9_-]{8}:[A-Za-z0-9_-]{12}")


def is_sid(name: object) -> bool:
    """Whether ``name`` has the shape of a sid issued by a :class:`ClusterManager`."""
    return isinstance(name, str) and len(name) == 21 and SID_RE.fullmatch(name) is not None


def sid_owner(sid: str) -> str:
    """The node tag of the node that owns ``sid``."""
    return sid[:8]


def _as_args(data: Any) -> list[Any]:
    # python-socketio: a tuple is several arguments, None is none, anything else is one
    if isinstance(data, tuple):
        return list(data)
    if data is None:
        return []
    return [data]


def _as_skip(skip_sid: Any) -> frozenset[str]:
    if skip_sid is None:
        return frozenset()
    if isinstance(skip_sid, str):
        return frozenset((skip_sid,))
    return frozenset(skip_sid)


def _as_targets(target: Any) -> list[str] | None:
    if target is None:
        return None
    if isinstance(target, str):
        return [target]
    return list(target)


class ClusterManager(AsyncManager):  # type: ignore[misc]
    """A python-socketio client manager that shares rooms across nodes via ``transport``.

    :param transport: the broker connection (see :mod:`nats_adapter.transport`).
    :param channel_prefix: first token(s) of every channel; nodes that should
        talk to each other use the same prefix.
    :param unsubscribe_linger: seconds a room's subscription outlives its last
        local member (damps join/leave churn).
    :param subscribe_timeout: seconds ``enter_room`` waits for the broker to
        confirm a new room subscription before returning anyway (the transport
        keeps trying; local delivery works meanwhile).
    :param callback_timeout: seconds an ack from a socket on another node is
        awaited before its callback is forgotten.
    :param write_only: emit only; never receive (for background workers with no
        Socket.IO server).
    :param websocket_compression: let websocket clients negotiate permessage-deflate.
        Off by default: browsers always offer it, and it costs ~100 KB of zlib state
        per socket and rules out sharing one frame between recipients.
    :param fanout_limits: per-socket bounds on unsent data; a socket past them is
        disconnected as a slow consumer.
    """

    name = "cluster"

    def __init__(
        self,
        transport: Transport,
        *,
        channel_prefix: str = "sio",
        unsubscribe_linger: float = 1.0,
        subscribe_timeout: float = 5.0,
        callback_timeout: float = 120.0,
        dedupe_window: float = 60.0,
        write_only: bool = False,
        websocket_compression: bool = False,
        fanout_limits: FanoutLimits | None = None,
    ) -> None:
        super().__init__()
        if subscribe_timeout <= 0:
            raise ValueError(f"subscribe_timeout must be > 0 seconds, got {subscribe_timeout!r}")
        if callback_timeout <= 0:
            raise ValueError(f"callback_timeout must be > 0 seconds, got {callback_timeout!r}")
        self.transport = transport
        self.node_id: str = secrets.token_urlsafe(6)
        self.channels = ChannelNames(channel_prefix)
        self.stats = ManagerStats()
        self.subscriptions = RoomSubscriptions(transport, self.stats, unsubscribe_linger)
        self.write_only = write_only
        self._subscribe_timeout = subscribe_timeout
        self._callback_timeout = callback_timeout
        self._dedupe_window = dedupe_window
        #: namespace -> sid -> named rooms it is in (no entry for a socket in no room)
        self._sid_rooms: dict[str, dict[str, set[str]]] = {}
        self._emit_ids = itertools.count(1)
        #: dedupe ids of multi-channel emits already delivered -> time seen
        self._seen: OrderedDict[str, float] = OrderedDict()
        #: (sid, ack id) of callbacks awaiting an ack from another node -> deadline
        self._remote_callbacks: dict[tuple[str, int], float] = {}
        self._start_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self.broker_connected = False
        self._compression = websocket_compression
        self._fanout_limits = fanout_limits
        self.fanout: Fanout | None = None
        #: whether the direct-write fast path is installed (see nats_adapter.fanout)
        self.fast_fanout = False

    def set_server(self, server: Any) -> None:
        super().set_server(server)
        self.fast_fanout = install(server.eio, compression=self._compression)
        self.fanout = Fanout(server.eio, self._fanout_limits)

    # -- lifecycle ---------------------------------------------------------------

    def initialize(self) -> None:
        """Called by python-socketio before the first request; starts the transport."""
        super().initialize()
        self._ensure_started()

    async def start(self) -> None:
        """Connect the transport. Safe to call more than once; ``initialize`` calls it lazily."""
        await self._ensure_started()

    def _ensure_started(self) -> asyncio.Task[None]:
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        return self._start_task

    async def _start(self) -> None:
        control = self.channels.node(self.node_id)
        await self.transport.start(self, control)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        logger.info("%s manager %s started (control channel %s)", self.transport.name,
                    self.node_id, control)

    async def close(self) -> None:
        """Flush what was published and disconnect from the broker."""
        if self._closed:
            return
        self._closed = True
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        await self.subscriptions.close()
        await self.transport.close()

    # -- membership (python-socketio hooks) ----------------------------------------

    async def pre_connect(self, eio_sid: str, namespace: str) -> str | None:
        """Register a connecting socket under a sid that names this node; no sid room."""
        sid = f"{self.node_id}:{secrets.token_urlsafe(9)}"
        try:
            self.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
        except ValueDuplicationError:
            return None  # this engine.io session is already connected to the namespace
        self.pending_connect.setdefault(namespace, []).append(sid)
        return sid

    def is_sid_room(self, namespace: str, room: Any) -> bool:
        return is_sid(room)

    def basic_enter_room(
        self, sid: str, namespace: str, room: str | None, eio_sid: str | None = None
    ) -> None:
        if room is not None and is_sid(room):
            raise ValueError("cannot enter a sid room")
        ns_rooms = self.rooms.get(namespace)
        if eio_sid is None:
            everyone = (ns_rooms or {}).get(None)
            if everyone is None or sid not in everyone:
                raise ValueError("sid is not connected to requested namespace")
            eio_sid = everyone[sid]
        if ns_rooms is None:
            ns_rooms = self.rooms[namespace] = {}
        members = ns_rooms.get(room)
        created = members is None
        if members is None:
            members = ns_rooms[room] = bidict()
        try:
            members[sid] = eio_sid
        finally:
            if created:
                if members:
                    self.subscriptions.acquire(self.channels.room(namespace, room))
                else:
                    del ns_rooms[room]
        if room is not None:
            self._sid_rooms.setdefault(namespace, {}).setdefault(sid, set()).add(room)

    def basic_leave_room(self, sid: str, namespace: str, room: str | None) -> None:
        ns_rooms = self.rooms.get(namespace)
        if ns_rooms is None:
            return
        members = ns_rooms.get(room)
        if members is None or sid not in members:
            return
        del members[sid]
        if room is not None:
            by_sid = self._sid_rooms.get(namespace, {})
            joined = by_sid.get(sid)
            if joined is not None:
                joined.discard(room)
                if not joined:
                    del by_sid[sid]
                    if not by_sid:
                        del self._sid_rooms[namespace]
        if not members:
            del ns_rooms[room]
            self.subscriptions.release(self.channels.room(namespace, room))
            if not ns_rooms:
                del self.rooms[namespace]

    def basic_close_room(self, room: str, namespace: str) -> None:
        if is_sid(room):
            raise ValueError("cannot close a sid room")
        members = self.rooms.get(namespace, {}).get(room)
        for sid in list(members or ()):
            self.basic_leave_room(sid, namespace, room)

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        for room in list(self._sid_rooms.get(namespace, {}).get(sid, ())):
            self.basic_leave_room(sid, namespace, room)
        self.basic_leave_room(sid, namespace, None)
        self.callbacks.pop(sid, None)
        for pending in (self.pending_connect, self.pending_disconnect):
            sids = pending.get(namespace)
            if sids is not None and sid in sids:
                sids.remove(sid)
                if not sids:
                    del pending[namespace]

    def get_rooms(self, sid: str, namespace: str) -> list[str]:
        """The named rooms ``sid`` is in (there is no sid room)."""
        return list(self._sid_rooms.get(namespace, {}).get(sid, ()))

    def get_participants(self, namespace: str, room: Any) -> Iterator[tuple[str, str]]:
        """Local ``(sid, eio_sid)`` pairs in ``room`` (a room, a local sid, a list, or None)."""
        yield from self._local_targets(namespace, _as_targets(room), frozenset()).items()

    def _is_local(self, sid: str, namespace: str) -> bool:
        return sid in self.rooms.get(namespace, {}).get(None, ())

    async def enter_room(
        self, sid: str, namespace: str, room: str, eio_sid: str | None = None
    ) -> None:
        """Add ``sid`` (on any node) to ``room``; returns once the room's subscription is up."""
        namespace = namespace or "/"
        if is_sid(room):
            raise ValueError("cannot enter a sid room")
        if eio_sid is not None or self._is_local(sid, namespace):
            self.basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
            channel = self.channels.room(namespace, room)
            if not await self.subscriptions.ready(channel, self._subscribe_timeout):
                logger.warning("broker has not confirmed subscription to %s yet", channel)
        else:
            await self._send_room_op(codec.ENTER_ROOM, sid, namespace, room)

    async def leave_room(self, sid: str, namespace: str, room: str) -> None:
        """Remove ``sid`` (on any node) from ``room``."""
        namespace = namespace or "/"
        if self._is_local(sid, namespace):
            self.basic_leave_room(sid, namespace, room)
        else:
            await self._send_room_op(codec.LEAVE_ROOM, sid, namespace, room)

    async def close_room(self, room: str, namespace: str) -> None:
        """Remove every member of ``room`` on every node."""
        namespace = namespace or "/"
        self.basic_close_room(room, namespace)
        msg = codec.RoomMessage(codec.CLOSE_ROOM, self.node_id, namespace, None, room)
        await self._publish(self.channels.room(namespace, room), msg)

    async def can_disconnect(self, sid: str, namespace: str) -> bool:
        namespace = namespace or "/"
        if self._is_local(sid, namespace):
            return bool(self.is_connected(sid, namespace))
        await self._send_room_op(codec.DISCONNECT, sid, namespace, None)
        return False

    async def _send_room_op(self, kind: int, sid: str, namespace: str, room: str | None) -> None:
        if not is_sid(sid) or sid_owner(sid) == self.node_id:
            logger.debug("ignoring operation %d on unknown sid %r", kind, sid)
            return
        msg = codec.RoomMessage(kind, self.node_id, namespace, sid, room)
        await self._publish(self.channels.node(sid_owner(sid)), msg)

    # -- emit --------------------------------------------------------------------

    async def emit(
        self,
        event: str,
        data: Any,
        namespace: str | None = None,
        room: Any = None,
        skip_sid: Any = None,
        callback: Callable[..., Any] | None = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        """Emit to sockets on every node (see the module docstring for targets)."""
        namespace = namespace or "/"
        target = to if to is not None else room
        args = _as_args(data)
        if callback is not None:
            await self._emit_with_callback(event, args, namespace, target, callback)
            return
        targets = _as_targets(target)
        skip = _as_skip(skip_sid)
        pkt = self._packet_class()(
            sio_packet.EVENT, namespace=namespace, data=[event, *args]
        ).encode()
        if self.server is not None:
            await self._deliver_targets(namespace, targets, skip, pkt)
        if kwargs.get("ignore_queue"):
            return
        await self._relay(namespace, targets, skip, pkt)

    async def _relay(
        self, namespace: str, targets: list[str] | None, skip: frozenset[str], pkt: EncodedPacket
    ) -> None:
        skip_list = sorted(skip)
        if targets is None:
            msg = codec.EmitMessage(self.node_id, namespace, None, skip_list, pkt)
            await self._publish(self.channels.room(namespace, None), msg)
            return
        channels: list[str] = []
        for name in dict.fromkeys(targets):
            if not is_sid(name):
                channels.append(self.channels.room(namespace, name))
            elif sid_owner(name) != self.node_id and name not in skip:
                channels.append(self.channels.node(sid_owner(name)))
        channels = list(dict.fromkeys(channels))
        if not channels:
            return
        dedupe = f"{self.node_id}:{next(self._emit_ids)}" if len(channels) > 1 else None
        msg = codec.EmitMessage(self.node_id, namespace, targets, skip_list, pkt, dedupe)
        data = self._encode(msg)
        if data is None:
            return
        for channel in channels:
            await self._publish_bytes(channel, data)

    async def _emit_with_callback(
        self, event: str, args: list[Any], namespace: str, target: Any,
        callback: Callable[..., Any],
    ) -> None:
        if not is_sid(target):
            raise ValueError("callbacks are only supported when emitting to a single sid")
        sid: str = target
        if self._is_local(sid, namespace):
            eio_sid = self.rooms[namespace][None][sid]
            ack_id = self._generate_ack_id(sid, callback)
            pkt = self._packet_class()(
                sio_packet.EVENT, namespace=namespace, data=[event, *args], id=ack_id
            ).encode()
            await self._deliver((eio_sid,), pkt)
            return
        if sid_owner(sid) == self.node_id:
            return  # our own sid, but no longer connected: nobody will ack
        ack_id = self._generate_ack_id(sid, callback)
        self._remote_callbacks[(sid, ack_id)] = time.monotonic() + self._callback_timeout
        msg = codec.EmitToSidMessage(self.node_id, namespace, sid, event, args, ack_id)
        await self._publish(self.channels.node(sid_owner(sid)), msg)

    async def trigger_callback(self, sid: str, id: int, data: list[Any]) -> None:
        self._remote_callbacks.pop((sid, id), None)
        await super().trigger_callback(sid, id, data)

    async def _return_ack(self, origin: str, sid: str, ack_id: int, *args: Any) -> None:
        await self._publish(self.channels.node(origin),
                            codec.AckMessage(self.node_id, sid, ack_id, list(args)))

    # -- local delivery ------------------------------------------------------------

    def _packet_class(self) -> Any:
        return self.server.packet_class if self.server is not None else sio_packet.Packet

    def _local_targets(
        self, namespace: str, targets: list[str] | None, skip: frozenset[str]
    ) -> dict[str, str]:
        """Local sockets addressed by ``targets`` (rooms and/or sids; None = namespace)."""
        ns_rooms = self.rooms.get(namespace)
        if not ns_rooms:
            return {}
        if targets is None:
            members = ns_rooms.get(None) or {}
            return {s: e for s, e in members.items() if s not in skip}
        if len(targets) == 1 and not is_sid(targets[0]):
            members = ns_rooms.get(targets[0]) or {}
            return {s: e for s, e in members.items() if s not in skip}
        out: dict[str, str] = {}
        everyone = ns_rooms.get(None) or {}
        for name in targets:
            if is_sid(name):
                eio_sid = everyone.get(name)
                if eio_sid is not None and name not in skip:
                    out[name] = eio_sid
                continue
            for s, e in (ns_rooms.get(name) or {}).items():
                if s not in skip:
                    out[s] = e
        return out

    async def _deliver_targets(self, namespace: str, targets: list[str] | None,
                               skip: frozenset[str], pkt: EncodedPacket) -> None:
        """Deliver to the local sockets ``targets`` address (see :meth:`_local_targets`)."""
        ns_rooms = self.rooms.get(namespace)
        if not ns_rooms:
            return
        if targets is None or (len(targets) == 1 and not is_sid(targets[0])):
            # one room or the namespace (nearly every emit): no per-emit recipient copy
            members = ns_rooms.get(None if targets is None else targets[0])
            if members:
                exclude = {e for sid in skip if (e := members.get(sid)) is not None}
                await self._deliver(members.values(), pkt, exclude)
            return
        await self._deliver(self._local_targets(namespace, targets, skip).values(), pkt)

    async def _deliver(self, eio_sids: Iterable[str], pkt: EncodedPacket,
                       exclude: Container[str] = ()) -> None:
        if self.fanout is None:
            return
        queued = self.fanout.queued
        delivered, failed = self.fanout.deliver(eio_sids, [pkt] if isinstance(pkt, str) else pkt,
                                                exclude)
        self.stats.delivered += delivered
        self.stats.delivery_errors += failed
        if self.fanout.queued != queued:
            await asyncio.sleep(0)  # let the engine.io writers of queued sockets run

    # -- the bus -----------------------------------------------------------------

    def _encode(self, msg: codec.Message) -> bytes | None:
        try:
            return codec.encode(msg)
        except (TypeError, ValueError):
            self.stats.publish_errors += 1
            logger.exception("cannot encode %s for the bus", type(msg).__name__)
            return None

    async def _publish(self, channel: str, msg: codec.Message) -> None:
        data = self._encode(msg)
        if data is not None:
            await self._publish_bytes(channel, data)

    async def _publish_bytes(self, channel: str, data: bytes) -> None:
        if self._start_task is None or not self._start_task.done():
            await self._ensure_started()
        try:
            await self.transport.publish(channel, data)
        except TransportError as exc:
            self.stats.publish_errors += 1
            logger.warning("publish to %s lost: %s", channel, exc)
            return
        self.stats.published += 1
        self.stats.published_bytes += len(data)

    def on_connection_state(self, connected: bool) -> None:
        if self.broker_connected and not connected:
            self.stats.disconnects += 1
        self.broker_connected = connected
        logger.log(logging.INFO if connected else logging.WARNING, "%s broker %s",
                   self.transport.name, "connected" if connected else "disconnected")

    async def on_message(self, channel: str, data: bytes) -> None:
        """Handle one payload from the broker; never raises (except cancellation)."""
        self.stats.received += 1
        self.stats.received_bytes += len(data)
        try:
            msg = codec.decode(data)
        except codec.EnvelopeError as exc:
            self.stats.dropped_malformed += 1
            logger.warning("dropped malformed payload of %d bytes on %s: %s", len(data),
                           channel, exc)
            return
        if msg.origin == self.node_id:
            self.stats.dropped_echo += 1
            return
        if self.write_only or self.server is None:
            return
        try:
            await self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.dropped_failed += 1
            logger.exception("failed to handle %s from node %s on %s", type(msg).__name__,
                             msg.origin, channel)

    async def _dispatch(self, msg: codec.Message) -> None:
        if isinstance(msg, codec.EmitMessage):
            await self._on_emit(msg)
        elif isinstance(msg, codec.EmitToSidMessage):
            await self._on_emit_to_sid(msg)
        elif isinstance(msg, codec.AckMessage):
            await self.trigger_callback(msg.sid, msg.ack_id, msg.args)
        elif msg.kind == codec.CLOSE_ROOM:
            assert msg.room is not None
            if not is_sid(msg.room):
                self.basic_close_room(msg.room, msg.namespace)
        else:
            await self._on_room_op(msg)

    async def _on_emit(self, msg: codec.EmitMessage) -> None:
        if msg.dedupe_id is not None and not self._first_copy(msg.dedupe_id):
            self.stats.dropped_duplicate += 1
            return
        ns_rooms = self.rooms.get(msg.namespace, {})
        if msg.rooms is not None and not any(
            (r in ns_rooms) if not is_sid(r) else self._is_local(r, msg.namespace)
            for r in msg.rooms
        ):
            self.stats.unwanted += 1
            return
        await self._deliver_targets(msg.namespace, msg.rooms, frozenset(msg.skip), msg.packet)

    async def _on_emit_to_sid(self, msg: codec.EmitToSidMessage) -> None:
        if not self._is_local(msg.sid, msg.namespace):
            self.stats.unwanted += 1
            return
        eio_sid = self.rooms[msg.namespace][None][msg.sid]
        ack_id = None
        if msg.ack_id is not None:
            ack_id = self._generate_ack_id(
                msg.sid, partial(self._return_ack, msg.origin, msg.sid, msg.ack_id)
            )
        pkt = self._packet_class()(
            sio_packet.EVENT, namespace=msg.namespace, data=[msg.event, *msg.args], id=ack_id
        ).encode()
        await self._deliver((eio_sid,), pkt)

    async def _on_room_op(self, msg: codec.RoomMessage) -> None:
        assert msg.sid is not None
        if not self._is_local(msg.sid, msg.namespace):
            self.stats.unwanted += 1
            return
        if msg.kind == codec.DISCONNECT:
            await self.server.disconnect(msg.sid, namespace=msg.namespace, ignore_queue=True)
            return
        assert msg.room is not None
        if msg.kind == codec.ENTER_ROOM:
            await self.enter_room(msg.sid, msg.namespace, msg.room)
        else:
            self.basic_leave_room(msg.sid, msg.namespace, msg.room)

    def _first_copy(self, dedupe_id: str) -> bool:
        if dedupe_id in self._seen:
            return False
        now = time.monotonic()
        self._seen[dedupe_id] = now
        horizon = now - self._dedupe_window
        while self._seen:
            oldest_id, seen_at = next(iter(self._seen.items()))
            if seen_at >= horizon and len(self._seen) <= 100_000:
                break
            del self._seen[oldest_id]
        return True

    async def _sweep(self) -> None:
        """Forget callbacks whose ack from another node never came."""
        while True:
            await asyncio.sleep(min(10.0, self._callback_timeout))
            now = time.monotonic()
            expired = [key for key, deadline in self._remote_callbacks.items() if deadline < now]
            for sid, ack_id in expired:
                del self._remote_callbacks[(sid, ack_id)]
                pending = self.callbacks.get(sid)
                if pending is not None:
                    pending.pop(ack_id, None)
                    if len(pending) <= 1:  # only the id counter is left
                        del self.callbacks[sid]

    def participants_count(self) -> int:
        """Connected sockets on this node, across namespaces."""
        return sum(len(ns.get(None) or ()) for ns in self.rooms.values())

    def room_count(self) -> int:
        """Named rooms with local members on this node."""
        return sum(len(ns) - (None in ns) for ns in self.rooms.values())
