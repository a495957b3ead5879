"""What an attacker tries against a gateway's sockets and HTTP API, and what holds.

Against ``python -m gateway serve`` processes on the session's NATS cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import socketio

from gateway.processes import GatewayNode, free_ports, start_gateway, stop_all, wait_gateways
from tests.conftest import broker_args
from tests.helpers import (
    SETTLE,
    SioClient,
    connect_all,
    metrics_of,
    read_metric,
    wait_for_condition,
)
from tests.test_bad_input import raw_socket

API_KEY = "hardening-api-key-5d2c1f0e9a"
SECRET = "hardening-jwt-secret-00112233445566778899aabb"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(scope="module")
def open_gateway(workdir: Path, request: pytest.FixtureRequest) -> Iterator[GatewayNode]:
    """Auth off, an API key set, tight API limits and a small connection bound."""
    port = free_ports(1)[0]
    gw = start_gateway(workdir / "hardening", "hard-gw", port, "nats",
                       broker_args("nats", request),
                       extra=["--api-rate", "5", "--api-burst", "5", "--body-timeout", "1",
                              "--max-connections", "40", "--max-send-queue", "200",
                              "--max-send-buffer", "262144"],
                       env={"GATEWAY_API_KEY": API_KEY})
    try:
        wait_gateways([gw])
        yield gw
    finally:
        stop_all([gw.child])


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """A raw HTTP POST (no client library fixing up what we send)."""
    host, port = url.removeprefix("http://").split("/")[0].split(":")
    path = "/" + url.removeprefix("http://").split("/", 1)[1]
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "Connection: close\r\n\r\n"
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(head.encode("latin-1", "surrogateescape") + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


def api(gw: GatewayNode, room: str = "api-room") -> str:
    return f"{gw.url}/api/rooms/{room}/messages"


JSON = {"Content-Type": "application/json"}


async def full_budget() -> None:
    """Wait until the API's rate-limit bucket (5 per second, burst 5) is full again."""
    await asyncio.sleep(1.1)  # the bucket's clock is the time itself: let it pass


async def test_start_up_objects_are_out_of_gc_and_its_pauses_are_on_metrics(
        open_gateway: GatewayNode) -> None:
    """A collection holds every socket of the node while it runs: the objects of the
    start-up (modules, the app, the broker connection) are frozen out of it, and its
    pauses are counted for the operator."""
    frozen = await read_metric(open_gateway.url, "gateway_gc_frozen_objects")
    assert frozen > 10_000, "gc.freeze() ran after the start-up"
    # sessions opened by long-polling keep objects: young collections follow
    await asyncio.to_thread(_open_polling_sessions, open_gateway.url, 30)
    metrics = await asyncio.to_thread(metrics_of, open_gateway.url)
    assert metrics["gateway_gc_collections_total"] > 0
    assert metrics["gateway_gc_pause_seconds_total"] > 0
    assert metrics["gateway_gc_longest_pause_seconds"] > 0
    # the full collection before the freeze was the start-up's, not a pause of serving
    # (this test runs first on its gateway: nothing since has made a full one)
    assert await asyncio.to_thread(_full_collections, open_gateway.url) == 0


def _open_polling_sessions(url: str, count: int) -> None:
    for _ in range(count):
        with urllib.request.urlopen(f"{url}/socket.io/?EIO=4&transport=polling",
                                    timeout=5) as resp:
            assert resp.status == 200


def _full_collections(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        lines = [line for line in resp.read().decode().splitlines()
                 if line.startswith("gateway_gc_collections_total{")
                 and 'generation="2"' in line]
    assert len(lines) == 1, lines
    return float(lines[0].rsplit(" ", 1)[1])


async def test_api_key_is_required_whenever_it_is_set(open_gateway: GatewayNode) -> None:
    await full_budget()
    body = b'{"text": "hi"}'
    status, reply = await asyncio.to_thread(post, api(open_gateway), body, JSON)
    assert status == 401 and "unauthorized" in reply["error"]
    authed = {**JSON, "Authorization": f"Bearer {API_KEY}"}
    status, reply = await asyncio.to_thread(post, api(open_gateway), body, authed)
    assert status == 202, reply
    # a header that is not UTF-8 is a wrong key, not a server error
    odd = {**JSON, "Authorization": "Bearer \udcff\udcfe"}
    status, _ = await asyncio.to_thread(post, api(open_gateway), body, odd)
    assert status == 401


async def test_api_refuses_what_a_cross_site_form_could_send(open_gateway: GatewayNode) -> None:
    await full_budget()
    authed = {"Authorization": f"Bearer {API_KEY}"}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = dict(authed)
        if content_type:
            headers["Content-Type"] = content_type
        status, reply = await asyncio.to_thread(post, api(open_gateway), b'{"text": "x"}',
                                                headers)
        assert status == 415, (content_type, reply)
    status, reply = await asyncio.to_thread(
        post, api(open_gateway), b'{"text": "x"}',
        {**authed, "Content-Type": "application/json; charset=klingon"})
    assert status == 415, reply


async def test_api_from_cannot_be_a_socket_id(open_gateway: GatewayNode,
                                              clients: list[SioClient]) -> None:
    (c,) = await connect_all(clients, [("c", open_gateway.url)])
    await full_budget()
    authed = {**JSON, "Authorization": f"Bearer {API_KEY}"}
    body = json.dumps({"text": "I am c", "from": c.sid}).encode()
    status, reply = await asyncio.to_thread(post, api(open_gateway), body, authed)
    assert status == 400 and "not a socket id" in reply["error"], reply


async def test_api_malformed_bodies_get_400_not_500(open_gateway: GatewayNode) -> None:
    await full_budget()
    authed = {**JSON, "Authorization": f"Bearer {API_KEY}"}
    for body in (b"[" * 30_000, b'{"text": "\\ud800"}', b"\xff\xfe{}"):
        status, reply = await asyncio.to_thread(post, api(open_gateway), body, authed)
        assert status == 400, (body[:20], reply)
        await asyncio.sleep(0.25)  # stay under the API rate limit
    assert open_gateway.child is not None
    log = open_gateway.child.log_path.read_text()
    assert "Traceback" not in log and "Error handling request" not in log


async def test_api_is_rate_limited(open_gateway: GatewayNode) -> None:
    await full_budget()
    authed = {**JSON, "Authorization": f"Bearer {API_KEY}"}
    statuses = [(await asyncio.to_thread(post, api(open_gateway), b'{"text": "x"}', authed))[0]
                for _ in range(12)]
    assert statuses.count(202) in range(5, 8) and statuses.count(429) >= 5, statuses


async def test_a_slow_body_is_cut_off(open_gateway: GatewayNode) -> None:
    await full_budget()
    host, port = open_gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"POST /api/rooms/slow/messages HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{".encode())
        await writer.drain()
        started = time.monotonic()
        async with asyncio.timeout(10):
            status_line = await reader.readline()  # one byte, then nothing
        assert b" 408 " in status_line, status_line
        assert time.monotonic() - started < 5
    finally:
        writer.close()


def accept_backlog(port: int) -> int:
    """Connections to the listening socket on 127.0.0.1:``port`` the server has not
    accepted yet (the kernel's accept queue, /proc/net/tcp's rx_queue of a LISTEN)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on port {port}")


async def test_connections_past_the_bound_are_refused_and_others_served(
        open_gateway: GatewayNode, clients: list[SioClient]) -> None:
    host, port = open_gateway.url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(45):  # idle connections that never finish a request
            _, w = await asyncio.open_connection(host, int(port))
            held.append(w)
        # for the server to accept them all (it can't be asked while full: a question
        # is one more connection): its accept queue empty
        await wait_for_condition(lambda: accept_backlog(int(port)) == 0,
                                 "the gateway to accept the 45 connections")
        reader, writer = await asyncio.open_connection(host, int(port))
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert data.startswith(b"HTTP/1.1 503"), data[:40]
    finally:
        for w in held:
            w.close()

    async def refused_counted() -> bool:  # once the closes have freed its slots
        try:
            return await read_metric(open_gateway.url,
                                     "gateway_connections_refused_total") >= 1
        except OSError:  # still full: 503
            return False

    await wait_for_condition(refused_counted, "the gateway to serve its metrics again")
    (c,) = await connect_all(clients, [("after", open_gateway.url)])  # served again
    assert c.sio.connected


def ws_frame(data: bytes) -> bytes:
    """A masked (zero key) websocket text frame, as a client sends."""
    if len(data) > 65535:
        head = bytes([0x81, 0x80 | 127]) + len(data).to_bytes(8, "big")
    elif len(data) > 125:
        head = bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | len(data)])
    return head + b"\x00\x00\x00\x00" + data


def stalled_socket(url: str) -> socket.socket:
    """A websocket client connected to the default namespace that never reads again."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:"
                 f"{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    sock.recv(4096)
    sock.sendall(ws_frame(b"40"))
    sock.settimeout(10)
    return sock


async def test_a_client_that_never_reads_cannot_grow_the_node(
        open_gateway: GatewayNode, clients: list[SioClient]) -> None:
    """What the node holds for one client is bounded: replies never echo a client's
    data, and a socket's unsent packets are capped (here 200 packets / 256 KiB),
    past which it is disconnected."""
    assert open_gateway.child is not None
    pid = open_gateway.child.pid
    before = rss(pid)
    dropped = await read_metric(open_gateway.url, "gateway_slow_consumers_dropped_total")
    sock = stalled_socket(open_gateway.url)
    try:
        # 700 unknown events of 60 KB each, asking for acks (+38 MB before the fix)
        big = b"".join(ws_frame(f'42{i}["{"u" * 60_000}",1]'.encode()) for i in range(700))
        # then 150,000 small ones: their replies (~6 MB) outgrow the kernel's socket
        # buffers (4 MiB here at most) and then the node's own limit
        small = b"".join(ws_frame(f'42{i}["x"]'.encode()) for i in range(700, 150_700))
        with contextlib.suppress(OSError):  # the gateway hung up on us: the point
            await asyncio.to_thread(sock.sendall, big + small)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and await read_metric(
                open_gateway.url, "gateway_slow_consumers_dropped_total") <= dropped:
            await asyncio.sleep(0.1)
        assert await read_metric(open_gateway.url,
                                 "gateway_slow_consumers_dropped_total") > dropped
        grown = rss(pid) - before
        print(f"\nRSS growth under the abuse: {grown / 2**20:.1f} MiB")
        assert grown < 16 * 2**20, f"the node grew {grown / 2**20:.0f} MiB"
    finally:
        sock.close()
    (c,) = await connect_all(clients, [("other", open_gateway.url)])
    assert (await c.call("join", "still-fine"))["ok"] is True


async def test_binary_packets_are_refused(open_gateway: GatewayNode,
                                          clients: list[SioClient]) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(open_gateway.url, session)
        # declares a huge number of attachments, then sends some
        await ws.send_str('459999999999-["join",{"_placeholder":true,"num":0}]')
        msg = await asyncio.wait_for(ws.receive(), 5)
        if msg.type == aiohttp.WSMsgType.TEXT:
            assert msg.data == "1", msg  # engine.io's CLOSE, then the websocket closes
            msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING), msg
    metrics = await asyncio.to_thread(metrics_of, open_gateway.url)
    assert metrics.get('gateway_requests_refused_total{backend="nats",node="hard-gw",'
                       'reason="binary"}', 0) >= 1, metrics


async def test_a_room_with_a_lone_surrogate_is_refused(open_gateway: GatewayNode,
                                                       clients: list[SioClient]) -> None:
    async with aiohttp.ClientSession() as session:
        ws = await raw_socket(open_gateway.url, session)
        await ws.send_str('421["join","\\ud800"]')
        reply = await asyncio.wait_for(ws.receive_str(), 5)
        assert reply.startswith("431") and "lone surrogate" in reply, reply
        await ws.close()


# -- hosts and proxies ---------------------------------------------------------------


async def test_dns_rebinding_is_refused_on_a_loopback_gateway(
        open_gateway: GatewayNode) -> None:
    port = open_gateway.url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as session:
        # what a browser sends after evil.example was made to resolve to 127.0.0.1
        async with session.get(f"{open_gateway.url}/socket.io/?EIO=4&transport=polling",
                               headers={"Host": f"evil.example:{port}",
                                        "Origin": f"http://evil.example:{port}"}) as resp:
            assert resp.status == 421
        async with session.get(f"{open_gateway.url}/healthz",
                               headers={"Host": f"localhost:{port}"}) as resp:
            assert resp.status == 200


async def test_forwarded_host_from_an_untrusted_peer_is_ignored(
        open_gateway: GatewayNode) -> None:
    port = open_gateway.url.rsplit(":", 1)[1]
    # a cross-site page whose request passed through a proxy that kept a forged header
    async with aiohttp.ClientSession() as session, session.get(
            f"{open_gateway.url}/socket.io/?EIO=4&transport=polling",
            headers={"Host": f"127.0.0.1:{port}", "Origin": "https://evil.example",
                     "X-Forwarded-Host": "evil.example",
                     "X-Forwarded-Proto": "https"}) as resp:
        assert resp.status == 400, await resp.text()


# -- JWT -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jwt_gateway(workdir: Path, request: pytest.FixtureRequest) -> Iterator[GatewayNode]:
    gw = start_gateway(workdir / "hardening", "jwt-gw", free_ports(1)[0], "nats",
                       broker_args("nats", request),
                       extra=["--auth", "jwt", "--jwt-issuer", "https://issuer.example",
                              "--jwt-audience", "chat", "--jwt-leeway", "0"],
                       env={"GATEWAY_JWT_SECRET": SECRET})
    try:
        wait_gateways([gw])
        yield gw
    finally:
        stop_all([gw.child])


def token(**claims: Any) -> str:
    """A token the jwt_gateway accepts, but for ``claims`` (None: leave the claim out)."""
    base = {"sub": "alice", "iss": "https://issuer.example", "aud": "chat",
            "exp": int(time.time()) + 600, **claims}
    return jwt.encode({k: v for k, v in base.items() if v is not None}, SECRET,
                      algorithm="HS256")


@pytest.mark.parametrize(("claims", "reason"), [
    ({"iss": "https://other.example"}, "wrong issuer"),
    ({"aud": "billing"}, "wrong audience"),
    ({"exp": None}, "no 'exp' claim"),
])
async def test_issuer_audience_and_expiry_are_required(
        jwt_gateway: GatewayNode, claims: dict[str, Any], reason: str) -> None:
    tok = token(**claims)
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", lambda data: errors.append(data))
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(jwt_gateway.url, transports=["websocket"], auth={"token": tok},
                             wait_timeout=5)
    await client.disconnect()
    assert errors and reason in errors[0]["message"], errors


async def test_a_socket_is_disconnected_when_its_token_expires(
        jwt_gateway: GatewayNode, clients: list[SioClient]) -> None:
    c = SioClient("expiring")
    clients.append(c)
    await c.connect(jwt_gateway.url, auth={"token": token(exp=int(time.time()) + 2)})
    assert (await c.call("join", "expiry"))["ok"] is True
    await c.wait_for(lambda x: not x.sio.connected, timeout=6, what="the disconnect")
    assert c.received("auth_error") and "token expired" in c.received("auth_error")[0]["error"]


async def test_a_refreshed_token_keeps_the_socket(jwt_gateway: GatewayNode,
                                                 clients: list[SioClient]) -> None:
    c = SioClient("refreshing")
    clients.append(c)
    await c.connect(jwt_gateway.url, auth={"token": token(exp=int(time.time()) + 2)})
    bad = await c.call("refresh", {"token": token(sub="mallory")})
    assert bad["ok"] is False and "sub" in bad["error"]
    fresh = int(time.time()) + 600
    ack = await c.call("refresh", {"token": token(exp=fresh)})
    assert ack == {"ok": True, "expires": fresh, "left": []}
    await asyncio.sleep(3)  # past the old token's expiry: time itself is the condition
    assert c.sio.connected and not c.received("auth_error")
    await asyncio.sleep(SETTLE)
