"""Room names to channel tokens: total, injective, literal (property tests)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nats_adapter.manager import is_sid
from nats_adapter.naming import (
    MAX_CHANNEL_CHARS,
    ChannelNames,
    ChannelNameTooLong,
    decode_token,
    encode_token,
)

LITERAL_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
# every str, including lone surrogates, which JSON from a client can produce
ANY_STR = st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF))


@settings(max_examples=2000)
@given(ANY_STR)
def test_token_is_one_literal_token_and_round_trips(name: str) -> None:
    token = encode_token(name)
    assert LITERAL_TOKEN.fullmatch(token), token
    assert not set(token) & set(".*> \t\r\n{}")
    assert decode_token(token) == name


@settings(max_examples=2000)
@given(ANY_STR, ANY_STR)
def test_encoding_is_injective(a: str, b: str) -> None:
    if a != b:
        assert encode_token(a) != encode_token(b)


@settings(max_examples=500)
@given(ANY_STR, ANY_STR)
def test_room_channels_parse_back(namespace: str, room: str) -> None:
    names = ChannelNames("sio")
    try:
        channel = names.room(namespace, room)
    except ChannelNameTooLong:  # refused by name, only past the cap
        assert len(encode_token(namespace)) + len(encode_token(room)) > MAX_CHANNEL_CHARS - 20
        return
    assert channel.count(".") == 3
    assert names.parse_room(channel) == (namespace, room)
    assert names.parse_room(names.room(namespace, None)) == (namespace, None)


@pytest.mark.parametrize("name", ["a.b", "a.*", "a.>", ">", "*", " ", "", "😀", "A", "a", "_",
                                  "_41", "{x}"])
def test_known_tricky_names(name: str) -> None:
    token = encode_token(name)
    assert LITERAL_TOKEN.fullmatch(token)
    assert decode_token(token) == name


@pytest.mark.parametrize("token", ["", "a.b", "_4", "_zz", "_41", "a b", "__"])
def test_decode_rejects_tokens_the_encoder_never_makes(token: str) -> None:
    with pytest.raises(ValueError):
        decode_token(token)


@pytest.mark.parametrize("prefix", ["", "a..b", "a.*", "sio.>", "a b"])
def test_bad_prefix_is_refused_by_name(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        ChannelNames(prefix)


def test_sid_shape() -> None:
    assert is_sid("AbCdEf12:0123456789ab")
    assert not is_sid("lobby")
    assert not is_sid("AbCdEf12-0123456789ab")
    assert not is_sid(None)


def test_every_kind_of_channel_has_its_own_literal_place_under_the_prefix() -> None:
    names = ChannelNames("app.sio")
    assert names.room("/", "a.b") == "app.sio.room._2F.a_2Eb"
    assert names.room("/", None) == "app.sio.ns._2F"
    assert names.node("gw.1") == "app.sio.node.gw_2E1"
    assert names.cluster() == "app.sio.cluster"
    assert names.parse_room(names.node("gw")) is None
    assert names.parse_room("app.sio.room._2F") is None  # no room token
    assert names.parse_room("app.sio.room._2F._zz") is None  # not a token the encoder makes
    assert not names.is_live(names.room("/", "a"))  # no store: nothing is live


def test_stored_rooms_are_published_to_the_store_and_read_back_live() -> None:
    names = ChannelNames("sio", stored=True)
    live, stored = names.room("/", "lobby"), names.stored_room("/", "lobby")
    assert (live, stored) == ("sio.live.room._2F.lobby", "sio.store.room._2F.lobby")
    assert names.is_live(live) and not names.is_live(stored)
    # an envelope read back live was sealed for the channel it was stored under
    assert names.logical(live) == stored
    assert names.logical(names.node("gw")) == names.node("gw")
    assert names.parse_room(live) == ("/", "lobby")


def test_a_sid_is_stored_under_its_node_and_read_back_live() -> None:
    names = ChannelNames("sio", stored=True)
    assert names.stored_sid("/", "node1:abc") == "sio.store.sid._2F.node1.abc"
    assert names.live_sid("node1:abc") == "sio.live.sid.*.node1.abc"
    assert names.live_sids("node1") == "sio.live.sid.*.node1.*"


def test_a_room_past_the_channel_cap_is_refused_by_name() -> None:
    with pytest.raises(ChannelNameTooLong, match="room 'xxx"):
        ChannelNames().room("/", "x" * MAX_CHANNEL_CHARS)
    assert len(ChannelNames().room("/", "😀" * 128)) <= MAX_CHANNEL_CHARS
