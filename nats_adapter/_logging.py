"""Log lines for events that can repeat thousands of times a second."""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    """Logs an event's first occurrence, then at most once per ``interval`` seconds
    with how many occurrences the silence covered; every occurrence is still counted
    by the caller's metrics."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._logger = logger
        self._interval = interval
        #: key -> (time of the last line, occurrences since)
        self._state: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last, skipped = self._state.get(key, (float("-inf"), 0))
        if now - last < self._interval:
            self._state[key] = (last, skipped + 1)
            return
        self._state[key] = (now, 0)
        if skipped:
            msg += f" (and {skipped} more like it in the last {now - last:.0f} s)"
        self._logger.warning(msg, *args)
