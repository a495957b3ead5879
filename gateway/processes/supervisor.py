"""Keeps a set of child processes running, like compose's ``restart: unless-stopped``.

A process that exits is reported, started again with the same command after a
backoff (doubling while it keeps dying young), and reported again once its health
check passes. The others keep serving meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .children import HasChild

#: a process that ran at least this long (seconds) before dying gets the shortest backoff
STABLE_AFTER = 10.0


@dataclass
class _Watch:
    node: HasChild
    backoff: float
    started_at: float
    restart_at: float | None = None
    waiting_ready: bool = False
    restarts: int = 0


class Supervisor:
    """Restarts the children of ``nodes`` when they die; call :meth:`poll` regularly.

    :param say: prints one line (what the user sees).
    :param min_backoff: seconds before the first restart of a process that died.
    :param max_backoff: longest wait between restarts of a process that keeps dying.
    """

    def __init__(self, nodes: Sequence[HasChild], say: Callable[[str], None],
                 min_backoff: float = 0.5, max_backoff: float = 30.0) -> None:
        now = time.monotonic()
        self._watches = [_Watch(n, min_backoff, now) for n in nodes]
        self._say = say
        self._min = min_backoff
        self._max = max_backoff

    def poll(self) -> None:
        """Notice deaths, start due restarts, and report processes that are back."""
        now = time.monotonic()
        for w in self._watches:
            child = w.node.child
            if w.restart_at is not None:
                if now >= w.restart_at and child is not None:
                    w.node.child = child.respawn()
                    w.restart_at = None
                    w.started_at = now
                    w.waiting_ready = True
                    w.restarts += 1
                continue
            if child is not None and not child.alive:
                if now - w.started_at >= STABLE_AFTER:
                    w.backoff = self._min
                delay = w.backoff
                w.backoff = min(w.backoff * 2, self._max)
                w.restart_at = now + delay
                self._say(f"{w.node.name} (pid {child.pid}) exited with code {child.returncode}; "
                          f"restarting in {delay:.1f} s")
                continue
            if w.waiting_ready and child is not None and w.node.ready():
                w.waiting_ready = False
                self._say(f"{w.node.name} is back (pid {child.pid}, restart {w.restarts})")

    def run(self, interval: float = 0.2) -> None:
        """Poll forever (until an exception such as KeyboardInterrupt ends it)."""
        while True:
            self.poll()
            time.sleep(interval)
