"""The edges' building blocks, in-process: bounded limiters, forwarded addresses,
secret lengths."""

from __future__ import annotations

import argparse

import pytest

from gateway import config as cfg
from gateway.config import GatewayConfig
from gateway.guards import RequestGuard
from gateway.limits import RateLimiter, client_key, is_loopback
from nats_adapter.admin import same_credentials


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


@pytest.mark.parametrize(("address", "key"), [
    ("198.51.100.7", "198.51.100.7"),
    ("198.51.100.7:5678", "198.51.100.7"),  # "ip:port" in X-Forwarded-For
    ("::ffff:198.51.100.7", "198.51.100.7"),  # IPv4-mapped IPv6
    ("[::ffff:198.51.100.7]:443", "198.51.100.7"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same /64
    ("[2001:db8:1:2::99]:443", "2001:db8:1:2::/64"),
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64: another client
    ("?", "?"),
    ("not an address", "not an address"),
])
def test_a_client_is_keyed_by_its_address_without_port_and_its_ipv6_slash_64(
        address: str, key: str) -> None:
    """Per-address limits keyed on the exact string: an IPv6 client rotated within its
    /64, a proxy's "ip:port" or an IPv4-mapped address counted as someone new."""
    assert client_key(address) == key


def test_one_loopback_test_for_names_and_addresses() -> None:
    """guards and chat had one each, which disagreed on "localhost"."""
    for host in ("localhost", "127.0.0.1", "127.9.9.9", "::1", "[::1]", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "198.51.100.7", "evil.example", "?", ""):
        assert not is_loopback(host), host


def test_the_client_is_the_rightmost_untrusted_forwarded_entry() -> None:
    guard = RequestGuard(GatewayConfig(trusted_proxies=("10.0.0.1", "10.0.0.2")))
    # what the client sent, then what the proxies appended
    assert guard.forwarded_client(["6.6.6.6, 198.51.100.7, 10.0.0.2"]) == "198.51.100.7"
    assert guard.forwarded_client(["1.1.1.1", "198.51.100.7"]) == "198.51.100.7"
    assert guard.forwarded_client(["10.0.0.1, 10.0.0.2"]) == "10.0.0.1"
    assert guard.forwarded_client([]) == ""


def test_trusted_proxies_may_be_networks() -> None:
    """A compose or cluster network's balancer has no fixed address: ``--trusted-proxies``
    takes networks too. The client stays the rightmost entry outside them, and the
    only one when the proxy set the header itself (compose's HAProxy drops what
    clients send), even a client on a private network."""
    guard = RequestGuard(GatewayConfig(trusted_proxies=("10.0.0.0/8", "fd00::/8", "192.0.2.9")))
    for proxy in ("10.89.0.5", "::ffff:10.89.0.5", "fd00::1", "192.0.2.9"):
        assert proxy in guard.proxies, proxy
    for other in ("11.0.0.1", "192.0.2.10", "fe80::1", "gateway", ""):
        assert other not in guard.proxies, other
    assert guard.forwarded_client(["6.6.6.6, 198.51.100.7, 10.89.0.5"]) == "198.51.100.7"
    assert guard.forwarded_client(["10.1.2.3"]) == "10.1.2.3"
    args = argparse.ArgumentParser()
    cfg.add_arguments(args)
    parsed = cfg.from_args(args.parse_args([]), env={
        "GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, 172.16.0.0/12,192.0.2.9"})
    assert parsed.trusted_proxies == ("10.0.0.0/8", "172.16.0.0/12", "192.0.2.9")
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.from_args(args.parse_args([]), env={"GATEWAY_TRUSTED_PROXIES": "10.0.0.0/33"})
    assert "GATEWAY_TRUSTED_PROXIES" in str(caught.value) and "10.0.0.0/33" in str(caught.value)


@pytest.mark.parametrize(("var", "value"), [
    ("GATEWAY_API_KEY", "short-key"),
    ("GATEWAY_ADMIN_PASSWORD", "hunter2"),
    ("GATEWAY_JWT_SECRET", "not-32-bytes-long"),
])
def test_short_secrets_are_refused_naming_the_variable(var: str, value: str) -> None:
    args = argparse.ArgumentParser()
    cfg.add_arguments(args)
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.from_args(args.parse_args([]), env={var: value})
    assert var in str(caught.value) and value not in str(caught.value)
    cfg.from_args(args.parse_args([]), env={var: value + "x" * 32})  # long enough


def test_the_node_id_is_the_host_name_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replicas of one compose service differ only in their host name (the container's
    id): with no GATEWAY_NODE_ID each takes it, so node ids are unique per replica."""
    args = argparse.ArgumentParser()
    cfg.add_arguments(args)
    monkeypatch.setattr(cfg.socket, "gethostname", lambda: "3f9c2a7d1e0b")
    assert cfg.from_args(args.parse_args([]), env={}).node_id == "3f9c2a7d1e0b"
    assert GatewayConfig().node_id == "3f9c2a7d1e0b"
    assert cfg.from_args(args.parse_args([]), env={"GATEWAY_NODE_ID": "gw-7"}).node_id == "gw-7"
    assert cfg.from_args(args.parse_args(["--node-id", "gw-8"]),
                         env={"GATEWAY_NODE_ID": "gw-7"}).node_id == "gw-8"
    monkeypatch.setattr(cfg.socket, "gethostname", lambda: "")
    assert cfg.from_args(args.parse_args([]), env={}).node_id == cfg.FALLBACK_NODE_ID
    monkeypatch.setattr(cfg.socket, "gethostname", lambda: "h" * 200)
    assert cfg.from_args(args.parse_args([]), env={}).node_id == "h" * 64


def test_admin_credentials_are_compared_whole() -> None:
    expected = {"username": "admin", "password": "correct horse battery"}
    assert same_credentials(dict(expected), expected)
    for given in ({"username": "admin", "password": "correct horse batterY"},
                  {"username": "admin"}, {**expected, "extra": 1}, "admin", None,
                  {"username": "admin", "password": 5}):
        assert not same_credentials(given, expected), given


def test_library_tracebacks_are_kept_once_a_minute() -> None:
    import logging
    import sys

    from gateway.cli import RareTracebacks

    quiet = RareTracebacks(interval=60.0)

    def record(msg: str) -> logging.LogRecord:
        try:
            raise ValueError("client input")
        except ValueError:
            info = sys.exc_info()
        return logging.LogRecord("engineio.server", logging.ERROR, __file__, 1, msg, None,
                                 info)

    assert quiet.filter(record("post request handler error"))
    assert not any(quiet.filter(record("post request handler error")) for _ in range(400))
    assert quiet.filter(record("message handler error"))  # another kind
    plain = logging.LogRecord("engineio.server", logging.ERROR, __file__, 1, "x", None, None)
    assert all(quiet.filter(plain) for _ in range(3))  # lines without a traceback pass
    quiet.interval = 0.0
    kept = record("post request handler error")
    assert quiet.filter(kept) and "400 more like it" in str(kept.msg)
