"""The edges of a gateway an attacker reaches first (issue 21, item 6): malformed
packets, grants, operator endpoints, forwarded addresses, key guessing, secrets,
engine.io sessions and recovery CONNECTs.

Against ``python -m gateway serve`` processes on the session's NATS cluster, with
raw clients that send what a library would not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest

from gateway.processes import (
    GatewayNode,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from tests.conftest import broker_args
from tests.helpers import SioClient, connect_all, metrics_of
from tests.test_bad_input import raw_socket

API_KEY = "edges-api-key-5d2c1f0e9a8b7c6d"


def refused(gw: GatewayNode, reason: str) -> float:
    return metrics_of(gw.url).get(
        f'gateway_requests_refused_total{{backend="nats",node="{gw.node_id}",'
        f'reason="{reason}"}}', 0.0)


@pytest.fixture(scope="module")
def edge_gateway(workdir: Path, request: pytest.FixtureRequest) -> Iterator[GatewayNode]:
    port = free_ports(1)[0]
    gw = start_gateway(workdir / "edges", "edge-gw", port, "nats", broker_args("nats", request),
                       extra=["--trusted-proxies", "127.0.0.1", "--api-rate", "0.5",
                              "--api-burst", "5", "--max-sessions-per-address", "5",
                              "--handshake-rate", "0.2", "--handshake-burst", "12"],
                       env={"GATEWAY_API_KEY": API_KEY})
    try:
        wait_gateways([gw])
        yield gw
    finally:
        stop_all([gw.child])


# -- malformed packets ---------------------------------------------------------------

#: Socket.IO packets no client library sends: each must close its socket
MALFORMED = ['42["chat",', "42[", "42", "42[]", "42[1]", '42[null,"x"]', "42{}", '42"x"',
             "4garbage", "43", "43[1]", "44x", "47", "48", "4" + "[" * 3000, '42["join"',
             "4{}", "4null", "4true", "4[1]", "431[1]", '437["x"]']
#: engine.io packets no client sends: over polling they end the session with a 400
ENGINEIO_GARBAGE = ["x", "9", "garbage", "\x00", "4x\x1ey", "-1"]


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """Whether the gateway hangs up on ``ws`` (engine.io's CLOSE, then the close frame)."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), 10)
        if msg.type == aiohttp.WSMsgType.TEXT and msg.data in ("1", "2"):
            if msg.data == "2":  # a ping that crossed: answer and go on waiting
                await ws.send_str("3")
            continue
        return msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                            aiohttp.WSMsgType.CLOSING)


async def _polling_session(session: aiohttp.ClientSession, url: str) -> str:
    base = f"{url}/socket.io/?EIO=4&transport=polling"
    async with session.get(base) as resp:
        opening = await resp.text()
    sid = opening.split('"sid":"', 1)[1].split('"', 1)[0]
    async with session.post(f"{base}&sid={sid}", data="40") as resp:
        assert resp.status == 200
    async with session.get(f"{base}&sid={sid}") as resp:
        assert (await resp.text()).startswith("40{")
    return sid


async def _polling_closed(session: aiohttp.ClientSession, url: str, sid: str) -> bool:
    """Whether the session is gone: its next poll gets engine.io's CLOSE or a 400."""
    base = f"{url}/socket.io/?EIO=4&transport=polling&sid={sid}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with session.get(base) as resp:
            body = await resp.text()
            if resp.status == 400 or "1" in body.split("\x1e"):
                return True
    return False


async def test_malformed_packets_close_the_socket_and_are_counted_not_logged(
        edge_gateway: GatewayNode, clients: list[SioClient]) -> None:
    """400 malformed packets (``42["chat",`` and others), over websocket and over
    polling: each closes its socket, is counted, and the log gets no traceback (it
    got ~2.3 KB of traceback twice per packet, and the socket stayed open)."""
    assert edge_gateway.child is not None
    log = edge_gateway.child.log_path
    size = log.stat().st_size
    before = refused(edge_gateway, "malformed")
    (member,) = await connect_all(clients, [("member", edge_gateway.url)])
    await member.join("calm")
    async with aiohttp.ClientSession() as session:
        for i in range(200):
            ws = await raw_socket(edge_gateway.url, session)
            await ws.send_str(MALFORMED[i % len(MALFORMED)])
            assert await _closed(ws), f"left open after {MALFORMED[i % len(MALFORMED)]!r}"
            await ws.close()
        for i in range(200):
            frame = MALFORMED[i % len(MALFORMED)]
            sid = await _polling_session(session, edge_gateway.url)
            async with session.post(
                    f"{edge_gateway.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                    data=frame) as resp:
                await resp.read()
            assert await _polling_closed(session, edge_gateway.url, sid), \
                f"polling session left open after {frame!r}"
        undecodable = refused(edge_gateway, "malformed")
        for frame in ENGINEIO_GARBAGE:
            sid = await _polling_session(session, edge_gateway.url)
            async with session.post(
                    f"{edge_gateway.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                    data=frame) as resp:
                assert resp.status == 400, (frame, resp.status, await resp.text())
            assert await _polling_closed(session, edge_gateway.url, sid), frame
        # "x", "garbage", "\x00", "4x\x1ey" do not decode ("9", "-1" are unknown types)
        assert refused(edge_gateway, "malformed") - undecodable >= 4
    assert refused(edge_gateway, "malformed") - before >= 400
    text = log.read_text(errors="replace")[size:]
    assert "Traceback" not in text, text[:3000]
    assert log.stat().st_size - size < 4096, text[:3000]
    # the well-behaved member never noticed
    assert member.sio.connected
    assert (await member.call("chat", {"room": "calm", "text": "fine"}))["ok"] is True


# -- grants --------------------------------------------------------------------------

SECRET = "edges-jwt-secret-00112233445566778899aabbccdd"


def token(sub: str = "alice", **claims: Any) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, **claims}, SECRET,
                      algorithm="HS256")


@pytest.fixture(scope="module")
def jwt_recovery_pair(workdir: Path, request: pytest.FixtureRequest
                      ) -> Iterator[list[GatewayNode]]:
    """Two gateways with --auth jwt and --recovery, on the session's NATS cluster."""
    gws: list[GatewayNode] = []
    try:
        for i, port in enumerate(free_ports(2)):
            gws.append(start_gateway(
                workdir / "edges", f"grant-gw-{i + 1}", port, "nats",
                broker_args("nats", request, i),
                extra=["--auth", "jwt", "--recovery", "on", "--heartbeat-interval", "0.5",
                       "--trusted-proxies", "127.0.0.1"],
                env={"GATEWAY_JWT_SECRET": SECRET, "GATEWAY_API_KEY": API_KEY}))
        wait_gateways(gws, timeout=40)
        yield gws
    finally:
        stop_all([g.child for g in gws])


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """GET ``url``: (status, the JSON body, or None)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, None


def members(gw: GatewayNode, room: str) -> list[str]:
    status, body = get(f"{gw.url}/api/rooms/{room}", {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200, body
    return list(body["sockets"])


class RawSocket:
    """A bare websocket Socket.IO client: sends what its test says, reads acks and
    events (answering pings)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[list[Any]] = []
        self.next_id = 0

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str, auth: dict[str, Any],
                      headers: dict[str, str] | None = None
                      ) -> tuple[RawSocket, dict[str, Any]]:
        ws = await session.ws_connect(
            url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket",
            headers=headers)
        assert (await ws.receive_str()).startswith("0{")
        await ws.send_str("40" + json.dumps(auth))
        sock = cls(ws)
        reply = await sock._read()
        assert reply.startswith("40{"), reply
        return sock, json.loads(reply[2:])

    async def _read(self) -> str:
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 10)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            if msg.data == "2":
                await self.ws.send_str("3")
                continue
            if msg.data.startswith("42"):
                self.events.append(json.loads(msg.data[2:]))
                continue
            return str(msg.data)

    async def call(self, *args: Any) -> Any:
        self.next_id += 1
        await self.ws.send_str(f"42{self.next_id}{json.dumps(list(args))}")
        while True:
            reply = await self._read()
            if reply.startswith(f"43{self.next_id}["):
                return json.loads(reply[len(f"43{self.next_id}"):])[0]

    async def wait_event_kept(self) -> None:
        while not self.events:
            await self._read()


async def test_a_refresh_that_narrows_rooms_leaves_the_lost_ones(
        jwt_recovery_pair: list[GatewayNode], clients: list[SioClient]) -> None:
    """A token that no longer grants a room takes the socket out of it: the ack says
    which, the room no longer lists it, and its chats there are forbidden (before:
    it stayed in the room, receiving and sending)."""
    gw = jwt_recovery_pair[0]
    c = SioClient("narrowed")
    clients.append(c)
    await c.connect(gw.url, auth={"token": token(rooms=["keep-1", "lose-1", "lose-2"])})
    for room in ("keep-1", "lose-1", "lose-2"):
        await c.join(room)
    ack = await c.call("refresh", {"token": token(rooms=["keep-1"])})
    assert ack["ok"] is True and ack["left"] == ["lose-1", "lose-2"], ack
    assert c.sid not in await asyncio.to_thread(members, gw, "lose-1")
    assert c.sid in await asyncio.to_thread(members, gw, "keep-1")
    refused_chat = await c.call("chat", {"room": "lose-1", "text": "still here?"})
    assert refused_chat["ok"] is False and "forbidden" in refused_chat["error"], refused_chat
    assert (await c.call("chat", {"room": "keep-1", "text": "fine"}))["ok"] is True


async def test_a_restored_session_keeps_only_the_rooms_its_new_token_grants(
        jwt_recovery_pair: list[GatewayNode], clients: list[SioClient]) -> None:
    """With --recovery, a socket that reconnects (to another gateway) with a token
    granting fewer rooms gets its session back, but not the rooms it lost."""
    gw1, gw2 = jwt_recovery_pair
    keep, lose = f"keep-{uuid.uuid4().hex[:4]}", f"lose-{uuid.uuid4().hex[:4]}"
    talker = SioClient("talker", offsets=True)
    clients.append(talker)
    await talker.connect(gw2.url, auth={"token": token(sub="bob")})
    await talker.join(keep)
    async with aiohttp.ClientSession() as session:
        sock, hello = await RawSocket.connect(session, gw1.url,
                                              {"token": token(rooms=[keep, lose])})
        assert "pid" in hello, hello
        for room in (keep, lose):
            assert (await sock.call("join", room))["ok"] is True
        # chats until one arrives (the join takes a moment to reach the other node)
        deadline = time.monotonic() + 10
        while not sock.events and time.monotonic() < deadline:
            await talker.chat(keep, "for an offset")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await sock.wait_event_kept()
        offset = sock.events[-1][-1]
        await sock.ws.close()  # the network went away: recoverable
        again, hello2 = await RawSocket.connect(
            session, gw2.url, {"token": token(rooms=[keep]), "pid": hello["pid"],
                               "offset": offset})
        try:
            assert hello2["sid"] == hello["sid"], "the session was not restored"
            assert hello["sid"] in await asyncio.to_thread(members, gw2, keep)
            assert hello["sid"] not in await asyncio.to_thread(members, gw2, lose)
        finally:
            await again.ws.close()


# -- operator endpoints --------------------------------------------------------------

ADMIN_PASSWORD = "edges-admin-password-0a1b2c3d"


@pytest.fixture(scope="module")
def admin_gateway(workdir: Path, request: pytest.FixtureRequest
                  ) -> Iterator[tuple[GatewayNode, str]]:
    """A gateway with an operator listener (--admin-port) and the Admin UI on."""
    port, admin_port = free_ports(2)
    gw = start_gateway(workdir / "edges", "admin-gw", port, "nats", broker_args("nats", request),
                       extra=["--admin-port", str(admin_port)],
                       env={"GATEWAY_API_KEY": API_KEY, "GATEWAY_ADMIN_PASSWORD": ADMIN_PASSWORD})
    try:
        wait_gateways([gw])
        yield gw, f"http://127.0.0.1:{admin_port}"
    finally:
        stop_all([gw.child])


async def _admin_connect(session: aiohttp.ClientSession, url: str,
                         password: str = ADMIN_PASSWORD, connect: str = "40/admin,") -> str:
    """What a Socket.IO CONNECT to the Admin UI's namespace gets back ("" when the
    socket is hung up on)."""
    ws = await session.ws_connect(url.replace("http", "ws")
                                  + "/socket.io/?EIO=4&transport=websocket")
    try:
        assert (await ws.receive_str()).startswith("0{")
        await ws.send_str(connect + json.dumps({"username": "admin",
                                                   "password": password}))
        while True:
            msg = await asyncio.wait_for(ws.receive(), 10)
            if msg.type != aiohttp.WSMsgType.TEXT:
                return ""
            if msg.data not in ("1", "2"):
                return str(msg.data)
    finally:
        await ws.close()


async def test_operator_endpoints_are_on_the_operator_listener_only(
        admin_gateway: tuple[GatewayNode, str]) -> None:
    """With --admin-port: /metrics, the detailed /healthz (which names the internal
    NATS URLs) and the Admin UI answer there, not on the public port (where they
    were open to anyone)."""
    gw, admin = admin_gateway
    status, _ = await asyncio.to_thread(get, f"{gw.url}/metrics")
    assert status == 404
    status, _ = await asyncio.to_thread(get, f"{gw.url}/metrics",
                                        {"Authorization": f"Bearer {API_KEY}"})
    assert status == 404, "with an operator listener, the public port has no /metrics"
    status, body = await asyncio.to_thread(get, f"{gw.url}/healthz")
    assert status == 200
    assert body == {"node_id": "admin-gw", "backend": "nats", "broker_connected": True}, body
    status, body = await asyncio.to_thread(get, f"{admin}/healthz")
    assert status == 200 and "nats://" in json.dumps(body["broker"]), body
    assert "gateway_requests_refused_total" in metrics_text(admin)
    async with aiohttp.ClientSession() as session:
        assert await _admin_connect(session, gw.url) == ""  # hung up on
        assert (await _admin_connect(session, admin)).startswith("40/admin,{")


@pytest.mark.parametrize("connect", ["400-/admin,", "401-/admin,", "40/admin?x=1,"])
async def test_every_spelling_of_an_admin_connect_is_refused_on_the_public_port(
        admin_gateway: tuple[GatewayNode, str], connect: str) -> None:
    """python-socketio reads "00-/admin" (an attachment count) as a CONNECT to /admin:
    the operator gate compared the raw text with "0/admin" and let it reach the Admin
    UI's login from the public port."""
    gw, admin = admin_gateway
    async with aiohttp.ClientSession() as session:
        assert await _admin_connect(session, gw.url, connect=connect) == ""  # hung up on
        assert (await _admin_connect(session, admin, connect=connect)).startswith("40/admin,{")


def metrics_text(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


async def test_without_an_operator_listener_only_loopback_or_the_key_reads_metrics(
        edge_gateway: GatewayNode) -> None:
    """No --admin-port: a loopback peer reads /metrics (a local Prometheus, the
    tests), but not a request a local reverse proxy forwarded, unless it carries
    the API key; others get the minimal /healthz."""
    gw = edge_gateway
    assert (await asyncio.to_thread(get, f"{gw.url}/metrics"))[0] == 200
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    assert (await asyncio.to_thread(get, f"{gw.url}/metrics", forwarded))[0] == 404
    status, body = await asyncio.to_thread(get, f"{gw.url}/healthz", forwarded)
    assert status == 200 and set(body) == {"node_id", "backend", "broker_connected"}, body
    keyed = {**forwarded, "Authorization": f"Bearer {API_KEY}"}
    assert (await asyncio.to_thread(get, f"{gw.url}/metrics", keyed))[0] == 200
    status, body = await asyncio.to_thread(get, f"{gw.url}/healthz", keyed)
    assert status == 200 and "broker" in body, body


async def test_a_gateway_listening_beyond_loopback_takes_no_loopback_peer_for_an_operator(
        workdir: Path, request: pytest.FixtureRequest) -> None:
    """Listening on all addresses, a loopback peer may be a same-host reverse proxy
    that relays everyone without X-Forwarded-For: it was an operator (/metrics) and
    exempt from the per-address limits. Now only the key makes it an operator."""
    port = free_ports(1)[0]
    gw = start_gateway(workdir / "edges", "wide-gw", port, "nats", broker_args("nats", request),
                       host="0.0.0.0", extra=["--max-sessions-per-address", "2"],
                       env={"GATEWAY_API_KEY": API_KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_gateways([gw])
        assert (await asyncio.to_thread(get, f"{url}/metrics"))[0] == 404
        keyed = {"Authorization": f"Bearer {API_KEY}"}
        assert (await asyncio.to_thread(get, f"{url}/metrics", keyed))[0] == 200
        statuses = []
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"{url}/socket.io/?EIO=4&transport=polling") as resp:
                    statuses.append(resp.status)
        assert statuses == [200, 200, 429], statuses
    finally:
        stop_all([gw.child])


# -- forwarded addresses -------------------------------------------------------------


def post_message(gw: GatewayNode, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"{gw.url}/api/rooms/xff/messages", data=b'{"text": "hi"}', method="POST",
        headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_the_rate_limit_keys_on_the_address_the_proxy_saw(
        edge_gateway: GatewayNode) -> None:
    """Behind a trusted proxy (here 127.0.0.1), a client that puts a new address at
    the left of X-Forwarded-For each time is still one client: the proxy appended
    its real address on the right (before: 10 spoofed posts, all 202)."""
    statuses = []
    for i in range(10):
        statuses.append(await asyncio.to_thread(post_message, edge_gateway, {
            "Authorization": f"Bearer {API_KEY}",
            "X-Forwarded-For": f"203.0.113.{i}, 198.51.100.7"}))
    assert statuses[:5] == [202] * 5, statuses
    assert 429 in statuses[5:], statuses


# -- API keys ------------------------------------------------------------------------


async def test_wrong_api_keys_are_rate_limited_per_address(edge_gateway: GatewayNode) -> None:
    """Wrong keys were answered 401 before any limit: unlimited guessing. Past the
    budget of failures an address gets 429, even for the right key (a right guess
    must not show), while other addresses are served."""
    guesser = {"X-Forwarded-For": "198.51.100.66"}
    statuses = [await asyncio.to_thread(post_message, edge_gateway,
                                        {**guesser, "Authorization": f"Bearer guess-{i}"})
                for i in range(30)]
    assert statuses[:10] == [401] * 10, statuses
    assert statuses[10:] == [429] * 20, statuses
    right = {"Authorization": f"Bearer {API_KEY}"}
    assert await asyncio.to_thread(post_message, edge_gateway, {**guesser, **right}) == 429
    other = {"X-Forwarded-For": "198.51.100.67", **right}
    assert await asyncio.to_thread(post_message, edge_gateway, other) == 202


async def test_wrong_keys_on_metrics_use_up_the_same_budget(edge_gateway: GatewayNode) -> None:
    """Without --admin-port, /metrics compared every Bearer key with the API key and
    answered 404 or 200 without counting: an unlimited key-guessing oracle. Now wrong
    keys there draw on the address's budget of wrong keys, the HTTP API's too."""
    guesser = {"X-Forwarded-For": "198.51.100.68"}
    statuses = [(await asyncio.to_thread(get, f"{edge_gateway.url}/metrics",
                                         {**guesser, "Authorization": f"Bearer guess-{i}"}))[0]
                for i in range(15)]
    assert statuses[:10] == [404] * 10 and statuses[10:] == [429] * 5, statuses
    right = {"Authorization": f"Bearer {API_KEY}"}
    assert (await asyncio.to_thread(get, f"{edge_gateway.url}/metrics",
                                    {**guesser, **right}))[0] == 429
    assert await asyncio.to_thread(post_message, edge_gateway, {**guesser, **right}) == 429


async def test_a_socketio_client_sending_a_bearer_token_is_not_locked_out(
        edge_gateway: GatewayNode) -> None:
    """Socket.IO clients may put a JWT in Authorization: not the API key, but their
    handshakes go on (only the operator gate reads the key there)."""
    address = "198.51.100.69"
    headers = {"X-Forwarded-For": address, "Authorization": "Bearer a.jwt.token"}
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(11):
            async with session.get(f"{edge_gateway.url}/socket.io/?EIO=4&transport=polling",
                                   headers=headers) as resp:
                body = await resp.text()
                statuses.append(resp.status)
            if resp.status == 200:
                sid = body.split('"sid":"', 1)[1].split('"', 1)[0]
                await _close_session(session, edge_gateway, address, sid)
    assert statuses == [200] * 11, statuses


async def test_room_members_need_the_key_under_jwt_auth(
        jwt_recovery_pair: list[GatewayNode]) -> None:
    gw = jwt_recovery_pair[0]
    status, body = await asyncio.to_thread(get, f"{gw.url}/api/rooms/lobby")
    assert status == 401, body
    status, body = await asyncio.to_thread(get, f"{gw.url}/api/rooms/lobby",
                                           {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and body["members"] == 0, body


@pytest.mark.parametrize("limit", ["%C2%B2", "%D9%A3", "-1", "0", "x"])  # "²", "٣"
async def test_a_history_limit_that_is_not_ascii_digits_is_a_400(
        jwt_recovery_pair: list[GatewayNode], limit: str) -> None:
    """``"²".isdigit()`` is true and ``int("²")`` raises: the limit was a 500."""
    status, body = await asyncio.to_thread(
        get, f"{jwt_recovery_pair[0].url}/api/rooms/lobby/messages?limit={limit}",
        {"Authorization": f"Bearer {API_KEY}"})
    assert status == 400 and "limit must be a number" in body["error"], (status, body)


# -- secrets -------------------------------------------------------------------------


async def test_admin_ui_logins_are_limited_per_address(
        admin_gateway: tuple[GatewayNode, str]) -> None:
    """Five wrong Admin UI passwords, then the address is refused even with the
    right one (before: unlimited guesses, compared with ==)."""
    _, admin = admin_gateway
    async with aiohttp.ClientSession() as session:
        for i in range(5):
            reply = await _admin_connect(session, admin, f"wrong-password-{i}")
            assert reply.startswith("44/admin,") and "authentication failed" in reply, reply
        reply = await _admin_connect(session, admin)
        assert reply.startswith("44/admin,") and "too many failed logins" in reply, reply


# -- engine.io sessions per address ----------------------------------------------------


async def _handshake(session: aiohttp.ClientSession, gw: GatewayNode,
                     address: str) -> tuple[int, str]:
    """A long-polling handshake that a proxy (127.0.0.1, trusted) forwarded for
    ``address``: (status, the session id or the error)."""
    async with session.get(f"{gw.url}/socket.io/?EIO=4&transport=polling",
                           headers={"X-Forwarded-For": address}) as resp:
        body = await resp.text()
        if resp.status != 200:
            return resp.status, body
        return 200, body.split('"sid":"', 1)[1].split('"', 1)[0]


async def _close_session(session: aiohttp.ClientSession, gw: GatewayNode, address: str,
                         sid: str) -> None:
    async with session.post(f"{gw.url}/socket.io/?EIO=4&transport=polling&sid={sid}",
                            data="1", headers={"X-Forwarded-For": address}) as resp:
        await resp.read()


async def test_engineio_sessions_are_capped_per_address(edge_gateway: GatewayNode) -> None:
    """Thousands of engine.io sessions fitted in a few TCP connections (long-polling
    handshakes on one keep-alive connection); now at most 5 per address here, the
    next one 429, and a closed one makes room again."""
    address = "198.51.100.80"
    async with aiohttp.ClientSession() as session:  # one keep-alive connection
        sids = []
        for _ in range(5):
            status, sid = await _handshake(session, edge_gateway, address)
            assert status == 200, sid
            sids.append(sid)
        status, error = await _handshake(session, edge_gateway, address)
        assert status == 429 and "too many sessions" in error, (status, error)
        assert (await _handshake(session, edge_gateway, "198.51.100.81"))[0] == 200
        await _close_session(session, edge_gateway, address, sids.pop())
        deadline = time.monotonic() + 10
        while (status := (await _handshake(session, edge_gateway, address))[0]) != 200 \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert status == 200
        for sid in sids:
            await _close_session(session, edge_gateway, address, sid)


async def test_an_empty_sid_is_a_new_session_and_counts_against_the_cap(
        edge_gateway: GatewayNode) -> None:
    """``?sid=`` (empty) skipped the cap and the handshake rate (aiohttp sees a sid),
    while engine.io, which drops empty values, opened a new session for each."""
    address = "198.51.100.85"
    statuses, sids = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(8):
            async with session.get(f"{edge_gateway.url}/socket.io/?EIO=4&transport=polling&sid=",
                                   headers={"X-Forwarded-For": address}) as resp:
                body = await resp.text()
                statuses.append(resp.status)
                if resp.status == 200:
                    sids.append(body.split('"sid":"', 1)[1].split('"', 1)[0])
        assert statuses[:5] == [200] * 5 and statuses[5:] == [429] * 3, statuses
        for sid in sids:
            await _close_session(session, edge_gateway, address, sid)


async def test_the_session_cap_counts_an_ipv6_slash_64_and_ports_as_one_client(
        edge_gateway: GatewayNode) -> None:
    """Addresses rotated within one IPv6 /64 (or written with a port, or IPv4-mapped)
    each got a cap of their own."""
    for addresses in ([f"2001:db8:5:6::{i}" for i in range(1, 7)],
                      [f"198.51.100.87:{1000 + i}" for i in range(5)] + ["::ffff:198.51.100.87"]):
        async with aiohttp.ClientSession() as session:
            replies = [await _handshake(session, edge_gateway, a) for a in addresses]
            assert [status for status, _ in replies] == [200] * 5 + [429], replies
            for address, (_, sid) in zip(addresses[:5], replies[:5], strict=True):
                await _close_session(session, edge_gateway, address, sid)


async def test_engineio_handshakes_are_rate_limited_per_address(
        edge_gateway: GatewayNode) -> None:
    address = "198.51.100.90"
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            status, sid = await _handshake(session, edge_gateway, address)
            statuses.append(status)
            if status == 200:
                await _close_session(session, edge_gateway, address, sid)
    assert statuses[:12] == [200] * 12 and 429 in statuses[12:], statuses


# -- recovery CONNECTs and history -----------------------------------------------------

FORGED = {"pid": "AAAAAAAAAAAAAAAAAAAAAA", "offset": "1"}


def restore_lookups(gw: GatewayNode, since: int) -> int:
    """Restores the gateway looked up (and logged) since log offset ``since``."""
    assert gw.child is not None
    with open(gw.child.log_path, "rb") as f:
        f.seek(since)
        return f.read().count(b"not restoring a session")


async def test_restore_attempts_are_one_per_session_and_limited_per_address(
        jwt_recovery_pair: list[GatewayNode]) -> None:
    """300 recovery CONNECTs on one socket made 300 message-store look-ups and log
    lines; now one per engine.io session, and at most 10 per address in a burst."""
    gw = jwt_recovery_pair[1]
    assert gw.child is not None
    auth = {"token": token(), **FORGED}
    async with aiohttp.ClientSession() as session:
        start = gw.child.log_path.stat().st_size
        sock, _ = await RawSocket.connect(session, gw.url, auth)
        for _ in range(299):
            await sock.ws.send_str("41")
            await sock.ws.send_str("40" + json.dumps(auth))
            assert (await sock._read()).startswith("40{")
        await sock.ws.close()
        assert restore_lookups(gw, start) == 1
        start = gw.child.log_path.stat().st_size
        for _ in range(15):
            sock, _ = await RawSocket.connect(session, gw.url, auth,
                                              {"X-Forwarded-For": "198.51.100.100"})
            await sock.ws.close()
        assert restore_lookups(gw, start) == 10


async def test_history_reads_are_limited_per_address(
        jwt_recovery_pair: list[GatewayNode]) -> None:
    """Every join with history creates a JetStream consumer: 20 per address in a
    burst, then refused with a reason (the join itself can be sent without)."""
    gw = jwt_recovery_pair[0]
    async with aiohttp.ClientSession() as session:
        sock, _ = await RawSocket.connect(session, gw.url, {"token": token()},
                                          {"X-Forwarded-For": "198.51.100.101"})
        acks = [await sock.call("join", {"room": f"hist-{i}", "history": 5})
                for i in range(25)]
        assert all(a["ok"] for a in acks[:20]), acks[:20]
        assert all(not a["ok"] and "history reads" in a["error"] for a in acks[20:]), acks
        assert (await sock.call("join", "hist-plain"))["ok"] is True
        await sock.ws.close()
