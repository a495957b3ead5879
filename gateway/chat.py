"""The chat event protocol of the spec: ``join``, ``leave``, ``chat``.

Every request is answered with an ack, ``{"ok": true, ...}`` or
``{"ok": false, "error": "<reason>"}``. Handlers take ``*args`` so that any
argument count a client sends is answered, never raised on.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from typing import Any

import socketio

from nats_adapter import is_sid

from .config import Limits
from .types import GatewayManager

logger = logging.getLogger(__name__)

Ack = dict[str, Any]


def refuse(reason: str) -> Ack:
    return {"ok": False, "error": reason}


_JSON_TYPES = {dict: "object", list: "array", type(None): "null", bool: "boolean", int: "number",
               float: "number", str: "string", bytes: "binary"}


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages clients understand."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


class ChatProtocol:
    """Registers the chat events on ``sio`` and enforces ``limits``."""

    def __init__(self, sio: socketio.AsyncServer, manager: GatewayManager, limits: Limits) -> None:
        self.sio = sio
        self.manager = manager
        self.limits = limits
        #: refused requests by reason (exported as a metric)
        self.refused: Counter[str] = Counter()
        self.chats = 0
        sio.on("connect", self.on_connect)
        sio.on("join", self.on_join)
        sio.on("leave", self.on_leave)
        sio.on("chat", self.on_chat)
        sio.on("*", self.on_unknown)

    def _refuse(self, kind: str, reason: str) -> Ack:
        self.refused[kind] += 1
        return refuse(reason)

    def _room_error(self, args: tuple[Any, ...]) -> tuple[str | None, str | None]:
        """(room, None) when ``args`` is exactly one valid room name, else (None, reason)."""
        if len(args) != 1:
            return None, f"expected one argument, the room name; got {len(args)}"
        return self._check_room(args[0])

    def _check_room(self, room: Any) -> tuple[str | None, str | None]:
        if not isinstance(room, str):
            return None, f"room must be a string, not {json_type(room)}"
        if not room:
            return None, "room must not be empty"
        if len(room) > self.limits.max_room_chars:
            return None, f"room name longer than {self.limits.max_room_chars} characters"
        if is_sid(room):
            return None, "room name is reserved (it has the shape of a socket id)"
        return room, None

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        return None

    async def on_join(self, sid: str, *args: Any) -> Ack:
        room, error = self._room_error(args)
        if room is None:
            return self._refuse("bad_request", error or "bad request")
        joined = self.manager.get_rooms(sid, "/")
        if room not in joined and len(joined) >= self.limits.max_rooms_per_socket:
            return self._refuse(
                "too_many_rooms", f"too many rooms (at most {self.limits.max_rooms_per_socket})"
            )
        await self.sio.enter_room(sid, room)
        return {"ok": True, "room": room}

    async def on_leave(self, sid: str, *args: Any) -> Ack:
        room, error = self._room_error(args)
        if room is None:
            return self._refuse("bad_request", error or "bad request")
        await self.sio.leave_room(sid, room)
        return {"ok": True, "room": room}

    async def on_chat(self, sid: str, *args: Any) -> Ack:
        if len(args) != 1 or not isinstance(args[0], dict):
            return self._refuse("bad_request", 'chat takes one object: {"room": str, "text": str}')
        body: dict[str, Any] = args[0]
        room, error = self._check_room(body.get("room"))
        if room is None:
            return self._refuse("bad_request", error or "bad request")
        text = body.get("text")
        if not isinstance(text, str):
            return self._refuse("bad_request", f"text must be a string, not {json_type(text)}")
        if len(text.encode("utf-8", "surrogatepass")) > self.limits.max_text_bytes:
            return self._refuse(
                "too_large", f"text longer than {self.limits.max_text_bytes} bytes"
            )
        if room not in self.manager.get_rooms(sid, "/"):
            return self._refuse("not_member", f"not a member of room {room!r}; join it first")
        msg_id = secrets.token_hex(8)
        message = {"room": room, "text": text, "from": sid, "id": msg_id,
                   "ts": int(time.time() * 1000)}
        await self.sio.emit("chat", message, to=room, skip_sid=sid)
        self.chats += 1
        return {"ok": True, "id": msg_id}

    async def on_unknown(self, event: Any, sid: str, *args: Any) -> Ack:
        return self._refuse("unknown_event", f"unknown event {event!r}")
