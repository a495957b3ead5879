"""The node core: a python-socketio ``AsyncManager`` that relays through a :class:`Broker`.

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

This module holds the python-socketio contract and the cross-node routing: what
goes to which channel, and what to do with what arrives. Local membership and
delivery are the :class:`~nats_adapter.hub.LocalHub`'s; the wire is the broker's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from functools import partial
from typing import Any

from bidict import ValueDuplicationError
from socketio import AsyncManager
from socketio import packet as sio_packet

from . import _socketio_hooks as socketio_hooks
from . import codec
from ._engineio import FastPath, QueueLimits, WriteBatch, fast_paths, install
from ._logging import ThrottledLog
from .brokers.base import Broker, BrokerError
from .cluster import ClusterApi, check_cluster_body
from .dedupe import DedupeWindow
from .hub import FanoutLimits, LocalHub
from .naming import ChannelNames
from .packets import is_event_packet
from .recovery import Recovery, RecoveryOptions
from .sealing import ClusterKey, ReplayWindow, Verdict
from .sids import is_node_tag, is_sid, new_node_tag, new_sid, sid_owner
from .stats import ManagerStats
from .subscriptions import RoomSubscriptions, SubscriptionError
from .types import EncodedPacket

logger = logging.getLogger(__name__)


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


class ClusterManager(ClusterApi, AsyncManager):  # type: ignore[misc]
    """A python-socketio client manager that shares rooms across nodes via ``broker``.

    :param broker: the broker connection (see :mod:`nats_adapter.brokers`).
    :param channel_prefix: first token(s) of every channel; nodes that should
        talk to each other use the same prefix.
    :param unsubscribe_linger: seconds a room's subscription outlives its last
        local member (damps join/leave churn).
    :param subscribe_timeout: seconds ``enter_room`` waits for the broker to
        confirm a room's subscription before it gives up and raises
        :class:`SubscriptionError` (the deadline that applies, whatever the broker).
    :param callback_timeout: seconds an ack from a socket on another node is
        awaited before its callback is forgotten.
    :param dedupe_window: seconds a multi-channel emit's id is remembered, so
        its second copy is dropped.
    :param write_only: emit only; never receive (for background workers with no
        Socket.IO server).
    :param websocket_compression: let websocket clients negotiate permessage-deflate.
        Off by default: browsers always offer it, and it costs ~100 KB of zlib state
        per socket and rules out sharing one frame between recipients.
    :param fanout_limits: per-socket bounds on unsent data; a socket past them is
        disconnected as a slow consumer.
    :param cluster_key: a secret shared by every node (at least 32 bytes). When
        set, envelopes are sealed with it and unsealed, forged, stale or replayed
        ones are dropped and counted (see :mod:`nats_adapter.sealing`).
    :param max_room_chars: longest room name a room operation from another node
        may carry.
    :param max_rooms_per_socket: rooms a socket may be put in by other nodes.
    :param node_name: a human name for this node (``gw-1``) in the cluster API's
        node listings and errors; the node is also known by its random tag.
    :param heartbeat_interval: seconds between this node's heartbeats to the others.
    :param heartbeat_timeout: seconds without a sign of life after which a node is
        no longer waited for (default: three heartbeats).
    :param recovery: Socket.IO connection state recovery (``True`` or
        :class:`~nats_adapter.recovery.RecoveryOptions`): needs a broker with a
        message store (NATS with JetStream); see :mod:`nats_adapter.recovery`.

    Whatever arrives from the broker must be something a node could send: emits
    carry EVENT packets of the envelope's namespace without an ack id, acks are
    accepted only from the node of the sid they answer and only when this node
    asked for them, and room operations stay within the limits above. Anything
    else is dropped and counted in :attr:`stats` (``dropped_invalid``).
    """

    name = "cluster"

    def __init__(
        self,
        broker: Broker,
        *,
        channel_prefix: str = "sio",
        unsubscribe_linger: float = 1.0,
        subscribe_timeout: float = 5.0,
        callback_timeout: float = 120.0,
        dedupe_window: float = 60.0,
        write_only: bool = False,
        websocket_compression: bool = False,
        fanout_limits: FanoutLimits | None = None,
        cluster_key: bytes | None = None,
        max_room_chars: int = 256,
        max_rooms_per_socket: int = 1000,
        node_name: str = "",
        heartbeat_interval: float = 2.0,
        heartbeat_timeout: float | None = None,
        recovery: RecoveryOptions | bool | None = None,
    ) -> None:
        super().__init__()
        if subscribe_timeout <= 0:
            raise ValueError(f"subscribe_timeout must be > 0 seconds, got {subscribe_timeout!r}")
        if callback_timeout <= 0:
            raise ValueError(f"callback_timeout must be > 0 seconds, got {callback_timeout!r}")
        self.broker = broker
        #: random, names this node in sids, envelopes and its control channel
        self.node_tag: str = new_node_tag()
        options = RecoveryOptions() if recovery is True else (recovery or None)
        self.channels = ChannelNames(channel_prefix, stored=options is not None)
        self.stats = ManagerStats()
        self.hub = LocalHub(self.stats)
        # python-socketio's own methods read the index through self.rooms
        self.rooms = self.hub.rooms
        self.subscriptions = RoomSubscriptions(broker, self.stats, unsubscribe_linger)
        self.write_only = write_only
        self._subscribe_timeout = subscribe_timeout
        self._callback_timeout = callback_timeout
        self._dedupe = DedupeWindow(dedupe_window)
        self._emit_ids = itertools.count(1)
        #: (sid, ack id) of callbacks awaiting an ack from another node -> deadline
        self._remote_callbacks: dict[tuple[str, int], float] = {}
        self._start_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: background work started by messages from the broker
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.broker_connected = False
        self._compression = websocket_compression
        self._fanout_limits = fanout_limits
        self._fastpath: FastPath | None = None
        self._log = ThrottledLog(logger)
        self._key = ClusterKey(cluster_key) if cluster_key is not None else None
        self._replays = ReplayWindow()
        self._max_room_chars = max_room_chars
        self._max_rooms = max_rooms_per_socket
        self._init_cluster(node_name, heartbeat_interval, heartbeat_timeout)
        self.recovery = Recovery(self, options) if options is not None else None

    def set_server(self, server: Any) -> None:
        super().set_server(server)
        limits = self._fanout_limits or FanoutLimits()
        queue_limits = QueueLimits(limits.max_queued_packets, limits.max_buffer_bytes)
        self._fastpath = install(server.eio, compression=self._compression,
                                 queue_limits=queue_limits)
        fastpath = self._fastpath
        self.hub.attach(server.eio, limits, queue_limits if fastpath is not None else None,
                        fastpath.sessions if fastpath is not None else None)
        if self.recovery is not None:
            assert self.hub.fanout is not None
            self.hub.fanout.held = self.recovery.catching_up
            socketio_hooks.install(server, self.recovery)

    @property
    def cluster_key(self) -> ClusterKey | None:
        """The key envelopes and session records are sealed with; None on an open bus."""
        return self._key

    @property
    def fast_fanout(self) -> bool:
        """Whether direct websocket writes are on (see nats_adapter._engineio)."""
        return self._fastpath is not None and self._fastpath.enabled

    def fast_paths(self) -> dict[str, dict[str, Any]]:
        """Which fast paths are active on this node and, for the others, why not
        (:mod:`nats_adapter.compat`; for /healthz)."""
        return fast_paths(self._fastpath)

    @property
    def fanout(self) -> Any:
        """The local writer (its counters are exported as metrics); None before a server."""
        return self.hub.fanout

    @property
    def websocket_writes(self) -> WriteBatch | None:
        """The lean websockets' writes (their counters are exported as metrics); None
        without lean websockets."""
        if self._fastpath is None or self._fastpath.heartbeat is None:
            return None
        return self._fastpath.sessions.writes

    # -- lifecycle ---------------------------------------------------------------

    def initialize(self) -> None:
        """Called by python-socketio before the first request; starts the broker."""
        super().initialize()
        self._ensure_started()

    async def start(self) -> None:
        """Connect the broker. Safe to call more than once; ``initialize`` calls it lazily."""
        await self._ensure_started()

    def _ensure_started(self) -> asyncio.Task[None]:
        if self._start_task is None:
            self._start_task = asyncio.get_running_loop().create_task(self._start())
        return self._start_task

    async def _start(self) -> None:
        control = self.channels.node(self.node_tag)
        await self.broker.start(self, control)
        if self.recovery is not None:
            await self.recovery.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if not self.write_only:
            # after this task ends: what it publishes waits for the start to be done
            self._spawn(self._start_cluster())
        logger.info("%s manager %s started (control channel %s)", self.broker.name,
                    self.node_tag, control)

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
        await self._stop_cluster()
        pending = list(self._tasks)
        if self.recovery is not None and self.recovery.flushing is not None:
            pending.append(self.recovery.flushing)
        if pending:  # let what is under way finish (session writes at shutdown)
            await asyncio.wait(pending, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.subscriptions.close()
        await self.broker.close()

    # -- membership (python-socketio hooks) ----------------------------------------

    async def pre_connect(self, eio_sid: str, namespace: str) -> str | None:
        """Register a connecting socket under a sid that names this node (or the sid of
        the session it restores); no sid room."""
        restored = self.recovery.restored_sid(eio_sid, namespace) if self.recovery else None
        sid = restored or new_sid(self.node_tag)
        try:
            self.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
        except ValueDuplicationError:
            return None  # this engine.io session is already connected to the namespace
        self.pending_connect.setdefault(namespace, []).append(sid)
        if restored is not None and self.recovery is not None:
            await self.recovery.reattach(sid, eio_sid, namespace)
        return sid

    def basic_enter_room(
        self, sid: str, namespace: str, room: str | None, eio_sid: str | None = None
    ) -> None:
        if room is not None and is_sid(room):
            raise ValueError("cannot enter a sid room")
        channel = self.channels.room(namespace, room)  # refuses names too long for one
        if self.hub.join(sid, namespace, room, eio_sid):
            self.subscriptions.acquire(channel)
        if room is not None and self.recovery is not None:
            self.recovery.touch(sid)

    def basic_leave_room(self, sid: str, namespace: str, room: str | None) -> None:
        if self.hub.leave(sid, namespace, room):
            self.subscriptions.release(self.channels.room(namespace, room))
        if room is not None and self.recovery is not None:
            self.recovery.touch(sid)

    def basic_close_room(self, room: str, namespace: str) -> None:
        if is_sid(room):
            raise ValueError("cannot close a sid room")
        for sid in list(self.hub.members(namespace, room)):
            self.basic_leave_room(sid, namespace, room)

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        if self._broadcast_acks:
            self._broadcast_recipient_gone(sid)
        if self.recovery is not None:
            eio_sid = self.hub.members(namespace, None).get(sid)
            if eio_sid is not None:
                self.recovery.on_disconnect(sid, namespace, eio_sid)
        for room in self.hub.rooms_of(sid, namespace):
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
        return self.hub.rooms_of(sid, namespace)

    def get_participants(self, namespace: str, room: Any) -> Iterator[tuple[str, str]]:
        """Local ``(sid, eio_sid)`` pairs in ``room`` (a room, a local sid, a list, or None)."""
        yield from self.hub.targets(namespace, _as_targets(room), frozenset()).items()

    async def enter_room(
        self, sid: str, namespace: str, room: str, eio_sid: str | None = None
    ) -> None:
        """Add ``sid`` (on any node) to ``room``.

        For a local socket, returns once this node's broker subscription for the room
        is confirmed, so the socket receives what any node sends to the room from
        then on. If the broker does not confirm it within ``subscribe_timeout``, the
        socket is taken out of the room again and :class:`SubscriptionError` is
        raised. For a socket on another node, the request is sent to that node.
        """
        namespace = namespace or "/"
        if is_sid(room):
            raise ValueError("cannot enter a sid room")
        if eio_sid is not None or self.hub.is_local(sid, namespace):
            was_member = sid in self.hub.members(namespace, room)
            self.basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
            channel = self.channels.room(namespace, room)
            if not await self.subscriptions.ready(channel, self._subscribe_timeout):
                if not was_member:
                    self.basic_leave_room(sid, namespace, room)
                raise SubscriptionError(
                    f"the {self.broker.name} broker did not confirm the room's subscription "
                    f"within {self._subscribe_timeout:g} s")
        else:
            await self._send_room_op(codec.ENTER_ROOM, sid, namespace, room)

    async def leave_room(self, sid: str, namespace: str, room: str) -> None:
        """Remove ``sid`` (on any node) from ``room``."""
        namespace = namespace or "/"
        if self.hub.is_local(sid, namespace):
            self.basic_leave_room(sid, namespace, room)
        else:
            await self._send_room_op(codec.LEAVE_ROOM, sid, namespace, room)

    async def close_room(self, room: str, namespace: str) -> None:
        """Remove every member of ``room`` on every node."""
        namespace = namespace or "/"
        self.basic_close_room(room, namespace)
        msg = codec.RoomMessage(codec.CLOSE_ROOM, self.node_tag, namespace, None, room)
        # with recovery a room's channel is the store's live copy, which only the store
        # publishes on (and only emits are believed there): every node hears it on the
        # cluster channel instead
        channel = self.channels.cluster() if self.recovery is not None \
            else self.channels.room(namespace, room)
        await self._publish(channel, msg)

    async def can_disconnect(self, sid: str, namespace: str) -> bool:
        namespace = namespace or "/"
        if self.hub.is_local(sid, namespace):
            return bool(self.is_connected(sid, namespace))
        await self._send_room_op(codec.DISCONNECT, sid, namespace, None)
        return False

    def _owner(self, sid: str) -> str:
        """The node tag of the node that has ``sid`` (a restored sid may have moved)."""
        return self.recovery.owner(sid) if self.recovery is not None else sid_owner(sid)

    async def _send_room_op(self, kind: int, sid: str, namespace: str, room: str | None) -> None:
        if not is_sid(sid) or self._owner(sid) == self.node_tag:
            logger.debug("ignoring operation %d on unknown sid %r", kind, sid)
            return
        msg = codec.RoomMessage(kind, self.node_tag, namespace, sid, room)
        await self._publish(self.channels.node(self._owner(sid)), msg)

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
        if self.recovery is not None and not kwargs.get("ignore_queue"):
            # stored, then delivered (here too) from the copy that carries its offset
            await self.recovery.store_emit(namespace, targets, skip, pkt)
            return
        if self.server is not None:
            await self.hub.deliver(namespace, targets, skip, pkt)
        if kwargs.get("ignore_queue"):
            return
        await self._relay(namespace, targets, skip, pkt)

    async def _relay(
        self, namespace: str, targets: list[str] | None, skip: frozenset[str], pkt: EncodedPacket
    ) -> None:
        """Publish an emit on every channel that reaches a node with a recipient."""
        # without recovery a sid of this node is on no other (sockets never move), so
        # skipping it there is a no-op: it does not travel (the sender, mostly)
        skip_list = sorted(s for s in skip if self.recovery is not None
                           or sid_owner(s) != self.node_tag)
        if targets is None:
            msg = codec.EmitMessage(self.node_tag, namespace, None, skip_list, pkt)
            await self._publish(self.channels.room(namespace, None), msg)
            return
        channels: list[str] = []
        for name in dict.fromkeys(targets):
            if not is_sid(name):
                channels.append(self.channels.room(namespace, name))
            elif self._owner(name) != self.node_tag and name not in skip:
                channels.append(self.channels.node(self._owner(name)))
        channels = list(dict.fromkeys(channels))
        if not channels:
            return
        if len(channels) > 1:
            msg = codec.EmitMessage(self.node_tag, namespace, targets, skip_list, pkt,
                                    f"{self.node_tag}:{next(self._emit_ids)}")
        elif len(targets) == 1 and not is_sid(targets[0]):  # its channel names the room
            # its origin only serves to drop a node's own publications and to check seals
            origin = self.node_tag if self._key is not None or self.broker.echoes else ""
            msg = codec.EmitMessage(origin, namespace, targets, skip_list, pkt,
                                    channel_room=True)
        else:
            msg = codec.EmitMessage(self.node_tag, namespace, targets, skip_list, pkt)
        data = self._encode(msg)
        if data is None:
            return
        for channel in channels:
            await self._publish_bytes(channel, self.seal(data, channel))

    async def _emit_with_callback(
        self, event: str, args: list[Any], namespace: str, target: Any,
        callback: Callable[..., Any],
    ) -> None:
        if not is_sid(target):
            raise ValueError("callbacks are only supported when emitting to a single sid")
        sid: str = target
        if self.hub.is_local(sid, namespace):
            eio_sid = self.hub.members(namespace, None)[sid]
            ack_id = self._generate_ack_id(sid, callback)
            pkt = self._packet_class()(
                sio_packet.EVENT, namespace=namespace, data=[event, *args], id=ack_id
            ).encode()
            await self.hub.deliver_to((eio_sid,), pkt)
            return
        if self._owner(sid) == self.node_tag:
            return  # our own sid, but no longer connected: nobody will ack
        ack_id = self._generate_ack_id(sid, callback)
        self._remote_callbacks[(sid, ack_id)] = time.monotonic() + self._callback_timeout
        msg = codec.EmitToSidMessage(self.node_tag, namespace, sid, event, args, ack_id)
        await self._publish(self.channels.node(self._owner(sid)), msg)

    async def trigger_callback(self, sid: str, id: int, data: list[Any]) -> None:
        self._remote_callbacks.pop((sid, id), None)
        await super().trigger_callback(sid, id, data)

    async def _return_ack(self, origin: str, sid: str, ack_id: int, *args: Any) -> None:
        await self._publish(self.channels.node(origin),
                            codec.AckMessage(self.node_tag, sid, ack_id, list(args)))

    def _packet_class(self) -> Any:
        return self.server.packet_class if self.server is not None else sio_packet.Packet

    # -- the bus -----------------------------------------------------------------

    def _encode(self, msg: codec.Message) -> bytes | None:
        """``msg`` as bytes, not yet sealed (see :meth:`seal`); None when it cannot be
        encoded (counted and logged)."""
        try:
            return codec.encode(msg)
        except (TypeError, ValueError):
            self.stats.publish_errors += 1
            logger.exception("cannot encode %s for the bus", type(msg).__name__)
            return None

    def seal(self, data: bytes, channel: str) -> bytes:
        """An encoded envelope as sent on ``channel``: sealed for that channel when
        there is a cluster key (it opens on no other), as is without."""
        if self._key is None:
            return data
        return self._key.seal(data, self.channels.logical(channel))

    def open_stored(self, subject: str, data: bytes, max_age: float
                    ) -> tuple[codec.Message, int, int] | None:
        """The envelope stored under ``subject``, its seal's sequence and stamp (ms;
        both 0 without a cluster key), read back from the message store: None when it
        does not open for that subject or is older than ``max_age`` seconds (plus the
        clock skew allowed). Not counted: it was counted when it came by live."""
        seq = stamp = 0
        if self._key is not None:
            opened = self._key.open(data, self.channels.logical(subject),
                                     max_age=max_age + self._key.max_skew_ms / 1000)
            if opened.verdict is not Verdict.OK:
                return None
            data, seq, stamp = opened.body, opened.seq, opened.stamp_ms
        try:
            return codec.decode(data), seq, stamp
        except codec.EnvelopeError:
            return None

    async def _publish(self, channel: str, msg: codec.Message) -> None:
        data = self._encode(msg)
        if data is not None:
            await self._publish_bytes(channel, self.seal(data, channel))

    async def _publish_bytes(self, channel: str, data: bytes) -> None:
        if self._start_task is None or not self._start_task.done():
            await self._ensure_started()
        try:
            await self.broker.publish(channel, data)
        except BrokerError as exc:
            self.stats.publish_errors += 1
            self._log.warning("publish", "publish to %s lost: %s", channel, exc)
            return
        self.stats.published += 1
        self.stats.published_bytes += len(data)

    def on_connection_state(self, connected: bool) -> None:
        if self.broker_connected and not connected:
            self.stats.disconnects += 1
        if connected and not self.broker_connected and self.stats.disconnects:
            self._cluster_reconnected()
        self.broker_connected = connected
        logger.log(logging.INFO if connected else logging.WARNING, "%s broker %s",
                   self.broker.name, "connected" if connected else "disconnected")

    async def on_message(self, channel: str, data: bytes, seq: int | None = None) -> None:
        """Handle one payload from the broker; never raises (except cancellation).

        ``seq`` set on one of the store's live channels: a stored message coming back
        live (connection state recovery), delivered with its offset, whoever sent it
        (this node included). On any other channel ``seq`` means nothing (anyone may
        set the header): the message is live traffic like any other. Stored or live,
        an envelope passes the same seal, age and replay checks."""
        size = len(data)
        self.stats.received += 1
        self.stats.received_bytes += size
        stored = seq is not None and self.recovery is not None \
            and self.channels.is_live(channel)
        opened = self._open(channel, data, stored=stored)
        if opened is None:
            return
        msg, sealed_seq = opened
        if msg.origin == self.node_tag and not stored:
            self.stats.dropped_echo += 1
            return
        if isinstance(msg, codec.ClusterMessage):
            self.stats.cluster_received += 1
            self.stats.cluster_received_bytes += size
        if self._key is not None and not self._replays.first(msg.origin, sealed_seq):
            self.stats.dropped_replayed += 1
            self._log.warning("replayed", "dropped a replayed envelope from %r on %s",
                              msg.origin, channel)
            return
        if self.write_only or self.server is None:
            return
        if stored:
            assert seq is not None
            await self._on_stored(channel, msg, seq)
            return
        problem = self._invalid(msg)
        if problem is not None:
            self.stats.dropped_invalid += 1
            self._log.warning("invalid", "dropped %s from %r on %s: %s", type(msg).__name__,
                              msg.origin, channel, problem)
            return
        try:
            await self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.dropped_failed += 1
            logger.exception("failed to handle %s from node %s on %s", type(msg).__name__,
                             msg.origin, channel)

    async def _on_stored(self, channel: str, msg: codec.Message, seq: int) -> None:
        assert self.recovery is not None
        if not isinstance(msg, codec.EmitMessage):
            problem: str | None = "only emits are stored"
        else:
            problem = self._invalid(msg)
        if problem is not None or not isinstance(msg, codec.EmitMessage):
            self.stats.dropped_invalid += 1
            self._log.warning("invalid", "dropped stored %s on %s: %s", type(msg).__name__,
                              channel, problem)
            return
        try:
            await self.recovery.deliver_stored(msg, seq)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.dropped_failed += 1
            logger.exception("failed to deliver stored message %d on %s", seq, channel)

    def _open(self, channel: str, data: bytes, stored: bool
              ) -> tuple[codec.Message, int] | None:
        """The envelope in ``data`` and its seal's sequence (0 without a cluster key),
        or None when it is unsealed, forged (sealed for another channel included),
        stale or malformed (counted and logged). A stored copy comes back live as it is
        stored: its age is checked like any other's."""
        sealed_seq = 0
        if self._key is not None:
            verdict, body, sealed_seq, _ = self._key.open(data, self.channels.logical(channel))
            if verdict is not Verdict.OK:
                self._reject_unsealed(verdict, data, channel)
                return None
            data = body
        try:
            msg = codec.decode(data)
            if isinstance(msg, codec.EmitMessage) and msg.channel_room:
                msg = self._with_channel_room(msg, channel)
            return msg, sealed_seq
        except codec.EnvelopeError as exc:
            self.stats.dropped_malformed += 1
            self._log.warning("malformed", "dropped malformed %spayload of %d bytes on %s: %s",
                              "stored " if stored else "", len(data), channel, exc)
            return None

    def _with_channel_room(self, msg: codec.EmitMessage, channel: str) -> codec.EmitMessage:
        """``msg`` for the namespace and room its channel names (the envelope has neither)."""
        parsed = self.channels.parse_room(channel)
        if parsed is None or parsed[1] is None:
            raise codec.EnvelopeError("an emit to its channel's room on a channel that names "
                                      "no room")
        return dataclasses.replace(msg, namespace=parsed[0], rooms=[parsed[1]],
                                   channel_room=False)

    def _reject_unsealed(self, verdict: Verdict, data: bytes, channel: str) -> None:
        if verdict is Verdict.STALE:
            self.stats.dropped_stale += 1
        else:
            try:
                codec.decode(data)  # a whole envelope with no seal at all
                verdict = Verdict.UNSIGNED
            except codec.EnvelopeError:
                verdict = Verdict.FORGED
            if verdict is Verdict.UNSIGNED:
                self.stats.dropped_unsigned += 1
            else:
                self.stats.dropped_forged += 1
        self._log.warning(verdict.value, "dropped a %s envelope of %d bytes on %s (cluster key "
                          "set)", verdict.value, len(data), channel)

    def _invalid(self, msg: codec.Message) -> str | None:
        """Why ``msg`` is not something a node could legitimately send; None if it is."""
        if not is_node_tag(msg.origin) and not (
                msg.origin == "" and self._key is None and isinstance(msg, codec.EmitMessage)):
            return "origin is not a node tag"
        if isinstance(msg, codec.EmitMessage):
            if not is_event_packet(msg.packet, msg.namespace):
                return "not an EVENT packet of the envelope's namespace without an ack id"
            for name in msg.rooms or ():
                if not is_sid(name) and len(name) > self._max_room_chars:
                    return "room name too long"
            return None
        if isinstance(msg, codec.EmitToSidMessage):
            if msg.ack_id is not None and msg.ack_id < 0:
                return "negative ack id"
            return None
        if isinstance(msg, codec.ClusterMessage):
            return check_cluster_body(msg.op, msg.body, self._max_room_chars)
        if isinstance(msg, codec.AckMessage):
            if self._owner(msg.sid) != msg.origin:
                return "ack from a node that does not own the sid"
            if (msg.sid, msg.ack_id) not in self._remote_callbacks:
                return "ack this node did not ask for"
            return None
        if msg.room is not None and (is_sid(msg.room) or len(msg.room) > self._max_room_chars):
            return "room name is a sid or too long"
        if msg.kind == codec.ENTER_ROOM and msg.sid is not None \
                and msg.sid not in self.hub.members(msg.namespace, msg.room) \
                and len(self.hub.rooms_of(msg.sid, msg.namespace)) >= self._max_rooms:
            return "the socket is in too many rooms"
        return None

    async def _dispatch(self, msg: codec.Message) -> None:
        if isinstance(msg, codec.EmitMessage):
            await self._on_emit(msg)
        elif isinstance(msg, codec.EmitToSidMessage):
            await self._on_emit_to_sid(msg)
        elif isinstance(msg, codec.AckMessage):
            await self.trigger_callback(msg.sid, msg.ack_id, msg.args)
        elif isinstance(msg, codec.ClusterMessage):
            await self._on_cluster(msg)
        elif msg.kind == codec.CLOSE_ROOM:
            assert msg.room is not None
            if not is_sid(msg.room):
                self.basic_close_room(msg.room, msg.namespace)
        else:
            await self._on_room_op(msg)

    async def _on_emit(self, msg: codec.EmitMessage) -> None:
        if msg.dedupe_id is not None and not self._dedupe.first(msg.dedupe_id):
            self.stats.dropped_duplicate += 1
            return
        if msg.rooms is not None and not self.hub.addresses_any(msg.namespace, msg.rooms):
            self.stats.unwanted += 1
            return
        await self.hub.deliver(msg.namespace, msg.rooms, frozenset(msg.skip), msg.packet)

    async def _on_emit_to_sid(self, msg: codec.EmitToSidMessage) -> None:
        eio_sid = self.hub.members(msg.namespace, None).get(msg.sid)
        if eio_sid is None:
            self.stats.unwanted += 1
            return
        ack_id = None
        if msg.ack_id is not None:
            ack_id = self._generate_ack_id(
                msg.sid, partial(self._return_ack, msg.origin, msg.sid, msg.ack_id)
            )
        pkt = self._packet_class()(
            sio_packet.EVENT, namespace=msg.namespace, data=[msg.event, *msg.args], id=ack_id
        ).encode()
        await self.hub.deliver_to((eio_sid,), pkt)

    async def _on_room_op(self, msg: codec.RoomMessage) -> None:
        assert msg.sid is not None
        if not self.hub.is_local(msg.sid, msg.namespace):
            self.stats.unwanted += 1
            return
        if msg.kind == codec.DISCONNECT:
            await self.server.disconnect(msg.sid, namespace=msg.namespace, ignore_queue=True)
            return
        assert msg.room is not None
        if msg.kind == codec.ENTER_ROOM:
            # membership changes now, in the order operations arrive; waiting for the
            # subscription here would hold up this channel's reader, which on Redis may
            # be the very connection the confirmation has to arrive on
            was_member = msg.sid in self.hub.members(msg.namespace, msg.room)
            self.basic_enter_room(msg.sid, msg.namespace, msg.room)
            self._spawn(self._confirm_remote_enter(msg.sid, msg.namespace, msg.room,
                                                   was_member))
        else:
            self.basic_leave_room(msg.sid, msg.namespace, msg.room)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm_remote_enter(self, sid: str, namespace: str, room: str,
                                    was_member: bool) -> None:
        """Undo a remote enter_room whose subscription the broker did not confirm."""
        channel = self.channels.room(namespace, room)
        if await self.subscriptions.ready(channel, self._subscribe_timeout):
            return
        if not was_member:
            self.basic_leave_room(sid, namespace, room)
        logger.warning("remote enter_room of %s to %r undone: the %s broker did not confirm "
                       "the room's subscription within %g s", sid, room, self.broker.name,
                       self._subscribe_timeout)

    async def _sweep(self) -> None:
        """Forget callbacks whose ack from another node never came."""
        while True:
            await asyncio.sleep(min(10.0, self._callback_timeout))
            now = time.monotonic()
            expired = [key for key, deadline in self._remote_callbacks.items() if deadline < now]
            for sid, ack_id in expired:
                del self._remote_callbacks[(sid, ack_id)]
                self._broadcast_acks.pop((sid, ack_id), None)
                pending = self.callbacks.get(sid)
                if pending is not None:
                    pending.pop(ack_id, None)
                    if len(pending) <= 1:  # only the id counter is left
                        del self.callbacks[sid]

    def participants_count(self) -> int:
        """Connected sockets on this node, across namespaces."""
        return self.hub.participants_count()

    def room_count(self) -> int:
        """Named rooms with local members on this node."""
        return self.hub.room_count()
