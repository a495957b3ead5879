"""The HTTP API for backend services: ``POST /api/rooms/{room}/messages`` publishes a
chat message, ``GET /api/rooms/{room}`` tells who is in a room across the cluster.

What a publish request must be, in the order it is checked (each refusal is a 4xx with a
JSON reason, counted under ``gateway_requests_refused_total``):

- ``Authorization: Bearer <GATEWAY_API_KEY>`` whenever a key is set (401); with
  JWT auth on and no key, the API is closed. A client address that sent
  ``KEY_FAILURE_BURST`` wrong keys gets 429 for everything until its budget refills
  (one more try per ``1 / KEY_FAILURE_RATE`` seconds): keys cannot be guessed at speed.
  The budget is :class:`gateway.guards.ApiKey`'s, shared with the operator endpoints.
- at most ``--api-rate`` requests per second per client address (429).
- ``Content-Type: application/json`` in UTF-8 (415): browsers cannot send that
  cross-site without a CORS preflight, which the gateway does not grant.
- a body that arrives within ``--body-timeout`` seconds (408) and fits
  ``--max-message-bytes`` (413).
- a JSON object with ``text`` and an optional ``from`` that is a plain name, never
  a socket id, so an API message cannot pass for a client's (400).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from nats_adapter import BrokerError, BrokerUnconfirmed, is_sid
from nats_adapter.cluster import ClusterTimeoutError
from nats_adapter.recovery import MAX_HISTORY

from .chat import ChatProtocol, json_type, utf8_problem
from .config import GatewayConfig
from .guards import ApiKey
from .limits import MAX_ADDRESSES, RateLimiter, client_key


class HttpApi:
    def __init__(self, chat: ChatProtocol, config: GatewayConfig,
                 api_key: ApiKey | None = None) -> None:
        self.chat = chat
        self.key = config.secrets.api_key.encode()
        #: the key check the request guard uses too (one failure budget per address)
        self.api_key = api_key if api_key is not None else ApiKey(config.secrets.api_key)
        self.closed = config.auth == "jwt" and not self.key
        self.limiter = RateLimiter(config.limits.api_rate, config.limits.api_burst,
                                   MAX_ADDRESSES)
        self.body_timeout = config.limits.body_timeout
        #: GET /api/rooms/{room} needs the key too (JWT auth: no anonymous reads)
        self.room_needs_key = config.auth == "jwt"

    def _refuse(self, reason: str, message: str, status: int) -> web.Response:
        self.chat.refused[reason] += 1
        return web.json_response({"ok": False, "error": message}, status=status)

    def _check_key(self, request: web.Request) -> web.Response | None:
        """None when the request may go on; else the refusal: 429 while its address is
        out of key attempts (whatever the key: a right guess must not show), 401."""
        checked = self.api_key.check(request)
        if checked == "limited":
            self.chat.refused["rate_limited"] += 1
            return self.api_key.refusal()
        if not self.closed and (not self.key or checked == "right"):
            return None
        return self._refuse("unauthenticated",
                            "unauthorized: send Authorization: Bearer <API key>", 401)

    async def publish(self, request: web.Request) -> web.Response:
        refusal = self._check_key(request)
        if refusal is not None:
            return refusal
        if not self.limiter.allow(client_key(request.remote or "?")):
            response = self._refuse("rate_limited", "rate limited: too many requests", 429)
            response.headers["Retry-After"] = "1"
            return response
        if request.content_type != "application/json":
            return self._refuse("bad_request", "Content-Type must be application/json", 415)
        if request.charset not in (None, "utf-8", "UTF-8"):
            return self._refuse("bad_request", "the body must be UTF-8 JSON", 415)
        room, error = self.chat.check_room(request.match_info["room"])
        if room is None:
            return self._bad(error or "bad room")
        try:
            async with asyncio.timeout(self.body_timeout):
                raw = await request.read()
        except TimeoutError:
            return self._refuse("slow_request", f"the body took more than "
                                f"{self.body_timeout:g} s to arrive", 408)
        try:
            body: Any = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return self._bad("body must be JSON")
        if not isinstance(body, dict):
            return self._bad(f"body must be a JSON object, not {json_type(body)}")
        problem = self.chat.check_text(body.get("text"))
        if problem is not None:
            return self._bad(problem[1])
        sender = body.get("from", "api")
        if not isinstance(sender, str) or not 1 <= len(sender) <= 64:
            return self._bad("from must be a string of 1-64 characters")
        if is_sid(sender) or utf8_problem(sender):
            return self._bad("from must be a name, not a socket id or invalid text")
        try:
            msg_id = await self.chat.publish(room, body["text"], sender)
        except BrokerUnconfirmed as exc:  # published, but the broker did not say it took it
            return self._refuse("unconfirmed", "not confirmed (members may still get it): "
                                f"{exc}", 503)
        except BrokerError as exc:  # not published (or with --recovery, not stored): nobody got it
            return self._refuse("unavailable", f"not delivered: {exc}", 503)
        return web.json_response({"ok": True, "id": msg_id, "room": room}, status=202)

    async def room(self, request: web.Request) -> web.Response:
        """GET /api/rooms/{room}: the room's member count across the cluster, and with
        the API key, its members' sids. ``partial`` and ``missing`` say which gateways
        did not answer in time (the count then covers the others)."""
        keyed = False
        if self.room_needs_key or request.headers.get("Authorization"):
            refusal = self._check_key(request)
            if refusal is not None:
                return refusal
            keyed = bool(self.key)
        room, error = self.chat.check_room(request.match_info["room"])
        if room is None:
            return self._bad(error or "bad room")
        if not self.limiter.allow(client_key(request.remote or "?")):
            return self._refuse("rate_limited", "rate limited: too many requests", 429)
        manager: Any = self.chat.manager
        if not hasattr(manager, "room_size"):
            return self._refuse("bad_request", "this backend has no cluster-wide room size",
                                501)
        body: dict[str, Any] = {"ok": True, "room": room}
        try:
            if keyed:
                sockets = await manager.room_members(room)
                body.update(members=len(sockets), sockets=sockets)
            else:
                body["members"] = await manager.room_size(room)
        except ClusterTimeoutError as exc:
            partial = exc.responses
            if isinstance(partial, list):
                body.update(members=len(partial), sockets=partial)
            else:
                body["members"] = partial
            body.update(partial=True, missing=exc.missing)
        return web.json_response(body)

    async def messages(self, request: web.Request) -> web.Response:
        """GET /api/rooms/{room}/messages?limit=N: the room's last N chat messages,
        oldest first (with --recovery; the same key as publishing)."""
        refusal = self._check_key(request)
        if refusal is not None:
            return refusal
        if not self.limiter.allow(client_key(request.remote or "?")):
            return self._refuse("rate_limited", "rate limited: too many requests", 429)
        room, error = self.chat.check_room(request.match_info["room"])
        if room is None:
            return self._bad(error or "bad room")
        raw = request.query.get("limit", "50")
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_HISTORY:
            return self._bad(f"limit must be a number from 1 to {MAX_HISTORY}")
        recovery = getattr(self.chat.manager, "recovery", None)
        if recovery is None:
            return self._refuse("bad_request", "history is kept only with --recovery", 501)
        messages = await self.chat.history(room, int(raw))
        return web.json_response({"ok": True, "room": room, "messages": messages})

    def _bad(self, reason: str) -> web.Response:
        return self._refuse("bad_request", reason, 400)
