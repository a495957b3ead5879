"""Envelopes sealed with a cluster key: only nodes that hold the key can send.

Anyone who can publish on the broker could otherwise forge envelopes. With a
cluster key every envelope carries, after its msgpack body, a trailer of

    timestamp (8 bytes, ms since the epoch) | sequence (8 bytes) | tag (16 bytes)

where ``tag`` is HMAC-SHA256(key, context + body + timestamp + sequence) cut to
128 bits. The context is what the envelope is for, authenticated but not sent: the
logical channel it was published on (an envelope sealed for one room's channel does
not open on another's), or the key name of a session record (a record does not open
under another pid). A receiver drops (and counts) an envelope that has no valid tag,
one whose timestamp is further than ``max_skew`` seconds from its own clock (what is
read back from a message store may be as old as the store keeps messages), and one
whose (origin, sequence) it has seen before (a replay), using a sliding window per
origin like IPsec's anti-replay window.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import struct
import time
from collections import OrderedDict
from enum import Enum
from typing import NamedTuple

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


class Opened(NamedTuple):
    """What :meth:`ClusterKey.open` found: body, sequence and stamp are only meaningful
    when the verdict is OK."""

    verdict: Verdict
    body: bytes
    seq: int
    #: when it was sealed (ms since the epoch, the sender's clock)
    stamp_ms: int


_NOT_OPENED = {v: Opened(v, b"", 0, 0) for v in Verdict}

#: the context of a session record (see :meth:`ClusterKey.seal_record`): a NUL cannot
#: occur in a channel name, so no record opens as bus traffic nor the reverse
_RECORD_CONTEXT = b"session-record\x00"


def _context(context: str | bytes) -> bytes:
    raw = context.encode("utf-8", "surrogatepass") if isinstance(context, str) else context
    return len(raw).to_bytes(4, "big") + raw


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

    def _tag(self, context: bytes, signed: bytes) -> bytes:
        mac = hmac.new(self._key, context, hashlib.sha256)
        mac.update(signed)
        return mac.digest()[:TAG_BYTES]

    def seal(self, body: bytes, context: str | bytes = b"") -> bytes:
        """``body`` followed by its trailer (a fresh sequence number each call), its tag
        covering ``context`` too (the logical channel it is published on)."""
        signed = body + TRAILER.pack(int(time.time() * 1000), next(self._seq))
        return signed + self._tag(_context(context), signed)

    def open(self, data: bytes, context: str | bytes = b"",
             max_age: float | None = None) -> Opened:
        """Open a received envelope sealed for ``context``.

        ``max_age``: seconds the envelope may be older than this clock (None:
        ``max_skew``; ``math.inf``: any age). Either way an envelope from more than
        ``max_skew`` in the future is STALE."""
        if len(data) <= TRAILER_BYTES:
            return _NOT_OPENED[Verdict.UNSIGNED]
        signed, tag = data[:-TAG_BYTES], data[-TAG_BYTES:]
        if not hmac.compare_digest(self._tag(_context(context), signed), tag):
            return _NOT_OPENED[Verdict.FORGED]
        stamp, seq = TRAILER.unpack_from(signed, len(signed) - TRAILER.size)
        age = int(time.time() * 1000) - stamp
        if age > (self.max_skew_ms if max_age is None else max_age * 1000) \
                or -age > self.max_skew_ms:
            return _NOT_OPENED[Verdict.STALE]
        return Opened(Verdict.OK, signed[:-TRAILER.size], seq, stamp)

    def seal_record(self, name: str, body: bytes) -> bytes:
        """A session record stored under key ``name`` (a pid), sealed so that it opens
        under that name only."""
        return self.seal(body, _RECORD_CONTEXT + name.encode())

    def open_record(self, name: str, data: bytes) -> bytes | None:
        """The body of a record sealed by :meth:`seal_record` for ``name``; None when
        it was not (forged, tampered with, moved from another key, another key's)."""
        opened = self.open(data, _RECORD_CONTEXT + name.encode(), max_age=math.inf)
        return opened.body if opened.verdict is Verdict.OK else None

    def record_name(self, pid: str) -> str:
        """The key a session of ``pid`` is stored under: a MAC of it, so reading the
        bucket reveals no pid (a pid restores a session)."""
        return hmac.new(self._key, b"session-key\x00" + pid.encode(),
                        hashlib.sha256).hexdigest()[:40]


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
