"""What every HTTP request passes before it reaches a handler (Socket.IO included).

- The ``Host`` header must be one the gateway serves (``--allowed-hosts``). A
  gateway listening on a loopback address accepts only loopback names by default,
  which defeats DNS rebinding: a page on evil.example whose name resolves to
  127.0.0.1 would otherwise pass engine.io's same-origin check (it compares
  ``Origin`` with ``Host``, both evil.example).
- ``X-Forwarded-*`` and ``Forwarded`` headers are believed only from a configured
  reverse proxy (``--trusted-proxies``); from anyone else they are dropped before
  engine.io's same-origin check or the rate limits read them. The client address is
  the rightmost ``X-Forwarded-For`` entry that is not a trusted proxy.
- Operator endpoints (``/metrics``, the detailed ``/healthz``, the Admin UI) answer
  only an operator: a request that came in on the operator listener
  (``--admin-port``), or, when there is none, one from a loopback peer that nothing
  forwarded while the gateway listens on loopback (``--host``; listening elsewhere,
  a loopback peer may be a same-host proxy relaying anyone), or one with the API key.
  Others get ``404`` for ``/metrics`` and the minimal ``/healthz`` (:data:`OPERATOR`).
  Every key is checked by :class:`ApiKey`, the HTTP API's check too: wrong keys
  anywhere draw on one budget per address.
- New engine.io sessions are limited per client address (:class:`SessionsByAddress`):
  past the cap or the handshake rate, 429.
"""

from __future__ import annotations

import hmac
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDict

from .config import GatewayConfig
from .limits import (
    LOOPBACK_NAMES,
    MAX_ADDRESSES,
    RateLimiter,
    TrustedProxies,
    client_key,
    is_loopback,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

FORWARDED_HEADERS = ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded")
#: whether a request comes from an operator (see the module docstring)
OPERATOR = web.RequestKey("operator", bool)


def _host_name(host_header: str) -> str:
    """``example.com:8001`` -> ``example.com``; ``[::1]:8001`` -> ``[::1]``."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def opens_session(query_string: str) -> bool:
    """Whether engine.io takes a request with this query for a new session: it reads
    ``sid`` with :func:`urllib.parse.parse_qs`, which drops empty values, so ``?sid=``
    opens one (aiohttp's ``"sid" in request.query`` says it is there)."""
    return not urllib.parse.parse_qs(query_string).get("sid")


class SessionsByAddress:
    """Engine.io sessions per client address: at most ``cap`` open at once, and new
    ones (handshakes) at ``rate`` per second, bursts of ``burst``. Engine.io sessions
    are not TCP connections: over long-polling, thousands fit in a few of them, so
    ``--max-connections`` does not bound them. With ``exempt_loopback`` (the gateway
    listens on loopback), loopback addresses (the host itself: its operator, a local
    load test) are not limited."""

    def __init__(self, cap: int, rate: float, burst: int, exempt_loopback: bool = True) -> None:
        self.cap = cap
        self.exempt_loopback = exempt_loopback
        self.handshakes = RateLimiter(rate, burst, MAX_ADDRESSES)
        self.open: Counter[str] = Counter()
        self._address: dict[str, str] = {}

    def refuse_handshake(self, address: str) -> str | None:
        """Why a new session from ``address`` is refused now, or None."""
        if self.exempt_loopback and is_loopback(address):
            return None
        address = client_key(address)
        if self.cap and self.open[address] >= self.cap:
            return f"too many sessions from your address (at most {self.cap})"
        if not self.handshakes.allow(address):
            return "too many new sessions from your address: try again later"
        return None

    def opened(self, eio_sid: str, address: str) -> None:
        address = client_key(address)
        self._address[eio_sid] = address
        self.open[address] += 1

    def closed(self, eio_sid: str) -> None:
        address = self._address.pop(eio_sid, None)
        if address is None:
            return
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


#: wrong API keys a client address may send in a burst, and per second after it
KEY_FAILURE_BURST = 10
KEY_FAILURE_RATE = 0.2
#: what :meth:`ApiKey.check` made of a request's key
KEY_CHECK = web.RequestKey("api_key_check", str)


class ApiKey:
    """The one check of ``Authorization: Bearer <GATEWAY_API_KEY>``, for the HTTP API
    and the operator endpoints alike: a client address that sent ``KEY_FAILURE_BURST``
    wrong keys is out of attempts (429, whatever key it sends) until its budget
    refills, one more try per ``1 / KEY_FAILURE_RATE`` seconds."""

    def __init__(self, key: str) -> None:
        self.key = key.encode()
        self.failures = RateLimiter(KEY_FAILURE_RATE, KEY_FAILURE_BURST, MAX_ADDRESSES)

    def check(self, request: web.Request) -> str:
        """``"limited"`` (the address is out of attempts), ``"none"`` (no key set or
        none sent), ``"right"`` or ``"wrong"`` (counted against the address). Once per
        request: a second call answers the first one's result without counting."""
        if KEY_CHECK in request:
            return request[KEY_CHECK]
        address = client_key(request.remote or "?")
        header = request.headers.get("Authorization")
        if self.failures.exhausted(address):
            result = "limited"
        elif not self.key or header is None:
            result = "none"
        else:
            # header values may hold any bytes: compare bytes, in constant time
            given = header.encode("utf-8", "surrogateescape").removeprefix(b"Bearer ").strip()
            result = "right" if hmac.compare_digest(given, self.key) else "wrong"
            if result == "wrong":
                self.failures.allow(address)
        request[KEY_CHECK] = result
        return result

    @staticmethod
    def refusal() -> web.Response:
        return web.json_response(
            {"ok": False, "error": "rate limited: too many wrong API keys"}, status=429,
            headers={"Retry-After": str(round(1 / KEY_FAILURE_RATE))})


class RequestGuard:
    """The aiohttp middleware described in the module docstring."""

    def __init__(self, config: GatewayConfig) -> None:
        self.allowed = {h.lower() for h in config.allowed_hosts}
        #: no list given and listening on loopback: loopback names only
        #: listening on loopback: a loopback peer is the host's own (else it may be a
        #: same-host reverse proxy that forwards everyone, with or without headers)
        self.loopback_host = is_loopback(config.host)
        self.loopback_only = not self.allowed and self.loopback_host
        self.proxies = TrustedProxies(config.trusted_proxies)
        self.refused = 0
        self.admin_port = config.admin_port
        #: the API key check, shared with the HTTP API (one failure budget per address)
        self.api_key = ApiKey(config.secrets.api_key)
        limits = config.limits
        self.sessions = SessionsByAddress(limits.max_sessions_per_address,
                                          limits.handshake_rate, limits.handshake_burst,
                                          self.loopback_host)
        self.engineio_path = "/socket.io"
        #: refused requests by reason (the app points it at the chat protocol's)
        self.refusals: Counter[str] = Counter()

    def local_operator(self, request: web.Request) -> bool:
        """An operator by where the request came in: the operator listener, or (when
        there is none and the gateway listens on loopback) a loopback peer that nothing
        forwarded. Read before the forwarding headers are dropped."""
        transport = request.transport
        if transport is None:
            return False
        if self.admin_port:
            local = transport.get_extra_info("sockname")
            return isinstance(local, tuple) and local[1] == self.admin_port
        peer = transport.get_extra_info("peername")
        return self.loopback_host and peer is not None and is_loopback(str(peer[0])) \
            and not any(h in request.headers for h in FORWARDED_HEADERS)

    def host_allowed(self, host_header: str) -> bool:
        host = host_header.strip().lower()
        name = _host_name(host)
        if self.allowed:
            return host in self.allowed or name in self.allowed
        if self.loopback_only:
            return is_loopback(name.strip("[]")) or name in LOOPBACK_NAMES
        return True

    def forwarded_client(self, values: list[str]) -> str:
        """The client a trusted proxy forwarded for: the rightmost X-Forwarded-For entry
        that is not a trusted proxy (the entries left of it are whatever the client
        sent, so anyone could pick them); "" when there is none."""
        entries = [e.strip() for value in values for e in value.split(",") if e.strip()]
        for entry in reversed(entries):
            if entry not in self.proxies:
                return entry
        return entries[0] if entries else ""

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.host_allowed(request.headers.get("Host", "")):
            self.refused += 1
            return web.json_response(
                {"ok": False, "error": "misdirected request: this gateway does not serve "
                 "that host (see --allowed-hosts)"}, status=421)
        local_operator = self.local_operator(request)
        if any(h in request.headers for h in FORWARDED_HEADERS):
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer is not None and peer[0] in self.proxies:
                client = self.forwarded_client(request.headers.getall("X-Forwarded-For", []))
                if client:
                    request = request.clone(remote=client)
            else:
                headers = CIMultiDict(request.headers)
                for name in FORWARDED_HEADERS:
                    headers.popall(name, None)
                request = request.clone(headers=headers)
        keyed = False
        if "Authorization" in request.headers:
            checked = self.api_key.check(request)
            # Socket.IO clients may send a Bearer JWT: that does not lock them out,
            # it only makes them no operator
            if checked == "limited" and not request.path.startswith(self.engineio_path):
                self.refusals["rate_limited"] += 1
                return self.api_key.refusal()
            keyed = checked == "right" and not self.admin_port
        request[OPERATOR] = local_operator or keyed
        if request.path.startswith(self.engineio_path) and opens_session(request.query_string):
            problem = self.sessions.refuse_handshake(request.remote or "?")
            if problem is not None:
                self.refusals["rate_limited"] += 1
                return web.json_response({"ok": False, "error": problem}, status=429,
                                         headers={"Retry-After": "1"})
        return await handler(request)
