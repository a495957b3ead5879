"""This node's sockets: the local room index and local delivery.

The hub knows which local socket is in which room and writes packets to local
sockets; it knows nothing about brokers or other nodes. When a room gains its
first or loses its last local member, :meth:`LocalHub.join` and
:meth:`LocalHub.leave` say so, and the caller (the manager) decides what that
means for broker subscriptions (as centrifuge's ``hub.go`` next to ``node.go``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

from bidict import bidict
from engineio import packet as eio_packet

from ._engineio import QueueLimits, Sessions, close_session, text_frame
from .sids import is_sid
from .stats import ManagerStats
from .types import EncodedPacket, RoomIndex

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FanoutLimits:
    """Per-socket bounds on what the node holds for a client that does not read.

    :param max_buffer_bytes: bytes waiting in a socket's transport buffer before it
        is considered a slow consumer.
    :param max_queued_packets: packets waiting in its engine.io queue likewise.
    """

    max_buffer_bytes: int = 1024 * 1024
    max_queued_packets: int = 1000


class HoldBack(Protocol):
    """Where a socket's stored traffic waits while it catches up."""

    def hold(self, seq: int, pkt: EncodedPacket) -> None: ...


class Fanout:
    """Writes packets to local engine.io sockets, directly when safe, else queued.

    One websocket frame is built per packet and the same bytes are offered to every
    recipient's lean connection (``sessions.writers``, see :mod:`._engineio`),
    which writes them when the socket may take them now; the others get the
    packet through engine.io's queue, as in stock python-socketio. A socket past
    :class:`FanoutLimits` is disconnected as a slow consumer instead of growing the
    node's memory or delaying others.
    """

    def __init__(self, eio: Any, limits: FanoutLimits | None = None,
                 queue_limits: QueueLimits | None = None,
                 sessions: Sessions | None = None) -> None:
        self.eio = eio
        #: eio sid -> lean connection that may take shared frames (the fast path's table)
        self.writers: dict[str, Any] = sessions.writers if sessions is not None else {}
        #: eio sids being dropped as slow consumers
        self.dropping: set[str] = set()
        self.limits = limits or FanoutLimits()
        self.queue_limits = queue_limits
        self.direct = 0
        self.queued = 0
        self._dropped = 0
        #: eio sid -> a catching-up restore (connection state recovery): what is
        #: delivered to it meanwhile is given to its ``hold(seq, packet)``, not written
        self.held: dict[str, HoldBack] = {}
        #: eio sid -> what is delivered to it while its session moves between nodes
        #: (:mod:`nats_adapter.handover`): kept there, in order, not written
        self.moving: dict[str, list[EncodedPacket]] = {}

    @property
    def slow_consumers_dropped(self) -> int:
        """Sockets closed for not reading: here, or by their bounded queue (acks,
        replies and everything else engine.io queues)."""
        return self._dropped + (self.queue_limits.overflows if self.queue_limits else 0)

    def deliver(self, eio_sids: Iterable[str], parts: list[str | bytes],
                exclude: Container[str] = (), seq: int | None = None) -> tuple[int, int]:
        """Send the encoded Socket.IO packet ``parts`` to every socket in ``eio_sids``
        except those in ``exclude``.

        Returns (delivered, failed). Never suspends: queued packets are put without
        waiting (engine.io's queue is unbounded, and bounded here by the limits); the
        caller should yield to the loop when :attr:`queued` grew, so writers can run.
        """
        # the hot loop of every emit: locals, and the fewest lookups per recipient
        sockets_get = self.eio.sockets.get
        frame: bytes | None = None
        eio_pkts: list[Any] | None = None
        failed = direct = queued = 0
        max_buffer = self.limits.max_buffer_bytes
        max_queued = self.limits.max_queued_packets
        shared = len(parts) == 1 and isinstance(parts[0], str)
        held = self.held if seq is not None else None
        writers_get = self.writers.get
        dropping = self.dropping
        moving = self.moving
        for eio_sid in eio_sids:
            if exclude and eio_sid in exclude:
                continue
            if moving and eio_sid in moving:
                moving[eio_sid].append(cast(EncodedPacket, parts[0] if len(parts) == 1
                                            else list(parts)))
                direct += 1
                continue
            if held and eio_sid in held:
                held[eio_sid].hold(cast(int, seq), cast(EncodedPacket, parts[0] if len(parts)
                                                        == 1 else parts))
                direct += 1
                continue
            s = sockets_get(eio_sid)
            if s is None or s.closed or s.closing or (dropping and eio_sid in dropping):
                failed += 1
                continue
            if shared and (writer := writers_get(eio_sid)) is not None:
                if frame is None:
                    frame = text_frame(("4" + parts[0]).encode())  # type: ignore[operator]
                written = writer.offer(s, frame, max_buffer)
                if written > 0:
                    direct += 1
                    continue
                if written < 0:
                    self._drop(s, "send buffer full")
                    failed += 1
                    continue
            queue = s.queue
            if queue.qsize() >= max_queued:
                self._drop(s, "send queue full")
                failed += 1
                continue
            if eio_pkts is None:
                eio_pkts = [eio_packet.Packet(eio_packet.MESSAGE, p) for p in parts]
            for p in eio_pkts:
                queue.put_nowait(p)
            queued += 1
        self.direct += direct
        self.queued += queued
        return direct + queued, failed

    def _drop(self, socket: Any, reason: str) -> None:
        """Disconnect a slow consumer: logged, counted, its memory released."""
        self._dropped += 1
        self.dropping.add(socket.sid)
        logger.warning("dropping slow consumer %s: %s", socket.sid, reason)
        task = asyncio.get_running_loop().create_task(self._close(socket))
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def _close(self, socket: Any) -> None:
        try:
            await close_session(socket, "slow consumer")
        finally:  # closed: it fails the checks above from now on
            self.dropping.discard(socket.sid)


_background: set[asyncio.Task[Any]] = set()


class LocalHub:
    """The local room index and local delivery of one node.

    :attr:`rooms` has python-socketio's shape (``rooms[namespace][room][sid] =
    eio_sid``, the room ``None`` holding every connected socket of the namespace)
    because python-socketio's manager and admin code read it directly. There is no
    per-socket default room; :meth:`rooms_of` answers from a reverse index.
    """

    def __init__(self, stats: ManagerStats) -> None:
        self.rooms: RoomIndex = {}
        #: namespace -> sid -> named rooms it is in (no entry for a socket in no room); a
        #: list, not a set: a socket is in few rooms (at most 100 in the gateway), and a
        #: one-room list costs a third of a one-room set
        self._sid_rooms: dict[str, dict[str, list[str]]] = {}
        self.stats = stats
        self.fanout: Fanout | None = None
        #: eio sid -> when it connected (time.time()), for the handshake of fetched sockets
        self._connected_at: dict[str, float] = {}

    def attach(self, eio: Any, limits: FanoutLimits | None = None,
               queue_limits: QueueLimits | None = None, sessions: Sessions | None = None
               ) -> None:
        """Deliver through the engine.io server ``eio`` from now on (with shared frames
        to the lean connections in ``sessions``)."""
        self.fanout = Fanout(eio, limits, queue_limits, sessions)

    # -- the index -----------------------------------------------------------------

    def join(self, sid: str, namespace: str, room: str | None,
             eio_sid: str | None = None) -> bool:
        """Put ``sid`` in ``room`` (``None``: connect it to the namespace).

        Returns True when ``room`` just gained its first local member. Raises
        ``ValueError`` when ``sid`` is not connected to ``namespace`` and no
        ``eio_sid`` is given, and bidict's ``ValueDuplicationError`` when the
        engine.io session already has a sid in the namespace.
        """
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
            members = ns_rooms[room] = bidict() if room is None else {}
        joined = sid in members
        try:
            members[sid] = eio_sid
        finally:
            if created and not members:
                del ns_rooms[room]
        if room is not None and not joined:
            self._sid_rooms.setdefault(namespace, {}).setdefault(sid, []).append(room)
        elif room is None and eio_sid not in self._connected_at:
            self._connected_at[eio_sid] = time.time()
        return created

    def leave(self, sid: str, namespace: str, room: str | None) -> bool:
        """Take ``sid`` out of ``room``; True when the room lost its last local member."""
        ns_rooms = self.rooms.get(namespace)
        if ns_rooms is None:
            return False
        members = ns_rooms.get(room)
        if members is None or sid not in members:
            return False
        eio_sid = members.pop(sid)
        if room is None and not any(eio_sid in cast("bidict[str, str]", ns[None]).inverse
                                    for ns in self.rooms.values() if None in ns):
            self._connected_at.pop(eio_sid, None)  # gone from its last namespace
        if room is not None:
            by_sid = self._sid_rooms.get(namespace, {})
            joined = by_sid.get(sid)
            if joined is not None:
                joined.remove(room)  # it is there: sid was in the room
                if not joined:
                    del by_sid[sid]
                    if not by_sid:
                        del self._sid_rooms[namespace]
        if members:
            return False
        del ns_rooms[room]
        if not ns_rooms:
            del self.rooms[namespace]
        return True

    def connected_at(self, eio_sid: str) -> float:
        """When the engine.io session ``eio_sid`` connected (seconds since the epoch)."""
        return self._connected_at.get(eio_sid, 0.0)

    def sids_of(self, eio_sid: str) -> dict[str, str]:
        """namespace -> sid of the engine.io session ``eio_sid`` here."""
        out = {}
        for ns, rooms in self.rooms.items():
            everyone = rooms.get(None)
            sid = cast("bidict[str, str]", everyone).inverse.get(eio_sid) if everyone else None
            if sid is not None:
                out[ns] = sid
        return out

    def namespaces_of(self, sid: str) -> list[str]:
        """The namespaces ``sid`` is connected to here."""
        return [ns for ns, rooms in self.rooms.items() if sid in (rooms.get(None) or ())]

    def rooms_of(self, sid: str, namespace: str) -> list[str]:
        """The named rooms ``sid`` is in."""
        return list(self._sid_rooms.get(namespace, {}).get(sid, ()))

    def members(self, namespace: str, room: str | None) -> Mapping[str, str]:
        """Local ``sid -> eio sid`` of ``room`` (``None``: the namespace); empty if none."""
        return self.rooms.get(namespace, {}).get(room) or {}

    def is_local(self, sid: str, namespace: str) -> bool:
        """Whether ``sid`` is connected to ``namespace`` on this node."""
        return sid in self.rooms.get(namespace, {}).get(None, ())

    def addresses_any(self, namespace: str, targets: list[str]) -> bool:
        """Whether any room or sid in ``targets`` has a local member here."""
        ns_rooms = self.rooms.get(namespace, {})
        everyone = ns_rooms.get(None) or ()
        return any((name in everyone) if is_sid(name) else (name in ns_rooms)
                   for name in targets)

    def reaches_any(self, namespace: str, targets: list[str], skip: frozenset[str]) -> bool:
        """Whether any room or sid in ``targets`` has a local member here that is not
        in ``skip`` (a node's own message back from the store, with only its sender
        here, reaches nobody)."""
        ns_rooms = self.rooms.get(namespace, {})
        everyone = ns_rooms.get(None) or {}
        for name in targets:
            if is_sid(name):
                if name in everyone and name not in skip:
                    return True
            elif (members := ns_rooms.get(name)) and (
                    len(members) > len(skip) or any(sid not in skip for sid in members)):
                return True
        return False

    def targets(self, namespace: str, targets: list[str] | None,
                skip: frozenset[str]) -> dict[str, str]:
        """Local ``sid -> eio sid`` addressed by ``targets`` (rooms and/or sids; None =
        the namespace), without the sids in ``skip``."""
        ns_rooms = self.rooms.get(namespace)
        if not ns_rooms:
            return {}
        if targets is None or (len(targets) == 1 and not is_sid(targets[0])):
            members: Mapping[str, str] = ns_rooms.get(
                None if targets is None else targets[0]) or {}
            return {s: e for s, e in members.items() if s not in skip}
        out: dict[str, str] = {}
        everyone: Mapping[str, str] = ns_rooms.get(None) or {}
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

    def participants_count(self) -> int:
        """Connected sockets on this node, across namespaces."""
        return sum(len(ns.get(None) or ()) for ns in self.rooms.values())

    def room_count(self) -> int:
        """Named rooms with local members on this node."""
        return sum(len(ns) - (None in ns) for ns in self.rooms.values())

    # -- delivery ------------------------------------------------------------------

    async def deliver(self, namespace: str, targets: list[str] | None,
                      skip: frozenset[str], pkt: EncodedPacket, seq: int | None = None
                      ) -> tuple[int, int]:
        """Deliver ``pkt`` to the local sockets ``targets`` address (see :meth:`targets`);
        a socket in several target rooms gets it once. Returns (delivered, failed)."""
        ns_rooms = self.rooms.get(namespace)
        if not ns_rooms:
            return 0, 0
        if targets is None or (len(targets) == 1 and not is_sid(targets[0])):
            # one room or the namespace (nearly every emit): no per-emit recipient copy
            members = ns_rooms.get(None if targets is None else targets[0])
            if members:
                exclude = {e for sid in skip if (e := members.get(sid)) is not None}
                return await self.deliver_to(members.values(), pkt, exclude, seq)
            return 0, 0
        return await self.deliver_to(self.targets(namespace, targets, skip).values(), pkt,
                                      seq=seq)

    async def deliver_to(self, eio_sids: Iterable[str], pkt: EncodedPacket,
                         exclude: Container[str] = (), seq: int | None = None
                         ) -> tuple[int, int]:
        """Write ``pkt`` to each engine.io session in ``eio_sids`` but ``exclude``
        (``seq``: its sequence in the message store, when it is a stored message).
        Returns (delivered, failed)."""
        fanout = self.fanout
        if fanout is None:
            return 0, 0
        queued = fanout.queued
        delivered, failed = fanout.deliver(eio_sids, [pkt] if isinstance(pkt, str) else pkt,
                                           exclude, seq)
        self.stats.delivered += delivered
        self.stats.delivery_errors += failed
        if fanout.queued != queued:
            await asyncio.sleep(0)  # let the engine.io writers of queued sockets run
        return delivered, failed
