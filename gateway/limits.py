"""Per-address limits: the token buckets (:class:`RateLimiter`) and the key every
limit that is per client address uses (:func:`client_key`)."""

from __future__ import annotations

import ipaddress
import time

#: buckets a limiter keyed by client address keeps (each ~200 bytes)
MAX_ADDRESSES = 100_000


#: names of the host itself (besides the loopback addresses)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def is_loopback(address: str) -> bool:
    """Whether ``address`` (an address, ``[::1]``, or ``localhost``) is the host itself;
    an IPv4-mapped ``::ffff:127.0.0.1`` is."""
    if address in LOOPBACK_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def client_key(address: str) -> str:
    """The key a per-address limit counts ``address`` under, so that one client is one
    key: a port is dropped (``1.2.3.4:5678``, ``[2001:db8::1]:443``, as some proxies
    write X-Forwarded-For), an IPv4-mapped IPv6 address is its IPv4 address, and an
    IPv6 address is its /64 (a client gets a whole /64 and can rotate within it).
    Anything that is not an address is its own key."""
    text = address.strip()
    if text.startswith("["):
        text = text[1:].split("]", 1)[0]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class TrustedProxies:
    """The peers whose forwarding headers are believed (``--trusted-proxies``): exact
    addresses, and networks written with a prefix length (``10.0.0.0/8``, e.g. a
    compose or cluster network whose balancer's address is not known in advance).
    ``address in proxies`` is what the guard asks; an IPv4-mapped IPv6 address is
    its IPv4 address."""

    __slots__ = ("addresses", "networks")

    def __init__(self, entries: tuple[str, ...] | list[str]) -> None:
        self.addresses = frozenset(e for e in entries if "/" not in e)
        self.networks = tuple(ipaddress.ip_network(e, strict=False)
                              for e in entries if "/" in e)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        if address in self.addresses:
            return True
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(address.strip("[]"))
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)


class RateLimiter:
    """Token buckets per key (a socket, a client address): ``rate`` requests per
    second, bursts of ``burst``. With ``max_keys``, at most that many buckets are
    kept, the least recently used dropped first (a dropped bucket is a full one)."""

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: int, max_keys: int = 0) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            if self.max_keys and len(buckets) >= self.max_keys:
                del buckets[next(iter(buckets))]  # the least recently used
            buckets[key] = [self.burst - 1.0, now]
            return True
        if self.max_keys:  # most recently used last
            del buckets[key]
            buckets[key] = bucket
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def exhausted(self, key: str) -> bool:
        """Whether ``key`` has no request left now (without taking one)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return False
        return bucket[0] + (time.monotonic() - bucket[1]) * self.rate < 1.0

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)
