"""The cluster-wide server API on real brokers: three gateways on NATS and on a Redis
Cluster, python-socketio clients and the official JavaScript client, a node that is
stopped (SIGSTOP) and one that dies (SIGKILL) mid-life."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.processes import GatewayNode, free_ports, start_gateway, stop_all, wait_gateways
from nats_adapter.cluster import ClusterTimeoutError
from tests.conftest import TEST_HEARTBEAT, broker_args
from tests.helpers import (
    Node,
    NodeClient,
    SioClient,
    connect_all,
    freeze,
    http_json,
    wait_for_condition,
)


def room_name() -> str:
    return f"api-{uuid.uuid4().hex[:6]}"


async def until(done: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_fetch_join_leave_disconnect_across_gateways_with_the_js_client(
        nodes: list[Node], clients: list[SioClient], node_bin: str) -> None:
    room = room_name()
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    js = await NodeClient.start(node_bin, nodes[2].url, "js")
    try:
        for c in (a, b):
            await c.join(room)
        assert (await js.call("join", room))["ok"] is True
        found = {s.sid: s for s in await nodes[1].manager.fetch_sockets(room)}
        assert set(found) == {a.sid, b.sid, js.sid}
        assert found[js.sid].node.startswith(nodes[2].node_id)
        assert found[js.sid].rooms == [room]
        assert await nodes[0].manager.room_size(room) == 3
        # one call puts every member of the room, on every node, in another room
        extra = room_name()
        assert await nodes[0].manager.sockets_join(extra, to=room, except_rooms=[a.sid]) == 2
        await nodes[0].sio.emit("news", "for the extra room", to=extra)
        await b.wait_for(lambda c: c.received("news") == ["for the extra room"], what="news")
        await js.wait_for(lambda c: any(e.get("event") == "news" for e in c.events),
                          what="news at the JS client")
        assert a.received("news") == []
        assert await nodes[2].manager.sockets_leave(extra, to=room) == 3
        assert extra not in nodes[2].manager.get_rooms(js.sid, "/")
        # and disconnects them, the JS client included
        assert await nodes[1].manager.disconnect_sockets(to=room, except_rooms=[b.sid]) == 2
        await a.wait_for(lambda c: not c.sio.connected, what="a's disconnect")
        await js.wait_for(lambda c: any(e["type"] == "disconnect" for e in c.events),
                          what="the JS client's disconnect")
        assert b.sio.connected
    finally:
        await js.close()


async def test_server_side_emit_and_broadcast_with_acks(
        nodes: list[Node], clients: list[SioClient], node_bin: str) -> None:
    event = f"cfg-{uuid.uuid4().hex[:4]}"
    for i, node in enumerate(nodes[1:], 2):
        node.manager.on_server_event(event, lambda v, i=i: f"gw-{i} took {v}")
    replies = await nodes[0].manager.server_side_emit(event, "v1", timeout=5)
    assert sorted(replies) == ["gw-2 took v1", "gw-3 took v1"]
    room = room_name()
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    js = await NodeClient.start(node_bin, nodes[2].url, "js")
    try:
        for c in (a, b):
            await c.join(room)
            c.replies["vote"] = lambda q, name=c.name: f"{name} says yes"
        assert (await js.call("join", room))["ok"] is True
        acks = await nodes[1].manager.emit_with_acks("vote", "lunch?", to=room, timeout=5)
        assert sorted(map(str, acks)) == sorted(
            ["a says yes", "b says yes", str({"echo": "lunch?", "from": "node"})])
    finally:
        await js.close()


async def test_room_size_over_http_from_any_gateway(nodes: list[Node],
                                                   clients: list[SioClient]) -> None:
    room = room_name()
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    for c in (a, b):
        await c.join(room)
    for node in nodes:  # the gateway a client asks need not hold any member
        status, body = await asyncio.to_thread(http_json, f"{node.url}/api/rooms/{room}")
        assert status == 200 and body == {"ok": True, "room": room, "members": 2}, body


@pytest.fixture
def extra_gateway(workdir: Path, nodes: list[Node], request: pytest.FixtureRequest
                  ) -> Iterator[GatewayNode]:
    """A fourth gateway, as a process this test may stop or kill."""
    backend = nodes[0].config.backend
    gw = start_gateway(workdir / "cluster-api", f"extra-{backend}-{uuid.uuid4().hex[:4]}",
                       free_ports(1)[0], backend, broker_args(backend, request),
                       extra=["--heartbeat-interval", str(TEST_HEARTBEAT)])
    try:
        wait_gateways([gw])
        yield gw
    finally:
        assert gw.child is not None
        gw.child.signal(signal.SIGCONT)
        stop_all([gw.child])


async def test_a_stopped_gateway_costs_the_timeout_and_a_dead_one_nothing(
        nodes: list[Node], extra_gateway: GatewayNode, clients: list[SioClient]) -> None:
    assert extra_gateway.child is not None
    room = room_name()
    (a,) = await connect_all(clients, [("a", nodes[0])])
    (far,) = await connect_all(clients, [("far", extra_gateway.url)])
    for c in (a, far):
        await c.join(room)
    await until(lambda: any(n["name"] == extra_gateway.node_id
                            for n in nodes[0].manager.nodes()))
    started = time.monotonic()
    assert {s.sid for s in await nodes[0].manager.fetch_sockets(room)} == {a.sid, far.sid}
    alive = time.monotonic() - started
    await freeze(extra_gateway.child.pid)
    started = time.monotonic()
    with pytest.raises(ClusterTimeoutError) as caught:
        await nodes[0].manager.fetch_sockets(room, timeout=1.0)
    stopped = time.monotonic() - started
    assert 1.0 <= stopped < 1.5, f"waited {stopped:.2f} s with a 1 s timeout"
    assert [s.sid for s in caught.value.responses] == [a.sid]
    assert any(m.startswith(extra_gateway.node_id) for m in caught.value.missing)
    print(f"\nfetch_sockets: {alive * 1000:.1f} ms with all alive, {stopped:.2f} s "
          "(timeout 1 s) with one stopped")
    extra_gateway.child.signal(signal.SIGCONT)
    resumed = time.monotonic()

    def heard_since_resumed() -> bool:
        return any(n["name"] == extra_gateway.node_id
                   and n["last_seen_s"] < time.monotonic() - resumed
                   for n in nodes[0].manager.nodes())

    await until(heard_since_resumed, timeout=TEST_HEARTBEAT * 6)
    # dead without a goodbye: waited for until its heartbeats are missed, then never
    extra_gateway.child.signal(signal.SIGKILL)
    extra_gateway.child.popen.wait()
    await until(lambda: not any(n["name"] == extra_gateway.node_id
                                for n in nodes[0].manager.nodes()), timeout=TEST_HEARTBEAT * 6)
    started = time.monotonic()
    assert [s.sid for s in await nodes[0].manager.fetch_sockets(room, timeout=5)] == [a.sid]
    assert time.monotonic() - started < 0.5


async def test_presence_events_cross_gateways_when_turned_on(
        nats_cluster: object, clients: list[SioClient]) -> None:
    from tests.conftest import start_node

    urls = tuple(nats_cluster.urls)  # type: ignore[attr-defined]
    made = [await start_node("nats", f"presence-{i}", {"nats_urls": urls, "presence": True})
            for i in (1, 2)]
    try:
        room = room_name()
        a, b, c = await connect_all(clients, [("a", made[0]), ("b", made[1]), ("c", made[1])])
        await a.join(room)
        await b.join(room)
        await a.wait_for(lambda x: x.received("presence") == [
            {"room": room, "sid": b.sid, "change": "joined"}], what="b joining")
        assert (await b.call("leave", room))["ok"] is True
        await c.join(room)
        c_sid = c.sid
        await c.close()
        await a.wait_for(lambda x: [(p["sid"], p["change"]) for p in x.received("presence")]
                         == [(b.sid, "joined"), (b.sid, "left"), (c_sid, "joined"),
                             (c_sid, "left")], what="every change, in order")
        assert b.received("presence") == []  # b was no longer in the room
    finally:
        for node in made:
            await node.runner.cleanup()


async def test_the_admin_ui_sees_and_moves_sockets_of_every_gateway(
        workdir: Path, clients: list[SioClient], request: pytest.FixtureRequest) -> None:
    """GATEWAY_ADMIN_PASSWORD turns python-socketio's Admin UI instrumentation on, over
    the whole cluster (each gateway is its own process, as in production)."""
    import socketio

    password = "admin-test-pass-31f9"
    gws = []
    try:
        for i, port in enumerate(free_ports(2)):
            gws.append(start_gateway(
                workdir / "admin", f"admin-gw-{i + 1}", port, "nats",
                broker_args("nats", request),
                extra=["--admin-mode", "development", "--heartbeat-interval", "0.5"],
                env={"GATEWAY_ADMIN_PASSWORD": password}))
        wait_gateways(gws)
        (b,) = await connect_all(clients, [("b", gws[1].url)])
        admin = socketio.AsyncClient(reconnection=False)
        seen: dict[str, list[object]] = {}

        async def record(event: str, *args: object) -> None:
            seen.setdefault(event, []).append(args[0] if len(args) == 1 else args)

        admin.on("*", record, namespace="/admin")
        auth = {"username": "admin", "password": password}
        # the gateways hear of each other: gateway 1 counts b's room on gateway 2
        probe = room_name()
        await b.join(probe)

        def counted() -> bool:
            return (http_json(f"{gws[0].url}/api/rooms/{probe}")[1] or {}).get("members") == 1

        # polled gently: the API's rate limit is per client address
        await wait_for_condition(counted, "gateway 1 to hear of gateway 2", timeout=10,
                                 interval=0.1)
        await admin.connect(gws[0].url, namespaces=["/admin"], auth=auth,
                            transports=["websocket"])
        try:
            await until(lambda: "all_sockets" in seen)
            listed = {s["id"]: s for s in seen["all_sockets"][0]}  # type: ignore[index]
            assert b.sid in listed, "a socket of the other gateway is listed"
            # the UI's Join and Disconnect buttons, on that socket
            await admin.emit("join", ("/", "moved", b.sid), namespace="/admin")
            await admin.emit("_disconnect", ("/", False, b.sid), namespace="/admin")
            await b.wait_for(lambda c: not c.sio.connected, what="the disconnect")
            # every gateway reports its own stats, under its own server id
            await until(lambda: {s["serverId"].split("/")[0] for s in seen.get("server_stats", [])
                                 if isinstance(s, dict)} >= {"admin-gw-1", "admin-gw-2"},
                        timeout=10)
        finally:
            await admin.disconnect()
        wrong = socketio.AsyncClient(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await wrong.connect(gws[0].url, namespaces=["/admin"],
                                auth={"username": "admin", "password": "guess"},
                                transports=["websocket"], wait_timeout=5)
        await wrong.disconnect()
    finally:
        stop_all([g.child for g in gws])
