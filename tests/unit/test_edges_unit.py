"""The edges' building blocks, in-process: bounded limiters, forwarded addresses,
secret lengths."""

from __future__ import annotations

from gateway.chat import RateLimiter
from gateway.config import GatewayConfig
from gateway.guards import RequestGuard


def test_an_address_limiter_keeps_a_bounded_number_of_buckets() -> None:
    """One bucket per address forever let a spoofing client grow the node without
    bound; past max_keys the least recently used is dropped."""
    limiter = RateLimiter(1.0, 2, max_keys=100)
    for i in range(10_000):
        limiter.allow(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) == 100
    # a bucket in use stays: its address keeps its (spent) budget
    limiter = RateLimiter(0.001, 2, max_keys=3)
    assert limiter.allow("busy") and limiter.allow("busy")
    for other in ("a", "b", "c", "d"):
        assert limiter.allow("busy") is False
        limiter.allow(other)


def test_the_client_is_the_rightmost_untrusted_forwarded_entry() -> None:
    guard = RequestGuard(GatewayConfig(trusted_proxies=("10.0.0.1", "10.0.0.2")))
    # what the client sent, then what the proxies appended
    assert guard.forwarded_client(["6.6.6.6, 198.51.100.7, 10.0.0.2"]) == "198.51.100.7"
    assert guard.forwarded_client(["1.1.1.1", "198.51.100.7"]) == "198.51.100.7"
    assert guard.forwarded_client(["10.0.0.1, 10.0.0.2"]) == "10.0.0.1"
    assert guard.forwarded_client([]) == ""
