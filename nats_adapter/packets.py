"""Checks on encoded Socket.IO packets that arrive from other nodes.

A node relays an emit as the packet it encoded, so a receiving node can write the
same bytes to its sockets. Those bytes come from the broker, where anyone who can
publish could put anything: a DISCONNECT, an ack into another namespace, or text
a client cannot parse (socket.io-client closes the connection on a parse error).
:func:`is_event_packet` accepts exactly what ``socketio.packet.Packet.encode()``
produces for an emit without a callback.
"""

from __future__ import annotations

import json

from .types import EncodedPacket

_EVENT = "2"
_BINARY_EVENT = "5"


def is_event_packet(pkt: EncodedPacket, namespace: str) -> bool:
    """Whether ``pkt`` is an EVENT (or BINARY_EVENT with its attachments) of
    ``namespace``, with no ack id, whose data is a JSON array naming an event."""
    nsp = "" if namespace == "/" else f"{namespace},"
    if isinstance(pkt, str):
        head = _EVENT + nsp
        text = pkt
        if not text.startswith(head):
            return False
    else:
        if not pkt or not isinstance(pkt[0], str):
            return False
        text = pkt[0]
        attachments = len(pkt) - 1
        head = f"{_BINARY_EVENT}{attachments}-{nsp}"
        if attachments < 1 or not text.startswith(head) \
                or not all(isinstance(p, bytes) for p in pkt[1:]):
            return False
    body = text[len(head):]
    if not body.startswith("["):  # an ack id would come first
        return False
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(data, list) and bool(data) and isinstance(data[0], str)
