"""HTTP long-polling as Node's engine.io answers it (nats_adapter._engineio.polling).

A python-socketio server with this project's manager, in this event loop
(:func:`tests.unit.test_lean_websocket.serving`), and raw HTTP requests: each rule
of :class:`~nats_adapter._engineio.polling.PollingRules`, and that bad requests of
one session leave another session alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import engineio
import pytest
import socketio
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from engineio.async_socket import AsyncSocket

from nats_adapter._engineio import install
from nats_adapter._engineio.heartbeat import ping_later
from tests.helpers import wait_for_condition
from tests.unit.test_lean_websocket import Server, serving


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with serving() as srv:
        yield srv


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def base(server: Server) -> str:
    return f"{server.url}/socket.io/?EIO=4"


async def open_session(server: Server, http: aiohttp.ClientSession) -> str:
    async with http.get(f"{base(server)}&transport=polling") as resp:
        assert resp.status == 200
        opening = await resp.text()
    sid: str = json.loads(opening[1:])["sid"]
    return sid


async def poll(server: Server, http: aiohttp.ClientSession, sid: str) -> tuple[int, str]:
    async with http.get(f"{base(server)}&transport=polling&sid={sid}") as resp:
        return resp.status, await resp.text()


async def push(server: Server, http: aiohttp.ClientSession, sid: str, body: str
               ) -> tuple[int, str]:
    async with http.post(f"{base(server)}&transport=polling&sid={sid}", data=body) as resp:
        return resp.status, await resp.text()


async def test_a_request_without_a_known_transport_is_refused(
        server: Server, session: aiohttp.ClientSession) -> None:
    for query in ("", "&transport=", "&transport=abc"):
        async with session.get(base(server) + query) as resp:
            assert resp.status == 400, query
            assert await resp.json() == {"code": 0, "message": "Transport unknown"}
    assert not server.sio.eio.sockets, "no session was opened"


async def test_methods_other_than_get_and_post_are_refused_with_400(
        server: Server, session: aiohttp.ClientSession) -> None:
    for method in ("PUT", "DELETE", "PATCH"):
        async with session.request(method, f"{base(server)}&transport=polling") as resp:
            assert resp.status == 400, method
            assert (await resp.json())["message"] == "Bad handshake method"
    sid = await open_session(server, session)
    async with session.put(f"{base(server)}&transport=polling&sid={sid}", data="4x") as resp:
        assert resp.status == 400
    # the CORS preflight is still engine.io's
    async with session.options(f"{base(server)}&transport=polling") as resp:
        assert resp.status == 200
    assert await push(server, session, sid, "40") == (200, "ok")


async def test_a_push_is_answered_ok(server: Server, session: aiohttp.ClientSession) -> None:
    sid = await open_session(server, session)
    assert await push(server, session, sid, "40") == (200, "ok")
    status, body = await poll(server, session, sid)
    assert status == 200 and body.startswith("40{")


async def test_an_undecodable_push_ends_its_session_only(
        server: Server, session: aiohttp.ClientSession) -> None:
    bystander = await open_session(server, session)
    assert (await push(server, session, bystander, "40"))[0] == 200
    for body in ("abc", "4a\x1e", "x"):
        sid = await open_session(server, session)
        status, _ = await push(server, session, sid, body)
        assert status == 400, body
        assert sid not in server.sio.eio.sockets
        assert (await poll(server, session, sid))[0] == 400
    status, text = await poll(server, session, bystander)
    assert status == 200 and text.startswith("40{")


async def test_a_second_poll_while_one_waits_ends_the_session(
        session: aiohttp.ClientSession) -> None:
    async with serving(ping_interval=5, ping_timeout=5) as server:
        bystander = await open_session(server, session)
        sid = await open_session(server, session)
        first = asyncio.create_task(poll(server, session, sid))
        await until_polled(server, sid)
        assert (await poll(server, session, sid))[0] == 400
        assert await asyncio.wait_for(first, 2) == (200, "1")
        assert (await poll(server, session, sid))[0] == 400
        assert (await push(server, session, bystander, "40"))[0] == 200
        status, text = await poll(server, session, bystander)
        assert status == 200 and text.startswith("40{")


async def until_polled(server: Server, sid: str) -> None:
    """Until a poll of ``sid`` waits in engine.io's queue."""
    socket = server.sio.eio.sockets[sid]
    await wait_for_condition(lambda: socket.queue.polled, "the poll waiting", interval=0.005)


async def test_a_client_close_answers_the_waiting_poll_at_once(
        session: aiohttp.ClientSession) -> None:
    async with serving(ping_interval=5, ping_timeout=5) as server:
        sid = await open_session(server, session)
        waiting = asyncio.create_task(poll(server, session, sid))
        await until_polled(server, sid)
        assert (await push(server, session, sid, "1"))[0] == 200
        # engine.io left it waiting ping interval + timeout (10 s here)
        assert await asyncio.wait_for(waiting, 2) == (200, "6")
        assert (await poll(server, session, sid))[0] == 400


async def test_a_request_after_the_ping_timeout_finds_the_session_closed(
        session: aiohttp.ClientSession) -> None:
    async with serving(ping_interval=5, ping_timeout=5) as server:
        sid = await open_session(server, session)
        socket = server.sio.eio.sockets[sid]
        # a PING went out longer than the ping timeout ago, unanswered; the sweep
        # (every 2.5 s here) has not come by yet: engine.io answered the PING
        socket.last_ping = time.time() - 6
        assert (await asyncio.wait_for(poll(server, session, sid), 1))[0] == 400
        assert socket.closed and sid not in server.sio.eio.sockets


def block_the_loop(seconds: float) -> None:
    """A handler that holds the event loop (what makes timers fire late)."""
    time.sleep(seconds)


async def test_a_late_ping_timer_counts_the_ping_from_when_it_was_due() -> None:
    class Queue:
        def __init__(self) -> None:
            self.items: list[Any] = []

        def put_nowait(self, item: Any) -> None:
            self.items.append(item)

    class Sock:
        sid = "s"
        closing = closed = False
        last_ping: float | None = None
        queue = Queue()

    sock = Sock()
    before = time.time()
    ping_later(sock, 0.05, lambda sid: False)
    block_the_loop(0.2)  # the timer fires late
    await asyncio.sleep(0)
    await wait_for_condition(lambda: sock.queue.items, "the ping")
    assert sock.last_ping is not None
    assert before + 0.05 <= sock.last_ping < before + 0.1


async def test_a_connect_to_an_unknown_namespace_gets_nodes_error(
        server: Server, session: aiohttp.ClientSession) -> None:
    sid = await open_session(server, session)
    assert (await push(server, session, sid, "40/random,"))[0] == 200
    status, text = await poll(server, session, sid)
    assert (status, text) == (200, '44/random,{"message":"Invalid namespace"}')
    assert (await push(server, session, sid, "40"))[0] == 200
    assert (await poll(server, session, sid))[1].startswith("40{")


async def test_a_client_close_ends_a_poll_that_has_not_reached_the_queue_yet() -> None:
    """engine.io's poll waits on the queue from a task of its own (``wait_for``), a
    loop turn after the request came in: a CLOSE pushed in between still ends it."""
    eio = engineio.AsyncServer(async_mode="aiohttp")
    fastpath = install(eio)
    assert fastpath is not None and fastpath.polling is not None
    rules = fastpath.polling
    socket = AsyncSocket(eio, "s1")
    socket.connected = True
    socket.last_ping = None
    eio.sockets["s1"] = socket
    gate = asyncio.Event()

    async def engineio_handle(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            await gate.wait()  # the poll reaches the queue only now
            return web.Response(text=(await socket.queue.get()).encode())
        await socket.close(wait=False, abort=True)  # engine.io, for a CLOSE packet
        return web.Response(text="OK")

    query = "/socket.io/?EIO=4&transport=polling&sid=s1"
    waiting = asyncio.create_task(rules.serve(make_mocked_request("GET", query),
                                              engineio_handle))
    await wait_for_condition(lambda: "s1" in rules.polls, "the poll in engine.io's hands")
    pushed = await rules.serve(make_mocked_request("POST", query), engineio_handle)
    assert isinstance(pushed, web.Response) and pushed.body == b"ok"
    gate.set()
    answer = await asyncio.wait_for(waiting, 2)
    assert isinstance(answer, web.Response) and answer.text == "6"


async def test_a_python_socketio_client_over_polling_disconnects_at_once() -> None:
    """python-socketio's client sends CLOSE and waits for its pending long-poll: that
    poll waited out the client's request timeout (ping interval + 5 s) for its answer."""
    async with serving(ping_interval=25, ping_timeout=20) as server:
        client = socketio.AsyncClient()
        await client.connect(server.url, transports=["polling"])
        await wait_for_condition(
            lambda: any(s.queue.polled for s in server.sio.eio.sockets.values()),
            "the client's long-poll waiting")
        await asyncio.wait_for(client.disconnect(), 5)
        assert not server.sio.eio.sockets


def connections(server: Server) -> int:
    """How many connections the server holds."""
    return len(server.runner.server.connections) if server.runner.server else 0


async def test_a_push_cut_off_mid_body_costs_no_traceback(
        server: Server, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
        ) -> None:
    sid = await open_session(server, session)
    held = connections(server)
    _, writer = await asyncio.open_connection("127.0.0.1", int(server.url.rsplit(":")[-1]))
    writer.write(f"POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\n"
                 "Host: 127.0.0.1\r\nContent-Length: 100\r\n\r\n40".encode())
    await writer.drain()
    await wait_for_condition(lambda: connections(server) > held, "the push under way")
    writer.close()
    await wait_for_condition(lambda: connections(server) == held, "the connection gone")
    assert sid in server.sio.eio.sockets
    assert (await push(server, session, sid, "40"))[0] == 200
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_a_push_of_more_than_sixteen_packets_is_taken_whole(
        session: aiohttp.ClientSession) -> None:
    """socket.io-client batches what it emits while a POST is out: engine.io refused
    more than 16 packets in one payload (and dropped them all); Node takes them."""
    async with serving(ping_interval=5, ping_timeout=5) as server:
        sid = await open_session(server, session)
        assert (await push(server, session, sid, "40"))[0] == 200
        status, text = await poll(server, session, sid)
        assert status == 200 and text.startswith("40{")
        events = [f'42{k}["echo",{k}]' for k in range(40)]
        assert (await push(server, session, sid, "\x1e".join(events)))[0] == 200
        acks: list[str] = []
        while len(acks) < 40:
            status, text = await asyncio.wait_for(poll(server, session, sid), 2)
            assert status == 200, text
            acks += [p for p in text.split("\x1e") if p.startswith("43")]
        assert sorted(acks) == sorted(f"43{k}[{k}]" for k in range(40))
        assert sid in server.sio.eio.sockets
