"""Where what this node sends goes: emits and room operations to channels.

A room's traffic goes to the room's channel (every node with a member subscribes
to it), a sid's to its owning node's control channel, a namespace broadcast to
the namespace's channel. An emit that needs several channels carries a dedupe id,
so a node that hears it twice delivers it once.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping

from . import codec
from .bus import Bus
from .naming import ChannelNames
from .plugin import NodePlugin
from .sids import is_sid, sid_owner
from .types import EncodedPacket

logger = logging.getLogger(__name__)


class Router:
    """Sends this node's emits and room operations to the channels that reach their
    recipients (see the module)."""

    def __init__(self, node_tag: str, channels: ChannelNames, bus: Bus,
                 plugin: NodePlugin, moved: Mapping[str, str] | None = None) -> None:
        self.node_tag = node_tag
        #: sid -> the node it moved to (:mod:`nats_adapter.handover`)
        self.moved: Mapping[str, str] = moved if moved is not None else {}
        self.channels = channels
        self.bus = bus
        self.plugin = plugin
        self._emit_ids = itertools.count(1)
        # its origin only serves to drop a node's own publications and to check seals
        self._room_origin = node_tag if bus.key is not None or bus.broker.echoes else ""

    def next_emit_id(self) -> int:
        """A number no other emit of this node has (for dedupe ids)."""
        return next(self._emit_ids)

    def owner(self, sid: str) -> str:
        """The node tag of the node that has ``sid`` (a moved or restored sid may be
        on another node than it names)."""
        return self.moved.get(sid) or self.plugin.owner(sid)

    async def relay(self, namespace: str, targets: list[str] | None, skip: frozenset[str],
                    pkt: EncodedPacket) -> None:
        """Publish an emit on every channel that reaches a node with a recipient; raises
        :class:`BrokerError` when the broker refuses one (the caller tells its sender)."""
        # unless sockets move (a restored session), a sid of this node is on no other,
        # so skipping it there is a no-op: it does not travel (the sender, mostly)
        moves = self.plugin.stores_emits
        skip_list = sorted(s for s in skip if moves or sid_owner(s) != self.node_tag
                           or s in self.moved)
        if targets is None:
            msg = codec.EmitMessage(self.node_tag, namespace, None, skip_list, pkt)
            await self.bus.publish(self.channels.room(namespace, None), msg, strict=True)
            return
        channels: list[str] = []
        for name in dict.fromkeys(targets):
            if not is_sid(name):
                channels.append(self.channels.room(namespace, name))
            elif name not in skip and (owner := self.owner(name)) != self.node_tag:
                channels.append(self.channels.node(owner))
        channels = list(dict.fromkeys(channels))
        if not channels:
            return
        if len(channels) > 1:
            msg = codec.EmitMessage(self.node_tag, namespace, targets, skip_list, pkt,
                                    f"{self.node_tag}:{self.next_emit_id()}")
        elif len(targets) == 1 and not is_sid(targets[0]):  # its channel names the room
            msg = codec.EmitMessage(self._room_origin, namespace, targets, skip_list, pkt,
                                    channel_room=True)
        else:
            msg = codec.EmitMessage(self.node_tag, namespace, targets, skip_list, pkt)
        data = self.bus.encode(msg)
        if data is None:
            return
        for channel in channels:
            await self.bus.publish_bytes(channel, self.bus.seal(data, channel), strict=True)

    async def room_op(self, kind: int, sid: str, namespace: str, room: str | None) -> None:
        """ENTER_ROOM, LEAVE_ROOM or DISCONNECT of a sid of another node, to that node."""
        owner = self.owner(sid) if is_sid(sid) else self.node_tag
        if owner == self.node_tag:
            logger.debug("ignoring operation %d on unknown sid %r", kind, sid)
            return
        await self.bus.publish(self.channels.node(owner),
                               codec.RoomMessage(kind, self.node_tag, namespace, sid, room))

    async def close_room(self, room: str, namespace: str) -> None:
        """Tell every node to empty ``room``."""
        msg = codec.RoomMessage(codec.CLOSE_ROOM, self.node_tag, namespace, None, room)
        # when emits are stored a room's channel is the store's live copy, which only
        # the store publishes on (and only emits are believed there): every node hears
        # it on the cluster channel instead
        channel = self.channels.cluster() if self.plugin.stores_emits \
            else self.channels.room(namespace, room)
        await self.bus.publish(channel, msg)

    async def to_sid(self, sid: str, msg: codec.EmitToSidMessage) -> None:
        """A direct emit or an ack to the node that has ``sid``."""
        await self.bus.publish(self.channels.node(self.owner(sid)), msg)

    async def ack_to(self, node: str, msg: codec.AckMessage) -> None:
        """An ack back to the node that asked for it."""
        await self.bus.publish(self.channels.node(node), msg)
