"""Sealed envelopes: what opens, what is forged, what is stale, what is a replay."""

from __future__ import annotations

import math
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nats_adapter.sealing import (
    MIN_KEY_BYTES,
    TRAILER_BYTES,
    ClusterKey,
    ReplayWindow,
    Verdict,
)

KEY = b"k" * MIN_KEY_BYTES
CHANNEL = "sio.room._2F.lobby"


@given(st.binary(min_size=1, max_size=200), st.text(max_size=30))
def test_a_sealed_body_opens_with_the_same_key_and_context(body: bytes, context: str) -> None:
    key = ClusterKey(KEY)
    opened = key.open(key.seal(body, context), context)
    assert opened.verdict is Verdict.OK
    assert opened.body == body
    assert abs(opened.stamp_ms - time.time() * 1000) < 5000


def test_each_seal_gets_the_next_sequence_number() -> None:
    key = ClusterKey(KEY)
    seqs = [key.open(key.seal(b"x", CHANNEL), CHANNEL).seq for _ in range(3)]
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]


def test_a_short_key_is_refused_naming_its_length() -> None:
    with pytest.raises(ValueError, match="got 31"):
        ClusterKey(b"k" * (MIN_KEY_BYTES - 1))


def test_another_key_or_any_flipped_byte_is_forged() -> None:
    key = ClusterKey(KEY)
    sealed = key.seal(b"body", CHANNEL)
    assert ClusterKey(b"x" * MIN_KEY_BYTES).open(sealed, CHANNEL).verdict is Verdict.FORGED
    for i in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        assert key.open(bytes(tampered), CHANNEL).verdict is Verdict.FORGED, i


def test_what_is_too_short_to_carry_a_trailer_is_unsigned() -> None:
    key = ClusterKey(KEY)
    for data in (b"", b"body", b"x" * TRAILER_BYTES):
        opened = key.open(data, CHANNEL)
        assert opened.verdict is Verdict.UNSIGNED and opened.body == b""


def test_a_seal_from_too_far_in_the_past_or_future_is_stale(
        monkeypatch: pytest.MonkeyPatch) -> None:
    key = ClusterKey(KEY, max_skew=60.0)
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now - 61)
    old = key.seal(b"old", CHANNEL)
    monkeypatch.setattr(time, "time", lambda: now + 61)
    future = key.seal(b"future", CHANNEL)
    monkeypatch.setattr(time, "time", lambda: now - 59)
    recent = key.seal(b"recent", CHANNEL)
    monkeypatch.setattr(time, "time", lambda: now)
    assert key.open(old, CHANNEL).verdict is Verdict.STALE
    assert key.open(future, CHANNEL).verdict is Verdict.STALE
    assert key.open(recent, CHANNEL).verdict is Verdict.OK
    # a stored envelope may be older than the skew, never from the future
    assert key.open(old, CHANNEL, max_age=120).verdict is Verdict.OK
    assert key.open(old, CHANNEL, max_age=math.inf).verdict is Verdict.OK
    assert key.open(future, CHANNEL, max_age=math.inf).verdict is Verdict.STALE
    assert key.open(recent, CHANNEL, max_age=30).verdict is Verdict.STALE


def test_record_names_depend_on_the_key_and_the_pid() -> None:
    a, b = ClusterKey(KEY), ClusterKey(b"b" * MIN_KEY_BYTES)
    assert a.record_name("pid-1") == ClusterKey(KEY).record_name("pid-1")
    assert len({a.record_name("pid-1"), a.record_name("pid-2"), b.record_name("pid-1")}) == 3
    assert "pid-1" not in a.record_name("pid-1")


def test_a_replay_window_takes_each_sequence_once_per_origin() -> None:
    window = ReplayWindow(size=8)
    assert window.first("a", 5)
    assert not window.first("a", 5)
    assert window.first("b", 5)  # another origin's numbers are its own
    assert window.first("a", 3)  # late but inside the window
    assert not window.first("a", 3)
    assert window.first("a", 20)  # a jump moves the window
    assert window.first("a", 13)  # the oldest still inside it
    assert not window.first("a", 12)  # older than the window: taken for a replay
    assert not window.first("a", 5)


def test_a_jump_past_the_whole_window_forgets_the_bitmap() -> None:
    window = ReplayWindow(size=4)
    for seq in range(1, 5):
        assert window.first("a", seq)
    assert window.first("a", 100)
    assert window.first("a", 99) and window.first("a", 97)
    assert not window.first("a", 96)


def test_the_least_recent_origin_is_forgotten_past_max_origins() -> None:
    window = ReplayWindow(size=8, max_origins=2)
    assert window.first("a", 1) and window.first("b", 1)
    assert not window.first("a", 1)  # "a" is now the most recent
    assert window.first("c", 1)  # evicts "b"
    assert window.first("b", 1)  # forgotten, so taken again
    assert not window.first("c", 1)
