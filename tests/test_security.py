"""Authentication, room authorization, floods, slow consumers and the HTTP publish API.

Against ``python -m gateway serve`` processes on the session's NATS cluster.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import socketio

from gateway.processes import GatewayNode, free_ports, start_gateway, stop_all, wait_gateways
from tests.conftest import broker_args
from tests.helpers import (
    SETTLE,
    SioClient,
    connect_all,
    read_metric,
    tls_files,
    wait_for_condition,
    watching_interest,
)
from tests.test_edges import get

SECRET = "test-jwt-secret-4f0c2a9e7d-0123456789abcdef"
API_KEY = "test-api-key-9b1e55c3"


def token(**claims: Any) -> str:
    claims.setdefault("sub", "alice")
    # tokens built at collection (parametrize) must outlive a whole suite run
    claims.setdefault("exp", int(time.time()) + 6 * 3600)
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def secure_procs(workdir: Path, request: pytest.FixtureRequest) -> Iterator[list[GatewayNode]]:
    """Two gateways with --auth jwt and tight flood limits."""
    args = broker_args("nats", request)
    procs: list[GatewayNode] = []
    env = {"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_API_KEY_FILE": str(workdir / "api-key")}
    (workdir / "api-key").write_text(API_KEY + "\n")
    try:
        for i, port in enumerate(free_ports(2)):
            procs.append(start_gateway(
                workdir / "secure", f"secure-gw-{i + 1}", port, "nats", args,
                extra=["--auth", "jwt", "--chat-rate", "5", "--chat-burst", "5",
                       "--join-rate", "5", "--join-burst", "10", "--log-level", "DEBUG",
                       "--max-send-buffer", "65536", "--max-send-queue", "64",
                       # the slow-consumer test pushes through the API as fast as it can
                       "--api-rate", "100000", "--api-burst", "100000"],
                env=env))
        wait_gateways(procs)
        yield procs
    finally:
        stop_all([p.child for p in procs])


async def connect_with(url: str, auth: Any) -> SioClient:
    client = SioClient("authed")
    await client.connect(url, auth=auth)
    return client


@pytest.mark.parametrize(("auth", "reason"), [
    (None, "authentication required"),
    ({}, "authentication required"),
    ({"token": 5}, "authentication required"),
    ({"token": "not.a.jwt"}, "invalid token"),
    ({"token": jwt.encode({"sub": "x"}, "another-secret-of-enough-length-0123456789",
                          algorithm="HS256")}, "invalid token"),
    ({"token": jwt.encode({"sub": "x", "exp": 1}, SECRET, algorithm="HS256")}, "token expired"),
    ({"token": jwt.encode({"sub": "x"}, SECRET, algorithm="HS256")}, "no 'exp' claim"),
    ({"token": token(rooms="lobby")}, "list of strings"),
    ({"token": jwt.encode({"sub": "x"}, SECRET * 2, algorithm="HS512")}, "invalid token"),
])
async def test_unauthenticated_sockets_are_refused_with_a_reason(
        secure_procs: list[GatewayNode], auth: Any, reason: str) -> None:
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", lambda data: errors.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(secure_procs[0].url, transports=["websocket"], auth=auth,
                             wait_timeout=5)
    await client.disconnect()
    assert len(errors) == 1 and reason in errors[0]["message"], errors


async def test_token_claims_restrict_rooms(secure_procs: list[GatewayNode],
                                           clients: list[SioClient]) -> None:
    alice = await connect_with(secure_procs[0].url,
                               {"token": token(rooms=["lobby"], room_prefixes=["team-"])})
    bob = await connect_with(secure_procs[1].url, {"token": token(sub="bob")})
    clients += [alice, bob]
    await alice.join("lobby")
    await alice.join("team-red")
    ack = await alice.call("join", "secret")
    assert ack == {"ok": False, "error": "forbidden: your token does not allow room 'secret'"}
    await bob.join("team-red")  # a token with no room claims may join any room
    await alice.chat("team-red", "hi from alice")
    await bob.wait_texts(["hi from alice"])
    assert bob.received()[0]["user"] == "alice", "the token's subject travels with the message"


async def test_chat_flood_is_rate_limited_without_hurting_others(
        secure_procs: list[GatewayNode], clients: list[SioClient]) -> None:
    flooder = await connect_with(secure_procs[0].url, {"token": token(sub="flood")})
    calm = await connect_with(secure_procs[1].url, {"token": token(sub="calm")})
    clients += [flooder, calm]
    await flooder.join("flood")
    await calm.join("flood")
    acks = await asyncio.gather(*(flooder.call("chat", {"room": "flood", "text": str(i)})
                                  for i in range(30)))
    ok = [a for a in acks if a["ok"]]
    limited = [a for a in acks if not a["ok"]]
    assert 5 <= len(ok) <= 8, acks
    assert all(a["error"] == "rate limited: too many chat messages" for a in limited)
    await calm.wait_for(lambda c: len(c.texts()) == len(ok), what="the accepted messages")
    # the flood did not touch anyone else's budget
    await calm.chat("flood", "still fine")
    await flooder.wait_for(lambda c: "still fine" in c.texts(), what="calm's message")
    # and the flooder recovers once its bucket refills
    await asyncio.sleep(0.5)  # the bucket's clock is the time itself: let it pass
    assert (await flooder.call("chat", {"room": "flood", "text": "later"}))["ok"] is True


async def test_join_flood_is_rate_limited(secure_procs: list[GatewayNode],
                                          clients: list[SioClient]) -> None:
    c = await connect_with(secure_procs[0].url, {"token": token(sub="joiner")})
    clients.append(c)
    acks = await asyncio.gather(*(c.call("join", f"j{i}") for i in range(40)))
    assert 10 <= sum(a["ok"] for a in acks) <= 14
    assert {a["error"] for a in acks if not a["ok"]} == {
        "rate limited: too many join requests"}


def post(url: str, body: bytes, key: str | None = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": content_type})
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


async def test_http_publish_api_needs_the_key_and_delivers(
        secure_procs: list[GatewayNode], clients: list[SioClient]) -> None:
    member = await connect_with(secure_procs[1].url, {"token": token(sub="member")})
    clients.append(member)
    await member.join("announcements")
    url = f"{secure_procs[0].url}/api/rooms/announcements/messages"
    body = json.dumps({"text": "deploy at 5", "from": "ops-bot"}).encode()
    status, reply = await asyncio.to_thread(post, url, body)
    assert status == 401 and reply["ok"] is False
    status, reply = await asyncio.to_thread(post, url, body, "wrong-key")
    assert status == 401
    status, reply = await asyncio.to_thread(post, url, body, API_KEY)
    assert status == 202 and reply["ok"] is True
    await member.wait_texts(["deploy at 5"])
    msg = member.received()[0]
    assert msg["from"] == "ops-bot" and msg["id"] == reply["id"]


@pytest.mark.parametrize(("path", "body", "error"), [
    ("lobby", b"not json", "body must be JSON"),
    ("lobby", b"[1, 2]", "body must be a JSON object, not array"),
    ("lobby", b"{}", "text must be a string, not null"),
    ("lobby", b'{"text": 5}', "text must be a string, not number"),
    ("lobby", json.dumps({"text": "x" * 9000}).encode(), "text longer than 8192 bytes"),
    ("lobby", b'{"text": "hi", "from": 7}', "from must be a string"),
    ("r" * 129, b'{"text": "hi"}', "longer than 128"),
    ("AbCdEf12:0123456789ab", b'{"text": "hi"}', "reserved"),
    ("lobby", b"\xff\xfe", "body must be JSON"),
])
async def test_http_publish_api_rejects_bad_bodies(secure_procs: list[GatewayNode], path: str,
                                                   body: bytes, error: str) -> None:
    url = f"{secure_procs[0].url}/api/rooms/{path}/messages"
    status, reply = await asyncio.to_thread(post, url, body, API_KEY)
    assert status == 400, reply
    assert reply["ok"] is False and error in reply["error"]


async def test_http_publish_api_refuses_oversize_bodies(secure_procs: list[GatewayNode]
                                                        ) -> None:
    url = f"{secure_procs[0].url}/api/rooms/lobby/messages"
    status, _ = await asyncio.to_thread(post, url, b'{"text":"' + b"x" * 200_000 + b'"}',
                                        API_KEY)
    assert status == 413


async def test_http_publish_api_without_auth(gateway_procs: list[GatewayNode],
                                             clients: list[SioClient]) -> None:
    (member,) = await connect_all(clients, [("m", gateway_procs[1].url)])
    await member.join("open-api")
    status, reply = await asyncio.to_thread(
        post, f"{gateway_procs[0].url}/api/rooms/open-api/messages", b'{"text": "open"}')
    assert status == 202, reply
    await member.wait_texts(["open"])
    assert member.received()[0]["from"] == "api"


async def test_slow_consumer_is_dropped_and_others_keep_receiving(
        secure_procs: list[GatewayNode], clients: list[SioClient]) -> None:
    sender = await connect_with(secure_procs[0].url, {"token": token(sub="sender")})
    healthy = await connect_with(secure_procs[0].url, {"token": token(sub="healthy")})
    clients += [sender, healthy]
    await sender.join("slow")
    await healthy.join("slow")
    # a member that stops reading: a tiny receive buffer, and nobody reads it
    slow = stalled_member(secure_procs[0].url, [
        '40{"token":"' + token(sub="slow") + '"}', '421["join","slow"]'])
    try:
        # its join is in: the room counts three (polled gently, under the API's rate
        # limit; under --auth jwt the room API needs the key)
        key = {"Authorization": f"Bearer {API_KEY}"}
        await wait_for_condition(
            lambda: (get(f"{secure_procs[0].url}/api/rooms/slow", key)[1] or {}).get(
                "members") == 3,
            "the stalled member's join", interval=0.1)
        # push through the HTTP API (not rate limited): the kernel's socket buffers
        # fill first, then the gateway's, until it gives up on the silent reader
        body = json.dumps({"text": "x" * 8000}).encode()
        url = f"{secure_procs[0].url}/api/rooms/slow/messages"
        sent = 0
        dropped = 0.0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for _ in range(50):
                status, _reply = await asyncio.to_thread(post, url, body, API_KEY)
                assert status == 202
                sent += 1
            dropped = await read_metric(secure_procs[0].url,
                                        "gateway_slow_consumers_dropped_total")
            if dropped >= 1:
                break
        assert dropped >= 1, "the reader that stopped was never dropped"
    finally:
        slow.close()
    await healthy.wait_for(lambda c: len(c.texts()) == sent, what="every message")
    await asyncio.sleep(SETTLE)
    assert len(healthy.texts()) == sent


def stalled_member(url: str, texts: list[str]) -> socket.socket:
    """A raw websocket client that sends ``texts`` and then never reads again."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    sock.recv(4096)  # 101 and the engine.io open packet
    for text in texts:
        data = text.encode()
        head = bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big") if len(data) > 125 \
            else bytes([0x81, 0x80 | len(data)])
        sock.sendall(head + b"\x00\x00\x00\x00" + data)
        if text.startswith("40"):  # the CONNECT reply: the session is in before what follows
            sock.settimeout(5)
            sock.recv(4096)
    return sock


def test_secrets_never_reach_the_logs(secure_procs: list[GatewayNode]) -> None:
    for proc in secure_procs:
        assert proc.child is not None
        log = proc.child.log_path.read_text(errors="replace")
        assert log, "the gateway logged nothing at DEBUG"
        assert SECRET not in log and API_KEY not in log


def test_auth_without_secret_is_a_clear_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--auth", "jwt"],
                          capture_output=True, text=True, timeout=30,
                          env={"PATH": "", "GATEWAY_PORT": str(free_ports(1)[0])})
    assert proc.returncode == 2
    assert "GATEWAY_JWT_SECRET" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "gateway", "serve", "--auth", "jwt"],
                          capture_output=True, text=True, timeout=30,
                          env={"PATH": "", "GATEWAY_JWT_SECRET": "short"})
    assert proc.returncode == 2
    assert "at least 32 bytes" in proc.stderr and "short" not in proc.stderr.replace(
        "at least", "")


async def test_gateway_logs_in_to_a_nats_cluster_that_requires_it(
        tmp_path: Path, clients: list[SioClient]) -> None:
    import nats
    import nats.errors

    from gateway.processes import NATS_CONFIG, NatsCluster

    creds = {"NATS_USER": "gateway", "NATS_PASSWORD": "nats-pass-7c1d"}
    cluster = NatsCluster(tmp_path / "nats", size=3, config=NATS_CONFIG.parent / "node-auth.conf",
                          env=creds, route_auth=("route", "route-pass-2b8e"))
    gws: list[GatewayNode] = []
    try:
        cluster.start()
        with pytest.raises(nats.errors.Error):
            await nats.connect(cluster.urls[0], allow_reconnect=False, connect_timeout=2,
                               max_reconnect_attempts=0)
        for i, port in enumerate(free_ports(2)):
            gws.append(start_gateway(tmp_path / "gw", f"auth-gw-{i}", port, "nats",
                                     cluster.gateway_args(), env=creds))
        wait_gateways(gws)
        a, b = await connect_all(clients, [("a", gws[0].url), ("b", gws[1].url)])
        with watching_interest(lambda: [n.monitor_url for n in cluster.nodes]):
            await a.join("guarded")
            await b.join("guarded")
        await a.chat("guarded", "through an authenticated mesh")
        await b.wait_texts(["through an authenticated mesh"])
        for gw in gws:
            assert gw.child is not None
            assert creds["NATS_PASSWORD"] not in gw.child.log_path.read_text()
    finally:
        stop_all([g.child for g in gws])
        cluster.stop()


async def test_gateway_logs_in_to_a_redis_cluster_that_requires_it(
        tmp_path: Path, clients: list[SioClient]) -> None:
    import redis.asyncio
    import redis.exceptions

    from gateway.processes import RedisCluster

    password = "redis-pass-5e9a1c"
    cluster = RedisCluster(tmp_path / "redis", size=3, password=password)
    gws: list[GatewayNode] = []
    try:
        cluster.start()
        anonymous = redis.asyncio.Redis(host="127.0.0.1", port=cluster.nodes[0].port)
        with pytest.raises(redis.exceptions.AuthenticationError):
            await anonymous.ping()
        await anonymous.aclose()
        for i, port in enumerate(free_ports(2)):
            gws.append(start_gateway(tmp_path / "gw", f"redis-auth-gw-{i}", port,
                                     "redis-sharded", cluster.gateway_args(i),
                                     env=cluster.gateway_env(i)))
        wait_gateways(gws)
        a, b = await connect_all(clients, [("a", gws[0].url), ("b", gws[1].url)])
        await a.join("guarded")
        await b.join("guarded")
        await a.chat("guarded", "through an authenticated cluster")
        await b.wait_texts(["through an authenticated cluster"])
        for gw in gws:
            assert gw.child is not None
            assert password not in gw.child.log_path.read_text()
    finally:
        stop_all([g.child for g in gws])
        cluster.stop()


async def test_gateway_talks_tls_to_a_redis_cluster_that_requires_it(
        tmp_path: Path, clients: list[SioClient]) -> None:
    """Every connection, the per-master subscribers included, goes over TLS with a
    rediss:// URL: a cluster that listens with TLS only carries the chat."""
    from gateway.processes import RedisCluster, TlsFiles

    files = tls_files(tmp_path)
    tls = TlsFiles(files["NATS_TLS_CERT"], files["NATS_TLS_KEY"], files["NATS_TLS_CA"])
    password = "redis-tls-pass-91c0"
    cluster = RedisCluster(tmp_path / "redis", size=3, password=password, tls=tls)
    gws: list[GatewayNode] = []
    try:
        cluster.start()
        assert cluster.nodes[0].url.startswith("rediss://")
        for i, port in enumerate(free_ports(2)):
            env = {**cluster.gateway_env(i), "REDIS_TLS_CA": tls.ca}
            gws.append(start_gateway(tmp_path / "gw", f"redis-tls-gw-{i}", port,
                                     "redis-sharded", cluster.gateway_args(i), env=env))
        wait_gateways(gws)
        a, b = await connect_all(clients, [("a", gws[0].url), ("b", gws[1].url)])
        await a.join("encrypted")
        await b.join("encrypted")
        await a.chat("encrypted", "over TLS")
        await b.wait_texts(["over TLS"])
        await b.chat("encrypted", "and back")
        await a.wait_texts(["and back"])
    finally:
        stop_all([g.child for g in gws])
        cluster.stop()
