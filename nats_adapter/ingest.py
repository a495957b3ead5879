"""What arrives from the broker: opened, checked, then handed to whoever handles it.

One path for live and stored traffic: :meth:`Ingest.on_message` opens the envelope
(:class:`~nats_adapter.bus.Bus`: seal, channel, shape), drops echoes and replays,
checks it is something a node could send (:meth:`Ingest.invalid`), and dispatches
it: emits to the local hub, cluster calls to the :class:`~nats_adapter.rpc.ClusterRpc`,
a stored emit to the plugin that stores them, the rest to the node (acks, room
operations, direct emits). Anything that fails a step is dropped and counted in
:class:`~nats_adapter.stats.ManagerStats`, never raised to the broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from . import codec
from .bus import Bus
from .dedupe import DedupeWindow
from .hub import LocalHub
from .naming import ChannelNames
from .packets import is_event_packet
from .plugin import NodePlugin
from .rpc import ClusterRpc
from .sealing import ReplayWindow
from .sids import is_node_tag, is_sid
from .stats import ManagerStats
from .tracing import BusTracer

logger = logging.getLogger(__name__)


class Receiver(Protocol):
    """The node's side of what arrives (the manager)."""

    @property
    def server(self) -> Any: ...

    write_only: bool

    def awaits_ack(self, sid: str, ack_id: int) -> bool:
        """Whether this node asked for ``sid``'s ack ``ack_id``."""

    async def trigger_callback(self, sid: str, id: int, data: list[Any]) -> None: ...

    async def on_emit_to_sid(self, msg: codec.EmitToSidMessage) -> None: ...

    async def on_room_op(self, msg: codec.RoomMessage) -> None: ...

    def basic_close_room(self, room: str, namespace: str) -> None: ...


class Ingest:
    """Opens, checks and dispatches what the broker delivers (see the module).

    ``on_connection_state`` is called with the broker connection's state; together
    with :meth:`on_message` this is the broker's
    :class:`~nats_adapter.brokers.base.BrokerHandler`.
    """

    def __init__(self, node_tag: str, bus: Bus, channels: ChannelNames, stats: ManagerStats,
                 hub: LocalHub, rpc: ClusterRpc, plugin: NodePlugin, receiver: Receiver,
                 dedupe: DedupeWindow, on_connection_state: Callable[[bool], None], *,
                 max_room_chars: int, max_rooms: int,
                 owner: Callable[[str], str] | None = None) -> None:
        self.node_tag = node_tag
        #: the node that has a sid (moved, restored, or the one it names)
        self.owner = owner or plugin.owner
        self.bus = bus
        self.channels = channels
        self.stats = stats
        self.hub = hub
        self.rpc = rpc
        self.plugin = plugin
        self.receiver = receiver
        self.dedupe = dedupe
        self.on_connection_state = on_connection_state
        self.max_room_chars = max_room_chars
        self.max_rooms = max_rooms
        self._replays = ReplayWindow()
        #: opens a span around the delivery of a traced emit (tracing on: see
        #: :func:`nats_adapter.tracing.install`)
        self.tracer: BusTracer | None = None
        # every node of this release reads an emit's trace context, traced or not
        rpc.features.add(codec.TRACE_FEATURE)

    async def on_message(self, channel: str, data: bytes, seq: int | None = None) -> None:
        """Handle one payload from the broker; never raises (except cancellation).

        ``seq`` set on one of the store's live channels: a stored message coming back
        live (connection state recovery), delivered with its offset, whoever sent it
        (this node included). On any other channel ``seq`` means nothing (anyone may
        set the header): the message is live traffic like any other. Stored or live,
        an envelope passes the same seal, age and replay checks."""
        size = len(data)
        stats = self.stats
        stats.received += 1
        stats.received_bytes += size
        stored = seq is not None and self.plugin.stores_emits \
            and self.channels.is_live(channel)
        opened = self.bus.open(channel, data, stored=stored)
        if opened is None:
            return
        msg, sealed_seq = opened
        if msg.origin == self.node_tag and not stored:
            stats.dropped_echo += 1
            return
        cluster = isinstance(msg, codec.ClusterMessage)
        if cluster:
            stats.cluster_received += 1
            stats.cluster_received_bytes += size
        if self.bus.key is not None and not self._replays.first(msg.origin, sealed_seq):
            stats.dropped_replayed += 1
            self.bus.log.warning("replayed", "dropped a replayed envelope from %r on %s",
                                 msg.origin, channel)
            return
        receiver = self.receiver
        if receiver.write_only or receiver.server is None:
            return
        if stored and not isinstance(msg, codec.EmitMessage):
            problem: str | None = "only emits are stored"
        else:
            problem = self.invalid(msg)
        body: codec.ClusterBody | None = None
        if problem is None and cluster:
            assert isinstance(msg, codec.ClusterMessage)
            decoded = self.rpc.decode(msg)
            if isinstance(decoded, str):
                problem = decoded
            else:
                body = decoded
        if problem is not None:
            stats.dropped_invalid += 1
            self.bus.log.warning("invalid", "dropped %s%s from %r on %s: %s",
                                 "stored " if stored else "", type(msg).__name__, msg.origin,
                                 channel, problem)
            return
        try:
            if stored:
                assert seq is not None and isinstance(msg, codec.EmitMessage)
                if msg.trace is not None and self.tracer is not None:
                    with self.tracer.delivering(msg.trace, msg.namespace, msg.rooms, True):
                        await self.plugin.deliver_stored(msg, seq)
                else:
                    await self.plugin.deliver_stored(msg, seq)
            elif body is not None:
                assert isinstance(msg, codec.ClusterMessage)
                await self.rpc.on_message(msg, body)
            else:
                await self._dispatch(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            stats.dropped_failed += 1
            logger.exception("failed to handle %s%s from node %s on %s",
                             "stored " if stored else "", type(msg).__name__, msg.origin,
                             channel)

    def invalid(self, msg: codec.Message) -> str | None:
        """Why ``msg`` is not something a node could legitimately send; None if it is
        (a cluster call's body is checked when it is decoded)."""
        if not is_node_tag(msg.origin) and not (
                msg.origin == "" and self.bus.key is None
                and isinstance(msg, codec.EmitMessage)):
            return "origin is not a node tag"
        if isinstance(msg, codec.EmitMessage):
            if not is_event_packet(msg.packet, msg.namespace):
                return "not an EVENT packet of the envelope's namespace without an ack id"
            for name in msg.rooms or ():
                if not is_sid(name) and len(name) > self.max_room_chars:
                    return "room name too long"
            return None
        if isinstance(msg, codec.EmitToSidMessage):
            if msg.ack_id is not None and msg.ack_id < 0:
                return "negative ack id"
            return None
        if isinstance(msg, codec.ClusterMessage):
            return None
        if isinstance(msg, codec.AckMessage):
            if self.owner(msg.sid) != msg.origin:
                return "ack from a node that does not own the sid"
            if not self.receiver.awaits_ack(msg.sid, msg.ack_id):
                return "ack this node did not ask for"
            return None
        if msg.room is not None and (is_sid(msg.room) or len(msg.room) > self.max_room_chars):
            return "room name is a sid or too long"
        if msg.kind == codec.ENTER_ROOM and msg.sid is not None \
                and msg.sid not in self.hub.members(msg.namespace, msg.room) \
                and len(self.hub.rooms_of(msg.sid, msg.namespace)) >= self.max_rooms:
            return "the socket is in too many rooms"
        return None

    async def _dispatch(self, msg: codec.Message) -> None:
        if isinstance(msg, codec.EmitMessage):
            await self._on_emit(msg)
        elif isinstance(msg, codec.EmitToSidMessage):
            await self.receiver.on_emit_to_sid(msg)
        elif isinstance(msg, codec.AckMessage):
            await self.receiver.trigger_callback(msg.sid, msg.ack_id, msg.args)
        elif isinstance(msg, codec.ClusterMessage):
            raise AssertionError("cluster messages are dispatched decoded")
        elif msg.kind == codec.CLOSE_ROOM:
            assert msg.room is not None
            if not is_sid(msg.room):
                self.receiver.basic_close_room(msg.room, msg.namespace)
        else:
            await self.receiver.on_room_op(msg)

    async def _on_emit(self, msg: codec.EmitMessage) -> None:
        if msg.dedupe_id is not None and not self.dedupe.first(msg.dedupe_id):
            self.stats.dropped_duplicate += 1
            return
        if msg.rooms is not None and not self.hub.addresses_any(msg.namespace, msg.rooms):
            self.stats.unwanted += 1
            return
        if msg.trace is not None and self.tracer is not None:
            with self.tracer.delivering(msg.trace, msg.namespace, msg.rooms, False) as span:
                span.record(*await self.hub.deliver(msg.namespace, msg.rooms,
                                                    frozenset(msg.skip), msg.packet))
            return
        await self.hub.deliver(msg.namespace, msg.rooms, frozenset(msg.skip), msg.packet)
