"""Websocket bytes the server writes itself: frames and the handshake's answer.

Only what a server sends (unmasked frames, the 101 answer) and the one frame it
reads without a parser (an idle client's PONG); everything else a client sends is
read by wsproto.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from wsproto.utilities import generate_accept_token

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


def frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, final websocket frame (server to client)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def text_frame(payload: bytes) -> bytes:
    """An unmasked, final websocket text frame (server to client)."""
    return frame(TEXT, payload)


def close_frame(code: int) -> bytes:
    """A close frame with ``code`` and no reason."""
    return frame(CLOSE, int(code).to_bytes(2, "big"))


#: engine.io's PING, and its answer to an upgrade's probe
PING_FRAME = text_frame(b"2")
PROBE_FRAME = text_frame(b"3probe")


def is_pong(data: bytes) -> bool:
    """Whether ``data`` is exactly one masked client frame carrying engine.io's PONG
    (``"3"``): an idle socket's only traffic, read without a parser."""
    return (len(data) == 7 and data[0] == 0x81 and data[1] == 0x81
            and data[6] ^ data[2] == 0x33)


def accept_key(method: str, headers: Mapping[str, str]) -> bytes | None:
    """The Sec-WebSocket-Accept value for a valid websocket handshake, else None."""
    if method != "GET" or headers.get("Upgrade", "").lower() != "websocket":
        return None
    if "upgrade" not in {t.strip().lower() for t in headers.get("Connection", "").split(",")}:
        return None
    if headers.get("Sec-WebSocket-Version") != "13":
        return None
    key = headers.get("Sec-WebSocket-Key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    return generate_accept_token(key.encode())


def switching_protocols(accept: bytes) -> bytes:
    """The handshake's answer (no extension: permessage-deflate is never agreed)."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
