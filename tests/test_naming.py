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
