"""The cluster-wide server API on the in-process bus: every call, and no waiting on
nodes that are dead or stopped."""

from __future__ import annotations

import asyncio
import time

import pytest

from nats_adapter.cluster import ClusterTimeoutError
from tests.helpers import SETTLE, SioClient
from tests.unit.conftest import CoreNode, NodeFactory
from tests.unit.test_core import client, join

HEARTBEAT = 0.1


async def three(make_node: NodeFactory, heartbeat_timeout: float | None = None
                ) -> list[CoreNode]:
    nodes = [await make_node(f"n{i}", heartbeat_interval=HEARTBEAT, node_name=f"gw-{i}",
                             heartbeat_timeout=heartbeat_timeout) for i in (1, 2, 3)]
    await until(lambda: all(n.manager.server_count() == 3 for n in nodes))
    return nodes


async def until(done: object, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_nodes_find_each_other_and_forget_the_ones_that_leave(
        make_node: NodeFactory) -> None:
    n1, n2, n3 = await three(make_node)
    assert {n["name"] for n in n1.manager.nodes()} == {"gw-2", "gw-3"}
    assert n1.manager.host_id.startswith("gw-1/")
    await n3.manager.close()  # says bye
    await until(lambda: n1.manager.server_count() == 2 and n2.manager.server_count() == 2,
                timeout=HEARTBEAT * 2)


async def test_heartbeats_are_counted_apart_and_are_never_wasted_receptions(
        make_node: NodeFactory) -> None:
    n1, _, _ = await three(make_node)
    stats = n1.manager.stats
    before = (stats.cluster_received, stats.cluster_received_bytes, stats.received_bytes)
    await until(lambda: stats.cluster_received - before[0] >= 4)  # heartbeats of n2 and n3
    heard = stats.cluster_received - before[0]
    assert heard >= 4, "heartbeats of the two other nodes"
    assert stats.cluster_received_bytes - before[1] > 20 * heard, "bytes counted with them"
    assert stats.received_bytes - before[2] >= stats.cluster_received_bytes - before[1]
    assert stats.unwanted == 0


async def test_fetch_sockets_across_nodes_with_rooms_and_except(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2, n3 = await three(make_node)
    a = await client(n1.url, "a", clients)
    b = await client(n2.url, "b", clients)
    c = await client(n3.url, "c", clients)
    for x in (a, b, c):
        await join(x, "lobby")
    await join(c, "vip")
    await n2.sio.save_session(b.sid, {"user": "bob"})
    found = {s.sid: s for s in await n1.manager.fetch_sockets()}
    assert set(found) == {a.sid, b.sid, c.sid}
    assert found[b.sid].rooms == ["lobby"] and found[b.sid].data == {"user": "bob"}
    assert found[c.sid].node.startswith("gw-3") and sorted(found[c.sid].rooms) == ["lobby", "vip"]
    assert found[a.sid].handshake["url"].startswith("/socket.io/")
    in_lobby_not_vip = await n1.manager.fetch_sockets("lobby", except_rooms=["vip", a.sid])
    assert [s.sid for s in in_lobby_not_vip] == [b.sid]
    assert await n2.manager.room_size("lobby") == 3
    assert sorted(await n3.manager.room_members("vip")) == [c.sid]
    local = await n1.manager.fetch_sockets(local=True)
    assert [s.sid for s in local] == [a.sid]


async def test_remote_sockets_can_be_acted_on(make_node: NodeFactory,
                                              clients: list[SioClient]) -> None:
    n1, n2, _ = await three(make_node)
    b = await client(n2.url, "b", clients)
    b.replies["ping"] = lambda data: {"pong": data}
    (remote,) = await n1.manager.fetch_sockets()
    await remote.emit("hello", "there")
    await b.wait_for(lambda r: r.received("hello") == ["there"], what="the emit")
    assert await remote.call("ping", 1, timeout=2) == {"pong": 1}
    await remote.join("moved")
    await until(lambda: n2.manager.get_rooms(b.sid, "/") == ["moved"])
    await remote.leave("moved")
    await until(lambda: n2.manager.get_rooms(b.sid, "/") == [])
    await remote.disconnect()
    await b.wait_for(lambda r: not r.sio.connected, what="the disconnect")


async def test_sockets_join_then_emit_reaches_them_and_leave_and_disconnect(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2, n3 = await three(make_node)
    a = await client(n1.url, "a", clients)
    b = await client(n2.url, "b", clients)
    c = await client(n3.url, "c", clients)
    for x in (a, b):
        await join(x, "team")
    assert await n3.manager.sockets_join(["news", "alerts"], to="team") == 2
    # returns once applied everywhere: an emit right after reaches them
    await n3.sio.emit("update", "v2", to="news")
    for x in (a, b):
        await x.wait_for(lambda r: r.received("update") == ["v2"], what="the news")
    assert sorted(n2.manager.get_rooms(b.sid, "/")) == ["alerts", "news", "team"]
    assert await n1.manager.sockets_leave("news", to=["team"], except_rooms=[b.sid]) == 1
    assert sorted(n1.manager.get_rooms(a.sid, "/")) == ["alerts", "team"]
    assert await n1.manager.disconnect_sockets(except_rooms="team") == 1  # c only
    await c.wait_for(lambda r: not r.sio.connected, what="c's disconnect")
    assert a.sio.connected and b.sio.connected


async def test_server_side_emit_answers_without_waiting_for_nodes_without_a_handler(
        make_node: NodeFactory) -> None:
    n1, n2, n3 = await three(make_node)
    seen: list[object] = []

    @n2.manager.on_server_event("reload")
    async def reload(config: str) -> dict[str, str]:
        seen.append(config)
        return {"node": "n2", "reloaded": config}

    n1.manager.on_server_event("reload", lambda config: f"n1 {config}")
    started = time.monotonic()
    replies = await n1.manager.server_side_emit("reload", "v7", timeout=5)
    assert replies == [{"node": "n2", "reloaded": "v7"}]  # never the caller's own handler
    assert time.monotonic() - started < 1.0, "waited for n3, which has no handler"
    got: list[object] = []
    await n3.manager.server_side_emit("reload", "v8", callback=got.append)
    assert len(got) == 1 and sorted(map(str, got[0])) == sorted(
        map(str, [{"node": "n2", "reloaded": "v8"}, "n1 v8"]))
    await n3.manager.server_side_emit("reload", "v9")  # fire and forget
    await until(lambda: seen == ["v7", "v8", "v9"])
    with pytest.raises(ValueError, match="reserved"):
        n1.manager.on_server_event("connect", lambda: None)


async def test_broadcast_with_acks_collects_every_recipient(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2, n3 = await three(make_node)
    members = [await client(n.url, f"m{i}", clients) for i, n in enumerate((n1, n2, n3, n3))]
    for i, m in enumerate(members):
        await join(m, "poll")
        m.replies["vote"] = lambda q, i=i: f"yes from m{i}"
    replies = await n1.manager.emit_with_acks("vote", "lunch?", to="poll",
                                              skip_sid=members[0].sid, timeout=5)
    assert sorted(replies) == ["yes from m1", "yes from m2", "yes from m3"]


async def test_a_recipient_that_leaves_is_not_waited_for(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2, _ = await three(make_node)
    quick = await client(n2.url, "quick", clients)
    gone = await client(n2.url, "gone", clients)
    for m in (quick, gone):
        await join(m, "poll")
    quick.replies["vote"] = lambda q: "quick"

    async def leave_instead(q: object) -> None:
        await gone.sio.disconnect()  # never answers

    gone.replies["vote"] = leave_instead
    started = time.monotonic()
    assert await n1.manager.emit_with_acks("vote", "?", to="poll", timeout=5) == ["quick"]
    assert time.monotonic() - started < 2.0


async def test_a_stopped_node_costs_at_most_the_timeout_and_then_nothing(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2, n3 = await three(make_node, heartbeat_timeout=1.5)
    await client(n2.url, "b", clients)
    await client(n3.url, "c", clients)
    # n3 stops reading its broker (as a SIGSTOPped or partitioned node would)
    reader = n3.manager.broker._reader  # type: ignore[attr-defined]
    reader.cancel()
    started = time.monotonic()
    with pytest.raises(ClusterTimeoutError) as caught:
        await n1.manager.fetch_sockets(timeout=0.5)
    waited = time.monotonic() - started
    assert 0.5 <= waited < 1.0, waited
    assert [s.node.split(" ")[0] for s in caught.value.responses] == ["gw-2"]
    assert len(caught.value.missing) == 1 and caught.value.missing[0].startswith("gw-3")
    # once its heartbeats are missed, calls no longer wait for it at all
    await until(lambda: n1.manager.server_count() == 2, timeout=2.0)
    started = time.monotonic()
    assert len(await n1.manager.fetch_sockets(timeout=5)) == 1
    assert time.monotonic() - started < 0.5
    await asyncio.sleep(SETTLE / 4)
