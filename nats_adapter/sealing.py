"""Envelopes sealed with a cluster key: only nodes that hold the key can send.

Anyone who can publish on the broker could otherwise forge envelopes. With a
cluster key every envelope carries, after its msgpack body, a trailer of

    timestamp (8 bytes, ms since the epoch) | sequence (8 bytes) | tag (16 bytes)

where ``tag`` is HMAC-SHA256(key, body + timestamp + sequence) cut to 128 bits.
A receiver drops (and counts) an envelope that has no valid tag, one whose
timestamp is further than ``max_skew`` seconds from its own clock, and one whose
(origin, sequence) it has seen before (a replay), using a sliding window per
origin like IPsec's anti-replay window.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import struct
import time
from collections import OrderedDict
from enum import Enum

TRAILER = struct.Struct("!QQ")
TAG_BYTES = 16
TRAILER_BYTES = TRAILER.size + TAG_BYTES
#: the shortest key accepted (bytes): as long as the HMAC's hash
MIN_KEY_BYTES = 32


class Verdict(Enum):
    OK = "ok"
    UNSIGNED = "unsigned"
    FORGED = "forged"
    STALE = "stale"


class ClusterKey:
    """Seals outgoing envelopes and checks incoming ones with one shared key.

    :param key: the cluster's secret, at least 32 bytes.
    :param max_skew: seconds an envelope's timestamp may differ from this clock.
    """

    def __init__(self, key: bytes, max_skew: float = 60.0) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a cluster key must be at least {MIN_KEY_BYTES} bytes, "
                             f"got {len(key)}")
        self._key = key
        self.max_skew_ms = int(max_skew * 1000)
        self._seq = itertools.count(1)

    def _tag(self, signed: bytes) -> bytes:
        return hmac.new(self._key, signed, hashlib.sha256).digest()[:TAG_BYTES]

    def seal(self, body: bytes) -> bytes:
        """``body`` followed by its trailer (a fresh sequence number each call)."""
        signed = body + TRAILER.pack(int(time.time() * 1000), next(self._seq))
        return signed + self._tag(signed)

    def open(self, data: bytes, check_time: bool = True) -> tuple[Verdict, bytes, int]:
        """(verdict, body, sequence) of a received envelope; body is only meaningful
        when the verdict is OK. ``check_time=False`` accepts an old envelope (a stored
        one, replayed)."""
        if len(data) <= TRAILER_BYTES:
            return Verdict.UNSIGNED, b"", 0
        signed, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(self._tag(signed), tag):
            return Verdict.FORGED, b"", 0
        stamp, seq = TRAILER.unpack_from(signed, len(signed) - TRAILER.size)
        if check_time and abs(int(time.time() * 1000) - stamp) > self.max_skew_ms:
            return Verdict.STALE, b"", 0
        return Verdict.OK, signed[:-TRAILER.size], seq


class ReplayWindow:
    """Sequence numbers seen per origin: the highest, and a bitmap of the ``size``
    before it. Anything older than the window, or seen, is a replay."""

    def __init__(self, size: int = 8192, max_origins: int = 4096) -> None:
        self.size = size
        self.max_origins = max_origins
        #: origin -> [highest sequence seen, bitmap of the window below it (int)]
        self._origins: OrderedDict[str, list[int]] = OrderedDict()

    def first(self, origin: str, seq: int) -> bool:
        """True the first time (origin, seq) is seen; False for a replay."""
        state = self._origins.get(origin)
        if state is None:
            self._origins[origin] = [seq, 1]
            if len(self._origins) > self.max_origins:
                self._origins.popitem(last=False)
            return True
        self._origins.move_to_end(origin)
        highest, bits = state
        if seq > highest:
            shift = seq - highest
            state[0] = seq
            state[1] = ((bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size \
                else 1
            return True
        offset = highest - seq
        if offset >= self.size or bits >> offset & 1:
            return False
        state[1] = bits | (1 << offset)
        return True
