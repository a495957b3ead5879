"""A session moved to the node its websocket upgrade lands on.

Behind a balancer without affinity, socket.io-client's websocket upgrade lands on
any node. Served through the session's owner (a splice, :mod:`gateway.forwarding`)
every delivery to that client costs the node in between a read and a write; moved,
it costs once. :meth:`Handover.take` moves the engine.io session ``X`` of node A
(the giver) to this node B (the taker) before B answers the upgrade itself:

1. **take** (B asks A): A answers X's state (each namespace's sid, rooms and pid,
   engine.io's session, which holds python-socketio's session data, and the
   handshake environ) and from then on holds what it delivers to X instead of
   writing it (:attr:`nats_adapter.hub.Fanout.moving`).
2. B makes X's engine.io socket (not served yet), puts X's sids in their rooms
   here, holding what is delivered to them too, and waits until the broker confirms
   every room's subscription: B now gets everything published to X's rooms.
3. **commit** (B asks A): A forgets X without a disconnect event (its sids leave
   their rooms, its engine.io socket goes, a waiting long-poll gets a NOOP) and
   answers what X's queue held unsent, what it held since the take, and the ack
   ids X owes callbacks there (B sends those acks back to A). B queues,
   in order: A's unsent packets, A's held packets, then its own held packets but
   those A held too (matched as a multiset of encoded packets: each copy A had
   drops one of B's), and serves X: its requests, its upgrade (the client's normal
   ``2probe``/``3probe``/``5``). Nothing is lost (B listened before A stopped) and
   nothing is twice (what both had is matched). The one approximation: two packets
   of the same bytes, one A had before B listened and one only B had after the
   commit, count as one (a chat carries its own id and time: never the same bytes).
4. B tells every node X's sids live here now (**moved**; and when they disconnect
   from B, that they are gone). Until a node hears it, A sends on what still comes
   its way: a direct emit or room operation for X's sids (the manager), a packet
   python-socketio sends to X after the commit (the ack of a handler still running,
   told to B: **moved_packets**), and X's HTTP requests, for as long as X lives on
   B (:meth:`Handover.moved_to`).

A move that cannot happen (A is of a release without moves, does not answer,
refuses: X is upgrading, closing or moving, or a CONNECT of it is being handled
(asked again for up to ~2 s); its session data does not travel; a subscription is
not confirmed) changes nothing: B undoes what it did, A (told to
abort, or on its own after :attr:`Handover.timeout` x 3) delivers what it held,
and the caller serves the upgrade the way it would without moves. Neither side's
application sees a connect or a disconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack
from engineio import packet as eio_packet

from . import _socketio_hooks as socketio_hooks
from . import codec, compat
from .codec import ClusterOp, MoveStep
from .hub import LocalHub
from .naming import ChannelNames
from .rpc import ClusterRpc
from .sids import eio_sid_owner, is_sid
from .subscriptions import RoomSubscriptions
from .types import EncodedPacket

logger = logging.getLogger(__name__)

#: the feature a node names in its heartbeats when it gives and takes sessions
FEATURE = "move"
#: seconds a node sends on the requests of a session that moved away, at most: until
#: the node it moved to says it ended (this bounds what a session that ends there
#: without a word, one that never connected a namespace, leaves here)
FORWARD_FOR = 3600.0
#: why a move did not happen: moves off or impossible here, an owner of a release
#: without moves, the session already moving, no answer, a CONNECT of the session
#: that did not end in time at the owner, the owner's refusal (the
#: session is upgrading, closing, moving, or its data does not travel), a room's
#: subscription not confirmed, an error
MOVE_FAILURES = ("unavailable", "owner_cannot", "cluster_cannot", "mid_move",
                 "owner_unreachable", "busy", "refused", "subscribe", "error")
#: seconds a taker waits before it asks again an owner busy with the session's CONNECT
BUSY_WAITS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class HandoverNode(Protocol):
    """What a move needs of its node (the manager)."""

    node_tag: str
    channels: ChannelNames
    hub: LocalHub
    subscriptions: RoomSubscriptions
    subscribe_timeout: float
    max_rooms: int

    @property
    def server(self) -> Any: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def basic_enter_room(self, sid: str, namespace: str, room: str | None,
                         eio_sid: str | None = None) -> None: ...

    def forget_sid(self, sid: str, namespace: str) -> None: ...

    def session_pid(self, sid: str) -> str | None: ...

    def set_session_pid(self, sid: str, pid: str | None) -> None: ...

    def acks_owed(self, sid: str) -> list[int]: ...

    def forward_acks(self, sid: str, owed: list[int], node: str) -> None: ...


@dataclass
class _Giving:
    """A session of this node another node is taking."""

    taker: str
    #: what was delivered to it since the take, in order
    held: list[EncodedPacket] = field(default_factory=list)
    #: namespace -> sid of the session when it was taken
    sids: dict[str, str] = field(default_factory=dict)


def _key(pkt: Any) -> Any:
    """A packet as a dict key (an encoded packet with attachments is a list)."""
    return tuple(pkt) if isinstance(pkt, list) else pkt


def _queue_packets(queue: Any, packets: Iterable[Any]) -> None:
    """Encoded Socket.IO packets into an engine.io queue, as MESSAGE packets."""
    for pkt in packets:
        for part in (pkt if isinstance(pkt, list) else (pkt,)):
            queue.put_nowait(eio_packet.Packet(eio_packet.MESSAGE, part))


class Handover:
    """Moves sessions between nodes (see the module). One per node; it registers its
    operations on the node's :class:`~nats_adapter.rpc.ClusterRpc`.

    :param timeout: seconds each step of a move waits for the other node.
    """

    def __init__(self, node: HandoverNode, rpc: ClusterRpc, *, timeout: float = 2.0) -> None:
        self.node = node
        self.rpc = rpc
        self.timeout = timeout
        #: sid -> the node it moved to (from here, or heard of); a sid's own node otherwise
        self.located: dict[str, str] = {}
        #: moves: "moved" (taken here), "given" (taken from here), and "failed_<reason>"
        self.counts: Counter[str] = Counter()
        #: eio sid -> (node it moved to, until when its requests are sent on there)
        self._away: dict[str, tuple[str, float]] = {}
        self._giving: dict[str, _Giving] = {}
        #: eio sid -> packets told to it before its take was done
        self._taking: dict[str, list[Any]] = {}
        #: eio sid -> namespace CONNECTs of it being handled here (it does not move then)
        self._connecting: Counter[str] = Counter()
        #: sids of the sessions taken here (until they disconnect)
        self._taken_sids: set[str] = set()
        #: engine.io sessions taken here (until their last namespace disconnects)
        self._taken_eio: set[str] = set()
        #: eio sid -> set when its take here is over (done or not)
        self._taken: dict[str, asyncio.Event] = {}
        #: called with (sid, namespace) of each socket of a session given to another node
        #: (its application state here can go: no disconnect handler runs for it)
        self.on_given: list[Callable[[str, str], None]] = []
        for op in (ClusterOp.MOVE_TAKE, ClusterOp.MOVE_COMMIT):
            rpc.register(op, self._on_step)
        rpc.register(ClusterOp.MOVE_ABORT, self._on_step, inline=True, answers=False)
        rpc.register(ClusterOp.MOVED, self._on_moved, inline=True, answers=False)
        rpc.register(ClusterOp.MOVED_PACKETS, self._on_moved_packets, inline=True,
                     answers=False)
        rpc.features.add(FEATURE)

    def install(self, server: Any) -> bool:
        """What the server sends to a session that moved away follows it; False (and no
        moves, either way) when python-socketio is not as expected."""
        if not socketio_hooks.redirect_sends(server, self._redirect) \
                or not socketio_hooks.count_connects(server, self._connecting):
            self.rpc.features.discard(FEATURE)
            return False
        return True

    # -- where things are ------------------------------------------------------------------

    def owner(self, sid: str) -> str | None:
        """The node ``sid`` moved to, if it moved."""
        return self.located.get(sid)

    def moved_to(self, eio_sid: str) -> str | None:
        """The node the session ``eio_sid`` of this node moved to, while it lives there
        (see :data:`FORWARD_FOR`)."""
        away = self._away.get(eio_sid)
        if away is None:
            return None
        if away[1] < time.monotonic():
            del self._away[eio_sid]
            return None
        return away[0]

    def serves(self, eio_sid: str) -> bool:
        """Whether the session ``eio_sid`` (of whichever node) is served here."""
        server = self.node.server
        return server is not None and eio_sid in server.eio.sockets

    async def serving(self, eio_sid: str) -> bool:
        """:meth:`serves`, once a take of ``eio_sid`` under way here is over (its old
        owner may send its requests here as soon as it let it go)."""
        taken = self._taken.get(eio_sid)
        if taken is not None:
            await taken.wait()
        return self.serves(eio_sid)

    # -- taking ----------------------------------------------------------------------------

    def _fail(self, reason: str) -> str:
        self.counts[f"failed_{reason}"] += 1
        return reason

    async def take(self, eio_sid: str) -> str | None:
        """Move the session ``eio_sid`` here from the node it names; None when done,
        else why not (counted; nothing changed)."""
        m = self.node
        owner = eio_sid_owner(eio_sid)
        if owner is None or owner == m.node_tag or m.server is None \
                or m.hub.fanout is None or FEATURE not in self.rpc.features:
            return self._fail("unavailable")
        if not self.rpc.serves(owner, FEATURE):
            return self._fail("owner_cannot")
        if not self.rpc.all_serve(FEATURE):
            # a node of an older release would go on sending the session's direct
            # emits to the old owner, which passes them on for FORWARD_FOR only
            return self._fail("cluster_cannot")
        if eio_sid in self._taking or self.serves(eio_sid):
            return self._fail("mid_move")
        self._taking[eio_sid] = []
        done = self._taken[eio_sid] = asyncio.Event()
        try:
            return await self._take(eio_sid, owner)
        finally:
            self._taking.pop(eio_sid, None)
            del self._taken[eio_sid]
            done.set()

    async def _take(self, eio_sid: str, owner: str) -> str | None:
        m = self.node
        state: Any = None
        for wait in BUSY_WAITS:  # a namespace CONNECT under way there: it ends soon
            try:
                state = await self.rpc.ask(owner, MoveStep(ClusterOp.MOVE_TAKE, eio_sid),
                                           self.timeout)
            except TimeoutError:
                return self._fail("owner_unreachable")
            if not (isinstance(state, dict) and state.get("busy") is True):
                break
            await asyncio.sleep(wait)
        else:
            return self._fail("busy")
        sockets = _sockets(state)
        if sockets is None:
            if state is not None:  # an answer of no shape: the owner may hold X's traffic
                m.spawn(self.rpc.tell(owner, MoveStep(ClusterOp.MOVE_ABORT, eio_sid)))
            return self._fail("refused")
        assert isinstance(state, dict)
        session = state.get("session")
        fanout = m.hub.fanout
        assert fanout is not None
        held: list[EncodedPacket] = []
        fanout.moving[eio_sid] = held
        socket = compat.new_socket(m.server, eio_sid,
                                   session if isinstance(session, dict) else {})
        joined: list[tuple[str, str]] = []
        try:
            for ns, sid, rooms, _ in sockets:
                m.basic_enter_room(sid, ns, None, eio_sid=eio_sid)
                joined.append((ns, sid))
                for room in rooms[:m.max_rooms]:
                    m.basic_enter_room(sid, ns, room)
            channels = {m.channels.room(ns, room) for ns, sid, rooms, _ in sockets
                        for room in [None, *m.hub.rooms_of(sid, ns)]}
            ready = await asyncio.gather(*(m.subscriptions.ready(c, m.subscribe_timeout)
                                           for c in channels))
            if not all(ready):
                raise _Refused("subscribe")
            try:
                handed = await self.rpc.ask(owner, MoveStep(ClusterOp.MOVE_COMMIT, eio_sid),
                                            self.timeout)
            except TimeoutError:
                raise _Refused("owner_unreachable") from None
            if not isinstance(handed, dict):
                raise _Refused("refused")
            self._commit(owner, socket, joined, handed, held)
        except _Refused as refused:
            self._undo(socket, joined)
            m.spawn(self.rpc.tell(owner, MoveStep(ClusterOp.MOVE_ABORT, eio_sid)))
            return self._fail(refused.reason)
        except asyncio.CancelledError:  # (the upgrade's request went away)
            self._undo(socket, joined)
            m.spawn(self.rpc.tell(owner, MoveStep(ClusterOp.MOVE_ABORT, eio_sid)))
            raise
        except Exception:
            logger.exception("taking the session %s failed", eio_sid)
            self._undo(socket, joined)
            m.spawn(self.rpc.tell(owner, MoveStep(ClusterOp.MOVE_ABORT, eio_sid)))
            return self._fail("error")
        finally:
            fanout.moving.pop(eio_sid, None)
        sids = [sid for _, sid in joined]
        self._taken_sids.update(sids)
        self._taken_eio.add(eio_sid)
        m.spawn(self.rpc.notice(codec.Moved(sids)))
        self.counts["moved"] += 1
        logger.info("took the session %s (%s) from %s", eio_sid, ", ".join(sids),
                    self.rpc.peers.name(owner))
        return None

    def _commit(self, owner: str, socket: Any, joined: list[tuple[str, str]],
                handed: dict[str, Any], held: list[EncodedPacket]) -> None:
        """Serve the session from now on, with what the giver handed over (no await:
        nothing is delivered between the hold and the queue)."""
        m = self.node
        queued, given, state = handed.get("queued"), handed.get("held"), handed.get("state")
        sockets = _sockets(state)
        if not isinstance(queued, list) or not isinstance(given, list) or sockets is None:
            raise _Refused("refused")
        assert isinstance(state, dict)
        for ns, sid, rooms, _ in sockets:  # (a namespace connected, a room joined meanwhile)
            if (ns, sid) not in joined:
                m.basic_enter_room(sid, ns, None, eio_sid=socket.sid)
                joined.append((ns, sid))
            now_in = m.hub.rooms_of(sid, ns)
            for room in rooms[:m.max_rooms]:
                if room not in now_in:
                    m.basic_enter_room(sid, ns, room)
        session, environ = state.get("session"), state.get("environ")
        if isinstance(session, dict):
            socket.session = session
        queue = socket.queue
        for encoded in queued:
            if isinstance(encoded, (str, bytes)):
                queue.put_nowait(eio_packet.Packet(encoded_packet=encoded))
        _queue_packets(queue, given)
        both = Counter(_key(p) for p in given)
        for pkt in held:
            key = _key(pkt)
            if both[key] > 0:
                both[key] -= 1
                continue
            _queue_packets(queue, (pkt,))
        _queue_packets(queue, self._taking.get(socket.sid, ()))
        compat.serve_socket(m.server, socket, {k: v for k, v in environ.items()
                                               if isinstance(k, str)}
                            if isinstance(environ, dict) else {})
        acks = state.get("acks")
        for _, sid, _, pid in sockets:
            self.located.pop(sid, None)
            if pid is not None:
                m.set_session_pid(sid, pid)
            owed = acks.get(sid) if isinstance(acks, dict) else None
            if isinstance(owed, list) and all(isinstance(i, int) and i > 0 for i in owed):
                m.forward_acks(sid, owed, owner)

    def _undo(self, socket: Any, joined: list[tuple[str, str]]) -> None:
        m = self.node
        for ns, sid in joined:
            m.forget_sid(sid, ns)
        compat.unserve_socket(m.server, socket)

    async def _on_moved(self, origin: str, req_id: str | None, body: codec.Moved) -> None:
        for sid in body.sids:
            if not body.gone:
                self.located[sid] = origin
            elif self.located.get(sid) == origin:
                del self.located[sid]
        away = self._away.get(body.eio_sid) if body.gone else None
        if away is not None and away[0] == origin:
            del self._away[body.eio_sid]

    def on_disconnect(self, sid: str, eio_sid: str) -> None:
        """``sid`` (of the engine.io session ``eio_sid``) is leaving this node: if it
        moved here, the others forget where it went, and once the session's last
        namespace goes, its old node stops sending its requests here."""
        last = eio_sid in self._taken_eio \
            and set(self.node.hub.sids_of(eio_sid).values()) <= {sid}
        if last:
            self._taken_eio.discard(eio_sid)
        if sid in self._taken_sids or last:
            self._taken_sids.discard(sid)
            self.node.spawn(self.rpc.notice(codec.Moved([sid], gone=True,
                                                        eio_sid=eio_sid if last else "")))

    async def _on_moved_packets(self, origin: str, req_id: str | None,
                                body: codec.MovedPackets) -> None:
        early = self._taking.get(body.eio_sid)
        if early is not None:
            early.extend(body.packets)
            return
        socket = self.node.server.eio.sockets.get(body.eio_sid) \
            if self.node.server is not None else None
        if socket is not None and eio_sid_owner(body.eio_sid) == origin:
            _queue_packets(socket.queue, body.packets)

    # -- giving ----------------------------------------------------------------------------

    async def _on_step(self, origin: str, req_id: str | None, body: MoveStep) -> None:
        eio_sid = body.eio_sid
        if body.op is ClusterOp.MOVE_ABORT:
            giving = self._giving.get(eio_sid)
            if giving is not None and giving.taker == origin:
                self._keep(eio_sid)
            return
        assert req_id is not None
        if body.op is ClusterOp.MOVE_TAKE:
            answer = self._give(origin, eio_sid)
        else:
            answer = self._hand_over(origin, eio_sid)
        await self.rpc.reply(origin, req_id, codec.Reply(answer))

    def _give(self, taker: str, eio_sid: str) -> dict[str, Any] | None:
        """The state of ``eio_sid`` for ``taker``, its traffic held from now on; None
        when it cannot move."""
        m = self.node
        if eio_sid_owner(eio_sid) != m.node_tag or eio_sid in self._giving \
                or m.hub.fanout is None:
            return None
        if eio_sid in self._connecting:
            return {"busy": True}  # (the taker may ask again)
        socket = compat.movable_socket(m.server, eio_sid)
        state = self._state(socket) if socket is not None else None
        if state is None:
            return None
        giving = self._giving[eio_sid] = _Giving(taker, sids=m.hub.sids_of(eio_sid))
        m.hub.fanout.moving[eio_sid] = giving.held
        m.spawn(self._expire(eio_sid, giving))
        return state

    def _state(self, socket: Any) -> dict[str, Any] | None:
        """What a taker needs of ``socket``'s session; None when it does not travel."""
        m = self.node
        eio_sid = socket.sid
        state = {"sockets": [{"ns": ns, "sid": sid, "rooms": m.hub.rooms_of(sid, ns),
                              "pid": m.session_pid(sid)}
                             for ns, sid in m.hub.sids_of(eio_sid).items()],
                 "acks": {},
                 "session": socket.session,
                 "environ": {k: v for k, v in compat.connection_environ(m.server,
                                                                        eio_sid).items()
                             if isinstance(k, str) and isinstance(v, str)}}
        try:
            msgpack.packb(state)
        except (TypeError, ValueError, OverflowError):
            logger.info("the session %s does not move: its session data is not portable",
                        eio_sid)
            return None
        return state

    async def _expire(self, eio_sid: str, giving: _Giving) -> None:
        """A taker that went quiet: keep the session."""
        await asyncio.sleep(self.timeout * 3)
        if self._giving.get(eio_sid) is giving:
            logger.info("the move of %s to %s was not done in time: kept", eio_sid,
                        self.rpc.peers.name(giving.taker))
            self._keep(eio_sid)

    def _keep(self, eio_sid: str) -> None:
        """The move is off: deliver what was held, and go on."""
        giving = self._giving.pop(eio_sid)
        fanout = self.node.hub.fanout
        assert fanout is not None
        fanout.moving.pop(eio_sid, None)
        for pkt in giving.held:
            fanout.deliver((eio_sid,), [pkt] if isinstance(pkt, str) else pkt)

    def _hand_over(self, taker: str, eio_sid: str) -> dict[str, Any] | None:
        """Forget ``eio_sid`` here; what the taker needs to go on (see the module)."""
        m = self.node
        giving = self._giving.get(eio_sid)
        if giving is None or giving.taker != taker:
            return None
        socket = compat.movable_socket(m.server, eio_sid)
        sids = m.hub.sids_of(eio_sid)
        state = self._state(socket) if socket is not None else None
        if state is None or not giving.sids.items() <= sids.items() \
                or eio_sid in self._connecting:
            # (closing, upgrading here, a namespace left or connecting meanwhile, data
            # that does not travel; a namespace connected meanwhile goes along)
            self._keep(eio_sid)
            return None
        del self._giving[eio_sid]
        assert m.hub.fanout is not None
        m.hub.fanout.moving.pop(eio_sid, None)
        # the acks it owes callbacks here: the taker sends them back here
        state["acks"] = {sid: owed for sid in sids.values() if (owed := m.acks_owed(sid))}
        for ns, sid in sids.items():
            m.set_session_pid(sid, None)
            m.forget_sid(sid, ns)
            self.located[sid] = taker
            for hook in self.on_given:
                hook(sid, ns)
        queued = [p.encode() for p in compat.forget_socket(m.server, socket)]
        now = time.monotonic()
        self._away = {k: v for k, v in self._away.items() if v[1] >= now}
        self._away[eio_sid] = (taker, now + FORWARD_FOR)
        self.counts["given"] += 1
        logger.info("gave the session %s to %s", eio_sid, self.rpc.peers.name(taker))
        return {"queued": queued, "held": giving.held, "state": state}

    async def _redirect(self, eio_sid: str, packets: list[Any]) -> bool:
        """A packet for ``eio_sid``, which is no longer here: to where it moved."""
        taker = self.moved_to(eio_sid)
        if taker is None:
            return False
        await self.rpc.tell(taker, codec.MovedPackets(eio_sid, packets))
        return True


class _Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _sockets(state: Any) -> list[tuple[str, str, list[str], str | None]] | None:
    """(namespace, sid, rooms, pid) of each namespace of a taken session's state, or
    None when it is not one a node could send."""
    if not isinstance(state, dict) or not isinstance(state.get("sockets"), list):
        return None
    out: list[tuple[str, str, list[str], str | None]] = []
    for entry in state["sockets"]:
        if not isinstance(entry, dict):
            return None
        ns, sid, rooms, pid = (entry.get("ns"), entry.get("sid"), entry.get("rooms"),
                               entry.get("pid"))
        if not isinstance(ns, str) or not is_sid(sid) or not isinstance(rooms, list) \
                or not all(isinstance(r, str) and not is_sid(r) for r in rooms) \
                or not (pid is None or isinstance(pid, str)):
            return None
        out.append((ns, str(sid), list(rooms), pid))
    return out
