"""The msgpack envelope that travels between nodes.

Every envelope is a msgpack array whose first two items are the format version
and the message kind; the rest depends on the kind (see the ``*Message`` types).
:func:`decode` accepts only well-formed envelopes of :data:`VERSION`; anything
else raises :class:`EnvelopeError` so the caller can log, count and drop it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Literal, TypeAlias, cast

import msgpack

from .sids import eio_sid_owner, is_sid
from .types import EncodedPacket

VERSION = 1

#: The largest envelope :func:`decode` accepts, in bytes (the NATS default max_payload).
MAX_ENVELOPE_BYTES = 1024 * 1024

# Message kinds (second array item).
EMIT = 1  # broadcast a pre-encoded packet to rooms / a namespace
EMIT_TO_SID = 2  # emit event+data to one sid, optionally awaiting its ack
ACK = 3  # a client's ack travelling back to the node that asked for it
ENTER_ROOM = 4
LEAVE_ROOM = 5
DISCONNECT = 6
CLOSE_ROOM = 7
CLUSTER = 8  # the cluster protocol: requests, replies, heartbeats (see rpc.py)
#: EMIT to the one room its channel names, which carries its namespace and room:
#: ``[VERSION, EMIT_ROOM, origin, packet]``, then ``skip`` if not empty. Nearly
#: every emit is one of these, and every byte is paid once per node it reaches:
#: ``origin`` is empty when nothing needs it (a broker that never hands a node its
#: own publications, and no cluster key).
EMIT_ROOM = 9
#: The optional operation (:meth:`~nats_adapter.rpc.ClusterRpc.serves`) of a node that
#: reads an emit's trace context (:attr:`EmitMessage.trace`): one more item at the
#: end of an EMIT or EMIT_ROOM envelope, which a node of an older release drops as
#: malformed. A node adds it only when every node alive says it reads it.
TRACE_FEATURE = "trace"

class EnvelopeError(ValueError):
    """A payload from the bus that is not a valid envelope of this version."""


class NewerEnvelope(EnvelopeError):
    """An envelope of a newer format than this release reads: sent by a gateway of a
    newer release (which should have spoken the oldest format its peers advertise)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"envelope format {version}, newer than this release's {VERSION}")
        self.version = version


@dataclass(frozen=True, slots=True)
class EmitMessage:
    """Deliver ``packet`` to local members of ``rooms`` (``None``: the namespace).

    ``rooms`` may name sids as well as rooms. ``dedupe_id`` is set when the same
    emit travels over more than one channel; a node delivers only its first copy.
    ``channel_room`` set: the emit is for the one room its channel names; it
    travels as :data:`EMIT_ROOM`, without ``namespace``, ``rooms`` and
    ``dedupe_id`` (:func:`decode` leaves the first two empty, for the receiver to
    fill in from the channel).
    ``trace``: the W3C ``traceparent`` of the span that sent it (tracing on, see
    :data:`TRACE_FEATURE`), sealed with the rest; None on nearly every emit.
    """

    origin: str
    namespace: str
    rooms: list[str] | None
    skip: list[str]
    packet: EncodedPacket
    dedupe_id: str | None = None
    channel_room: bool = False
    trace: str | None = None


@dataclass(frozen=True, slots=True)
class EmitToSidMessage:
    """Emit ``event`` with ``args`` to ``sid``; ``ack_id`` set means send its ack to ``origin``."""

    origin: str
    namespace: str
    sid: str
    event: str
    args: list[Any]
    ack_id: int | None


@dataclass(frozen=True, slots=True)
class AckMessage:
    """A client's ack for the callback ``ack_id`` registered under ``sid`` on ``origin``'s node."""

    origin: str
    sid: str
    ack_id: int
    args: list[Any]


@dataclass(frozen=True, slots=True)
class RoomMessage:
    """ENTER_ROOM/LEAVE_ROOM of ``sid``, CLOSE_ROOM (no sid) or DISCONNECT (no room)."""

    kind: int
    origin: str
    namespace: str
    sid: str | None
    room: str | None


@dataclass(frozen=True, slots=True)
class ClusterMessage:
    """One operation of the cluster-wide server API (``nats_adapter.cluster``).

    ``op`` names it (a :class:`ClusterOp`), ``req_id`` ties replies to their request
    (None for heartbeats and one-way operations), ``body`` holds its arguments as
    they travel: a map from string keys to msgpack values, which :func:`decode_call`
    checks and types.
    """

    origin: str
    op: str
    req_id: str | None
    body: dict[str, Any]


Message: TypeAlias = EmitMessage | EmitToSidMessage | AckMessage | RoomMessage | ClusterMessage


def encode(msg: Message) -> bytes:
    """Serialize ``msg``; raises ``TypeError``/``ValueError`` for data msgpack cannot carry."""
    if isinstance(msg, EmitMessage) and msg.channel_room:
        items: list[Any] = [VERSION, EMIT_ROOM, msg.origin, msg.packet]
        if msg.skip or msg.trace is not None:
            items.append(msg.skip)
        if msg.trace is not None:
            items.append(msg.trace)
    elif isinstance(msg, EmitMessage):
        items = [
            VERSION, EMIT, msg.origin, msg.namespace, msg.rooms, msg.skip, msg.packet,
            msg.dedupe_id,
        ]
        if msg.trace is not None:
            items.append(msg.trace)
    elif isinstance(msg, EmitToSidMessage):
        items = [VERSION, EMIT_TO_SID, msg.origin, msg.namespace, msg.sid, msg.event, msg.args,
                 msg.ack_id]
    elif isinstance(msg, AckMessage):
        items = [VERSION, ACK, msg.origin, msg.sid, msg.ack_id, msg.args]
    elif isinstance(msg, ClusterMessage):
        items = [VERSION, CLUSTER, msg.origin, msg.op, msg.req_id, msg.body]
    else:
        items = [VERSION, msg.kind, msg.origin, msg.namespace, msg.sid, msg.room]
    data: bytes = msgpack.packb(items, use_bin_type=True)
    return data


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise EnvelopeError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _str_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EnvelopeError(f"{what} must be a list of strings")
    return value


def _packet(value: Any) -> EncodedPacket:
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and isinstance(value[0], str)
        and all(isinstance(v, bytes) for v in value[1:])
    ):
        return value
    raise EnvelopeError("packet must be a string or [string, bytes...]")


#: the longest trace context accepted (a W3C traceparent is 55 characters)
MAX_TRACE_CHARS = 128


def _trace(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TRACE_CHARS:
        raise EnvelopeError("trace context must be a short string")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise EnvelopeError(f"{what} must be an integer")
    return value


def decode(data: bytes) -> Message:
    """Parse an envelope; raise :class:`EnvelopeError` for anything malformed."""
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError(f"envelope of {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    try:
        items = msgpack.unpackb(data, use_list=True, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise EnvelopeError(f"not msgpack: {exc}") from None
    if not isinstance(items, list) or len(items) < 3:
        raise EnvelopeError("envelope must be an array of at least 3 items")
    if items[0] != VERSION:
        if isinstance(items[0], int) and not isinstance(items[0], bool) \
                and VERSION < items[0] < 2**16:
            raise NewerEnvelope(items[0])
        raise EnvelopeError(f"unsupported envelope version {items[0]!r}")
    kind = items[1]
    try:
        if kind == EMIT and len(items) in (8, 9):
            _, _, origin, ns, rooms, skip, pkt, dedupe = items[:8]
            return EmitMessage(
                _str(origin, "origin"), _str(ns, "namespace"),
                None if rooms is None else _str_list(rooms, "rooms"),
                _str_list(skip, "skip"), _packet(pkt), _opt_str(dedupe, "dedupe id"),
                trace=_trace(items[8]) if len(items) == 9 else None,
            )
        if kind == EMIT_ROOM and len(items) in (4, 5, 6):
            skip = _str_list(items[4], "skip") if len(items) >= 5 else []
            return EmitMessage(_str(items[2], "origin"), "", [], skip, _packet(items[3]),
                               channel_room=True,
                               trace=_trace(items[5]) if len(items) == 6 else None)
        if kind == EMIT_TO_SID and len(items) == 8:
            _, _, origin, ns, sid, event, args, ack_id = items
            if not isinstance(args, list):
                raise EnvelopeError("args must be a list")
            return EmitToSidMessage(
                _str(origin, "origin"), _str(ns, "namespace"), _str(sid, "sid"),
                _str(event, "event"), args, None if ack_id is None else _int(ack_id, "ack id"),
            )
        if kind == ACK and len(items) == 6:
            _, _, origin, sid, ack_id, args = items
            if not isinstance(args, list):
                raise EnvelopeError("args must be a list")
            return AckMessage(_str(origin, "origin"), _str(sid, "sid"), _int(ack_id, "ack id"),
                              args)
        if kind == CLUSTER and len(items) == 6:
            _, _, origin, op, req_id, body = items
            if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
                raise EnvelopeError("body must be a map with string keys")
            return ClusterMessage(_str(origin, "origin"), _str(op, "op"),
                                  _opt_str(req_id, "request id"), body)
        if kind in (ENTER_ROOM, LEAVE_ROOM, DISCONNECT, CLOSE_ROOM) and len(items) == 6:
            _, _, origin, ns, sid, room = items
            msg = RoomMessage(kind, _str(origin, "origin"), _str(ns, "namespace"),
                              _opt_str(sid, "sid"), _opt_str(room, "room"))
            if kind != CLOSE_ROOM and msg.sid is None:
                raise EnvelopeError("sid is required")
            if kind != DISCONNECT and msg.room is None:
                raise EnvelopeError("room is required")
            return msg
    except (TypeError, ValueError) as exc:
        if isinstance(exc, EnvelopeError):
            raise
        raise EnvelopeError(str(exc)) from None
    raise EnvelopeError(f"unknown message kind {kind!r} with {len(items)} items")


# -- the cluster protocol's bodies ------------------------------------------------------
#
# A ClusterMessage carries its operation as a string and its arguments as a map, as
# they travel. decode_call turns the pair into one of the typed bodies below (and is
# the one place a body is checked); encode_call turns a typed body back into the
# envelope. Each body names its operation in ``OP``.


class ClusterOp(StrEnum):
    """The operations of the cluster protocol (``ClusterMessage.op``)."""

    HELLO = "hello"
    HEARTBEAT = "heartbeat"
    BYE = "bye"
    REPLY = "reply"
    BCAST_COUNT = "bcast_count"
    BCAST_ACK = "bcast_ack"
    FETCH = "fetch"
    JOIN = "join"
    LEAVE = "leave"
    DISCONNECT = "disconnect"
    SERVER_EMIT = "server_emit"
    BCAST = "bcast"
    ADOPT = "adopt"
    DISOWN = "disown"
    RELEASE = "release"
    MOVE_TAKE = "move_take"
    MOVE_COMMIT = "move_commit"
    MOVE_ABORT = "move_abort"
    MOVED = "moved"
    MOVED_PACKETS = "moved_packets"


#: the most rooms or sids a selection (``rooms``, ``except``) may name
MAX_SELECTION = 10_000
#: the most rooms a join or leave may name
MAX_TARGETS = 1_000


@dataclass(frozen=True, slots=True)
class Hello:
    """A node started or reconnected; ``info``: name, host, pid, start time."""

    OP: ClassVar[ClusterOp] = ClusterOp.HELLO
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A node is alive (also the answer to a hello)."""

    OP: ClassVar[ClusterOp] = ClusterOp.HEARTBEAT
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Bye:
    """A node is closing: stop waiting for it."""

    OP: ClassVar[ClusterOp] = ClusterOp.BYE
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reply:
    """(A part of) a node's answer to a request; ``last`` False: more parts follow."""

    OP: ClassVar[ClusterOp] = ClusterOp.REPLY
    data: Any
    last: bool = True


@dataclass(frozen=True, slots=True)
class BcastCount:
    """How many local sockets an acked broadcast went to on the answering node."""

    OP: ClassVar[ClusterOp] = ClusterOp.BCAST_COUNT
    n: int


@dataclass(frozen=True, slots=True)
class BcastAck:
    """One recipient's ack of an acked broadcast (``args`` None: it went away)."""

    OP: ClassVar[ClusterOp] = ClusterOp.BCAST_ACK
    sid: str
    args: list[Any] | None


FetchFormat: TypeAlias = Literal["full", "ids", "count"]


@dataclass(frozen=True, slots=True)
class Selection:
    """The sockets of namespace ``ns`` in any of ``rooms`` (rooms or sids; None: all)
    and in none of ``except_``: what fetch, join, leave, disconnect and an acked
    broadcast act on. On the wire its three keys sit in the body beside the others."""

    ns: str
    rooms: list[str] | None = None
    except_: list[str] | None = None

    def wire(self) -> dict[str, Any]:
        return {"ns": self.ns, "rooms": self.rooms, "except": self.except_}


@dataclass(frozen=True, slots=True)
class Fetch:
    """The sockets of a selection: described (``full``), their sids, or how many."""

    OP: ClassVar[ClusterOp] = ClusterOp.FETCH
    sel: Selection
    fmt: FetchFormat


@dataclass(frozen=True, slots=True)
class Join:
    """Put the selected sockets in ``targets``."""

    OP: ClassVar[ClusterOp] = ClusterOp.JOIN
    sel: Selection
    targets: list[str]


@dataclass(frozen=True, slots=True)
class Leave:
    """Take the selected sockets out of ``targets``."""

    OP: ClassVar[ClusterOp] = ClusterOp.LEAVE
    sel: Selection
    targets: list[str]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Disconnect the selected sockets (``close``: their engine.io connection too)."""

    OP: ClassVar[ClusterOp] = ClusterOp.DISCONNECT
    sel: Selection
    close: bool = False


@dataclass(frozen=True, slots=True)
class ServerEmit:
    """Run the server-side handler of ``event`` with ``args``."""

    OP: ClassVar[ClusterOp] = ClusterOp.SERVER_EMIT
    ns: str
    event: str
    args: list[Any]


@dataclass(frozen=True, slots=True)
class Bcast:
    """An acked broadcast to the selected sockets."""

    OP: ClassVar[ClusterOp] = ClusterOp.BCAST
    sel: Selection
    event: str
    args: list[Any]


@dataclass(frozen=True, slots=True)
class Adopt:
    """The sender restored ``sid`` (connection state recovery): it lives there now."""

    OP: ClassVar[ClusterOp] = ClusterOp.ADOPT
    sid: str


@dataclass(frozen=True, slots=True)
class Disown:
    """The sender no longer has the adopted ``sid``."""

    OP: ClassVar[ClusterOp] = ClusterOp.DISOWN
    sid: str


@dataclass(frozen=True, slots=True)
class Release:
    """Drop the connection of ``sid`` still here: another node restores its session."""

    OP: ClassVar[ClusterOp] = ClusterOp.RELEASE
    sid: str
    ns: str


@dataclass(frozen=True, slots=True)
class MoveStep:
    """A step of moving the engine.io session ``eio_sid`` to the sender
    (:mod:`nats_adapter.handover`): ``op`` is MOVE_TAKE (ask for its state, and hold
    its traffic), MOVE_COMMIT (the sender receives its rooms' traffic now: hand it
    over) or MOVE_ABORT (keep it)."""

    op: ClusterOp
    eio_sid: str

    @property
    def OP(self) -> ClusterOp:  # the name every body has
        return self.op


@dataclass(frozen=True, slots=True)
class Moved:
    """The sids of a session the sender took over live there now; ``gone``: they
    disconnected there (their own node has them again, if anyone), and with
    ``eio_sid``, the engine.io session they were of ended there."""

    OP: ClassVar[ClusterOp] = ClusterOp.MOVED
    sids: list[str]
    gone: bool = False
    eio_sid: str = ""


@dataclass(frozen=True, slots=True)
class MovedPackets:
    """Socket.IO packets the sender's server sent to a session after it moved to the
    receiver (an ack of a handler that was still running), encoded."""

    OP: ClassVar[ClusterOp] = ClusterOp.MOVED_PACKETS
    eio_sid: str
    packets: list[Any]


ClusterBody: TypeAlias = (Hello | Heartbeat | Bye | Reply | BcastCount | BcastAck | Fetch
                          | Join | Leave | Disconnect | ServerEmit | Bcast | Adopt | Disown
                          | Release | MoveStep | Moved | MovedPackets)

#: the MoveStep operations
MOVE_STEPS = frozenset((ClusterOp.MOVE_TAKE, ClusterOp.MOVE_COMMIT, ClusterOp.MOVE_ABORT))


def encode_call(origin: str, req_id: str | None, body: ClusterBody) -> ClusterMessage:
    """The envelope that carries ``body``."""
    data: dict[str, Any]
    if isinstance(body, (Hello, Heartbeat, Bye)):
        data = body.info
    elif isinstance(body, Reply):
        data = {"data": body.data, "last": body.last}
    elif isinstance(body, BcastCount):
        data = {"data": {"n": body.n}, "last": True}
    elif isinstance(body, BcastAck):
        data = {"data": {"sid": body.sid, "args": body.args}, "last": True}
    elif isinstance(body, Fetch):
        data = {**body.sel.wire(), "fmt": body.fmt}
    elif isinstance(body, (Join, Leave)):
        data = {**body.sel.wire(), "targets": body.targets}
    elif isinstance(body, Disconnect):
        data = {**body.sel.wire(), "close": body.close}
    elif isinstance(body, ServerEmit):
        data = {"ns": body.ns, "event": body.event, "args": body.args}
    elif isinstance(body, Bcast):
        data = {**body.sel.wire(), "event": body.event, "args": body.args}
    elif isinstance(body, Release):
        data = {"sid": body.sid, "ns": body.ns}
    elif isinstance(body, MoveStep):
        data = {"eio_sid": body.eio_sid}
    elif isinstance(body, Moved):
        data = {"sids": body.sids, "gone": body.gone, "eio_sid": body.eio_sid}
    elif isinstance(body, MovedPackets):
        data = {"eio_sid": body.eio_sid, "packets": body.packets}
    else:
        data = {"sid": body.sid}
    return ClusterMessage(origin, body.OP.value, req_id, data)


def _sid(body: dict[str, Any], op: str) -> str:
    sid = body.get("sid")
    if not is_sid(sid):
        raise EnvelopeError(f"{op} needs a sid")
    return cast(str, sid)


def _ns(body: dict[str, Any]) -> str:
    ns = body.get("ns")
    if not isinstance(ns, str):
        raise EnvelopeError("namespace must be a string")
    return ns


def _selection(body: dict[str, Any], key: str, max_room_chars: int) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_SELECTION or not all(
            isinstance(r, str) and r and (len(r) <= max_room_chars or is_sid(r))
            for r in value):
        raise EnvelopeError(f"{key} must be a list of room names or sids")
    return value


def _decode_selection(body: dict[str, Any], max_room_chars: int) -> Selection:
    return Selection(_ns(body), _selection(body, "rooms", max_room_chars),
                     _selection(body, "except", max_room_chars))


def _event(body: dict[str, Any], op: str) -> tuple[str, list[Any]]:
    event, args = body.get("event"), body.get("args")
    if not isinstance(event, str) or not isinstance(args, list):
        raise EnvelopeError(f"{op} needs an event name and a list of arguments")
    return event, args


def _reply_data(body: dict[str, Any]) -> tuple[Any, bool]:
    return body.get("data"), body.get("last") is not False


def _decode_reply(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    data, last = _reply_data(body)
    return Reply(data, last)


def _decode_bcast_count(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    data, _ = _reply_data(body)
    n = data.get("n") if isinstance(data, dict) else None
    if not isinstance(n, int) or isinstance(n, bool):
        raise EnvelopeError("bcast_count needs a count")
    return BcastCount(n)


def _decode_bcast_ack(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    data, _ = _reply_data(body)
    if not isinstance(data, dict):
        raise EnvelopeError("bcast_ack needs a sid and its ack")
    sid, args = data.get("sid"), data.get("args")
    return BcastAck(sid if isinstance(sid, str) else "", args if isinstance(args, list) else None)


def _decode_fetch(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    sel = _decode_selection(body, max_room_chars)
    fmt = body.get("fmt")
    if fmt not in ("full", "ids", "count"):
        raise EnvelopeError("unknown fetch format")
    return Fetch(sel, fmt)


def _targets(body: dict[str, Any], max_room_chars: int) -> list[str]:
    targets = body.get("targets")
    if not isinstance(targets, list) or len(targets) > MAX_TARGETS or not all(
            isinstance(r, str) and r and len(r) <= max_room_chars and not is_sid(r)
            for r in targets):
        raise EnvelopeError("targets must be a list of room names")
    return targets


def _decode_join(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    return Join(_decode_selection(body, max_room_chars), _targets(body, max_room_chars))


def _decode_leave(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    return Leave(_decode_selection(body, max_room_chars), _targets(body, max_room_chars))


def _decode_disconnect(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    return Disconnect(_decode_selection(body, max_room_chars), bool(body.get("close")))


def _decode_server_emit(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    ns = _ns(body)
    event, args = _event(body, "server_emit")
    return ServerEmit(ns, event, args)


def _decode_bcast(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    sel = _decode_selection(body, max_room_chars)
    event, args = _event(body, "bcast")
    return Bcast(sel, event, args)


def _eio_sid(body: dict[str, Any], op: str) -> str:
    eio_sid = body.get("eio_sid")
    if eio_sid_owner(eio_sid) is None:
        raise EnvelopeError(f"{op} needs an engine.io session id")
    return cast(str, eio_sid)


def _decode_move_step(op: ClusterOp) -> Callable[[dict[str, Any], int], ClusterBody]:
    return lambda body, _: MoveStep(op, _eio_sid(body, op.value))


def _decode_moved(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    sids = body.get("sids")
    if not isinstance(sids, list) or not sids or len(sids) > MAX_TARGETS \
            or not all(is_sid(s) for s in sids):
        raise EnvelopeError("moved needs a list of sids")
    eio_sid = body.get("eio_sid", "")
    if eio_sid != "" and eio_sid_owner(eio_sid) is None:
        raise EnvelopeError("moved names no engine.io session")
    return Moved(sids, body.get("gone") is True, cast(str, eio_sid))


def _decode_moved_packets(body: dict[str, Any], max_room_chars: int) -> ClusterBody:
    packets = body.get("packets")
    if not isinstance(packets, list) or not all(
            isinstance(p, (str, bytes)) for p in packets):
        raise EnvelopeError("moved_packets needs a list of encoded packets")
    return MovedPackets(_eio_sid(body, "moved_packets"), packets)


def _decoders() -> dict[str, Callable[[dict[str, Any], int], ClusterBody]]:
    return {
        ClusterOp.HELLO: lambda body, _: Hello(body),
        ClusterOp.HEARTBEAT: lambda body, _: Heartbeat(body),
        ClusterOp.BYE: lambda body, _: Bye(body),
        ClusterOp.REPLY: _decode_reply,
        ClusterOp.BCAST_COUNT: _decode_bcast_count,
        ClusterOp.BCAST_ACK: _decode_bcast_ack,
        ClusterOp.FETCH: _decode_fetch,
        ClusterOp.JOIN: _decode_join,
        ClusterOp.LEAVE: _decode_leave,
        ClusterOp.DISCONNECT: _decode_disconnect,
        ClusterOp.SERVER_EMIT: _decode_server_emit,
        ClusterOp.BCAST: _decode_bcast,
        ClusterOp.ADOPT: lambda body, _: Adopt(_sid(body, "adopt")),
        ClusterOp.DISOWN: lambda body, _: Disown(_sid(body, "disown")),
        ClusterOp.RELEASE: lambda body, _: Release(_sid(body, "release"), _ns(body)),
        **{op: _decode_move_step(op) for op in MOVE_STEPS},
        ClusterOp.MOVED: _decode_moved,
        ClusterOp.MOVED_PACKETS: _decode_moved_packets,
    }


_DECODERS = _decoders()


def decode_call(msg: ClusterMessage, max_room_chars: int) -> ClusterBody:
    """The typed body of ``msg``; raises :class:`EnvelopeError` saying why it is not
    one a node could send (an unknown operation, a missing or ill-typed argument, a
    room name longer than ``max_room_chars``)."""
    decoder = _DECODERS.get(msg.op)
    if decoder is None:
        raise EnvelopeError(f"unknown cluster operation {msg.op!r:.40}")
    return decoder(msg.body, max_room_chars)
