"""The seal's bindings: an envelope opens only on the channel it was sealed for, a
session record only under the pid it was sealed for and with the key that sealed it;
stored traffic is believed only on the store's own channels and only as emits."""

from __future__ import annotations

import asyncio
import time

import pytest
import socketio

from nats_adapter import MemoryManager, codec
from nats_adapter.brokers.memory import MemoryBus
from nats_adapter.sealing import ClusterKey, Verdict
from nats_adapter.sids import new_node_tag
from tests.helpers import SioClient
from tests.unit.conftest import NodeFactory, settle

KEY = b"k" * 32


def test_an_envelope_opens_only_on_the_channel_it_was_sealed_for() -> None:
    key = ClusterKey(KEY)
    sealed = key.seal(b"body", "sio.room._2F.public")
    assert key.open(sealed, "sio.room._2F.public")[:2] == (Verdict.OK, b"body")
    assert key.open(sealed, "sio.room._2F.secret").verdict is Verdict.FORGED
    assert key.open(sealed).verdict is Verdict.FORGED
    # the channel is authenticated, not sent: a seal costs what it did
    assert len(sealed) == len(key.seal(b"body")) == len(b"body") + 32


def test_the_context_is_length_prefixed() -> None:
    key = ClusterKey(KEY)
    sealed = key.seal(b"xbody", "sio.a")
    # the same bytes split differently between channel and body do not open
    assert key.open(sealed[1:], "sio.ax").verdict is Verdict.FORGED


def test_stored_envelopes_may_be_older_than_the_skew_but_not_than_the_store(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = ClusterKey(KEY, max_skew=60)
    sealed = key.seal(b"body", "c")
    now = time.time()
    monkeypatch.setattr("nats_adapter.sealing.time.time", lambda: now + 120)
    assert key.open(sealed, "c").verdict is Verdict.STALE
    assert key.open(sealed, "c", max_age=600).verdict is Verdict.OK
    assert key.open(sealed, "c", max_age=60).verdict is Verdict.STALE
    monkeypatch.setattr("nats_adapter.sealing.time.time", lambda: now - 120)
    assert key.open(sealed, "c", max_age=600).verdict is Verdict.STALE  # from the future


def test_a_session_record_opens_only_under_its_pid_and_key() -> None:
    key = ClusterKey(KEY)
    record = key.seal_record("pid-a", b"session")
    assert key.open_record("pid-a", record) == b"session"
    assert key.open_record("pid-b", record) is None  # moved to another key
    tampered = bytearray(record)
    tampered[0] ^= 1
    assert key.open_record("pid-a", bytes(tampered)) is None
    assert ClusterKey(b"o" * 32).open_record("pid-a", record) is None
    assert key.open_record("pid-a", b"session") is None  # not sealed at all
    # a record is no envelope, and an envelope no record
    assert key.open(record, "pid-a").verdict is Verdict.FORGED
    assert key.open_record("sio.cluster", key.seal(b"session", "sio.cluster")) is None


def test_a_record_is_stored_under_a_name_that_reveals_no_pid() -> None:
    key = ClusterKey(KEY)
    name = key.record_name("pid-a")
    assert "pid" not in name and name == key.record_name("pid-a")
    assert name != key.record_name("pid-b")
    assert name != ClusterKey(b"o" * 32).record_name("pid-a")


async def test_a_live_room_envelope_re_routed_to_another_room_is_dropped(
        make_node: NodeFactory, clients: list[SioClient]) -> None:
    n1, n2 = [await make_node(f"n{i}", cluster_key=KEY) for i in (1, 2)]
    b = SioClient("b")
    clients.append(b)
    await b.connect(n2.url)
    assert await b.call("join", "secret") == {"ok": True, "room": "secret"}
    public = n1.manager.channels.room("/", "public")
    envelope = codec.encode(codec.EmitMessage(n1.manager.node_tag, "/", ["public"], [],
                                              '2["news","for public"]', channel_room=True))
    secret = n2.manager.channels.room("/", "secret")
    await n1.manager.broker.publish(secret, n1.manager.seal(envelope, public))
    async with asyncio.timeout(5):
        while n2.manager.stats.dropped_forged == 0:
            await asyncio.sleep(0.02)
    # sealed for its own channel, it passes
    await n1.manager.broker.publish(secret, n1.manager.seal(envelope, secret))
    await b.wait_for(lambda c: c.received("news") == ["for public"], what="the news")
    await settle([n1, n2], b)
    assert b.received("news") == ["for public"]


async def test_the_stored_path_takes_emits_only_and_only_on_the_stores_channels() -> None:
    manager = MemoryManager(MemoryBus(), cluster_key=KEY, recovery=True)
    socketio.AsyncServer(async_mode="aiohttp", client_manager=manager)
    assert manager.recovery is not None
    stored: list[int] = []

    async def deliver_stored(msg: codec.Message, seq: int) -> None:
        stored.append(seq)

    manager.recovery.deliver_stored = deliver_stored  # type: ignore[method-assign]
    other, tag = ClusterKey(KEY), new_node_tag()  # another node's
    live = manager.channels.room("/", "r")
    assert live.startswith("sio.live.")
    close = codec.encode(codec.RoomMessage(codec.CLOSE_ROOM, tag, "/", None, "r"))
    await manager.on_message(live, other.seal(close, manager.channels.logical(live)), 5)
    assert manager.stats.dropped_invalid == 1 and stored == []
    emit = codec.encode(codec.EmitMessage(tag, "/", ["r"], [], '2["e"]'))
    await manager.on_message(live, other.seal(emit, manager.channels.logical(live)), 6)
    assert stored == [6]
    # a sequence on any other channel is nobody's offset: that message is live traffic
    node = manager.channels.node(tag)
    await manager.on_message(node, other.seal(emit, node), 999999)
    assert stored == [6]
