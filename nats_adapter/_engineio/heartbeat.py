"""engine.io pings and timeouts on one timer per server instead of tasks per socket.

- :class:`Heartbeat` pings every lean connection and times out those that stop
  answering, and checks polling sessions' ping timeouts (the job of engine.io's
  service task, which woke once per socket with a ``wait_for`` each time).
- :func:`ping_later` replaces the task engine.io keeps asleep for the whole ping
  interval per socket (``AsyncSocket._send_ping``) with a timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from engineio import packet as eio_packet

logger = logging.getLogger(__name__)

_background: set[asyncio.Task[Any]] = set()


def spawn(coro: Any) -> None:
    """Run ``coro`` in the background, keeping a reference until it ends."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)


class Timed(Protocol):
    """What the heartbeat drives (a lean connection)."""

    #: bumped on every (re)scheduling: entries of an older generation are stale
    gen: int

    @property
    def sid(self) -> str: ...

    def on_timer(self) -> None: ...

    def hang_up(self, code: int = ...) -> None: ...


class Heartbeat:
    """engine.io pings and timeouts for every lean connection of one server, on one
    timer; and the check of polling sessions' ping timeouts.

    Every connection has at most one live entry: when its next ping is due, or when
    its pong (or a pending upgrade) is overdue. All pings are due ``interval`` after
    they are scheduled and all deadlines ``timeout`` after, so two FIFO queues stay
    sorted and each step is O(1); stale entries are skipped by generation number.

    :param is_lean: whether an engine.io session is served by a lean connection
        (then the sweep of polling sessions leaves it alone).
    """

    def __init__(self, eio: Any, is_lean: Callable[[str], bool]) -> None:
        self.eio = eio
        self.is_lean = is_lean
        self.interval = float(eio.ping_interval)
        self.timeout = float(eio.ping_timeout)
        # entries due within this much are handled together: fewer wake-ups
        self.slack = min(0.05, self.interval / 10, self.timeout / 10)
        self._pings: deque[tuple[float, Timed, int]] = deque()
        self._deadlines: deque[tuple[float, Timed, int]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._sweeping = False

    def ping_later(self, conn: Timed) -> None:
        """``conn`` gets a ping ``interval`` from now."""
        conn.gen += 1
        due = asyncio.get_running_loop().time() + self.interval
        self._pings.append((due, conn, conn.gen))
        self._arm(due)

    def deadline(self, conn: Timed) -> None:
        """``conn``'s timer fires ``timeout`` from now unless rescheduled."""
        conn.gen += 1
        due = asyncio.get_running_loop().time() + self.timeout
        self._deadlines.append((due, conn, conn.gen))
        self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None and self._timer_at <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_at(due + self.slack, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time() + self.slack
        for entries in (self._pings, self._deadlines):
            while entries and entries[0][0] <= now:
                _, conn, gen = entries.popleft()
                if conn.gen == gen:
                    try:
                        conn.on_timer()
                    except Exception:  # one broken connection must not stop the rest
                        logger.exception("heartbeat of %s failed", conn.sid)
                        conn.hang_up(1011)
        heads = [q[0][0] for q in (self._pings, self._deadlines) if q]
        if heads:
            self._arm(min(heads))

    def start_sweep(self) -> None:
        """Check polling sessions' ping timeouts, every half ``timeout``."""
        if not self._sweeping:
            self._sweeping = True
            asyncio.get_running_loop().call_later(self.timeout / 2, self._sweep)

    def _sweep(self) -> None:
        now = time.time()
        sockets = self.eio.sockets
        for sid, s in list(sockets.items()):
            if s.closed:
                if sockets.get(sid) is s:
                    del sockets[sid]
            elif (not s.closing and s.last_ping and now - s.last_ping > self.timeout
                  and not self.is_lean(sid)):
                spawn(s.check_ping_timeout())  # closes it, as engine.io's service task
        asyncio.get_running_loop().call_later(self.timeout / 2, self._sweep)


def ping_later(socket: Any, interval: float, is_lean: Callable[[str], bool]
               ) -> asyncio.TimerHandle:
    """``AsyncSocket._send_ping`` as a timer: after ``interval``, queue a PING for
    ``socket`` (unless a lean connection pings it, or it closed meanwhile).

    The ping counts as sent when it was due, even if the timer fires late: the
    client's ping timeout runs from then, as on Node's timers (a long-poll that comes
    ping interval + timeout after the last pong finds the session closed)."""
    due = time.time() + interval
    return asyncio.get_running_loop().call_later(interval, _send_ping, socket, is_lean, due)


def _send_ping(socket: Any, is_lean: Callable[[str], bool], due: float) -> None:
    if is_lean(socket.sid):
        return  # a lean connection's heartbeat pings it
    if not socket.closing and not socket.closed:
        socket.last_ping = min(due, time.time())
        socket.queue.put_nowait(eio_packet.Packet(eio_packet.PING))
