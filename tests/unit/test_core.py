"""The node core on the in-process bus: routing, dedupe, linger, acks.

Fast (no broker process); each test states what a user of the manager would see.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from nats_adapter import codec
from nats_adapter.dedupe import DedupeWindow
from nats_adapter.hub import LocalHub
from nats_adapter.sids import is_sid, sid_owner
from nats_adapter.stats import ManagerStats
from tests.helpers import SioClient, wait_for_condition
from tests.unit.conftest import LINGER, NodeFactory, settle


async def client(url: str, name: str, made: list[SioClient]) -> SioClient:
    c = SioClient(name)
    made.append(c)
    return await c.connect(url)


async def join(c: SioClient, room: str) -> None:
    assert await c.call("join", room) == {"ok": True, "room": room}


# -- routing -------------------------------------------------------------------------


async def test_room_emit_reaches_members_on_every_node_but_the_skipped_one(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2, n3 = [await make_node(f"n{i}") for i in (1, 2, 3)]
    a = await client(n1.url, "a", clients)
    b = await client(n2.url, "b", clients)
    c = await client(n3.url, "c", clients)
    for x in (a, b, c):
        await join(x, "lobby")
    await n1.sio.emit("news", "one", to="lobby", skip_sid=a.sid)
    await n2.sio.emit("news", "two", to="lobby", skip_sid=b.sid)
    for receiver, expected in ((a, ["two"]), (b, ["one"]), (c, ["one", "two"])):
        await receiver.wait_for(lambda r, e=expected: sorted(r.received("news")) == e,
                                what=f"news {expected}")
    await settle([n1, n2, n3], a, b, c)
    assert sorted(a.received("news")) == ["two"]
    assert sorted(b.received("news")) == ["one"]


async def test_a_room_emit_travels_as_little_more_than_its_packet(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    """The channel names the room and namespace, the sender's own sid is on no other
    node, and a no-echo broker without a cluster key needs no origin: an emit to one
    room puts its packet on the bus with 5 bytes of envelope, and still reaches every
    other member on every node, the skipped one excepted."""
    n1, n2 = [await make_node(f"n{i}") for i in (1, 2)]
    a = await client(n1.url, "a", clients)
    a2 = await client(n1.url, "a2", clients)
    b = await client(n2.url, "b", clients)
    for x in (a, a2, b):
        await join(x, "a room of some length")
    before = n1.manager.stats.published_bytes
    await n1.sio.emit("news", "one", to="a room of some length", skip_sid=a.sid)
    packet = '2["news","one"]'
    assert n1.manager.stats.published_bytes - before == len(packet) + 5
    await b.wait_for(lambda r: r.received("news") == ["one"], what="the news on n2")
    await a2.wait_for(lambda r: r.received("news") == ["one"], what="the news on n1")
    # the other way, skipping a socket of the receiving node: that sid travels
    await n2.sio.emit("news", "two", to="a room of some length", skip_sid=a2.sid)
    await a.wait_for(lambda r: r.received("news") == ["two"], what="the news from n2")
    await settle([n1, n2], a, a2, b)
    assert a.received("news") == ["two"] and a2.received("news") == ["one"]
    assert b.received("news") == ["one", "two"]
    assert n1.manager.stats.dropped_malformed == n2.manager.stats.dropped_malformed == 0


async def test_a_room_emit_on_a_channel_that_names_no_room_is_dropped(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2 = [await make_node(f"n{i}") for i in (1, 2)]
    b = await client(n2.url, "b", clients)
    envelope = codec.encode(codec.EmitMessage("", "/", ["x"], [], '2["news","forged"]',
                                              channel_room=True))
    await n1.manager.broker.publish(n2.manager.channels.node(n2.manager.node_tag), envelope)
    async with asyncio.timeout(5):
        while n2.manager.stats.dropped_malformed == 0:
            await asyncio.sleep(0.02)
    await settle([n1, n2], b)
    assert b.received("news") == []


async def test_sids_name_their_node_and_direct_emits_go_only_there(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2, n3 = [await make_node(f"n{i}") for i in (1, 2, 3)]
    b = await client(n2.url, "b", clients)
    assert is_sid(b.sid) and sid_owner(b.sid) == n2.manager.node_tag
    received_before = n3.manager.stats.received
    await n1.sio.emit("dm", "for b", to=b.sid)
    await b.wait_for(lambda r: r.received("dm") == ["for b"], what="the direct message")
    await settle([n1], b)
    assert n3.manager.stats.received == received_before, "a third node saw a direct message"


async def test_multi_room_emit_is_delivered_once_and_the_copy_is_counted(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2 = await make_node("n1"), await make_node("n2")
    b = await client(n2.url, "b", clients)
    for room in ("r1", "r2", "r3"):
        await join(b, room)
    await n1.sio.emit("news", "once", to=["r1", "r2", "r3", b.sid])
    await b.wait_for(lambda r: r.received("news") == ["once"], what="one copy")
    await settle([n1], b)
    assert b.received("news") == ["once"]
    # four channels (three rooms and b's node), one delivery, three copies dropped
    assert n2.manager.stats.dropped_duplicate == 3


async def test_namespace_broadcast_crosses_nodes(make_node: NodeFactory,
                                                 clients: list[SioClient]) -> None:
    n1, n2 = await make_node("n1"), await make_node("n2")
    a = await client(n1.url, "a", clients)
    b = await client(n2.url, "b", clients)
    await n2.sio.emit("all", "hello")
    for x in (a, b):
        await x.wait_for(lambda r: r.received("all") == ["hello"], what="the broadcast")


async def test_remote_enter_leave_and_disconnect(make_node: NodeFactory,
                                                 clients: list[SioClient]) -> None:
    n1, n2 = await make_node("n1"), await make_node("n2")
    b = await client(n2.url, "b", clients)
    await n1.sio.enter_room(b.sid, "moved")
    deadline = time.monotonic() + 2
    while n2.manager.get_rooms(b.sid, "/") != ["moved"] and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert n2.manager.get_rooms(b.sid, "/") == ["moved"]
    await n1.sio.emit("news", "in moved", to="moved")
    await b.wait_for(lambda r: r.received("news") == ["in moved"], what="the room's emit")
    await n1.sio.leave_room(b.sid, "moved")
    while n2.manager.get_rooms(b.sid, "/") and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert n2.manager.get_rooms(b.sid, "/") == []
    await n1.sio.disconnect(b.sid)
    await b.wait_for(lambda r: not r.sio.connected, what="the disconnect")


async def test_messages_for_rooms_without_local_members_are_counted_as_unwanted(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2 = await make_node("n1"), await make_node("n2")
    b = await client(n2.url, "b", clients)
    await join(b, "brief")
    assert await b.call("leave", "brief") == {"ok": True, "room": "brief"}
    # still subscribed during the linger: what arrives now is a wasted reception
    await n1.sio.emit("news", "late", to="brief")
    await wait_for_condition(lambda: n2.manager.stats.unwanted == 1, "the wasted reception")
    assert n2.manager.stats.unwanted == 1
    assert b.received("news") == []


# -- linger --------------------------------------------------------------------------


async def test_emptied_room_is_unsubscribed_after_the_linger(make_node: NodeFactory,
                                                             clients: list[SioClient]) -> None:
    n1 = await make_node("n1")
    a = await client(n1.url, "a", clients)
    channel = n1.manager.channels.room("/", "quiet")
    await join(a, "quiet")
    assert channel in n1.manager.broker.bus.subscribers  # type: ignore[attr-defined]
    await a.call("leave", "quiet")
    assert channel in n1.manager.subscriptions and n1.manager.subscriptions.lingering == 1
    bus = n1.manager.broker.bus  # type: ignore[attr-defined]
    # the manager forgets the channel first, then the broker's unsubscribe completes
    await wait_for_condition(lambda: channel not in n1.manager.subscriptions
                             and channel not in bus.subscribers,
                             "the linger to end and the broker to unsubscribe",
                             timeout=LINGER * 20)
    assert n1.manager.stats.unsubscribe_ops == 1


async def test_rejoining_within_the_linger_costs_no_broker_operation(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1 = await make_node("n1")
    a = await client(n1.url, "a", clients)
    await join(a, "churn")
    stats = n1.manager.stats
    ops = (stats.subscribe_ops, stats.unsubscribe_ops)
    for _ in range(20):
        await a.call("leave", "churn")
        await join(a, "churn")
    await asyncio.sleep(LINGER * 2)  # past the linger: proves no unsubscribe came (not a wait)
    assert (stats.subscribe_ops, stats.unsubscribe_ops) == ops


# -- acks ----------------------------------------------------------------------------


async def test_call_to_a_socket_on_another_node_returns_its_ack(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2 = await make_node("n1"), await make_node("n2")
    b = await client(n2.url, "b", clients)
    b.replies["ping"] = lambda data: {"pong": data}
    assert await n1.sio.call("ping", 7, to=b.sid, timeout=2) == {"pong": 7}


async def test_a_remote_callback_that_never_comes_is_forgotten(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2 = await make_node("n1", callback_timeout=0.2), await make_node("n2")
    gone = f"{n2.manager.node_tag}:{'x' * 12}"  # n2's, but no such socket: nobody acks
    got: list[object] = []
    await n1.sio.emit("never", "x", to=gone, callback=lambda *a: got.append(a))
    assert n1.manager._remote_callbacks
    await wait_for_condition(lambda: not n1.manager._remote_callbacks,
                             "the callback to time out")
    assert not n1.manager._remote_callbacks and gone not in n1.manager.callbacks
    assert got == [] and n2.manager.stats.unwanted == 1


async def test_callbacks_to_a_room_are_refused(make_node: NodeFactory) -> None:
    n1 = await make_node("n1")
    with pytest.raises(ValueError, match="single sid"):
        await n1.sio.emit("x", to="room", callback=lambda *a: None)


# -- pieces --------------------------------------------------------------------------


def test_hub_reports_first_and_last_member_and_keeps_no_sid_room() -> None:
    hub = LocalHub(ManagerStats())
    assert hub.join("s1", "/", None, eio_sid="e1") is True
    assert hub.join("s2", "/", None, eio_sid="e2") is False
    assert hub.join("s1", "/", "r") is True
    assert hub.join("s2", "/", "r") is False
    assert set(hub.rooms["/"]) == {None, "r"}  # no room per sid
    assert hub.rooms_of("s1", "/") == ["r"]
    assert hub.targets("/", ["r", "s1"], frozenset({"s2"})) == {"s1": "e1"}
    assert hub.leave("s1", "/", "r") is False
    assert hub.leave("s2", "/", "r") is True
    assert hub.room_count() == 0 and hub.participants_count() == 2
    with pytest.raises(ValueError):
        hub.join("ghost", "/", "r")


def test_a_message_only_its_sender_would_get_reaches_nobody() -> None:
    """With recovery a node's own room messages come back from the store: one whose
    only local member is its sender reaches nobody (a wasted reception)."""
    hub = LocalHub(ManagerStats())
    hub.join("s1", "/", None, eio_sid="e1")
    hub.join("s1", "/", "r")
    alone, sender = ["r"], frozenset({"s1"})
    assert hub.reaches_any("/", alone, frozenset()) is True
    assert hub.reaches_any("/", alone, sender) is False
    assert hub.reaches_any("/", ["s1"], sender) is False
    assert hub.reaches_any("/", ["elsewhere"], frozenset()) is False
    hub.join("s2", "/", None, eio_sid="e2")
    hub.join("s2", "/", "r")
    assert hub.reaches_any("/", alone, sender) is True


def test_dedupe_window_forgets_old_ids_and_stays_bounded() -> None:
    window = DedupeWindow(window=0.05, max_ids=3)
    assert window.first("a") and not window.first("a")
    for x in "bcd":
        assert window.first(x)
    assert len(window) == 3  # "a" pushed out by the bound
    time.sleep(0.06)  # the window's clock is the time itself: let it pass
    assert window.first("e") and len(window) == 1  # the rest aged out


def test_offsets_are_appended_as_the_last_argument() -> None:
    from nats_adapter.recovery import with_offset

    assert with_offset('2["chat",{"text":"hi"}]', 42) == '2["chat",{"text":"hi"},"42"]'
    assert with_offset('2/admin,["x"]', 7) == '2/admin,["x","7"]'
    assert with_offset(['51-["file",{"_placeholder":true,"num":0}]', b"\x00"], 3) == \
        ['51-["file",{"_placeholder":true,"num":0},"3"]', b"\x00"]


def test_stored_channels_do_not_overlap_the_live_ones() -> None:
    from nats_adapter.naming import ChannelNames

    stored = ChannelNames("sio", stored=True)
    assert stored.room("/", "lobby") == "sio.live.room._2F.lobby"
    assert stored.stored_room("/", "lobby") == "sio.store.room._2F.lobby"
    assert stored.stored_room("/", None) == "sio.store.ns._2F"
    sid = "AbCd-f_h:0123456789ab"
    assert stored.stored_sid("/", sid) == "sio.store.sid._2F.AbCd-f_5Fh.0123456789ab"
    assert stored.live_sid(sid) == "sio.live.sid.*.AbCd-f_5Fh.0123456789ab"
    assert ChannelNames("sio").room("/", "lobby") == "sio.room._2F.lobby"
