"""A rogue publisher on the broker, with and without a cluster key.

Whoever can publish on NATS or Redis can put envelopes on the gateways' channels.
Without a cluster key a node still accepts only what a node could legitimately
send; with the key it accepts only envelopes sealed with it, once.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable

import nats
import pytest
from nats.aio.msg import Msg

from gateway.config import Secrets
from gateway.processes import NatsCluster
from nats_adapter import NatsManager, codec
from nats_adapter.sids import new_node_tag
from tests.conftest import start_node
from tests.helpers import SETTLE, Node, SioClient, connect_all
from tests.test_fuzz import publish_raw

ROGUE = new_node_tag()


async def wait_until(done: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def room_name() -> str:
    return f"rogue-{uuid.uuid4().hex[:6]}"


async def member(clients: list[SioClient], node: Node, room: str, name: str) -> SioClient:
    (c,) = await connect_all(clients, [(name, node)])
    await c.join(room)
    return c


async def still_connected_and_served(sender: SioClient, receiver: SioClient, room: str) -> None:
    assert receiver.sio.connected, "the rogue envelope disconnected the socket"
    text = f"after {uuid.uuid4().hex[:4]}"
    await sender.chat(room, text)
    await receiver.wait_for(lambda c: text in c.texts(), what="a legitimate message")


async def test_forged_emits_cannot_carry_anything_but_events(
        nodes: list[Node], clients: list[SioClient]) -> None:
    room = room_name()
    a = await member(clients, nodes[0], room, "a")
    b = await member(clients, nodes[1], room, "b")
    channel = nodes[1].manager.channels.room("/", room)
    forged = [
        "1",  # DISCONNECT of the namespace
        "3/admin,5[\"x\"]",  # an ack into another namespace
        "27[\"chat\",{}]",  # an event that asks the client for an ack
        "2[\"chat\",{\"room\":",  # text socket.io-client cannot parse: it would hang up
        "2/other,[\"chat\",{}]",  # another namespace than the envelope's
        "2{\"not\":\"an array\"}",
        "4oops",
    ]
    invalid_before = nodes[1].manager.stats.dropped_invalid
    await publish_raw(nodes[1], channel, [
        codec.encode(codec.EmitMessage(ROGUE, "/", [room], [], pkt)) for pkt in forged])
    await wait_until(lambda: nodes[1].manager.stats.dropped_invalid - invalid_before
                     >= len(forged))
    assert nodes[1].manager.stats.dropped_invalid - invalid_before == len(forged)
    assert b.received("chat") == [] and b.events == [], b.events
    await still_connected_and_served(a, b, room)
    # a legitimate-looking event is still delivered (publish_raw seals with the key)
    await publish_raw(nodes[1], channel, [codec.encode(codec.EmitMessage(
        ROGUE, "/", [room], [], '2["chat",{"text":"relayed"}]'))])
    await b.wait_for(lambda c: "relayed" in c.texts(), what="a valid event")


async def test_forged_room_operations_stay_within_client_limits(
        nodes: list[Node], clients: list[SioClient]) -> None:
    room = room_name()
    b = await member(clients, nodes[1], room, "b")
    control = nodes[1].manager.channels.node(nodes[1].manager.node_tag)
    limits = nodes[1].config.limits
    ops = [codec.RoomMessage(codec.ENTER_ROOM, ROGUE, "/", b.sid, "x" * 5000)]
    ops += [codec.RoomMessage(codec.ENTER_ROOM, ROGUE, "/", b.sid, f"flood-{i}")
            for i in range(limits.max_rooms_per_socket + 50)]
    stats = nodes[1].manager.stats
    invalid_before = stats.dropped_invalid
    await publish_raw(nodes[1], control, [codec.encode(op) for op in ops])
    # b is in one room: 99 more are accepted; the long name and 51 others are not
    refused = 1 + len(ops) - 1 - (limits.max_rooms_per_socket - 1)
    await wait_until(lambda: stats.dropped_invalid - invalid_before >= refused)
    await asyncio.sleep(SETTLE)
    rooms = nodes[1].manager.get_rooms(b.sid, "/")
    assert "x" * 5000 not in rooms
    assert len(rooms) <= limits.max_rooms_per_socket, len(rooms)
    assert stats.dropped_invalid - invalid_before == refused
    for r in rooms:
        if r != room:
            await nodes[1].sio.leave_room(b.sid, r)


async def test_forged_acks_are_dropped(nodes: list[Node], clients: list[SioClient]) -> None:
    a = (await connect_all(clients, [("a", nodes[0])]))[0]
    b = (await connect_all(clients, [("b", nodes[1])]))[0]
    pending: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    async def late(*args: object) -> str:
        await asyncio.sleep(1.0)  # the real answer comes late (on purpose)
        return "the real answer"

    b.replies["ask"] = late
    await nodes[0].sio.emit("ask", 1, to=b.sid, callback=pending.set_result)
    ack_id = next(aid for (sid, aid) in nodes[0].manager._remote_callbacks if sid == b.sid)
    control = nodes[0].manager.channels.node(nodes[0].manager.node_tag)
    forged = [
        # not b's node (an origin of its own: ROGUE's sequence numbers went further
        # in other tests, which might make these look like replays)
        codec.AckMessage(new_node_tag(), b.sid, ack_id, ["from a rogue"]),
        codec.AckMessage(nodes[1].manager.node_tag, b.sid, ack_id + 1, ["not asked"]),
        codec.AckMessage(nodes[1].manager.node_tag, a.sid, 1, ["a local sid"]),
    ]
    invalid_before = nodes[0].manager.stats.dropped_invalid
    # sealed as nodes[1] would (two of them claim to come from it), see publish_raw
    await publish_raw(nodes[0], control, [codec.encode(m) for m in forged],
                      sealer=nodes[1].manager.cluster_key)
    await wait_until(lambda: nodes[0].manager.stats.dropped_invalid - invalid_before
                     >= len(forged))
    assert nodes[0].manager.stats.dropped_invalid - invalid_before == len(forged)
    assert not pending.done(), "a forged ack triggered the callback"
    await asyncio.wait_for(pending, 5)  # the real one still arrives


def test_channel_names_have_a_length_cap(nodes: list[Node]) -> None:
    from nats_adapter.naming import ChannelNameTooLong

    channels = nodes[0].manager.channels
    assert len(channels.room("/", "\U0001f600" * 128)) < 2048  # the client limit fits
    with pytest.raises(ChannelNameTooLong):
        channels.room("/", "\U0001f600" * 200)


async def test_entering_a_room_too_long_for_a_channel_is_refused(
        nodes: list[Node], clients: list[SioClient]) -> None:
    (a,) = await connect_all(clients, [("a", nodes[0])])
    with pytest.raises(ValueError, match="more than 2048"):
        await nodes[0].sio.enter_room(a.sid, "\U0001f600" * 200)
    assert nodes[0].manager.get_rooms(a.sid, "/") == []


# -- with a cluster key --------------------------------------------------------------

KEY = secrets.token_urlsafe(32)


@pytest.fixture
async def keyed(nats_cluster: NatsCluster) -> AsyncIterator[list[Node]]:
    """Two gateways sealing with KEY, on their own channel prefix."""
    made: list[Node] = []
    try:
        for i in (1, 2):
            manager = NatsManager(nats_cluster.urls, channel_prefix="keyed",
                                  cluster_key=KEY.encode(), connection_name=f"keyed-{i}")
            made.append(await start_node(
                "nats", f"keyed-{i}", {"nats_urls": tuple(nats_cluster.urls),
                                       "secrets": Secrets(cluster_key=KEY)}, manager=manager))
        yield made
    finally:
        for node in made:
            await node.runner.cleanup()


async def test_with_a_cluster_key_only_sealed_envelopes_count_and_only_once(
        keyed: list[Node], nats_cluster: NatsCluster, clients: list[SioClient]) -> None:
    room = room_name()
    a = await member(clients, keyed[0], room, "a")
    b = await member(clients, keyed[1], room, "b")
    await still_connected_and_served(a, b, room)  # sealed traffic flows between them
    channel = keyed[1].manager.channels.room("/", room)
    control = keyed[1].manager.channels.node(keyed[1].manager.node_tag)
    stats = keyed[1].manager.stats
    # capture a sealed envelope on the wire, as a rogue subscriber could: on every
    # NATS node, so that the capture does not wait for interest to cross the routes
    listeners = [await nats.connect(url) for url in nats_cluster.urls]
    rogue = listeners[0]
    captured: list[bytes] = []

    async def capture(msg: Msg) -> None:
        if msg.data not in captured:
            captured.append(msg.data)

    try:
        subs = [await listener.subscribe(channel, cb=capture) for listener in listeners]
        for listener in listeners:
            await listener.flush()
        await a.chat(room, "captured")
        await b.wait_for(lambda c: "captured" in c.texts(), what="the captured message")
        await asyncio.sleep(SETTLE)
        for sub in subs:
            await sub.unsubscribe()
        assert len(captured) == 1
        unsealed = [
            codec.encode(codec.RoomMessage(codec.DISCONNECT, ROGUE, "/", b.sid, None)),
            codec.encode(codec.EmitMessage(keyed[0].manager.node_tag, "/", [room], [],
                                           '2["chat",{"text":"impersonated"}]')),
        ]
        forged = [codec.encode(codec.RoomMessage(codec.DISCONNECT, ROGUE, "/", b.sid, None))
                  + b"\x00" * 32]
        for data in unsealed + forged:
            await rogue.publish(control, data)
        await rogue.publish(channel, captured[0])  # a replay of a real one
        await rogue.flush()
    finally:
        for listener in listeners:
            await listener.close()
    await wait_until(lambda: stats.dropped_unsigned + stats.dropped_forged
                     + stats.dropped_replayed >= 4)
    assert stats.dropped_unsigned == 2 and stats.dropped_forged == 1, stats
    assert stats.dropped_replayed == 1, stats
    assert b.texts().count("captured") == 1 and "impersonated" not in b.texts()
    await still_connected_and_served(a, b, room)
    await still_connected_and_served(b, a, room)
