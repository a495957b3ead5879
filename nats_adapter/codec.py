"""The msgpack envelope that travels between nodes.

Every envelope is a msgpack array whose first two items are the format version
and the message kind; the rest depends on the kind (see the ``*Message`` types).
:func:`decode` accepts only well-formed envelopes of :data:`VERSION`; anything
else raises :class:`EnvelopeError` so the caller can log, count and drop it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import msgpack

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
CLUSTER = 8  # the cluster-wide server API: requests, replies, heartbeats (see cluster.py)
#: EMIT to the one room its channel names, which carries its namespace and room:
#: ``[VERSION, EMIT_ROOM, origin, packet]``, then ``skip`` if not empty. Nearly
#: every emit is one of these, and every byte is paid once per node it reaches:
#: ``origin`` is empty when nothing needs it (a broker that never hands a node its
#: own publications, and no cluster key).
EMIT_ROOM = 9

class EnvelopeError(ValueError):
    """A payload from the bus that is not a valid envelope of this version."""


@dataclass(frozen=True, slots=True)
class EmitMessage:
    """Deliver ``packet`` to local members of ``rooms`` (``None``: the namespace).

    ``rooms`` may name sids as well as rooms. ``dedupe_id`` is set when the same
    emit travels over more than one channel; a node delivers only its first copy.
    ``channel_room`` set: the emit is for the one room its channel names; it
    travels as :data:`EMIT_ROOM`, without ``namespace``, ``rooms`` and
    ``dedupe_id`` (:func:`decode` leaves the first two empty, for the receiver to
    fill in from the channel).
    """

    origin: str
    namespace: str
    rooms: list[str] | None
    skip: list[str]
    packet: EncodedPacket
    dedupe_id: str | None = None
    channel_room: bool = False


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

    ``op`` names it, ``req_id`` ties replies to their request (None for heartbeats
    and one-way operations), ``body`` holds its arguments: a map from string keys
    to msgpack values, checked by whoever handles ``op``.
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
        if msg.skip:
            items.append(msg.skip)
    elif isinstance(msg, EmitMessage):
        items = [
            VERSION, EMIT, msg.origin, msg.namespace, msg.rooms, msg.skip, msg.packet,
            msg.dedupe_id,
        ]
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
        raise EnvelopeError(f"unsupported envelope version {items[0]!r}")
    kind = items[1]
    try:
        if kind == EMIT and len(items) == 8:
            _, _, origin, ns, rooms, skip, pkt, dedupe = items
            return EmitMessage(
                _str(origin, "origin"), _str(ns, "namespace"),
                None if rooms is None else _str_list(rooms, "rooms"),
                _str_list(skip, "skip"), _packet(pkt), _opt_str(dedupe, "dedupe id"),
            )
        if kind == EMIT_ROOM and len(items) in (4, 5):
            skip = _str_list(items[4], "skip") if len(items) == 5 else []
            return EmitMessage(_str(items[2], "origin"), "", [], skip, _packet(items[3]),
                               channel_room=True)
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
