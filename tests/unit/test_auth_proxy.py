"""The application's backend decides who may connect and join (gateway/auth_proxy.py),
asked by a gateway over HTTP: the example backend in docs/examples/auth_backend.py,
a real aiohttp server, and real Socket.IO clients."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import socketio
from aiohttp import web

from gateway.app import create_app
from gateway.auth_proxy import AuthProxy
from gateway.config import GatewayConfig
from gateway.processes import free_ports
from nats_adapter import MemoryManager
from nats_adapter.brokers.memory import MemoryBus
from tests.helpers import REPO, SioClient, parse_metrics, refusal

_spec = importlib.util.spec_from_file_location("auth_backend",
                                               REPO / "docs" / "examples" / "auth_backend.py")
assert _spec is not None and _spec.loader is not None
auth_backend: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auth_backend)


@dataclasses.dataclass
class Setup:
    gateway: str
    backend: web.AppRunner


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    backend_port, gateway_port = free_ports(2)
    backend = web.AppRunner(auth_backend.make_app())
    await backend.setup()
    await web.TCPSite(backend, "127.0.0.1", backend_port).start()
    config = dataclasses.replace(
        GatewayConfig(), backend="memory", node_id="gw-auth", port=gateway_port,
        connect_proxy=f"http://127.0.0.1:{backend_port}/socketio/connect",
        join_proxy=f"http://127.0.0.1:{backend_port}/socketio/join", proxy_timeout=0.5)
    gateway = web.AppRunner(create_app(config, MemoryManager(MemoryBus(), node_name="gw-auth")))
    await gateway.setup()
    await web.TCPSite(gateway, "127.0.0.1", gateway_port).start()
    try:
        yield Setup(f"http://127.0.0.1:{gateway_port}", backend)
    finally:
        await gateway.cleanup()
        await backend.cleanup()


async def test_the_backend_refuses_one_user_and_grants_another_two_rooms(
        setup: Setup, clients: list[SioClient]) -> None:
    assert await refusal(setup.gateway, {"session": "s-mallory"}) == "account suspended"
    assert await refusal(setup.gateway, {"session": "nobody"}) == "not signed in"
    assert await refusal(setup.gateway, None) == "not signed in"

    alice, alice2 = SioClient("alice"), SioClient("alice2")
    for c in (alice, alice2):
        clients.append(c)
        await c.connect(setup.gateway, auth={"session": "s-alice"})
    assert await alice.call("whoami") == {"ok": True, "user": "alice",
                                          "data": {"display_name": "Alice"},
                                          "name": None, "node": "gw-auth"}
    for room in ("lobby", "ops"):
        assert await alice.call("join", room) == {"ok": True, "room": room}
    ack = await alice.call("join", "secret")
    assert ack["ok"] is False and ack["error"].startswith("forbidden"), ack
    await alice2.join("lobby")

    # the backend goes away: new connections are refused, clearly; sockets carry on
    await setup.backend.cleanup()
    assert (await refusal(setup.gateway, {"session": "s-alice"})).startswith(
        "authorization backend unavailable")
    await alice.chat("lobby", "still here")
    await alice2.wait_texts(["still here"])
    # a join answered in the last --proxy-cache seconds (alice: ops) needs no backend
    assert await alice2.call("join", "ops") == {"ok": True, "room": "ops"}

    async with aiohttp.ClientSession() as http, http.get(f"{setup.gateway}/metrics") as r:
        metrics = parse_metrics(await r.text())
    def requests(proxy: str, outcome: str) -> float:
        return metrics['gateway_proxy_requests_total{backend="memory",node="gw-auth",'
                       f'outcome="{outcome}",proxy="{proxy}"}}']

    assert (requests("connect", "refused"), requests("connect", "allowed"),
            requests("connect", "unreachable")) == (3, 2, 1)
    assert (requests("join", "allowed"), requests("join", "cached")) == (2, 2)
    assert metrics["gateway_proxy_answers_total"] == 7


@pytest.mark.parametrize("answer", [
    web.json_response({"user": 42}),  # a 200 that is no grant
    web.json_response({"user": "x", "rooms": "lobby"}),
    web.json_response({"reason": "oops"}, status=500),
    web.Response(text="<html>login</html>", status=302),
], ids=["user not a string", "rooms not a list", "500", "302"])
async def test_an_answer_that_does_not_decide_lets_nobody_in(answer: web.Response) -> None:
    async def connect(request: web.Request) -> web.Response:
        return answer

    app = web.Application()
    app.router.add_post("/connect", connect)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    proxy = AuthProxy(f"http://127.0.0.1:{port}/connect", "", timeout=2)
    try:
        with pytest.raises(socketio.exceptions.ConnectionRefusedError,
                           match="authorization backend unavailable"):
            await proxy.connect({"session": "s"}, {}, "127.0.0.1", "/")
    finally:
        await proxy.close()
        await runner.cleanup()
