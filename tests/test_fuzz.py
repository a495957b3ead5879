"""Hostile input: random event payloads from a client, and garbage on the broker's channels.

Every client request must be answered with an ack of the spec's shape (or be
dropped), never crash a node, never reach another client. Every payload on the bus
that is not a valid envelope must be dropped and counted, never delivered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nats_adapter.sealing import ClusterKey
from tests.conftest import start_node
from tests.helpers import Node, SioClient, connect_all, seal_with, wait_for_condition

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=200) | st.sampled_from(["lobby", "", "r" * 129, "a.b", ">"]),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.sampled_from(["room", "text", "from", "x"]) | st.text(max_size=8),
                      children, max_size=5),
    max_leaves=20,
)
EVENTS = st.sampled_from(["join", "leave", "chat", "unknown", "message", "x" * 300])

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
async def fuzz_node() -> AsyncIterator[Node]:
    node = await start_node("memory", "fuzz-gw", {})
    try:
        yield node
    finally:
        await node.runner.cleanup()


@pytest.fixture(scope="module")
async def fuzz_clients(fuzz_node: Node) -> AsyncIterator[tuple[SioClient, SioClient]]:
    made: list[SioClient] = []
    try:
        fuzzer, witness = await connect_all(made, [("fuzzer", fuzz_node), ("witness", fuzz_node)])
        await witness.join("lobby")
        yield fuzzer, witness
    finally:
        for c in made:
            await c.close()


@FUZZ
@given(event=EVENTS, args=st.lists(JSON, max_size=4))
async def test_random_client_requests_get_well_formed_acks(
        fuzz_node: Node, fuzz_clients: tuple[SioClient, SioClient], event: str,
        args: list[Any]) -> None:
    fuzzer, _ = fuzz_clients
    ack = await fuzzer.sio.call(event, tuple(args), timeout=5)
    assert isinstance(ack, dict) and isinstance(ack.get("ok"), bool), ack
    if not ack["ok"]:
        assert isinstance(ack["error"], str) and ack["error"]
    elif event == "chat":
        assert isinstance(ack["id"], str)
    else:
        # join also takes {"room": <name>, "history": <count>}
        room = args[0]["room"] if event == "join" and isinstance(args[0], dict) else args[0]
        assert event in ("join", "leave") and ack["room"] == room


async def test_after_fuzzing_the_node_still_serves(
        fuzz_node: Node, fuzz_clients: tuple[SioClient, SioClient]) -> None:
    fuzzer, witness = fuzz_clients
    assert fuzz_node.manager.is_connected(fuzzer.sid, "/")
    assert all(m["room"] == "lobby" for m in witness.received())
    await fuzzer.join("lobby")
    # the fuzzing spent the fuzzer's chat budget (unknown events count against it too):
    # its answer says so until the bucket refills (20 a second), then it serves
    deadline = time.monotonic() + 10
    while (ack := await fuzzer.call("chat", {"room": "lobby", "text": "after the fuzz"})
           ) != {"ok": True, "id": ack.get("id")}:
        assert ack.get("error") == "rate limited: too many chat messages", ack
        assert time.monotonic() < deadline, ack
        await asyncio.sleep(0.05)  # poll interval: the bucket refills one chat per 50 ms
    await witness.wait_for(lambda c: "after the fuzz" in c.texts(), what="a normal chat")


GARBAGE = [
    b"", b"\xc1", b"\x00" * 64, b"not msgpack at all",
    msgpack.packb([1]), msgpack.packb([2, 1, "x", "/", None, [], "42[]", None]),  # version 2
    msgpack.packb([0, 1, "x", "/", None, [], "42[]", None]),
    msgpack.packb(["1", 1, "x"]), msgpack.packb({"method": "emit", "room": "lobby"}),
    msgpack.packb([1, 99, "rogue", "/", None, None]),
    msgpack.packb([1, 1, "rogue", "/", ["lobby"], [], 5, None]),  # packet of wrong type
    msgpack.packb([1, 1, "rogue", "/", ["lobby"], [7], "42[]", None]),  # skip not strings
    msgpack.packb([1, 1, "rogue", "/", "lobby", [], "42[]", None]),  # rooms not a list
    msgpack.packb([1, 2, "rogue", "/", "sid", "ev", "notalist", None]),
    msgpack.packb([1, 3, "rogue", "sid", "x", []]),
    msgpack.packb([1, 4, "rogue", "/", None, "room"]),  # enter_room without sid
    msgpack.packb([1, 1, "rogue", "/", ["lobby"], [], "42[\"chat\",1]", None])[:-4],  # cut
    b"\x93" * 5000,
    b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 billion items
    msgpack.packb([1, 1, "rogue", "/", ["lobby"], [], "x" * (2 * 1024 * 1024), None]),
]


async def publish_raw(node: Node, channel: str, payloads: list[bytes],
                      sealer: ClusterKey | None = None) -> None:
    """Publish straight onto the broker, as a rogue client would (no gateway involved).
    When ``node`` has a cluster key, each payload is sealed with it: what a rogue
    holding the key sends, which must pass every check after the seal's.

    ``sealer``: seal with this key object instead. Envelopes that claim to come from a
    running node must be sealed with that node's own (``manager.cluster_key``), so
    that their sequence numbers continue the node's: from another sealer they could
    repeat one the receiver saw from it (and be dropped as a replay), or jump ahead
    and make the node's own next envelopes look like replays."""
    broker: Any = node.manager.broker
    key = node.config.secrets.cluster_key
    if sealer is not None:
        payloads = [bytes(sealer.seal(p, channel)) for p in payloads]
    elif key:
        payloads = [seal_with(key, p, channel) for p in payloads]
    if node.config.backend == "nats":
        import nats

        rogue = await nats.connect(list(node.config.nats_urls))
        try:
            for payload in payloads:
                if len(payload) <= rogue.max_payload:
                    await rogue.publish(channel, payload)
            await rogue.flush()
        finally:
            await rogue.close()
    else:
        from redis.asyncio.cluster import RedisCluster

        rogue = RedisCluster.from_url(broker.url)
        try:
            for payload in payloads:
                await rogue.spublish(channel, payload)
        finally:
            await rogue.aclose()


@pytest.mark.expected_errors("dropped_malformed")
async def test_garbage_on_room_and_node_channels_is_dropped_and_counted(
        nodes: list[Node], clients: list[SioClient]) -> None:
    member, other = await connect_all(clients, [("member", nodes[1]), ("other", nodes[2])])
    await member.join("lobby")
    await other.join("lobby")
    target = nodes[1]
    before = target.manager.stats.dropped_malformed
    room = target.manager.channels.room("/", "lobby")
    control = target.manager.channels.node(target.manager.node_tag)
    await publish_raw(target, room, GARBAGE)
    await publish_raw(target, control, GARBAGE)
    # NATS refuses payloads over its max_payload (1 MB) before they reach anyone; an
    # empty payload sealed is a bare seal, dropped as unsigned before it is decoded
    sealed = bool(target.config.secrets.cluster_key)
    decoded = [g for g in GARBAGE if len(g) < 1024 * 1024 and (g or not sealed)]
    await wait_for_condition(lambda: target.manager.stats.dropped_malformed - before
                             >= 2 * len(decoded), "the garbage to be dropped")
    dropped = target.manager.stats.dropped_malformed - before
    assert dropped >= 2 * len(decoded), dropped
    assert member.received() == [] and other.received() == []
    # and the node still relays real traffic both ways
    await member.chat("lobby", "after the garbage")
    await other.wait_texts(["after the garbage"])
    await other.chat("lobby", "reply")
    await member.wait_texts(["reply"])
