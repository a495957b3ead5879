"""Ids of messages already handled, for a bounded time and count."""

from __future__ import annotations

import time
from collections import OrderedDict


class DedupeWindow:
    """Remembers ids for ``window`` seconds (and at most ``max_ids`` of them).

    An emit that travels over several channels (rooms on different subjects, a
    room and a node's control channel) reaches a node once per channel it listens
    on; the node delivers the first copy and drops the rest.
    """

    def __init__(self, window: float = 60.0, max_ids: int = 100_000) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0 seconds, got {window!r}")
        self.window = window
        self.max_ids = max_ids
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first(self, msg_id: str) -> bool:
        """True the first time ``msg_id`` is seen within the window, False after."""
        if msg_id in self._seen:
            return False
        now = time.monotonic()
        self._seen[msg_id] = now
        horizon = now - self.window
        seen = self._seen
        while seen:
            oldest_id, seen_at = next(iter(seen.items()))
            if seen_at >= horizon and len(seen) <= self.max_ids:
                break
            del seen[oldest_id]
        return True
