"""The application's own backend decides who may connect and what they may join.

``--connect-proxy URL``: on a Socket.IO CONNECT the gateway POSTs to the URL, as
JSON, what the application needs to recognise the client::

    {"auth": <the CONNECT's auth payload>, "headers": {<the headers it is told to
     forward, lower-case>}, "address": "<client address>", "namespace": "/"}

and the answer decides:

- ``200`` with ``{"user": "<id>", "rooms": [...], "room_prefixes": [...],
  "expires": <seconds since the epoch>, "data": {...}}`` (every key optional): the
  socket connects as that user, may join only those rooms (or rooms with those
  prefixes; neither key: any room), is disconnected at ``expires``, and carries
  ``data`` (sent back to it in ``whoami``);
- ``401`` or ``403`` with ``{"reason": "..."}``: refused; the client's
  ``connect_error`` says the reason;
- anything else, no answer within ``--proxy-timeout``, or the circuit open: refused
  ("authorization backend unavailable"), never let in unchecked.

``--join-proxy URL``: before each join, ``{"user", "sid", "room"}``; ``200``
allows it, ``401``/``403`` ``{"reason"}`` refuses it, anything else refuses it as
unavailable. Answers are kept ``--proxy-cache`` seconds per (user, room).

One aiohttp session keeps connections alive to the backend. A request that could
not reach it (connection refused or reset) is tried once more within the same
timeout. After :data:`BREAK_AFTER` such failures in a row the circuit opens: for
:data:`BREAK_FOR` seconds requests are refused at once instead of piling up on a
backend that is down; then one is let through to try.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from socketio.exceptions import ConnectionRefusedError as Refused

#: failures in a row that open the circuit, and how long it stays open (seconds)
BREAK_AFTER = 5
BREAK_FOR = 5.0
#: the most characters of a backend's reason a client is shown
MAX_REASON = 200
#: the most (user, room) answers the join cache holds
MAX_CACHED = 100_000


class Unavailable(Exception):
    """The backend did not give an answer that decides."""


@dataclass(frozen=True, slots=True)
class Decision:
    """What the connect proxy answered for a connection."""

    user: str | None
    rooms: frozenset[str] | None
    prefixes: tuple[str, ...]
    expires: float
    data: dict[str, Any]


@dataclass
class ProxyStats:
    """Per proxy (connect, join): requests by outcome, and the time they took."""

    outcomes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    answered: int = 0


def _reason(body: Any, default: str) -> str:
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        return default
    return reason.strip()[:MAX_REASON]


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Unavailable(f"{what} must be a list of strings")
    return value


def decision_of(body: Any) -> Decision:
    """The connect proxy's 200 answer, checked (:class:`Unavailable` if malformed)."""
    if not isinstance(body, dict):
        raise Unavailable("the answer is not a JSON object")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not 1 <= len(user) <= 256):
        raise Unavailable("user must be a string of 1-256 characters")
    rooms = body.get("rooms")
    prefixes = body.get("room_prefixes", [])
    expires = body.get("expires", float("inf"))
    data = body.get("data", {})
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise Unavailable("expires must be a number (seconds since the epoch)")
    if not isinstance(data, dict):
        raise Unavailable("data must be an object")
    return Decision(user, None if rooms is None else frozenset(_strings(rooms, "rooms")),
                    tuple(_strings(prefixes, "room_prefixes")), float(expires), data)


class AuthProxy:
    """The connect and join proxies of one gateway."""

    def __init__(self, connect_url: str, join_url: str, *, timeout: float = 1.0,
                 headers: tuple[str, ...] = ("cookie", "authorization"),
                 cache_seconds: float = 5.0) -> None:
        self.connect_url = connect_url
        self.join_url = join_url
        self.timeout = timeout
        self.headers = tuple(h.lower() for h in headers)
        self.cache_seconds = cache_seconds
        self.stats = {"connect": ProxyStats(), "join": ProxyStats()}
        self._session: aiohttp.ClientSession | None = None
        self._failures = 0
        self._open_until = 0.0
        self._joins: dict[tuple[str | None, str], tuple[float, str | None]] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, keepalive_timeout=30))
        return self._session

    async def _ask(self, kind: str, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        """POST ``body``; (status, JSON body or None). :class:`Unavailable` when the
        backend gave nothing that decides (counted by outcome)."""
        stats = self.stats[kind]
        now = time.monotonic()
        if now < self._open_until:
            stats.outcomes["circuit_open"] += 1
            raise Unavailable("the circuit is open after repeated failures")
        deadline = now + self.timeout
        tries = 2
        while True:
            tries -= 1
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())), \
                        self._client().post(url, json=body) as answer:
                    status = answer.status
                    try:
                        data = await answer.json(content_type=None)
                    except ValueError:
                        data = None
            except TimeoutError:
                self._failed(stats, "timeout")
                raise Unavailable(f"no answer within {self.timeout:g} s") from None
            except aiohttp.ClientConnectionError as exc:
                if tries and time.monotonic() < deadline:
                    continue  # refused or reset before an answer: once more
                self._failed(stats, "unreachable")
                raise Unavailable(f"unreachable: {exc}") from None
            break
        stats.seconds += time.monotonic() - now
        stats.answered += 1
        if status in (200, 401, 403):
            self._failures = 0
            stats.outcomes["allowed" if status == 200 else "refused"] += 1
            return status, data
        self._failed(stats, f"status_{status}")
        raise Unavailable(f"answered {status}")

    def _failed(self, stats: ProxyStats, outcome: str) -> None:
        stats.outcomes[outcome] += 1
        self._failures += 1
        if self._failures >= BREAK_AFTER:
            self._open_until = time.monotonic() + BREAK_FOR
            self._failures = 0

    async def connect(self, auth: Any, environ: dict[str, Any], address: str,
                      namespace: str) -> Decision:
        """Ask whether this connection may connect; raises ``ConnectionRefusedError``
        with the reason (the client's ``connect_error``) when not."""
        headers = {}
        for name in self.headers:
            value = environ.get("HTTP_" + name.upper().replace("-", "_"))
            if isinstance(value, str):
                headers[name] = value
        body = {"auth": auth if isinstance(auth, dict | list | str | int | float) else None,
                "headers": headers, "address": address, "namespace": namespace}
        try:
            status, answer = await self._ask("connect", self.connect_url, body)
            if status != 200:
                raise Refused(_reason(answer, "refused by the application"))
            return decision_of(answer)
        except Unavailable as exc:
            raise Refused(f"authorization backend unavailable ({exc})") from None

    async def may_join(self, user: str | None, sid: str, room: str) -> str | None:
        """None when ``user`` may join ``room``, else the reason it may not."""
        key = (user, room)
        cached = self._joins.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            self.stats["join"].outcomes["cached"] += 1
            return cached[1]
        try:
            status, answer = await self._ask("join", self.join_url,
                                             {"user": user, "sid": sid, "room": room})
        except Unavailable as exc:
            return f"authorization backend unavailable ({exc})"
        verdict = None if status == 200 else _reason(answer, "refused by the application")
        if len(self._joins) >= MAX_CACHED:
            self._joins.clear()
        self._joins[key] = (now + self.cache_seconds, verdict)
        return verdict
