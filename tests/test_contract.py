"""The cross-node contract: what users of the manager and the chat protocol see.

Runs once per backend (the ``backend`` fixture) on three gateway nodes with real
Socket.IO clients; every test uses room names of its own so tests stay independent.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.helpers import (
    SETTLE,
    Node,
    SioClient,
    connect_all,
    wait_for_condition,
    wait_interest_everywhere,
)


def room_name(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


async def test_chat_crosses_nodes_and_skips_sender(nodes: list[Node], clients: list[SioClient]
                                                   ) -> None:
    a, b, c, outsider = await connect_all(
        clients, [("a", nodes[0]), ("b", nodes[1]), ("c", nodes[2]), ("outsider", nodes[1])])
    room = room_name("lobby")
    for client in (a, b, c):
        await client.join(room)
    msg_id = await a.chat(room, "hello from a")
    await b.wait_texts(["hello from a"])
    await c.wait_texts(["hello from a"])
    msg = b.received()[0]
    assert msg["room"] == room and msg["from"] == a.sid and msg["id"] == msg_id
    assert isinstance(msg["ts"], int)
    await asyncio.sleep(SETTLE)
    assert a.texts() == [], "the sender must not receive its own message"
    assert outsider.texts() == [], "a non-member must receive nothing"
    assert c.texts() == ["hello from a"], "delivered exactly once"


async def test_chat_to_unjoined_room_is_refused(nodes: list[Node], clients: list[SioClient]
                                                ) -> None:
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    room = room_name("closed")
    await b.join(room)
    ack = await a.call("chat", {"room": room, "text": "let me in"})
    assert ack["ok"] is False and "not a member" in ack["error"]
    await asyncio.sleep(SETTLE)
    assert b.texts() == []


async def test_leave_stops_delivery(nodes: list[Node], clients: list[SioClient]) -> None:
    a, b = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1])])
    room = room_name("leave")
    await a.join(room)
    await b.join(room)
    await a.chat(room, "one")
    await b.wait_texts(["one"])
    assert await b.call("leave", room) == {"ok": True, "room": room}
    await a.chat(room, "two")
    await asyncio.sleep(SETTLE)
    assert b.texts() == ["one"]


async def test_multi_room_emit_is_delivered_once(nodes: list[Node], clients: list[SioClient]
                                                 ) -> None:
    both_local, both_remote, only_r2, only_r1 = await connect_all(
        clients, [("both-local", nodes[0]), ("both-remote", nodes[1]), ("r2", nodes[2]),
                  ("r1", nodes[1])])
    r1, r2 = room_name("r1"), room_name("r2")
    for client in (both_local, both_remote):
        await client.join(r1)
        await client.join(r2)
    await only_r2.join(r2)
    await only_r1.join(r1)
    await nodes[0].sio.emit("news", {"n": 1}, to=[r1, r2])
    for client in (both_local, both_remote, only_r2, only_r1):
        await client.wait_for(lambda c: len(c.received("news")) >= 1, what="news")
    await asyncio.sleep(SETTLE)
    for client in (both_local, both_remote, only_r2, only_r1):
        assert client.received("news") == [{"n": 1}], client.name


async def test_emit_to_room_and_sid_list_is_delivered_once(
        nodes: list[Node], clients: list[SioClient]) -> None:
    member, direct = await connect_all(clients, [("member", nodes[1]), ("direct", nodes[2])])
    room = room_name("mixed")
    await member.join(room)
    await direct.join(room)
    # `direct` is addressed both as a room member and by sid: one copy
    await nodes[0].sio.emit("note", "x", to=[room, direct.sid, member.sid])
    for client in (member, direct):
        await client.wait_for(lambda c: len(c.received("note")) >= 1, what="note")
    await asyncio.sleep(SETTLE)
    assert member.received("note") == ["x"]
    assert direct.received("note") == ["x"]


async def test_skip_sid_list_applies_on_every_node(nodes: list[Node], clients: list[SioClient]
                                                   ) -> None:
    keep0, skip0, keep1, skip1, skip2 = await connect_all(
        clients, [("keep0", nodes[0]), ("skip0", nodes[0]), ("keep1", nodes[1]),
                  ("skip1", nodes[1]), ("skip2", nodes[2])])
    room = room_name("skip")
    for client in (keep0, skip0, keep1, skip1, skip2):
        await client.join(room)
    await nodes[0].sio.emit("news", "hi", to=room, skip_sid=[skip0.sid, skip1.sid, skip2.sid])
    await keep0.wait_for(lambda c: c.received("news") == ["hi"], what="news")
    await keep1.wait_for(lambda c: c.received("news") == ["hi"], what="news")
    await asyncio.sleep(SETTLE)
    for client in (skip0, skip1, skip2):
        assert client.received("news") == [], client.name
    # a single sid (not a list) works the same way
    await nodes[2].sio.emit("news", "again", to=room, skip_sid=keep1.sid)
    await keep0.wait_for(lambda c: c.received("news") == ["hi", "again"], what="again")
    await asyncio.sleep(SETTLE)
    assert keep1.received("news") == ["hi"]


async def test_namespace_broadcast_reaches_every_node_once(
        nodes: list[Node], clients: list[SioClient]) -> None:
    everyone = await connect_all(clients, [(f"c{i}", nodes[i % 3]) for i in range(6)])
    token = uuid.uuid4().hex
    await nodes[1].sio.emit("announce", token, skip_sid=everyone[0].sid)
    for client in everyone[1:]:
        await client.wait_for(lambda c: token in c.received("announce"), what="announce")
    await asyncio.sleep(SETTLE)
    assert token not in everyone[0].received("announce")
    for client in everyone[1:]:
        assert client.received("announce").count(token) == 1, client.name


async def test_close_room_removes_members_on_every_node(
        nodes: list[Node], clients: list[SioClient]) -> None:
    a, b, c = await connect_all(clients, [("a", nodes[0]), ("b", nodes[1]), ("c", nodes[2])])
    room = room_name("close")
    for client in (a, b, c):
        await client.join(room)
    await nodes[0].sio.close_room(room)

    async def closed_everywhere() -> bool:
        return all(room not in n.manager.get_rooms(cl.sid, "/")
                   for n, cl in zip(nodes, (a, b, c), strict=True))

    await wait_for_condition(closed_everywhere, "the room closed on every node")
    await nodes[2].sio.emit("news", "after close", to=room)
    await asyncio.sleep(SETTLE)
    assert a.received("news") == b.received("news") == c.received("news") == []
    ack = await b.call("chat", {"room": room, "text": "still here?"})
    assert ack["ok"] is False


async def test_direct_message_to_sid_on_another_node(nodes: list[Node], clients: list[SioClient]
                                                     ) -> None:
    target, bystander = await connect_all(clients, [("target", nodes[1]), ("by", nodes[1])])
    await nodes[0].sio.emit("dm", {"secret": 42}, to=target.sid)
    await target.wait_for(lambda c: c.received("dm") == [{"secret": 42}], what="dm")
    await asyncio.sleep(SETTLE)
    assert bystander.received("dm") == []


async def test_call_with_ack_to_sid_on_another_node(nodes: list[Node], clients: list[SioClient]
                                                    ) -> None:
    (target,) = await connect_all(clients, [("target", nodes[2])])
    target.replies["ping"] = lambda data: {"pong": data["n"] + 1}
    reply = await nodes[0].sio.call("ping", {"n": 41}, to=target.sid, timeout=5)
    assert reply == {"pong": 42}
    # and to a local sid, through the same manager
    reply = await nodes[2].sio.call("ping", {"n": 1}, to=target.sid, timeout=5)
    assert reply == {"pong": 2}


async def test_remote_enter_and_leave_room(nodes: list[Node], clients: list[SioClient]) -> None:
    sender, target = await connect_all(clients, [("sender", nodes[0]), ("target", nodes[1])])
    room = room_name("remote-join")
    await sender.join(room)
    await nodes[2].sio.enter_room(target.sid, room)
    await wait_for_condition(lambda: room in nodes[1].manager.get_rooms(target.sid, "/"),
                             "the remote enter_room")
    await wait_interest_everywhere(room)
    await sender.chat(room, "welcome")
    await target.wait_texts(["welcome"])
    await nodes[2].sio.leave_room(target.sid, room)
    await wait_for_condition(lambda: room not in nodes[1].manager.get_rooms(target.sid, "/"),
                             "the remote leave_room")
    await sender.chat(room, "gone")
    await asyncio.sleep(SETTLE)
    assert target.texts() == ["welcome"]


async def test_remote_disconnect(nodes: list[Node], clients: list[SioClient]) -> None:
    (target,) = await connect_all(clients, [("target", nodes[1])])
    sid = target.sid
    disconnected = asyncio.Event()
    target.sio.on("disconnect", lambda *a: disconnected.set())
    await nodes[0].sio.disconnect(sid)
    async with asyncio.timeout(5):
        await disconnected.wait()
    await wait_for_condition(lambda: not nodes[1].manager.is_connected(sid, "/"),
                             "the remote disconnect")


async def test_callback_to_a_room_is_refused(nodes: list[Node]) -> None:
    with pytest.raises(ValueError, match="single sid"):
        await nodes[0].sio.emit("x", 1, to="some-room", callback=lambda *a: None)


async def test_connected_socket_is_in_no_room(nodes: list[Node], clients: list[SioClient]
                                              ) -> None:
    (client,) = await connect_all(clients, [("fresh", nodes[0])])
    manager = nodes[0].manager
    assert manager.is_connected(client.sid, "/")
    assert manager.get_rooms(client.sid, "/") == []
    assert client.sid not in manager.rooms["/"], "no per-socket default room"
    assert all(client.sid not in members for room, members in manager.rooms["/"].items()
               if room is not None)
    room = room_name("only")
    await client.join(room)
    assert manager.get_rooms(client.sid, "/") == [room]


@pytest.mark.parametrize("tricky", [
    ["a.b", "a", "b", "a_2Eb"],
    ["a.*", "a.>", ">", "*", "a.x"],
    [" ", "a b", "a\tb", "a\nb", ""],
    ["😀", "😀😀", "ü", "u"],
    ["A", "a", "ROOM", "room"],
    ["{tag}", "tag", "_", "_5F", "__"],
])
async def test_room_names_stay_isolated(tricky: list[str], nodes: list[Node],
                                        clients: list[SioClient]) -> None:
    rooms = [r for r in tricky if r]  # "" is refused by the gateway; see test_bad_input
    sender = SioClient("sender")
    clients.append(sender)
    await sender.connect(nodes[0].url)
    members = await connect_all(clients, [(repr(r), nodes[1 + i % 2]) for i, r in
                                          enumerate(rooms)])
    for room, member in zip(rooms, members, strict=True):
        await member.join(room)
        await sender.join(room)
    for room in rooms:
        await sender.chat(room, f"to {room!r}")
    for room, member in zip(rooms, members, strict=True):
        await member.wait_texts([f"to {room!r}"])
    await asyncio.sleep(SETTLE)
    for room, member in zip(rooms, members, strict=True):
        assert member.texts() == [f"to {room!r}"], f"room {room!r} got {member.texts()!r}"
