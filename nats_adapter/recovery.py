"""Socket.IO connection state recovery across nodes, on the broker's message store.

The protocol is the one socket.io-client >= 4.6 already speaks: the CONNECT reply
carries a private id (``pid``); every event a socket receives from an emit without
a callback ends with an offset (a string); on a reconnect the client sends
``{pid, offset}`` in its CONNECT auth, and a server that can restore the session
answers with the same pid after sending every packet the client missed, so the
client sees ``socket.recovered === true``, the same sid, its rooms and its data.

How this node does it:

- Emits without a callback are not delivered from memory: they are stored
  (:class:`~nats_adapter.brokers.base.MessageStore`) and every node, this one
  included, delivers the stored copy the broker sends back with its sequence
  number, which becomes the offset. Every socket therefore gets its events in
  the store's order, whichever node sent them.
- A session (sid, pid, rooms, data, owning node) is written to the store's
  session bucket at connect and after room changes (so it survives a crash of its
  node) and, on an engine.io-level close (network gone, ping timeout, server
  shutdown), marked disconnected for ``window`` seconds. A namespace disconnect
  (the client or the app said goodbye) deletes it.
- On a reconnect with ``{pid, offset}`` to any node, the session is taken from the
  bucket (once: of two nodes, one wins), its rooms re-joined, and, while new
  traffic for the socket is held back, every stored message after ``offset`` for
  its rooms, its namespace and its sid is sent, then the CONNECT reply, then what
  was held back (without what was already replayed): exactly once, in order, no
  gap at the seam. The sid is kept; when it names another node, this node adopts it
  and tells the others, so direct messages reach it here.

What cannot be restored gets a normal new session (a new pid: ``recovered`` is
false): an unknown, forged or expired pid, a session of another namespace, an
offset that is not a number or is older than what the store still holds, a
session record that does not verify, or a connection whose identity (see
:attr:`RecoveryOptions.identity`) is not the session's.

What the store holds is trusted no more than the live bus. With a cluster key a
session record is sealed for its pid (a record does not open under another key)
and stored under a MAC of the pid (reading the bucket reveals no pid); a refused
record is left where it is. Stored envelopes are sealed for their subject and, when
read back (catch-up, history), must open for the subject they are stored under, be
no older than the store keeps messages, and not repeat an (origin, seal sequence)
already read: a captured envelope stored again is not delivered again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgpack

from . import _socketio_hooks as socketio_hooks
from . import codec, compat
from .brokers.base import BrokerError, MessageStore
from .bus import Bus
from .cluster import session_data
from .dedupe import DedupeWindow
from .hub import HoldBack, LocalHub
from .naming import ChannelNames, decode_token
from .rpc import ClusterRpc
from .sids import is_sid, sid_owner
from .stats import ManagerStats
from .subscriptions import RoomSubscriptions
from .types import EncodedPacket

logger = logging.getLogger(__name__)

#: the most messages one room history request returns
MAX_HISTORY = 200
#: seconds the clocks of gateways (which stamp seals) and NATS nodes (which stamp
#: stored messages) may differ for a catch-up's look back (see Recovery._catch_up)
LOOK_BACK_SLACK = 5.0
#: an envelope read back from the store: (message, seal sequence, seal stamp in ms);
#: the sequence is 0 and the stamp meaningless without a cluster key
StoredEnvelope = tuple[codec.Message, int, int]


#: who a connection is, from its CONNECT auth and its WSGI-style environ: e.g. the
#: ``sub`` of a verified JWT; None for nobody in particular
IdentityFn = Callable[[Any, dict[str, Any]], "str | None"]


@dataclass(frozen=True, slots=True)
class RecoveryOptions:
    """:param window: seconds a disconnected session stays recoverable (socket.io's
        ``maxDisconnectionDuration``, 2 minutes by default).
    :param identity: who a connection is (see :data:`IdentityFn`); it is written in
        the session record and a restore by a connection of another identity gets a
        new session. Called before the app's connect handler, so it must check the
        credentials itself (verify the token, not just read it)."""

    window: float = 120.0
    identity: IdentityFn | None = None

    def __post_init__(self) -> None:
        if not self.window > 0:
            raise ValueError(f"window must be > 0 seconds, got {self.window!r}")


class RecoveryNode(Protocol):
    """What recovery needs from its node (the manager), beyond the bus and the rpc."""

    node_tag: str
    channels: ChannelNames
    stats: ManagerStats
    hub: LocalHub
    subscriptions: RoomSubscriptions
    dedupe: DedupeWindow
    subscribe_timeout: float
    max_rooms: int

    @property
    def server(self) -> Any: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...

    def next_emit_id(self) -> int: ...

    def basic_enter_room(self, sid: str, namespace: str, room: str | None,
                         eio_sid: str | None = None) -> None: ...


@dataclass
class _Restore:
    """A session being restored on this node."""

    pid: str
    offset: int
    session: dict[str, Any]
    #: what the socket gets while it catches up: (seq, packet) held back
    held: list[tuple[int, EncodedPacket]] = field(default_factory=list)

    def hold(self, seq: int, pkt: EncodedPacket) -> None:
        """Live traffic for the socket while it catches up: kept for after."""
        self.held.append((seq, pkt))


def with_offset(pkt: EncodedPacket, seq: int) -> EncodedPacket:
    """``pkt`` (an encoded EVENT) with the offset appended as its last argument."""
    tail = f',"{seq}"]'
    if isinstance(pkt, str):
        return pkt[:-1] + tail
    return [pkt[0][:-1] + tail, *pkt[1:]]  # type: ignore[operator]


class Recovery:
    """Connection state recovery for one :class:`ClusterManager` (see the module)."""

    #: emits go through the store (see the module)
    stores_emits = True

    def __init__(self, node: RecoveryNode, bus: Bus, rpc: ClusterRpc,
                 options: RecoveryOptions) -> None:
        self.node = node
        self.bus = bus
        self.rpc = rpc
        self.options = options
        self.store: MessageStore | None = None
        #: node tag -> when it last let a release request go unanswered
        self._unanswered: dict[str, float] = {}
        #: sid -> pid of the local sockets
        self.pids: dict[str, str] = {}
        #: (eio sid, namespace) -> the restore in progress for that connection
        self._restoring: dict[tuple[str, str], _Restore] = {}
        #: eio sid -> restore whose socket is catching up (its live traffic is held);
        #: the local writer's table once installed
        self.catching_up: dict[str, HoldBack] = {}
        #: eio sids whose engine.io connection is closing (a recoverable disconnect)
        self._engine_closing: set[str] = set()
        #: sids adopted from another node (restored here) -> the node tag that has them
        self.adopted: dict[str, str] = {}
        self._dirty: set[str] = set()
        self._flush_task: asyncio.Task[None] | None = None
        #: sid -> identity of the local sockets (see RecoveryOptions.identity)
        self.identities: dict[str, str | None] = {}
        #: (eio sid, namespace) -> identity of a connection whose CONNECT is under way
        self._connecting: dict[tuple[str, str], str | None] = {}
        #: the application's say on a restore attempt, by engine.io sid (e.g. limits
        #: per client address): False makes it a new session, without a store look-up
        self.may_restore: Callable[[str], bool] | None = None
        rpc.register(codec.ClusterOp.ADOPT, self._on_adopt, inline=True, answers=False)
        rpc.register(codec.ClusterOp.DISOWN, self._on_disown, inline=True, answers=False)
        rpc.register(codec.ClusterOp.RELEASE, self._on_release)
        rpc.on_hello.append(self._tell_adopted)

    # -- set-up ------------------------------------------------------------------------

    def install(self, server: Any, held: dict[str, HoldBack]) -> None:
        """Hold back the traffic of catching-up sockets in ``held`` (the local
        writer's), and hook python-socketio's connects (see _socketio_hooks)."""
        self.catching_up = held
        socketio_hooks.install(server, self)

    def work(self) -> list[asyncio.Task[None]]:
        """The session write under way, if any (a close lets it finish)."""
        task = self.flushing
        return [task] if task is not None else []

    async def start(self) -> None:
        m = self.node
        store = self.bus.broker.message_store(m.channels.prefix, self.options.window)
        await store.setup()
        store.watch_losses(self._on_lost)
        # a gateway heard again after it missed its heartbeats: the broker was split
        # between us (copies from its side did not come either); look for gaps
        self.rpc.on_back.append(lambda _tag: store.check_gaps())
        self.store = store
        # direct messages to this node's sids come back from the store on one wildcard
        m.subscriptions.acquire(m.channels.live_sids(m.node_tag))

    # -- where a sid lives -------------------------------------------------------------

    def owner(self, sid: str) -> str:
        return self.adopted.get(sid) or sid_owner(sid)

    async def _on_adopt(self, origin: str, req_id: str | None, body: codec.Adopt) -> None:
        self.adopted[body.sid] = origin

    async def _on_disown(self, origin: str, req_id: str | None, body: codec.Disown) -> None:
        if self.adopted.get(body.sid) == origin:
            del self.adopted[body.sid]

    async def _tell_adopted(self, node: str) -> None:
        """A node said hello: tell it which sids restored here live here now."""
        me = self.node.node_tag
        for sid, tag in list(self.adopted.items()):
            if tag == me:
                await self.rpc.tell(node, codec.Adopt(sid))

    async def _on_release(self, origin: str, req_id: str | None, body: codec.Release) -> None:
        """Another node restores ``sid``'s session: drop the connection still here (its
        client has left it), without keeping its session."""
        assert req_id is not None
        self.pids.pop(body.sid, None)
        m = self.node
        if m.hub.is_local(body.sid, body.ns):
            await m.server.disconnect(body.sid, namespace=body.ns, ignore_queue=True)
        await self.rpc.reply(origin, req_id, codec.Reply(True))

    # -- gaps that could not be repaired -------------------------------------------------

    def _on_lost(self, channel: str) -> None:
        """Stored messages on ``channel`` will never reach this node (a gap the broker
        could not repair: past retention, purged): the local sockets that should
        have had them get no newer stored packet and are disconnected as the network
        would (the engine.io connection closes, the session stays recoverable), so
        their clients reconnect and a restore from their offset decides: what is
        still stored is replayed, else they get a new session and know it
        (``recovered`` false). Called before the broker delivers anything newer on
        ``channel``."""
        m = self.node
        eio_sids = sorted(set(self._receivers(channel).values()))
        if not eio_sids:
            return
        for eio_sid in eio_sids:
            # nothing stored reaches them until they are gone: a newer packet's offset
            # would let their restore skip what was lost
            self.catching_up[eio_sid] = _LOST
        m.stats.gap_disconnects += len(eio_sids)
        logger.warning("stored messages on %s are lost to this node: disconnecting %d "
                       "socket(s) so that they recover", channel, len(eio_sids))
        m.spawn(self._disconnect_engines(eio_sids))

    def _receivers(self, channel: str) -> dict[str, str]:
        """sid -> eio sid of the local sockets the live ``channel`` delivers to."""
        m = self.node
        parsed = m.channels.parse_room(channel)
        if parsed is not None:
            return dict(m.hub.members(*parsed))
        head = f"{m.channels.prefix}.live.sid."
        tokens = channel[len(head):].split(".") if channel.startswith(head) else []
        if len(tokens) != 3:
            return {}
        try:
            ns = decode_token(tokens[0])
            sid = f"{decode_token(tokens[1])}:{decode_token(tokens[2])}"
        except ValueError:
            return {}
        eio_sid = m.hub.members(ns, None).get(sid)
        return {sid: eio_sid} if eio_sid is not None else {}

    async def _disconnect_engines(self, eio_sids: list[str]) -> None:
        eio = self.node.server.eio
        for eio_sid in eio_sids:
            await eio.disconnect(eio_sid)

    # -- sending -----------------------------------------------------------------------

    async def store_emit(self, namespace: str, targets: list[str] | None,
                         skip: frozenset[str], pkt: EncodedPacket) -> None:
        """Store an emit on the subject of each target; the copies come back to every
        node (this one too) with their sequence, and are delivered from there.

        Returns once stored; raises :class:`BrokerError` if the store would not take it
        (retried meanwhile): unlike an at-most-once relay, nobody got it then."""
        m = self.node
        if targets is None:
            subjects = [m.channels.stored_room(namespace, None)]
        else:
            subjects = list(dict.fromkeys(
                m.channels.stored_sid(namespace, name) if is_sid(name)
                else m.channels.stored_room(namespace, name)
                for name in targets if not (is_sid(name) and name in skip)))
        if not subjects:
            return
        dedupe = f"{m.node_tag}:{m.next_emit_id()}" if len(subjects) > 1 else None
        data = self.bus.encode(codec.EmitMessage(m.node_tag, namespace, targets, sorted(skip),
                                                 pkt, dedupe))
        if data is None:
            return
        for subject in subjects:
            await self.publish(subject, self.bus.seal(data, subject))

    async def publish(self, subject: str, data: bytes) -> None:
        """Store one envelope; raises :class:`BrokerError` when the store would not
        take it (then nobody received it: the caller can say so)."""
        m = self.node
        try:
            if self.store is None:
                raise BrokerError("the message store is not ready")
            await self.store.publish(subject, data)
        except BrokerError as exc:
            m.stats.publish_errors += 1
            self.bus.log.warning("publish", "publish to %s lost: %s", subject, exc)
            raise
        m.stats.published += 1
        m.stats.published_bytes += len(data)

    # -- receiving ---------------------------------------------------------------------

    async def deliver_stored(self, msg: codec.EmitMessage, seq: int) -> None:
        """A stored emit came back (checked like live traffic): deliver it with its
        offset."""
        m = self.node
        if msg.dedupe_id is not None and not m.dedupe.first(msg.dedupe_id):
            m.stats.dropped_duplicate += 1
            return
        if msg.rooms is not None and not m.hub.reaches_any(msg.namespace, msg.rooms,
                                                           frozenset(msg.skip)):
            m.stats.unwanted += 1
            return
        await m.hub.deliver(msg.namespace, msg.rooms, frozenset(msg.skip),
                            with_offset(msg.packet, seq), seq=seq)

    # -- sessions ----------------------------------------------------------------------

    def session_of(self, sid: str, namespace: str, connected: bool) -> dict[str, Any]:
        m = self.node
        eio_sid = m.hub.members(namespace, None).get(sid, "")
        return {"sid": sid, "ns": namespace, "rooms": m.hub.rooms_of(sid, namespace),
                "data": session_data(m.server, eio_sid, namespace), "node": m.node_tag,
                "connected": connected, "at": time.time(), "id": self.identities.get(sid)}

    @property
    def flushing(self) -> asyncio.Task[None] | None:
        """The session write under way, if any."""
        task = self._flush_task
        return task if task is not None and not task.done() else None

    def touch(self, sid: str) -> None:
        """``sid``'s rooms changed: write its session soon (changes are coalesced)."""
        if sid not in self.pids:
            return
        self._dirty.add(sid)
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0.05)
        while self._dirty:
            sid = self._dirty.pop()
            pid = self.pids.get(sid)
            if pid is None:
                continue
            for ns in self.node.hub.namespaces_of(sid):
                await self._put(pid, self.session_of(sid, ns, True))

    def record_name(self, pid: str) -> str:
        """The key of ``pid``'s session record in the store."""
        key = self.bus.key
        return key.record_name(pid) if key is not None else pid

    def seal_record(self, pid: str, session: dict[str, Any]) -> bytes:
        """``session`` as stored for ``pid``: sealed for that pid with a cluster key."""
        blob: bytes = msgpack.packb(session, use_bin_type=True)
        key = self.bus.key
        return key.seal_record(pid, blob) if key is not None else blob

    def open_record(self, pid: str, blob: bytes) -> dict[str, Any] | str:
        """The session in a stored record of ``pid``, or why it is not one."""
        key = self.bus.key
        if key is not None:
            body = key.open_record(pid, blob)
            if body is None:
                return "a session record that does not verify"
            blob = body
        try:
            session = msgpack.unpackb(blob, raw=False)
        except Exception:
            return "unreadable session"
        if not isinstance(session, dict) or not is_sid(session.get("sid")):
            return "unreadable session"
        return session

    async def _put(self, pid: str, session: dict[str, Any], ttl: float | None = None) -> None:
        if self.store is None:
            return
        try:
            await self.store.put_session(self.record_name(pid), self.seal_record(pid, session),
                                         ttl)
        except (BrokerError, TypeError, ValueError) as exc:
            logger.warning("could not store the session of %s: %s", session.get("sid"), exc)

    def engine_closing(self, eio_sid: str) -> None:
        self._engine_closing.add(eio_sid)

    def engine_closed(self, eio_sid: str) -> None:
        self._engine_closing.discard(eio_sid)

    def on_disconnect(self, sid: str, namespace: str, eio_sid: str) -> None:
        """``sid`` is leaving (before its rooms are): keep its session for the window if
        the network went away, forget it if it said goodbye."""
        self._dirty.discard(sid)
        pid = self.pids.pop(sid, None)
        identity = self.identities.pop(sid, None)
        restore = self.catching_up.pop(eio_sid, None)
        if restore is not None:
            self._restoring.pop((eio_sid, namespace), None)
        m = self.node
        if self.adopted.get(sid) == m.node_tag:
            del self.adopted[sid]
            m.subscriptions.release(m.channels.live_sid(sid))
            m.spawn(self.rpc.notice(codec.Disown(sid)))
        if pid is None or self.store is None:
            return
        if eio_sid in self._engine_closing:
            session = self.session_of(sid, namespace, False)
            session["id"] = identity
            m.spawn(self._put(pid, session, ttl=self.options.window))
        else:
            m.spawn(self.store.delete_session(self.record_name(pid)))

    # -- restoring ---------------------------------------------------------------------

    async def before_connect(self, eio_sid: str, namespace: str, auth: Any) -> None:
        """A CONNECT arrived: who it is and, if its auth asks to restore a session we
        can, plan it."""
        identity = self._identity(eio_sid, auth)
        self._connecting[(eio_sid, namespace)] = identity
        if self.store is None or not isinstance(auth, dict):
            return
        pid, offset = auth.get("pid"), auth.get("offset")
        if not isinstance(pid, str) or not isinstance(offset, str):
            return
        m = self.node
        m.stats.recovery_attempts += 1
        if self.may_restore is not None and not self.may_restore(eio_sid):
            m.stats.recovery_refused += 1
            return
        try:
            problem = await self._restorable(pid, offset, namespace, identity)
        except Exception:  # a CONNECT must be answered: a new session, never silence
            logger.exception("restoring a session for %s failed", eio_sid)
            problem = "restoring failed"
        if isinstance(problem, str):
            m.stats.recovery_refused += 1
            logger.info("not restoring a session for %s: %s", eio_sid, problem)
            return
        self._restoring[(eio_sid, namespace)] = problem

    def _identity(self, eio_sid: str, auth: Any) -> str | None:
        check = self.options.identity
        if check is None:
            return None
        server = self.node.server
        environ = compat.connection_environ(server, eio_sid)
        try:
            return check(auth, environ)
        except Exception:  # the app's hook failed: nobody in particular
            logger.exception("the identity hook failed for %s", eio_sid)
            return None

    async def _restorable(self, pid: str, offset: str, namespace: str,
                          identity: str | None) -> _Restore | str:
        if not (0 < len(pid) <= 64 and pid.replace("-", "").replace("_", "").isalnum()):
            return "not a pid"
        if not (offset.isascii() and offset.isdigit() and len(offset) <= 20):
            return "not an offset"
        assert self.store is not None
        position = int(offset)
        try:  # before the session is taken: a failure here leaves it for another try
            first, last = await self.store.bounds()
        except BrokerError as exc:
            return f"the message store did not answer: {exc}"
        if position > last:
            return "an offset from the future"
        if position + 1 < first:
            return "messages after the offset are no longer stored"
        found: list[dict[str, Any] | str] = []

        def acceptable(blob: bytes) -> bool:
            # checked before the record is taken: a refused one stays for its owner
            session = self.open_record(pid, blob)
            if isinstance(session, dict) and session.get("ns") != namespace:
                session = "a session of another namespace"
            elif isinstance(session, dict) and session.get("id") != identity:
                session = "the connection's identity is not the session's"
            found.append(session)
            return isinstance(session, dict)

        try:
            blob = await self.store.take_session(self.record_name(pid), acceptable)
        except BrokerError as exc:
            return f"the session store did not answer: {exc}"
        if blob is None or not found or isinstance(found[-1], str):
            return found[-1] if found and isinstance(found[-1], str) \
                else "no such session (unknown, expired or taken)"
        session = found[-1]
        if not session.get("connected"):
            if time.time() - float(session.get("at", 0)) > self.options.window:
                return "disconnected for longer than the window"
        elif not await self._release_elsewhere(session):
            return "the socket is still connected on its node"
        return _Restore(pid, position, session)

    async def _release_elsewhere(self, session: dict[str, Any]) -> bool:
        """The session says its socket is connected: make sure it is not (its node
        died, or keeps a connection the client has already left)."""
        m = self.node
        sid, node = str(session["sid"]), str(session.get("node", ""))
        if node == m.node_tag or self.owner(sid) == m.node_tag:
            if m.hub.is_local(sid, str(session["ns"])):
                await m.server.disconnect(sid, namespace=session["ns"], ignore_queue=True)
            return True
        if node not in self.rpc.peers:
            return True  # its node is gone
        silent_since = self._unanswered.get(node)
        seen = self.rpc.peers.last_seen(node)
        if silent_since is not None and seen is not None and seen < silent_since:
            # it did not answer a release and has not been heard from since: a storm
            # of restores from a killed gateway waits once, not once per session
            return True
        try:
            answer = await self.rpc.ask(node, codec.Release(sid, str(session["ns"])),
                                        timeout=1.0)
        except TimeoutError:
            self._unanswered[node] = time.monotonic()
            return True  # its node does not answer: as good as gone
        self._unanswered.pop(node, None)
        return answer is not None

    def after_connect(self, eio_sid: str, namespace: str) -> None:
        # a connect that was refused (or failed) leaves nothing half restored
        self._connecting.pop((eio_sid, namespace), None)
        restore = self._restoring.pop((eio_sid, namespace), None)
        if restore is not None and self.catching_up.get(eio_sid) is restore:
            del self.catching_up[eio_sid]

    def restored_sid(self, eio_sid: str, namespace: str) -> str | None:
        """The sid to give this connection, when it restores a session (pre_connect)."""
        restore = self._restoring.get((eio_sid, namespace))
        if restore is None:
            return None
        sid = str(restore.session["sid"])
        if self.node.hub.is_local(sid, namespace):
            return None  # still here after all: not restorable
        return sid

    async def reattach(self, sid: str, eio_sid: str, namespace: str) -> None:
        """pre_connect gave ``sid`` back: its rooms, its data, and hold its traffic."""
        restore = self._restoring[(eio_sid, namespace)]
        m = self.node
        self.catching_up[eio_sid] = restore
        if sid_owner(sid) != m.node_tag:
            self.adopted[sid] = m.node_tag
            m.subscriptions.acquire(m.channels.live_sid(sid))
            await self.rpc.notice(codec.Adopt(sid))
        rooms = [r for r in restore.session.get("rooms") or [] if isinstance(r, str)]
        for room in rooms[:m.max_rooms]:
            m.basic_enter_room(sid, namespace, room)
        data = restore.session.get("data")
        if isinstance(data, dict) and data and m.server is not None:
            await m.server.save_session(sid, data, namespace=namespace)

    async def send_connect_reply(self, eio_sid: str, pkt: Any,
                                 send: Callable[[str, Any], Any]) -> None:
        """The CONNECT reply: with a pid, after the missed packets when restoring."""
        ns = pkt.namespace or "/"
        sid = str(pkt.data.get("sid"))
        self.identities[sid] = self._connecting.pop((eio_sid, ns), None)
        restore = self._restoring.pop((eio_sid, ns), None)
        if restore is None or self.catching_up.get(eio_sid) is not restore:
            pid = secrets.token_urlsafe(16)
            self.pids[sid] = pid
            pkt.data["pid"] = pid
            await send(eio_sid, pkt)
            self.touch(sid)
            return
        try:
            replayed = await self._catch_up(sid, ns, restore, eio_sid, send)
        except BrokerError as exc:
            # the session is taken but what it missed cannot be read: carry on as a new
            # session (a new pid: the client sees recovered false)
            self.catching_up.pop(eio_sid, None)
            self.node.stats.recovery_refused += 1
            logger.warning("could not replay for %s (%s): a new session instead", sid, exc)
            pid = secrets.token_urlsafe(16)
            self.pids[sid] = pid
            pkt.data["pid"] = pid
            await send(eio_sid, pkt)
            for _seq, held in sorted(restore.held, key=lambda item: item[0]):
                await send(eio_sid, _Raw(held))
            self.touch(sid)
            return
        finally:
            self.catching_up.pop(eio_sid, None)
        self.pids[sid] = restore.pid
        self.node.stats.recovered += 1
        logger.info("restored %s (%d missed packets)", sid, replayed)
        self.touch(sid)

    async def _catch_up(self, sid: str, ns: str, restore: _Restore, eio_sid: str,
                        send: Callable[[str, Any], Any]) -> int:
        m = self.node
        assert self.store is not None
        channels = m.channels
        rooms = m.hub.rooms_of(sid, ns)
        for room in rooms:  # live traffic must reach the hold-back buffer from here on
            await m.subscriptions.ready(channels.room(ns, room), m.subscribe_timeout)
        subjects = [channels.stored_room(ns, r) for r in rooms]
        subjects += [channels.stored_room(ns, None), channels.stored_sid(ns, sid)]
        done, count = restore.offset, 0
        seen: set[object] = set()
        looked_back = float("inf")
        for _ in range(2):  # again, for what was stored while the first pass ran
            _, last = await self.store.bounds()
            found = [(seq, opened) for seq, subject, data
                     in await self.store.replay(subjects, done, last)
                     if (opened := self._open_stored(subject, data)) is not None]
            # A captured envelope stored again comes after the offset while the one it
            # copies may come before: what was stored since the oldest seal here, up to
            # the offset, is not sent again (the client had it, or it was not for it)
            oldest = min((stamp for _, (_, sealed, stamp) in found if sealed), default=None)
            if oldest is not None and oldest / 1000 < looked_back:
                looked_back = oldest / 1000 - LOOK_BACK_SLACK
                for _, subject, data in await self.store.replay(
                        subjects, 0, restore.offset, since=looked_back):
                    before = self._open_stored(subject, data)
                    self._seen(before, seen)
                    # an emit to several rooms is stored once per room: a copy at or
                    # before the offset means the client had it
                    if before is not None and isinstance(before[0], codec.EmitMessage) \
                            and before[0].dedupe_id is not None:
                        seen.add(before[0].dedupe_id)
            for seq, opened in found:
                pkt = self._replayable(opened, sid, ns, rooms, seen)
                if pkt is not None:
                    await send(eio_sid, _Raw(with_offset(pkt, seq)))
                    count += 1
                done = max(done, seq)
            await asyncio.sleep(0.05)
        pkt_class = m.server.packet_class
        reply = pkt_class(0, {"sid": sid, "pid": restore.pid}, namespace=ns)
        await send(eio_sid, reply)
        for seq, held in sorted(restore.held, key=lambda item: item[0]):
            if seq > done:
                await send(eio_sid, _Raw(held))
        return count

    def _open_stored(self, subject: str, data: bytes) -> StoredEnvelope | None:
        """The envelope stored under ``subject``, if it opens for that subject and is no
        older than the store keeps messages."""
        assert self.store is not None
        return self.bus.open_stored(subject, data, self.store.retention)

    @staticmethod
    def _seen(opened: StoredEnvelope | None, seen: set[object]) -> bool:
        """Whether ``opened`` repeats an (origin, seal sequence) in ``seen`` (a captured
        envelope stored again); remembers it there if not."""
        if opened is None:
            return True
        msg, sealed_seq, _ = opened
        if not sealed_seq:
            return False
        if (msg.origin, sealed_seq) in seen:
            return True
        seen.add((msg.origin, sealed_seq))
        return False

    def _replayable(self, opened: StoredEnvelope | None, sid: str, ns: str, rooms: list[str],
                    seen: set[object]) -> EncodedPacket | None:
        """The packet of a stored envelope if it is not a repeat and ``sid`` was among
        its recipients."""
        if self._seen(opened, seen):
            return None
        assert opened is not None
        msg = opened[0]
        if not isinstance(msg, codec.EmitMessage) or msg.namespace != ns or sid in msg.skip:
            return None
        if msg.rooms is not None and sid not in msg.rooms \
                and not any(r in rooms for r in msg.rooms):
            return None
        if msg.dedupe_id is not None:
            if msg.dedupe_id in seen:
                return None
            seen.add(msg.dedupe_id)
        return msg.packet

    # -- history -----------------------------------------------------------------------

    async def room_history(self, room: str, limit: int, namespace: str = "/"
                           ) -> list[tuple[str, list[Any], str]]:
        """The last ``limit`` events emitted to ``room`` (event, args, offset), oldest
        first."""
        if self.store is None:
            raise BrokerError("the message store is not ready")
        if not 0 < limit <= MAX_HISTORY:
            raise ValueError(f"limit must be 1-{MAX_HISTORY}, got {limit!r}")
        m = self.node
        subject = m.channels.stored_room(namespace, room)
        seen: set[object] = set()

        def replayable(data: bytes) -> bool:  # before the store keeps the last few
            return self._replayable(self._open_stored(subject, data), "", namespace, [room],
                                    seen) is not None

        out = []
        for seq, data in await self.store.history(subject, limit, replayable):
            pkt = self._replayable(self._open_stored(subject, data), "", namespace, [room],
                                   set())
            if not isinstance(pkt, str):
                continue
            head = "2" + ("" if namespace == "/" else f"{namespace},")
            try:
                decoded = m.server.packet_class.json.loads(pkt[len(head):])
            except (ValueError, AttributeError):
                continue
            if isinstance(decoded, list) and decoded and isinstance(decoded[0], str):
                out.append((decoded[0], decoded[1:], str(seq)))
        return out


class _Lost:
    """The hold-back of a socket whose stored traffic was lost past repair, until its
    connection is closed: what comes is dropped (its client recovers it, or learns
    that it cannot)."""

    __slots__ = ()

    def hold(self, seq: int, pkt: EncodedPacket) -> None:
        pass


_LOST = _Lost()


class _Raw:
    """An already encoded packet, sent as is by python-socketio's _send_packet."""

    __slots__ = ("encoded", "packet_type")

    def __init__(self, encoded: EncodedPacket) -> None:
        self.encoded = encoded
        self.packet_type = 2

    def encode(self) -> EncodedPacket:
        return self.encoded
