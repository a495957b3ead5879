"""The cluster protocol: every operation's body through the codec and back, bodies
a node could not send refused, pending calls that time out, and the handler
registry on the in-process bus."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nats_adapter import codec
from nats_adapter.codec import ClusterOp
from nats_adapter.naming import ChannelNames
from nats_adapter.rpc import ClusterRpc, ClusterTimeoutError, PendingAcks, PendingCall
from nats_adapter.sids import new_eio_sid, new_node_tag, new_sid
from nats_adapter.stats import ManagerStats
from tests.helpers import wait_for_condition
from tests.unit.conftest import NodeFactory

SID = new_sid(new_node_tag())
EIO_SID = new_eio_sid(new_node_tag())
INFO = {"name": "gw-1", "host": "h", "pid": 1, "started": 1.5}

#: one body of every operation, with every optional part set and unset
BODIES: list[codec.ClusterBody] = [
    codec.Hello(INFO), codec.Heartbeat(INFO), codec.Bye({}),
    codec.Reply([1, "two", {"three": None}]), codec.Reply(None, last=False),
    codec.BcastCount(3), codec.BcastAck(SID, ["ok", 2]), codec.BcastAck(SID, None),
    codec.Fetch(codec.Selection("/"), "full"),
    codec.Fetch(codec.Selection("/chat", ["a", SID], ["b"]), "ids"),
    codec.Fetch(codec.Selection("/", ["a"]), "count"),
    codec.Join(codec.Selection("/", ["a"], [SID]), ["x", "y"]),
    codec.Leave(codec.Selection("/"), ["x"]),
    codec.Disconnect(codec.Selection("/", ["a"]), close=True),
    codec.Disconnect(codec.Selection("/")),
    codec.ServerEmit("/", "event", [1, {"k": "v"}]),
    codec.Bcast(codec.Selection("/", ["a"], [SID]), "event", []),
    codec.Bcast(codec.Selection("/"), "e", [1]),
    codec.Adopt(SID), codec.Disown(SID), codec.Release(SID, "/"),
    *(codec.MoveStep(op, EIO_SID) for op in sorted(codec.MOVE_STEPS)),
    codec.Moved([SID]), codec.Moved([SID], gone=True, eio_sid=EIO_SID),
    codec.MovedPackets(EIO_SID, ["2[\"chat\"]", b"\x01"]),
]


def test_every_operation_has_a_body_here() -> None:
    assert {body.OP for body in BODIES} == set(ClusterOp)


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_every_body_round_trips_through_the_codec(body: codec.ClusterBody) -> None:
    envelope = codec.encode_call("origin01", "origin01:7", body)
    assert envelope.op == body.OP
    wire = codec.decode(codec.encode(envelope))
    assert isinstance(wire, codec.ClusterMessage)
    assert (wire.origin, wire.req_id) == ("origin01", "origin01:7")
    assert codec.decode_call(wire, max_room_chars=16) == body


EVERYONE: dict[str, Any] = {"ns": "/", "rooms": None, "except": None}


@pytest.mark.parametrize(("op", "body", "problem"), [
    ("launch", {}, "unknown cluster operation"),
    ("fetch", {**EVERYONE, "fmt": "all"}, "unknown fetch format"),
    ("fetch", {"rooms": None, "except": None, "fmt": "full"}, "namespace"),
    ("fetch", {**EVERYONE, "ns": 1, "fmt": "full"}, "namespace"),
    ("fetch", {**EVERYONE, "rooms": "a", "fmt": "full"}, "rooms must be"),
    ("fetch", {**EVERYONE, "rooms": [""], "fmt": "full"}, "rooms must be"),
    ("fetch", {**EVERYONE, "except": ["r" * 17], "fmt": "full"}, "except must be"),
    ("fetch", {**EVERYONE, "rooms": ["a"] * 10_001, "fmt": "full"}, "rooms must be"),
    ("join", {**EVERYONE}, "targets must be"),
    ("join", {**EVERYONE, "targets": [SID]}, "targets must be"),
    ("leave", {**EVERYONE, "targets": ["r" * 17]}, "targets must be"),
    ("leave", {**EVERYONE, "targets": ["a"] * 1_001}, "targets must be"),
    ("disconnect", {"rooms": None}, "namespace"),
    ("server_emit", {"ns": "/", "event": 1, "args": []}, "event name"),
    ("server_emit", {"ns": "/", "event": "e", "args": "x"}, "event name"),
    ("bcast", {**EVERYONE, "event": "e"}, "event name"),
    ("bcast_count", {"data": {"n": "3"}}, "count"),
    ("bcast_count", {"data": {"n": True}}, "count"),
    ("bcast_ack", {"data": "ok"}, "sid and its ack"),
    ("adopt", {"sid": "not-a-sid"}, "adopt needs a sid"),
    ("disown", {}, "disown needs a sid"),
    ("release", {"sid": SID}, "namespace"),
    ("release", {"sid": 7, "ns": "/"}, "release needs a sid"),
])
def test_bodies_a_node_could_not_send_are_refused(op: str, body: dict[str, Any],
                                                  problem: str) -> None:
    with pytest.raises(codec.EnvelopeError, match=problem):
        codec.decode_call(codec.ClusterMessage("origin01", op, "origin01:1", body),
                          max_room_chars=16)


class Sent:
    """A publish that records what it was given and delivers nothing."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, codec.Message]] = []

    async def __call__(self, channel: str, msg: codec.Message) -> None:
        self.messages.append((channel, msg))


def rpc(sent: Sent, stats: ManagerStats | None = None) -> ClusterRpc:
    def spawn(coro: Any) -> None:
        asyncio.get_running_loop().create_task(coro)

    return ClusterRpc("me000001", ChannelNames(), stats or ManagerStats(), sent, spawn,
                      node_name="gw-1")


async def test_a_request_nobody_answers_times_out_once_and_says_who() -> None:
    sent, stats = Sent(), ManagerStats()
    node = rpc(sent, stats)
    node.peers.saw("peer0001", {"name": "gw-2"})
    pending = await node.request(codec.Fetch(codec.Selection("/"), "count"), timeout=0.05)
    assert pending.timed_out and pending.expected == {"peer0001"}
    assert (stats.cluster_requests, stats.cluster_timeouts) == (1, 1)
    assert [ch for ch, _ in sent.messages] == [ChannelNames().cluster()]
    with pytest.raises(ClusterTimeoutError) as raised:
        node.check(pending, 41, 0.05)
    assert raised.value.responses == 41
    assert raised.value.missing == ["gw-2 (peer0001)"]
    assert node.pending("me000001:1") is None, "the call is closed"


async def test_a_request_returns_when_every_node_answered_or_left() -> None:
    sent = Sent()
    node = rpc(sent)
    node.peers.saw("peer0001")
    node.peers.saw("peer0002")
    call = asyncio.create_task(node.request(codec.Fetch(codec.Selection("/"), "ids"), timeout=5))
    await wait_for_condition(lambda: bool(sent.messages), what="the request is sent")
    _, request = sent.messages[0]
    assert isinstance(request, codec.ClusterMessage) and request.req_id is not None
    reply = codec.ClusterMessage("peer0001", "reply", request.req_id,
                                 {"data": ["a"], "last": True})
    await node.on_message(reply, codec.decode_call(reply, 16))
    bye = codec.ClusterMessage("peer0002", "bye", None, {})
    await node.on_message(bye, codec.decode_call(bye, 16))
    pending = await asyncio.wait_for(call, 1)
    assert not pending.timed_out
    assert pending.replies == {"peer0001": [["a"]]}
    node.check(pending, None, 5)  # does not raise


async def test_a_node_heard_again_after_it_missed_its_heartbeats_is_back() -> None:
    node = rpc(Sent())
    back: list[str] = []
    node.on_back.append(back.append)
    heartbeat = codec.ClusterMessage("peer0001", "heartbeat", None, {"info": INFO})
    await node.on_message(heartbeat, codec.decode_call(heartbeat, 16))
    assert back == [], "first heard of: not back"
    node.peers.timeout = -1.0
    node.check_peers()  # it missed its heartbeats (heard from longer ago than -1 s)
    assert "peer0001" not in node.peers
    node.peers.timeout = 60.0
    await node.on_message(heartbeat, codec.decode_call(heartbeat, 16))
    assert back == ["peer0001"]
    await node.on_message(heartbeat, codec.decode_call(heartbeat, 16))
    assert back == ["peer0001"], "once"


async def test_asking_one_node_that_does_not_answer_raises_timeout() -> None:
    node = rpc(Sent())
    with pytest.raises(TimeoutError):
        await node.ask("peer0001", codec.Release(SID, "/"), timeout=0.05)


async def test_pending_calls_count_what_they_wait_for() -> None:
    call = PendingCall({"a", "b"})
    call.reply("a", 1, last=False)
    call.gone("b")
    assert not call.done.done()
    call.reply("a", 2, last=True)
    assert call.done.done() and call.replies == {"a": [1, 2]}
    assert await call.wait(0.01)

    acks = PendingAcks({"a"})
    acks.count("a", 2)
    acks.ack("a", ["x"])
    assert not await acks.wait(0.01) and acks.timed_out
    acks.ack("a", None)  # the second recipient went away
    assert acks.done.done() and acks.acks == [["x"]]


async def test_a_handler_is_registered_once_and_gets_the_typed_body() -> None:
    node = rpc(Sent())
    got: list[tuple[str, str | None, Any]] = []

    async def handle(origin: str, req_id: str | None, body: Any) -> None:
        got.append((origin, req_id, body))

    node.register(ClusterOp.ADOPT, handle, inline=True, answers=False)
    with pytest.raises(ValueError, match="already has a handler"):
        node.register(ClusterOp.ADOPT, handle)
    msg = codec.encode_call("peer0001", None, codec.Adopt(SID))
    await node.on_message(msg, codec.decode_call(msg, 16))
    assert got == [("peer0001", None, codec.Adopt(SID))]
    # a request that carries no request id to answer is dropped
    node.register(ClusterOp.FETCH, handle, inline=True)
    msg = codec.encode_call("peer0001", None, codec.Fetch(codec.Selection("/"), "ids"))
    await node.on_message(msg, codec.decode_call(msg, 16))
    assert len(got) == 1


async def test_a_malformed_cluster_body_is_dropped_and_counted(
        make_node: NodeFactory) -> None:
    n1 = await make_node("n1", heartbeat_interval=0.1)
    n2 = await make_node("n2", heartbeat_interval=0.1)
    await wait_for_condition(lambda: n1.manager.server_count() == 2, what="n1 sees n2")
    before = n1.manager.stats.dropped_invalid
    bad = codec.ClusterMessage(n2.manager.node_tag, "fetch", f"{n2.manager.node_tag}:99",
                               {"ns": "/", "rooms": None, "except": None, "fmt": "all"})
    await n2.manager.bus.publish(n2.manager.channels.cluster(), bad)
    await wait_for_condition(lambda: n1.manager.stats.dropped_invalid == before + 1,
                             what="the bad body is counted")
    assert n1.manager.stats.dropped_failed == 0
    # and a good one is served: n2 asks n1 for its sockets
    assert await n2.manager.room_size("nobody") == 0


async def test_a_registered_handler_answers_a_call_across_the_bus(
        make_node: NodeFactory) -> None:
    n1 = await make_node("n1", heartbeat_interval=0.1)
    n2 = await make_node("n2", heartbeat_interval=0.1)
    await wait_for_condition(lambda: n1.manager.server_count() == 2, what="n1 sees n2")
    asked: list[codec.ClusterBody] = []

    async def release(origin: str, req_id: str | None, body: Any) -> None:
        assert origin == n1.manager.node_tag and req_id is not None
        asked.append(body)
        await n2.manager.rpc.reply(origin, req_id, codec.Reply("released"))

    n2.manager.rpc.register(ClusterOp.RELEASE, release)  # plain nodes leave it unhandled
    answer = await n1.manager.rpc.ask(n2.manager.node_tag, codec.Release(SID, "/"), 2.0)
    assert answer == "released" and asked == [codec.Release(SID, "/")]
