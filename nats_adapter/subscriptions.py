"""Per-channel broker interest with an unsubscribe linger."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .brokers.base import Broker
from .stats import ManagerStats

logger = logging.getLogger(__name__)


class RoomSubscriptions:
    """Holds one broker subscription per channel that has local members.

    ``acquire`` is called when a channel gains its first local member and
    ``release`` when it loses its last one. A released channel stays subscribed
    for ``linger`` seconds, so join/leave churn costs no broker interest updates;
    acquiring it again within the linger cancels the unsubscribe. Operations on
    one channel reach the broker in the order they were requested.
    """

    def __init__(self, broker: Broker, stats: ManagerStats, linger: float) -> None:
        if linger < 0:
            raise ValueError(f"linger must be >= 0 seconds, got {linger!r}")
        self._broker = broker
        self._stats = stats
        self._linger = linger
        #: channel -> the latest operation on it (subscribe or unsubscribe)
        self._ops: dict[str, asyncio.Task[None]] = {}
        #: channels subscribed (or being subscribed) that the core wants
        self._wanted: set[str] = set()
        #: channels released and waiting out their linger
        self._lingering: dict[str, asyncio.TimerHandle] = {}

    def __contains__(self, channel: str) -> bool:
        return channel in self._wanted or channel in self._lingering

    def __len__(self) -> int:
        """Channels the broker holds interest for (wanted or lingering)."""
        return len(self._wanted) + len(self._lingering)

    @property
    def lingering(self) -> int:
        return len(self._lingering)

    def acquire(self, channel: str) -> None:
        """The channel got its first local member."""
        timer = self._lingering.pop(channel, None)
        self._wanted.add(channel)
        if timer is not None:
            timer.cancel()
            return
        self._chain(channel, self._subscribe)

    def release(self, channel: str) -> None:
        """The channel lost its last local member."""
        if channel not in self._wanted:
            return
        self._wanted.discard(channel)
        if self._linger == 0:
            self._chain(channel, self._unsubscribe)
        else:
            loop = asyncio.get_running_loop()
            self._lingering[channel] = loop.call_later(self._linger, self._expire, channel)

    async def ready(self, channel: str, timeout: float) -> bool:
        """Wait until the broker has ``channel``'s subscription; False on timeout."""
        op = self._ops.get(channel)
        if op is None or op.done():
            return True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(op)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Forget everything without unsubscribing (the broker is closing)."""
        for timer in self._lingering.values():
            timer.cancel()
        self._lingering.clear()
        self._wanted.clear()
        ops = list(self._ops.values())
        for op in ops:
            op.cancel()
        await asyncio.gather(*ops, return_exceptions=True)
        self._ops.clear()

    def _expire(self, channel: str) -> None:
        if self._lingering.pop(channel, None) is not None:
            self._chain(channel, self._unsubscribe)

    def _chain(self, channel: str, op: Callable[[str], Awaitable[None]]) -> None:
        previous = self._ops.get(channel)

        async def run() -> None:
            if previous is not None and not previous.done():
                await asyncio.gather(previous, return_exceptions=True)
            await op(channel)

        task = asyncio.get_running_loop().create_task(run())
        self._ops[channel] = task
        task.add_done_callback(lambda t: self._op_done(channel, t))

    def _op_done(self, channel: str, task: asyncio.Task[None]) -> None:
        if self._ops.get(channel) is task:
            del self._ops[channel]

    async def _subscribe(self, channel: str) -> None:
        self._stats.subscribe_ops += 1
        try:
            await self._broker.subscribe(channel)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._stats.subscription_errors += 1
            logger.exception("subscribe to %s failed", channel)

    async def _unsubscribe(self, channel: str) -> None:
        self._stats.unsubscribe_ops += 1
        try:
            await self._broker.unsubscribe(channel)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._stats.subscription_errors += 1
            logger.exception("unsubscribe from %s failed", channel)
