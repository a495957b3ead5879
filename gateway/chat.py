"""The chat event protocol of the spec: ``join``, ``leave``, ``chat``.

Every request is answered with an ack, ``{"ok": true, ...}`` or
``{"ok": false, "error": "<reason>"}``. Handlers take ``*args`` so that any
argument count a client sends is answered, never raised on.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import jwt
import socketio
from socketio.exceptions import ConnectionRefusedError as Refused

from nats_adapter import BrokerError, BrokerUnconfirmed, SubscriptionError, is_sid
from nats_adapter.recovery import MAX_HISTORY

from .auth_proxy import AuthProxy
from .config import GatewayConfig, Limits
from .latency import LatencyHistogram
from .limits import MAX_ADDRESSES, RateLimiter, client_key, is_loopback
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


def utf8_problem(text: str) -> bool:
    """Whether ``text`` cannot travel as UTF-8 (a lone surrogate, which JSON allows)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def shown(name: Any, limit: int = 32) -> str:
    """``name`` for an error message, cut short: a reply never echoes a client's
    input in full (that would let it make the node hold its data twice)."""
    text = name if isinstance(name, str) else json_type(name)
    return repr(text[:limit] + "..." if len(text) > limit else text)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows: its subject, the rooms it may join, and until when."""

    subject: str | None
    rooms: frozenset[str] | None  # None: no restriction by exact name
    prefixes: tuple[str, ...]
    #: the token's exp (seconds since the epoch)
    expires: float = float("inf")
    #: a second grant that must allow a room too (a token and the connect proxy)
    also: Grant | None = None

    def allows(self, room: str) -> bool:
        if self.also is not None and not self.also.allows(room):
            return False
        if self.rooms is None and not self.prefixes:
            return True
        return (self.rooms is not None and room in self.rooms) or room.startswith(self.prefixes)


@dataclass(frozen=True, slots=True)
class TokenRules:
    """How tokens are checked: the HS256 secret, clock leeway, required iss / aud."""

    secret: str
    leeway: float = 30.0
    issuer: str = ""
    audience: str = ""


def verify_token(token: Any, rules: TokenRules) -> Grant:
    """Check an HS256 JWT (``exp`` required) and read its room claims; raises
    ``Refused`` with the reason."""
    if not isinstance(token, str) or not token:
        raise Refused('authentication required: connect with auth {"token": "<JWT>"}')
    try:
        claims = jwt.decode(token, rules.secret, algorithms=["HS256"],
                            options={"require": ["exp"]}, leeway=rules.leeway,
                            issuer=rules.issuer or None, audience=rules.audience or None)
    except jwt.ExpiredSignatureError:
        raise Refused("authentication failed: token expired") from None
    except jwt.MissingRequiredClaimError as exc:
        raise Refused(f"authentication failed: token has no {exc.claim!r} claim") from None
    except jwt.InvalidIssuerError:
        raise Refused("authentication failed: wrong issuer") from None
    except jwt.InvalidAudienceError:
        raise Refused("authentication failed: wrong audience") from None
    except jwt.InvalidTokenError:
        raise Refused("authentication failed: invalid token") from None
    rooms, prefixes = claims.get("rooms"), claims.get("room_prefixes", [])
    for name, value in (("rooms", rooms), ("room_prefixes", prefixes)):
        if value is not None and not (isinstance(value, list)
                                      and all(isinstance(v, str) for v in value)):
            raise Refused(f"authentication failed: claim {name!r} must be a list of strings")
    subject = claims.get("sub")
    return Grant(subject if isinstance(subject, str) else None,
                 frozenset(rooms) if rooms is not None else None, tuple(prefixes or ()),
                 float(claims["exp"]) + rules.leeway)


#: session restores (--recovery) per second per client address, and the burst; each
#: takes message store look-ups
RESTORE_RATE, RESTORE_BURST = 0.5, 10
#: joins with history per second per client address, and the burst; each creates a
#: JetStream consumer
HISTORY_RATE, HISTORY_BURST = 2.0, 20


#: the environ key of a connection's client address (set at its engine.io connect)
REMOTE_KEY = "gateway.remote"

#: the longest display name a client may give in its CONNECT auth (characters)
MAX_NAME_CHARS = 32


def name_problem(name: Any) -> str | None:
    """Why ``name`` (CONNECT auth's ``name``) is not an acceptable display name, or None.
    A display name is what a client says it is called: shown beside its chats, never
    an identity (``from`` is the sid; ``user`` is what a token or the backend said)."""
    if not isinstance(name, str):
        return f"name must be a string, not {json_type(name)}"
    if not name.strip():
        return "name must not be empty"
    if len(name) > MAX_NAME_CHARS:
        return f"name longer than {MAX_NAME_CHARS} characters"
    if utf8_problem(name) or not name.isprintable():
        return "name must be printable text"
    return None


class ChatProtocol:
    """Registers the chat events on ``sio`` and enforces the configured limits and auth."""

    def __init__(self, sio: socketio.AsyncServer, manager: GatewayManager,
                 config: GatewayConfig) -> None:
        self.sio = sio
        self.manager = manager
        self.node_id = config.node_id
        self.limits: Limits = config.limits
        self.presence = config.presence
        self.confirm_publish = config.confirm_publish
        #: listening on loopback: loopback clients (the host's own) skip address limits
        self.loopback_host = is_loopback(config.host)
        self.tokens = TokenRules(config.secrets.jwt_secret, config.jwt_leeway,
                                 config.jwt_issuer, config.jwt_audience) \
            if config.auth == "jwt" else None
        #: refused requests by reason (exported as a metric)
        self.refused: Counter[str] = Counter()
        #: how long a chat's publish took until its ack could say ok (the broker's,
        #: or with --recovery the stream's, answer included)
        self.publish_seconds = LatencyHistogram()
        self.chats = 0
        self.chat_limiter = RateLimiter(self.limits.chat_rate, self.limits.chat_burst)
        self.join_limiter = RateLimiter(self.limits.join_rate, self.limits.join_burst)
        #: sid -> what its token, or the connect proxy, allows (only when auth is on)
        self.grants: dict[str, Grant] = {}
        #: the application's backend, asked who may connect and join (gateway/auth_proxy.py)
        self.proxy = AuthProxy(config.connect_proxy, config.join_proxy,
                               timeout=config.proxy_timeout, headers=config.proxy_headers,
                               cache_seconds=config.proxy_cache) \
            if config.connect_proxy or config.join_proxy else None
        #: sid -> the data the connect proxy attached to it
        self.data: dict[str, dict[str, Any]] = {}
        #: sid -> the display name its CONNECT auth gave (``name``)
        self.names: dict[str, str] = {}
        self.restore_limiter = RateLimiter(RESTORE_RATE, RESTORE_BURST, MAX_ADDRESSES)
        self.history_limiter = RateLimiter(HISTORY_RATE, HISTORY_BURST, MAX_ADDRESSES)
        #: engine.io sessions that have tried a restore (one try each)
        self.restore_tried: set[str] = set()
        recovery: Any = getattr(manager, "recovery", None)
        if recovery is not None:
            recovery.may_restore = self.may_restore
        #: sid -> the timer that ends its session when its token expires
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        sio.on("connect", self.on_connect)
        sio.on("refresh", self.on_refresh)
        sio.on("disconnect", self.on_disconnect)
        sio.on("join", self.on_join)
        sio.on("leave", self.on_leave)
        sio.on("chat", self.on_chat)
        sio.on("whoami", self.on_whoami)
        sio.on("*", self.on_unknown)

    def exempt(self, address: str) -> bool:
        """Whether ``address`` skips the per-address limits: the host's own, when the
        gateway listens on loopback."""
        return self.loopback_host and is_loopback(address)

    def _refuse(self, kind: str, reason: str) -> Ack:
        self.refused[kind] += 1
        return refuse(reason)

    def _room_error(self, args: tuple[Any, ...]) -> tuple[str | None, str | None]:
        """(room, None) when ``args`` is exactly one valid room name, else (None, reason)."""
        if len(args) != 1:
            return None, f"expected one argument, the room name; got {len(args)}"
        return self.check_room(args[0])

    def check_room(self, room: Any) -> tuple[str | None, str | None]:
        if not isinstance(room, str):
            return None, f"room must be a string, not {json_type(room)}"
        if not room:
            return None, "room must not be empty"
        if utf8_problem(room):
            return None, "room must be valid Unicode text (it holds a lone surrogate)"
        if len(room) > self.limits.max_room_chars:
            return None, f"room name longer than {self.limits.max_room_chars} characters"
        if is_sid(room):
            return None, "room name is reserved (it has the shape of a socket id)"
        return room, None

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        name = auth.get("name") if isinstance(auth, dict) else None
        if name is not None:
            problem = name_problem(name)
            if problem is not None:
                self.refused["bad_request"] += 1
                raise Refused(problem)
        grant: Grant | None = None
        if self.tokens is not None:
            token = auth.get("token") if isinstance(auth, dict) else None
            try:
                grant = verify_token(token, self.tokens)
            except Refused:
                self.refused["unauthenticated"] += 1
                raise
        if self.proxy is not None and self.proxy.connect_url:
            try:
                decision = await self.proxy.connect(auth, environ, self.address_of(environ),
                                                    "/")
            except Refused:
                self.refused["unauthorized"] += 1
                raise
            granted = Grant(decision.user if decision.user is not None
                            else grant.subject if grant is not None else None,
                            decision.rooms, decision.prefixes,
                            min(decision.expires, grant.expires if grant else float("inf")),
                            grant)
            grant = granted
            self.data[sid] = decision.data
        if name is not None:
            self.names[sid] = name
        if grant is None:
            return
        self.grants[sid] = grant
        self._expire_at(sid, grant.expires)
        # a restored session (--recovery) has its rooms back already: it keeps only
        # those this token grants
        await self._apply_grant(sid, grant)

    async def _apply_grant(self, sid: str, grant: Grant) -> list[str]:
        """Make ``sid`` leave the rooms ``grant`` does not allow; returns them, sorted."""
        lost = sorted(room for room in self.manager.get_rooms(sid, "/")
                      if room != sid and not is_sid(room) and not grant.allows(room))
        for room in lost:
            await self.sio.leave_room(sid, room)
            if self.presence:
                await self._announce(sid, room, "left")
        return lost

    def address_of(self, environ: Any) -> str:
        """The client address of a connection's environ (after the proxy rules)."""
        return str(environ.get(REMOTE_KEY, "?")) if isinstance(environ, dict) else "?"

    def may_restore(self, eio_sid: str) -> bool:
        """A restore attempt (--recovery): one per engine.io session, and per client
        address at most RESTORE_BURST, then one per 1 / RESTORE_RATE seconds."""
        if eio_sid in self.restore_tried:
            self.refused["rate_limited"] += 1
            return False
        self.restore_tried.add(eio_sid)
        address = self.address_of(self.sio.environ.get(eio_sid))
        if self.exempt(address) or self.restore_limiter.allow(client_key(address)):
            return True
        self.refused["rate_limited"] += 1
        return False

    def engine_closed(self, eio_sid: str) -> None:
        self.restore_tried.discard(eio_sid)

    async def on_disconnect(self, sid: str, reason: Any = None) -> None:
        if self.presence:  # the rooms are still there while this handler runs
            for room in self.manager.get_rooms(sid, "/"):
                await self._announce(sid, room, "left")
        self.forget_moved(sid, "/")

    def forget_moved(self, sid: str, namespace: str) -> None:
        """What this gateway kept for ``sid`` goes: it disconnected, or its session
        moved to another gateway (then without a disconnect)."""
        self.chat_limiter.forget(sid)
        self.join_limiter.forget(sid)
        self.grants.pop(sid, None)
        self.data.pop(sid, None)
        self.names.pop(sid, None)
        timer = self._expiry.pop(sid, None)
        if timer is not None:
            timer.cancel()

    def _expire_at(self, sid: str, when: float) -> None:
        """End ``sid``'s session when its token expires (wall-clock ``when``)."""
        old = self._expiry.pop(sid, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.time())
        self._expiry[sid] = loop.call_later(delay, self._on_expired, sid)

    def _on_expired(self, sid: str) -> None:
        self._expiry.pop(sid, None)
        task = asyncio.get_running_loop().create_task(self._end_expired(sid))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_expired(self, sid: str) -> None:
        self.refused["token_expired"] += 1
        # the client sees why, then a server-side disconnect (no automatic reconnect
        # with the same token, which would be refused anyway)
        await self.sio.emit("auth_error", {"error": "token expired: connect again with a "
                                           "fresh token, or send it with 'refresh' before "
                                           "expiry"}, to=sid)
        await self.sio.disconnect(sid)

    async def on_refresh(self, sid: str, *args: Any) -> Ack:
        """``refresh`` ({"token": JWT}): a fresh token for the same subject extends the
        session and replaces its room claims: the socket leaves the rooms the new token
        does not grant (the ack's ``left`` names them)."""
        if self.tokens is None:
            return self._refuse("bad_request", "refresh is only for --auth jwt")
        if not self.chat_limiter.allow(sid):
            return self._refuse("rate_limited", "rate limited: too many requests")
        token = args[0].get("token") if len(args) == 1 and isinstance(args[0], dict) else None
        try:
            grant = verify_token(token, self.tokens)
        except Refused as exc:
            return self._refuse("unauthenticated", str(exc.error_args["message"]))
        current = self.grants.get(sid)
        if current is None or grant.subject != current.subject:
            return self._refuse("forbidden", "forbidden: a refresh must keep the token's sub")
        self.grants[sid] = grant
        self._expire_at(sid, grant.expires)
        # a token that grants fewer rooms takes the others away now
        left = await self._apply_grant(sid, grant)
        return {"ok": True, "expires": int(grant.expires), "left": left}

    async def on_join(self, sid: str, *args: Any) -> Ack:
        if not self.join_limiter.allow(sid):
            return self._refuse("rate_limited", "rate limited: too many join requests")
        history = 0
        if len(args) == 1 and isinstance(args[0], dict):  # {"room": ..., "history": N}
            history = args[0].get("history", 0)
            if not isinstance(history, int) or isinstance(history, bool) \
                    or not 0 <= history <= MAX_HISTORY:
                return self._refuse("bad_request",
                                    f"history must be a number from 0 to {MAX_HISTORY}")
            args = (args[0].get("room"),)
            if not isinstance(args[0], str):
                return self._refuse(
                    "bad_request", f"room must be a string, not {json_type(args[0])} (join "
                    'takes a room name, or {"room": <name>, "history": <count>})')
        room, error = self._room_error(args)
        if room is None:
            return self._refuse("bad_request", error or "bad request")
        grant = self.grants.get(sid)
        if grant is not None and not grant.allows(room):
            return self._refuse("forbidden", f"forbidden: your token does not allow room {room!r}")
        if self.proxy is not None and self.proxy.join_url:
            reason = await self.proxy.may_join(grant.subject if grant else None, sid, room)
            if reason is not None:
                return self._refuse("forbidden", f"forbidden: {reason}")
        recovery = getattr(self.manager, "recovery", None)
        if history and recovery is not None:
            address = self.address_of(self.sio.get_environ(sid))
            if not self.exempt(address) \
                    and not self.history_limiter.allow(client_key(address)):
                return self._refuse("rate_limited",
                                    "rate limited: too many history reads from your address")
        joined = self.manager.get_rooms(sid, "/")
        if room not in joined and len(joined) >= self.limits.max_rooms_per_socket:
            return self._refuse(
                "too_many_rooms", f"too many rooms (at most {self.limits.max_rooms_per_socket})"
            )
        was_member = room in joined
        try:
            await self.sio.enter_room(sid, room)
        except SubscriptionError as exc:
            # the node could not start receiving the room: say so rather than ack a
            # join that would get nothing from the other nodes
            return self._refuse("unavailable", f"room unavailable: {exc}")
        if self.presence and not was_member:
            await self._announce(sid, room, "joined")
        ack: Ack = {"ok": True, "room": room}
        if history and getattr(self.manager, "recovery", None) is not None:
            ack["history"] = await self.history(room, history)
        return ack

    async def history(self, room: str, limit: int) -> list[Any]:
        """The room's last ``limit`` chat messages, oldest first (with --recovery)."""
        recovery: Any = getattr(self.manager, "recovery", None)
        events = await recovery.room_history(room, limit)
        return [args[0] for event, args, _offset in events
                if event == "chat" and args and isinstance(args[0], dict)]

    async def _announce(self, sid: str, room: str, change: str) -> None:
        """Tell the room's other members, on every node, that ``sid`` joined or left."""
        grant = self.grants.get(sid)
        event: dict[str, Any] = {"room": room, "sid": sid, "change": change}
        if grant is not None and grant.subject is not None:
            event["user"] = grant.subject
        try:
            await self.sio.emit("presence", event, to=room, skip_sid=sid)
        except BrokerError as exc:  # the join or leave itself happened; only the notice failed
            logger.warning("presence notice for room %r not sent: %s", room, exc)

    async def on_leave(self, sid: str, *args: Any) -> Ack:
        # never rate limited: leaving adds no load, and refusing it would keep a client
        # receiving a room it asked to stop
        room, error = self._room_error(args)
        if room is None:
            return self._refuse("bad_request", error or "bad request")
        was_member = room in self.manager.get_rooms(sid, "/")
        await self.sio.leave_room(sid, room)
        if self.presence and was_member:
            await self._announce(sid, room, "left")
        return {"ok": True, "room": room}

    async def on_chat(self, sid: str, *args: Any) -> Ack:
        if not self.chat_limiter.allow(sid):
            return self._refuse("rate_limited", "rate limited: too many chat messages")
        if len(args) != 1 or not isinstance(args[0], dict):
            return self._refuse("bad_request", 'chat takes one object: {"room": str, "text": str}')
        body: dict[str, Any] = args[0]
        room, error = self.check_room(body.get("room"))
        if room is None:
            return self._refuse("bad_request", error or "bad request")
        text: str = body.get("text")  # type: ignore[assignment]  # checked next
        problem = self.check_text(text)
        if problem is not None:
            return self._refuse(*problem)
        grant = self.grants.get(sid)
        if grant is not None and not grant.allows(room):
            return self._refuse("forbidden", f"forbidden: your token does not allow room {room!r}")
        if room not in self.manager.get_rooms(sid, "/"):
            return self._refuse("not_member", f"not a member of room {room!r}; join it first")
        user = grant.subject if grant is not None else None
        started = time.perf_counter()
        try:
            msg_id = await self.publish(room, text, sid, user, skip_sid=sid)
            self.publish_seconds.observe(time.perf_counter() - started)
        except BrokerUnconfirmed as exc:  # published, but the broker did not say it took it
            return self._refuse("unconfirmed", f"not confirmed (members may still get it): "
                                f"{exc}")
        except BrokerError as exc:  # not published (or with --recovery, not stored): nobody got it
            return self._refuse("unavailable", f"not delivered: {exc}")
        return {"ok": True, "id": msg_id}

    async def publish(self, room: str, text: str, sender: str, user: str | None = None,
                      skip_sid: str | None = None) -> str:
        """Emit a chat message to every member of ``room`` on every node; returns its id."""
        msg_id = secrets.token_hex(8)
        message: dict[str, Any] = {"room": room, "text": text, "from": sender, "id": msg_id,
                                   "ts": int(time.time() * 1000)}
        if user is not None:
            message["user"] = user
        name = self.names.get(sender)
        if name is not None:
            message["name"] = name
        await self.sio.emit("chat", message, to=room, skip_sid=skip_sid)
        if self.confirm_publish:  # what the ack then says: the broker read it
            await self.manager.confirm_published()
        self.chats += 1
        return msg_id

    def check_text(self, text: Any) -> tuple[str, str] | None:
        """(metric reason, message) when ``text`` is not an acceptable chat text, or None."""
        if not isinstance(text, str):
            return "bad_request", f"text must be a string, not {json_type(text)}"
        if utf8_problem(text):
            return "bad_request", "text must be valid Unicode text (it holds a lone surrogate)"
        if len(text.encode("utf-8")) > self.limits.max_text_bytes:
            return "too_large", f"text longer than {self.limits.max_text_bytes} bytes"
        return None

    async def on_whoami(self, sid: str, *args: Any) -> Ack:
        """``whoami``: the user this socket connected as, the data the connect proxy
        attached to it, its display name and the gateway it is connected to."""
        grant = self.grants.get(sid)
        return {"ok": True, "user": grant.subject if grant is not None else None,
                "data": self.data.get(sid, {}), "name": self.names.get(sid),
                "node": self.node_id}

    async def close(self) -> None:
        if self.proxy is not None:
            await self.proxy.close()

    async def on_unknown(self, event: Any, sid: str, *args: Any) -> Ack:
        # an unknown event costs a reply like a chat does: the same budget
        if not self.chat_limiter.allow(sid):
            return self._refuse("rate_limited", "rate limited: too many requests")
        return self._refuse("unknown_event", f"unknown event {shown(event)}")
