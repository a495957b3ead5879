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
  :attr:`ClusterManager.stats`, never silent. An emit the broker refuses raises
  :class:`~nats_adapter.BrokerError` having reached nobody (it goes to the broker
  before the local sockets), so a caller never acks what was lost.

:class:`ClusterManager` is the facade python-socketio sees. It holds the
python-socketio contract and composes the parts that do the work, each of which
talks to the others through public methods only:

- :class:`~nats_adapter.hub.LocalHub`: local membership and delivery;
- :class:`~nats_adapter.bus.Bus`: envelopes encoded, sealed, published, opened;
- :class:`~nats_adapter.routing.Router`: what goes to which channel;
- :class:`~nats_adapter.ingest.Ingest`: what arrives, checked and dispatched;
- :class:`~nats_adapter.rpc.ClusterRpc`: presence and typed calls between nodes;
- :class:`~nats_adapter.cluster.ClusterApi`: the cluster-wide server API on it;
- a :class:`~nats_adapter.plugin.NodePlugin`: connection state recovery
  (:class:`~nats_adapter.recovery.Recovery`) or none.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from functools import partial
from typing import Any

from bidict import ValueDuplicationError
from socketio import AsyncManager
from socketio import packet as sio_packet

from . import codec, compat
from ._engineio import FastPath, QueueLimits, WriteBatch, fast_paths, install
from ._socketio_hooks import answer_unknown_namespaces
from .brokers.base import Broker
from .bus import Bus
from .cluster import ClusterApi, RemoteSocket
from .dedupe import DedupeWindow
from .handover import Handover
from .hub import FanoutLimits, LocalHub
from .ingest import Ingest
from .naming import ChannelNames
from .plugin import NodePlugin, NoPlugin
from .recovery import Recovery, RecoveryOptions
from .routing import Router
from .rpc import ClusterRpc, Peers
from .sealing import ClusterKey
from .sids import is_sid, new_eio_sid, new_node_tag, new_sid
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


class ClusterManager(AsyncManager):  # type: ignore[misc]
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
        node_url: str = "",
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
        self.subscribe_timeout = subscribe_timeout
        self.callback_timeout = callback_timeout
        self.max_room_chars = max_room_chars
        self.max_rooms = max_rooms_per_socket
        #: ids of multi-channel emits already delivered here
        self.dedupe = DedupeWindow(dedupe_window)
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
        key = ClusterKey(cluster_key) if cluster_key is not None else None
        self.bus = Bus(broker, self.channels, self.stats, key, self._ensure_started)
        self.rpc = ClusterRpc(self.node_tag, self.channels, self.stats, self.bus.publish,
                              self.spawn, node_name=node_name, node_url=node_url,
                              heartbeat_interval=heartbeat_interval,
                              heartbeat_timeout=heartbeat_timeout,
                              max_room_chars=max_room_chars, subscribe=self._hold_channel,
                              subscribe_timeout=subscribe_timeout)
        self.cluster = ClusterApi(self, self.rpc, max_room_chars=max_room_chars,
                                  max_rooms=max_rooms_per_socket)
        #: connection state recovery; None when off
        self.recovery: Recovery | None = None
        self.plugin: NodePlugin = NoPlugin()
        if options is not None:
            self.recovery = self.plugin = Recovery(self, self.bus, self.rpc, options)
        #: sessions moved to the node their websocket upgrade lands on
        self.handover = Handover(self, self.rpc, timeout=min(subscribe_timeout, 2.0))
        self.router = Router(self.node_tag, self.channels, self.bus, self.plugin,
                             self.handover.located)
        self.ingest = Ingest(self.node_tag, self.bus, self.channels, self.stats, self.hub,
                             self.rpc, self.plugin, self, self.dedupe,
                             self.on_connection_state, max_room_chars=max_room_chars,
                             max_rooms=max_rooms_per_socket, owner=self.router.owner)

    def set_server(self, server: Any) -> None:
        super().set_server(server)
        limits = self._fanout_limits or FanoutLimits()
        queue_limits = QueueLimits(limits.max_queued_packets, limits.max_buffer_bytes)
        self._fastpath = install(server.eio, compression=self._compression,
                                 queue_limits=queue_limits)
        fastpath = self._fastpath
        self.hub.attach(server.eio, limits, queue_limits if fastpath is not None else None,
                        fastpath.sessions if fastpath is not None else None)
        assert self.hub.fanout is not None
        self.plugin.install(server, self.hub.fanout.held)
        self.handover.install(server)
        answer_unknown_namespaces(server)
        if compat.check("engineio.generate_id"):
            # engine.io session ids name this node, as sids do (see nats_adapter.sids)
            server.eio.generate_id = functools.partial(new_eio_sid, self.node_tag)

    def node_url(self, tag: str) -> str | None:
        """Where node ``tag`` said other nodes reach it over HTTP; None when it is not
        known alive or said nothing."""
        info = self.rpc.peers.info(tag)
        url = info.get("url") if info is not None else None
        return url if isinstance(url, str) and url else None

    def owner(self, sid: str) -> str:
        """The node tag of the node that has ``sid`` (moved, restored, or its own)."""
        return self.router.owner(sid)

    def moved_to(self, eio_sid: str) -> str | None:
        """The node the session ``eio_sid`` of this node moved to, while it lives there
        (:mod:`nats_adapter.handover`)."""
        return self.handover.moved_to(eio_sid)

    async def serving(self, eio_sid: str) -> bool:
        """Whether the engine.io session ``eio_sid`` is served here (its own, or moved
        here; once a move here under way is over)."""
        return await self.handover.serving(eio_sid)

    async def take_session(self, eio_sid: str) -> str | None:
        """Move the engine.io session ``eio_sid`` of another node here; None when
        done, else why not (see :meth:`nats_adapter.handover.Handover.take`)."""
        return await self.handover.take(eio_sid)

    def forget_sid(self, sid: str, namespace: str) -> None:
        """Take ``sid`` out of this node without a disconnect (its session moved, or a
        move of it here was called off). The acks it owes this node's callbacks are
        awaited from the node it moved to (:meth:`acks_owed`)."""
        for room in self.hub.rooms_of(sid, namespace):
            self.basic_leave_room(sid, namespace, room)
        self.basic_leave_room(sid, namespace, None)
        pending = self.callbacks.get(sid)
        if pending is not None and len(pending) <= 1:  # only the id counter is left
            del self.callbacks[sid]

    def acks_owed(self, sid: str) -> list[int]:
        """The ack ids ``sid`` owes callbacks here, from now on awaited from another
        node (the one ``sid`` moves to: see :meth:`forward_acks`)."""
        pending = self.callbacks.get(sid) or {}
        owed = [ack_id for ack_id in pending if ack_id]
        deadline = time.monotonic() + self.callback_timeout
        for ack_id in owed:
            self._remote_callbacks.setdefault((sid, ack_id), deadline)
        return owed

    def forward_acks(self, sid: str, owed: list[int], node: str) -> None:
        """``sid``, moved here from ``node``, owes callbacks there the acks ``owed``:
        they go back there; the ids this node hands out for ``sid`` come after them."""
        if not owed:
            return
        pending = self.callbacks.setdefault(sid, {0: itertools.count(max(owed) + 1)})
        for ack_id in owed:
            pending[ack_id] = partial(self._return_ack, node, sid, ack_id)

    def session_pid(self, sid: str) -> str | None:
        """``sid``'s recovery pid, when connection state recovery is on."""
        return self.recovery.pids.get(sid) if self.recovery is not None else None

    def set_session_pid(self, sid: str, pid: str | None) -> None:
        """``sid``'s recovery pid is ``pid`` here from now on (None: not here)."""
        if self.recovery is None:
            return
        if pid is None:
            self.recovery.pids.pop(sid, None)
            self.recovery.identities.pop(sid, None)
        else:
            self.recovery.pids[sid] = pid
            self.recovery.touch(sid)

    @property
    def cluster_key(self) -> ClusterKey | None:
        """The key envelopes and session records are sealed with; None on an open bus."""
        return self.bus.key

    def on_undecodable_polling_payload(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(eio_sid)`` for every long-polling session ended because a
        POST of it did not decode (:mod:`nats_adapter._engineio.polling`); nothing
        happens when those rules are not installed."""
        if self._fastpath is not None and self._fastpath.polling is not None:
            self._fastpath.polling.on_bad_payload = callback

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
            self._start_task.add_done_callback(self._started)
        return self._start_task

    def _started(self, _: asyncio.Task[None]) -> None:
        # done, failed or cancelled: publishes stop waiting for it (and fail on their own)
        self.bus.ready = True

    async def _start(self) -> None:
        control = self.channels.node(self.node_tag)
        await self.broker.start(self.ingest, control)
        await self.plugin.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if not self.write_only:
            # after this task ends: what it publishes waits for the start to be done
            self.spawn(self.rpc.start())
        logger.info("%s manager %s started (control channel %s)", self.broker.name,
                    self.node_tag, control)

    async def _hold_channel(self, channel: str, timeout: float) -> bool:
        """Subscribe to ``channel`` for the manager's whole life; whether the broker
        confirmed it within ``timeout``."""
        self.subscriptions.acquire(channel)
        return await self.subscriptions.ready(channel, timeout)

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
        await self.rpc.stop()
        pending = [*self._tasks, *self.plugin.work()]
        if pending:  # let what is under way finish (session writes at shutdown)
            await asyncio.wait(pending, timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.subscriptions.close()
        await self.broker.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background; a close lets it finish (briefly)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def next_emit_id(self) -> int:
        """A number no other emit of this node has (for dedupe ids)."""
        return self.router.next_emit_id()

    # -- membership (python-socketio hooks) ----------------------------------------

    async def pre_connect(self, eio_sid: str, namespace: str) -> str | None:
        """Register a connecting socket under a sid that names this node (or the sid of
        the session it restores); no sid room."""
        restored = self.plugin.restored_sid(eio_sid, namespace)
        sid = restored or new_sid(self.node_tag)
        try:
            self.basic_enter_room(sid, namespace, None, eio_sid=eio_sid)
        except ValueDuplicationError:
            return None  # this engine.io session is already connected to the namespace
        self.pending_connect.setdefault(namespace, []).append(sid)
        if restored is not None:
            await self.plugin.reattach(sid, eio_sid, namespace)
        return sid

    def basic_enter_room(
        self, sid: str, namespace: str, room: str | None, eio_sid: str | None = None
    ) -> None:
        if room is not None and is_sid(room):
            raise ValueError("cannot enter a sid room")
        channel = self.channels.room(namespace, room)  # refuses names too long for one
        if self.hub.join(sid, namespace, room, eio_sid):
            self.subscriptions.acquire(channel)
        if room is not None:
            self.plugin.touch(sid)

    def basic_leave_room(self, sid: str, namespace: str, room: str | None) -> None:
        if self.hub.leave(sid, namespace, room):
            self.subscriptions.release(self.channels.room(namespace, room))
        if room is not None:
            self.plugin.touch(sid)

    def basic_close_room(self, room: str, namespace: str) -> None:
        if is_sid(room):
            raise ValueError("cannot close a sid room")
        for sid in list(self.hub.members(namespace, room)):
            self.basic_leave_room(sid, namespace, room)

    def basic_disconnect(self, sid: str, namespace: str, **kwargs: Any) -> None:
        self.cluster.recipient_gone(sid, self.spawn)
        eio_sid = self.hub.members(namespace, None).get(sid)
        if eio_sid is not None:
            self.plugin.on_disconnect(sid, namespace, eio_sid)
            self.handover.on_disconnect(sid, eio_sid)
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
            if not await self.subscriptions.ready(channel, self.subscribe_timeout):
                if not was_member:
                    self.basic_leave_room(sid, namespace, room)
                raise SubscriptionError(
                    f"the {self.broker.name} broker did not confirm the room's subscription "
                    f"within {self.subscribe_timeout:g} s")
        else:
            await self.router.room_op(codec.ENTER_ROOM, sid, namespace, room)

    async def leave_room(self, sid: str, namespace: str, room: str) -> None:
        """Remove ``sid`` (on any node) from ``room``."""
        namespace = namespace or "/"
        if self.hub.is_local(sid, namespace):
            self.basic_leave_room(sid, namespace, room)
        else:
            await self.router.room_op(codec.LEAVE_ROOM, sid, namespace, room)

    async def close_room(self, room: str, namespace: str) -> None:
        """Remove every member of ``room`` on every node."""
        namespace = namespace or "/"
        self.basic_close_room(room, namespace)
        await self.router.close_room(room, namespace)

    async def can_disconnect(self, sid: str, namespace: str) -> bool:
        namespace = namespace or "/"
        if self.hub.is_local(sid, namespace):
            return bool(self.is_connected(sid, namespace))
        await self.router.room_op(codec.DISCONNECT, sid, namespace, None)
        return False

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
        if self.plugin.stores_emits and not kwargs.get("ignore_queue"):
            # stored, then delivered (here too) from the copy that carries its offset
            await self.plugin.store_emit(namespace, targets, skip, pkt)
            return
        if not kwargs.get("ignore_queue"):
            # first to the other nodes: when the broker refuses it, BrokerError tells the
            # caller that nobody got it (not some: these sockets before the failure)
            await self.router.relay(namespace, targets, skip, pkt)
        if self.server is not None:
            delivered = await self.hub.deliver(namespace, targets, skip, pkt)
            if self.ingest.tracer is not None:  # tracing on: told to the sending span
                self.ingest.tracer.delivered_here(*delivered)

    async def confirm_published(self) -> None:
        """Return once the broker has taken every emit made so far (for an ack that
        says so); raises :class:`~nats_adapter.BrokerError` when it did not say so in
        time. Emits that are stored (connection state recovery) are taken when
        :meth:`emit` returns."""
        if not self.plugin.stores_emits:
            await self.bus.confirm_published()

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
            await self.hub.deliver_to((eio_sid,), self.event_packet(namespace, [event, *args],
                                                                    ack_id))
            return
        if self.router.owner(sid) == self.node_tag:
            return  # our own sid, but no longer connected: nobody will ack
        ack_id = self._generate_ack_id(sid, callback)
        self._remote_callbacks[(sid, ack_id)] = time.monotonic() + self.callback_timeout
        await self.router.to_sid(sid, codec.EmitToSidMessage(self.node_tag, namespace, sid,
                                                             event, args, ack_id))

    async def trigger_callback(self, sid: str, id: int, data: list[Any]) -> None:
        self._remote_callbacks.pop((sid, id), None)
        await super().trigger_callback(sid, id, data)

    def awaits_ack(self, sid: str, ack_id: int) -> bool:
        """Whether this node asked another for ``sid``'s ack ``ack_id``."""
        return (sid, ack_id) in self._remote_callbacks

    def expect_ack(self, sid: str, ack_id: int, callback: Callable[..., Any]) -> None:
        """Call ``callback`` with ``sid``'s ack of ``ack_id`` (an id this manager did not
        hand out); forgotten after ``callback_timeout``."""
        self.callbacks.setdefault(sid, {0: itertools.count(1)})[ack_id] = callback
        self._remote_callbacks[(sid, ack_id)] = time.monotonic() + self.callback_timeout

    def event_packet(self, namespace: str, data: list[Any], ack_id: int | None
                     ) -> EncodedPacket:
        """An encoded EVENT packet of ``namespace``."""
        encoded: EncodedPacket = self._packet_class()(
            sio_packet.EVENT, namespace=namespace, data=data, id=ack_id).encode()
        return encoded

    async def _return_ack(self, origin: str, sid: str, ack_id: int, *args: Any) -> None:
        await self.router.ack_to(origin, codec.AckMessage(self.node_tag, sid, ack_id,
                                                          list(args)))

    def _packet_class(self) -> Any:
        return self.server.packet_class if self.server is not None else sio_packet.Packet

    # -- what arrives (see Ingest) -----------------------------------------------

    def seal(self, data: bytes, channel: str) -> bytes:
        """An encoded envelope as sent on ``channel`` (see :meth:`Bus.seal`)."""
        return self.bus.seal(data, channel)

    def open_stored(self, subject: str, data: bytes, max_age: float
                    ) -> tuple[codec.Message, int, int] | None:
        """An envelope read back from the message store (see :meth:`Bus.open_stored`)."""
        return self.bus.open_stored(subject, data, max_age)

    def on_connection_state(self, connected: bool) -> None:
        if self.broker_connected and not connected:
            self.stats.disconnects += 1
        if connected and not self.broker_connected and self.stats.disconnects:
            self.rpc.reconnected()
        self.broker_connected = connected
        logger.log(logging.INFO if connected else logging.WARNING, "%s broker %s",
                   self.broker.name, "connected" if connected else "disconnected")

    async def on_message(self, channel: str, data: bytes, seq: int | None = None) -> None:
        """Handle one payload from the broker (see :meth:`Ingest.on_message`)."""
        await self.ingest.on_message(channel, data, seq)

    async def on_emit_to_sid(self, msg: codec.EmitToSidMessage) -> None:
        """Another node emits to a local sid (and may want its ack)."""
        eio_sid = self.hub.members(msg.namespace, None).get(msg.sid)
        if eio_sid is None:
            moved_to = self.handover.owner(msg.sid)
            if moved_to is None or moved_to == msg.origin:
                self.stats.unwanted += 1
                return
            # the sender did not hear yet that the sid moved: sent on, as this node's
            # own emit (its ack comes back here, and goes on to the sender)
            ack_id = None
            if msg.ack_id is not None:
                ack_id = self._generate_ack_id(
                    msg.sid, partial(self._return_ack, msg.origin, msg.sid, msg.ack_id))
                self._remote_callbacks[(msg.sid, ack_id)] = \
                    time.monotonic() + self.callback_timeout
            await self.router.to_sid(msg.sid, codec.EmitToSidMessage(
                self.node_tag, msg.namespace, msg.sid, msg.event, msg.args, ack_id))
            return
        ack_id = None
        if msg.ack_id is not None:
            ack_id = self._generate_ack_id(
                msg.sid, partial(self._return_ack, msg.origin, msg.sid, msg.ack_id)
            )
        await self.hub.deliver_to((eio_sid,), self.event_packet(
            msg.namespace, [msg.event, *msg.args], ack_id))

    async def on_room_op(self, msg: codec.RoomMessage) -> None:
        """Another node enters, leaves or disconnects a local sid."""
        assert msg.sid is not None
        if not self.hub.is_local(msg.sid, msg.namespace):
            moved_to = self.handover.owner(msg.sid)
            if moved_to is not None and moved_to != msg.origin:
                # the sender did not hear yet that the sid moved: sent on, as this node's
                await self.router.room_op(msg.kind, msg.sid, msg.namespace, msg.room)
                return
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
            self.spawn(self._confirm_remote_enter(msg.sid, msg.namespace, msg.room,
                                                  was_member))
        else:
            self.basic_leave_room(msg.sid, msg.namespace, msg.room)

    async def _confirm_remote_enter(self, sid: str, namespace: str, room: str,
                                    was_member: bool) -> None:
        """Undo a remote enter_room whose subscription the broker did not confirm."""
        channel = self.channels.room(namespace, room)
        if await self.subscriptions.ready(channel, self.subscribe_timeout):
            return
        if not was_member:
            self.basic_leave_room(sid, namespace, room)
        logger.warning("remote enter_room of %s to %r undone: the %s broker did not confirm "
                       "the room's subscription within %g s", sid, room, self.broker.name,
                       self.subscribe_timeout)

    async def _sweep(self) -> None:
        """Forget callbacks whose ack from another node never came."""
        while True:
            await asyncio.sleep(min(10.0, self.callback_timeout))
            now = time.monotonic()
            expired = [key for key, deadline in self._remote_callbacks.items() if deadline < now]
            for sid, ack_id in expired:
                del self._remote_callbacks[(sid, ack_id)]
                self.cluster.forget_ack(sid, ack_id)
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

    # -- the cluster-wide server API (see ClusterApi) ----------------------------

    @property
    def node_name(self) -> str:
        return self.rpc.node_name

    @property
    def peers(self) -> Peers:
        """The other nodes known alive."""
        return self.rpc.peers

    @property
    def host_id(self) -> str:
        """This node's name and tag (python-socketio's admin UI uses it as server id)."""
        return self.rpc.host_id

    def server_count(self) -> int:
        """Nodes alive in the cluster, this one included."""
        return self.cluster.server_count()

    def nodes(self) -> list[dict[str, Any]]:
        """The other nodes alive: tag, name, host, pid, start time, seconds since heard."""
        return self.cluster.nodes()

    async def fetch_sockets(self, room: str | Iterable[str] | None = None,
                            namespace: str = "/", *,
                            except_rooms: str | Iterable[str] | None = None,
                            local: bool = False, timeout: float = 5.0) -> list[RemoteSocket]:
        """Every socket in ``room`` (a room, several, or None: all) on every node."""
        return await self.cluster.fetch_sockets(room, namespace, except_rooms=except_rooms,
                                                local=local, timeout=timeout)

    async def room_size(self, room: str, namespace: str = "/", *, timeout: float = 5.0) -> int:
        """How many sockets are in ``room`` across the cluster."""
        return await self.cluster.room_size(room, namespace, timeout=timeout)

    async def room_members(self, room: str, namespace: str = "/", *,
                           timeout: float = 5.0) -> list[str]:
        """The sids in ``room`` across the cluster."""
        return await self.cluster.room_members(room, namespace, timeout=timeout)

    async def sockets_join(self, rooms: str | Iterable[str], to: str | Iterable[str] | None
                           = None, namespace: str = "/", *,
                           except_rooms: str | Iterable[str] | None = None,
                           local: bool = False, timeout: float = 5.0) -> int:
        """Put the selected sockets in ``rooms`` on every node (see ClusterApi)."""
        return await self.cluster.sockets_join(rooms, to, namespace, except_rooms=except_rooms,
                                               local=local, timeout=timeout)

    async def sockets_leave(self, rooms: str | Iterable[str], to: str | Iterable[str] | None
                            = None, namespace: str = "/", *,
                            except_rooms: str | Iterable[str] | None = None,
                            local: bool = False, timeout: float = 5.0) -> int:
        """Take the selected sockets out of ``rooms`` on every node (see ClusterApi)."""
        return await self.cluster.sockets_leave(rooms, to, namespace,
                                                except_rooms=except_rooms, local=local,
                                                timeout=timeout)

    async def disconnect_sockets(self, to: str | Iterable[str] | None = None,
                                 namespace: str = "/", *,
                                 except_rooms: str | Iterable[str] | None = None,
                                 close: bool = False, local: bool = False,
                                 timeout: float = 5.0) -> int:
        """Disconnect the selected sockets on every node (see ClusterApi)."""
        return await self.cluster.disconnect_sockets(to, namespace, except_rooms=except_rooms,
                                                     close=close, local=local, timeout=timeout)

    def on_server_event(self, event: str, handler: Callable[..., Any] | None = None,
                        namespace: str = "/") -> Any:
        """Register a handler for ``event`` from other nodes' :meth:`server_side_emit`
        (also a decorator; see ClusterApi)."""
        return self.cluster.on_server_event(event, handler, namespace)

    async def server_side_emit(self, event: str, *args: Any, namespace: str = "/",
                               callback: Callable[[list[Any]], Any] | None = None,
                               timeout: float | None = None) -> list[Any] | None:
        """Run ``event``'s server-side handler on every other node (see ClusterApi)."""
        return await self.cluster.server_side_emit(event, *args, namespace=namespace,
                                                   callback=callback, timeout=timeout)

    async def emit_with_acks(self, event: str, data: Any = None, to: str | Iterable[str] | None
                             = None, namespace: str = "/", *,
                             except_rooms: str | Iterable[str] | None = None,
                             skip_sid: str | Iterable[str] | None = None,
                             timeout: float = 5.0) -> list[Any]:
        """Emit to the selected sockets on every node and return every ack (see
        ClusterApi)."""
        return await self.cluster.emit_with_acks(event, data, to, namespace,
                                                 except_rooms=except_rooms, skip_sid=skip_sid,
                                                 timeout=timeout)
