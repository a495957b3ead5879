"""The envelope codec: every message kind survives a round trip, and anything that is
not a well-formed envelope of this version is refused with EnvelopeError."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nats_adapter import codec
from nats_adapter.codec import (
    AckMessage,
    ClusterMessage,
    EmitMessage,
    EmitToSidMessage,
    EnvelopeError,
    Message,
    RoomMessage,
)

TEXT = st.text(max_size=20)
# what msgpack carries and gives back equal (no tuples, no float NaN)
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | TEXT | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=10,
)
PACKETS = TEXT | st.tuples(TEXT, st.lists(st.binary(max_size=10), max_size=3)).map(
    lambda t: [t[0], *t[1]])
ACK_IDS = st.integers(0, 2**63 - 1)

MESSAGES: st.SearchStrategy[Message] = st.one_of(
    st.builds(EmitMessage, TEXT, TEXT, st.none() | st.lists(TEXT, max_size=3),
              st.lists(TEXT, max_size=3), PACKETS, st.none() | TEXT),
    st.builds(EmitToSidMessage, TEXT, TEXT, TEXT, TEXT, st.lists(VALUES, max_size=3),
              st.none() | ACK_IDS),
    st.builds(AckMessage, TEXT, TEXT, ACK_IDS, st.lists(VALUES, max_size=3)),
    st.builds(ClusterMessage, TEXT, TEXT, st.none() | TEXT,
              st.dictionaries(TEXT, VALUES, max_size=4)),
    st.builds(RoomMessage, st.sampled_from([codec.ENTER_ROOM, codec.LEAVE_ROOM]), TEXT, TEXT,
              TEXT, TEXT),
    st.builds(RoomMessage, st.just(codec.DISCONNECT), TEXT, TEXT, TEXT, st.none() | TEXT),
    st.builds(RoomMessage, st.just(codec.CLOSE_ROOM), TEXT, TEXT, st.none() | TEXT, TEXT),
)


@settings(max_examples=300)
@given(MESSAGES)
def test_every_message_kind_round_trips(msg: Message) -> None:
    assert codec.decode(codec.encode(msg)) == msg


@settings(max_examples=100)
@given(TEXT, PACKETS, st.lists(TEXT, max_size=3))
def test_a_channel_room_emit_travels_without_what_its_channel_names(
        origin: str, packet: Any, skip: list[str]) -> None:
    sent = EmitMessage(origin, "/chat", ["lobby"], skip, packet, dedupe_id="d1",
                       channel_room=True)
    data = codec.encode(sent)
    # namespace, rooms and dedupe id stay home: the receiver reads them off the channel
    assert msgpack.unpackb(data)[1] == codec.EMIT_ROOM
    assert codec.decode(data) == EmitMessage(origin, "", [], skip, packet, channel_room=True)


def pack(*items: Any) -> bytes:
    return bytes(msgpack.packb(list(items), use_bin_type=True))


V = codec.VERSION


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # a byte msgpack never uses
    msgpack.packb({"not": "an array"}),
    pack(V, codec.EMIT),  # too short
    pack(2, codec.ACK, "o", "s", 1, []),  # another version
    pack(V, 99, "o", "x", "y", "z"),  # unknown kind
    pack(V, codec.ACK, "o", "s", 1),  # wrong arity for its kind
    pack(V, codec.ACK, "o", "s", True, []),  # a bool is no ack id
    pack(V, codec.ACK, "o", "s", 1, "not a list"),
    pack(V, codec.EMIT, 1, "/", None, [], "pkt", None),  # origin not a string
    pack(V, codec.EMIT, "o", "/", ["r", 1], [], "pkt", None),  # rooms not all strings
    pack(V, codec.EMIT, "o", "/", None, [], ["text", "not bytes"], None),  # bad packet
    pack(V, codec.EMIT, "o", "/", None, [], [], None),  # an empty packet list
    pack(V, codec.EMIT_ROOM, "o"),
    pack(V, codec.EMIT_ROOM, "o", "pkt", "skip is no list"),
    pack(V, codec.EMIT_TO_SID, "o", "/", "sid", "ev", "args", None),
    pack(V, codec.CLUSTER, "o", "op", None, {1: "non-string key"}),
    pack(V, codec.CLUSTER, "o", "op", None, ["not a map"]),
    pack(V, codec.ENTER_ROOM, "o", "/", None, "room"),  # sid required
    pack(V, codec.LEAVE_ROOM, "o", "/", "sid", None),  # room required
    pack(V, codec.CLOSE_ROOM, "o", "/", None, None),  # room required
])
def test_malformed_envelopes_are_refused(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        codec.decode(data)


def test_a_disconnect_needs_no_room_and_a_close_no_sid() -> None:
    for msg in (RoomMessage(codec.DISCONNECT, "o", "/", "sid", None),
                RoomMessage(codec.CLOSE_ROOM, "o", "/", None, "room")):
        assert codec.decode(codec.encode(msg)) == msg


def test_an_envelope_past_the_size_limit_is_refused_before_parsing() -> None:
    big = codec.encode(EmitMessage("o", "/", None, [], "x" * codec.MAX_ENVELOPE_BYTES))
    with pytest.raises(EnvelopeError, match="exceeds"):
        codec.decode(big)
    fits = EmitMessage("o", "/", None, [], "x" * (codec.MAX_ENVELOPE_BYTES - 100))
    assert codec.decode(codec.encode(fits)) == fits


def test_data_msgpack_cannot_carry_fails_at_encode() -> None:
    with pytest.raises((TypeError, ValueError)):
        codec.encode(AckMessage("o", "sid", 1, [object()]))


def test_an_envelope_of_a_newer_format_is_told_apart_from_a_malformed_one() -> None:
    """A rolling upgrade's newer gateway must not look like garbage to an older one:
    its envelopes are counted and logged as a newer format, with what to do."""
    newer = msgpack.packb([codec.VERSION + 1, codec.EMIT_ROOM, "gw-9", b"2[]"])
    with pytest.raises(codec.NewerEnvelope) as caught:
        codec.decode(newer)
    assert caught.value.version == codec.VERSION + 1
    for version in (0, "2", True, 2**40):
        with pytest.raises(codec.EnvelopeError) as other:
            codec.decode(msgpack.packb([version, codec.EMIT_ROOM, "gw-9", b"2[]"]))
        assert not isinstance(other.value, codec.NewerEnvelope), version


def test_the_bus_counts_a_newer_format_apart(caplog: pytest.LogCaptureFixture) -> None:
    from nats_adapter import MemoryManager
    from nats_adapter.brokers.memory import MemoryBus

    manager = MemoryManager(MemoryBus(), node_name="old")
    newer = msgpack.packb([codec.VERSION + 1, codec.EMIT_ROOM, "gw-9", b"2[]"])
    assert manager.bus.open("sio.room._2F.lobby", newer, stored=False) is None
    assert (manager.stats.dropped_newer, manager.stats.dropped_malformed) == (1, 1)
    assert "newer release" in caplog.text
