"""Websocket bytes the server writes itself: frames and the handshake's answer.

Only what a server sends (unmasked frames, the 101 answer) and the frames it
reads without a parser (an idle client's PONG, a one-frame text message); everything
else a client sends is read by wsproto.
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


def read_text_frame(data: bytes, start: int, limit: int) -> tuple[str, int] | None:
    """The text of the one-frame text message a client's ``data`` holds at ``start``,
    and where the next frame begins; None when that frame is anything else (a
    fragment, a control or binary frame, a reserved bit, a payload past ``limit``
    bytes or of invalid UTF-8), or incomplete, for wsproto to read (and answer as
    the protocol says).

    A chat's frame through wsproto costs a parser and ~15 us of Python; this reads
    the common case (a masked, final text frame up to 64 KB) in ~2 us."""
    end = len(data)
    if end - start < 6 or data[start] != 0x81:  # FIN, no reserved bit, text
        return None
    n = data[start + 1] ^ 0x80  # the mask bit must be set: a client's frame
    head = start + 2
    if n == 126:
        if end - start < 8:
            return None
        n = (data[head] << 8) | data[head + 1]
        if n < 126:  # not the shortest encoding: wsproto refuses it
            return None
        head += 2
    elif n > 125:  # unmasked, or a 64-bit length
        return None
    body = head + 4
    stop = body + n
    if n > limit or stop > end:
        return None
    mask = data[head:body]
    key = (mask * ((n >> 2) + 1))[:n]
    payload = (int.from_bytes(data[body:stop], "little")
               ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    try:
        return payload.decode("utf-8"), stop
    except UnicodeDecodeError:
        return None


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
