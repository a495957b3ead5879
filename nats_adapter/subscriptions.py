"""Per-channel broker interest with an unsubscribe linger."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .brokers.base import Broker
from .stats import ManagerStats

logger = logging.getLogger(__name__)


class SubscriptionError(RuntimeError):
    """The broker did not confirm a room's subscription in time: the node cannot
    receive that room's traffic from other nodes (yet)."""


class RoomSubscriptions:
    """Holds one broker subscription per channel that has local members.

    ``acquire`` is called when a channel gains its first local member and
    ``release`` when it loses its last one. A released channel stays subscribed
    for ``linger`` seconds, so join/leave churn costs no broker interest updates;
    acquiring it again within the linger cancels the unsubscribe. Operations on
    one channel reach the broker in the order they were requested, and after the
    last release plus the linger the broker holds no interest in the channel,
    whatever came before.

    A channel counts as subscribed only once the broker confirmed it
    (:meth:`ready`); a subscribe the broker refused or did not confirm is tried
    again by the next :meth:`ready` for that channel.
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
        #: channels the broker confirmed and that were not unsubscribed since
        self._confirmed: set[str] = set()
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
        """Wait until the broker confirmed ``channel``'s subscription, asking again
        (with a short backoff) if an attempt failed; False when ``timeout`` seconds
        pass first."""
        deadline = time.monotonic() + timeout
        retry_wait = 0.05
        while channel not in self._confirmed:
            if channel not in self:
                return False  # released and unsubscribed meanwhile
            op = self._ops.get(channel)
            if op is None or op.done():
                op = self._chain(channel, self._subscribe)  # the last attempt failed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    await asyncio.shield(op)
                    if channel not in self._confirmed:
                        await asyncio.sleep(retry_wait)
                        retry_wait = min(retry_wait * 2, 1.0)
            except TimeoutError:
                return False
        return True

    async def close(self) -> None:
        """Forget everything without unsubscribing (the broker is closing)."""
        for timer in self._lingering.values():
            timer.cancel()
        self._lingering.clear()
        self._wanted.clear()
        self._confirmed.clear()
        ops = list(self._ops.values())
        for op in ops:
            op.cancel()
        await asyncio.gather(*ops, return_exceptions=True)
        self._ops.clear()

    def _expire(self, channel: str) -> None:
        if self._lingering.pop(channel, None) is not None:
            self._chain(channel, self._unsubscribe)

    def _chain(self, channel: str, op: Callable[[str], Awaitable[None]]) -> asyncio.Task[None]:
        previous = self._ops.get(channel)

        async def run() -> None:
            if previous is not None and not previous.done():
                await asyncio.gather(previous, return_exceptions=True)
            await op(channel)

        task = asyncio.get_running_loop().create_task(run())
        self._ops[channel] = task
        task.add_done_callback(lambda t: self._op_done(channel, t))
        return task

    def _op_done(self, channel: str, task: asyncio.Task[None]) -> None:
        if self._ops.get(channel) is task:
            del self._ops[channel]

    async def _subscribe(self, channel: str) -> None:
        if channel not in self or channel in self._confirmed:
            return  # released (and its linger over) while queued, or already held
        self._stats.subscribe_ops += 1
        try:
            await self._broker.subscribe(channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._stats.subscription_errors += 1
            logger.warning("subscribe to %s failed: %s", channel, exc)
            return
        self._confirmed.add(channel)

    async def _unsubscribe(self, channel: str) -> None:
        if channel in self:
            return  # acquired again (or released again) while this waited its turn
        self._confirmed.discard(channel)
        self._stats.unsubscribe_ops += 1
        try:
            await self._broker.unsubscribe(channel)
        except asyncio.CancelledError:
            raise
        except Exception:
            self._stats.subscription_errors += 1
            logger.exception("unsubscribe from %s failed", channel)
