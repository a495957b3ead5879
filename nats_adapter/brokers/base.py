"""The interface between the node core and a broker.

A broker only moves bytes between nodes: it owns the broker connection,
reconnects, sharding and (re)subscription; it never sees a Socket.IO object and
imports no manager. The core owns membership, naming, the envelope and fan-out,
and calls :meth:`Broker.subscribe` only for a channel's first local member.

"Broker" rather than "transport": transport already means the engine.io
(polling/websocket) and asyncio transports in this codebase.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class BrokerHandler(Protocol):
    """What a broker calls back into; implemented by the node core."""

    async def on_message(self, channel: str, data: bytes, seq: int | None = None) -> None:
        """A payload arrived on ``channel`` (a room channel or this node's control channel).

        ``seq`` is its sequence number in the broker's :class:`MessageStore` when it
        is a stored message delivered live. Called once per payload in arrival order
        per channel; must not raise.
        """

    def on_connection_state(self, connected: bool) -> None:
        """The broker connection went up (``True``) or down (``False``)."""


class BrokerError(RuntimeError):
    """The broker could not take a publish (down, closed, buffer full)."""


class BrokerUnconfirmed(BrokerError):
    """The broker did not confirm in time that it took what was published: it may
    still deliver it, to some or all (the connection dropped, or no answer)."""


class Broker(abc.ABC):
    """A pub/sub broker connection with at-most-once delivery.

    Contract:
    - ``publish`` is fire-and-forget; it raises :class:`BrokerError` when the
      payload certainly cannot be sent, and never blocks on a slow broker beyond
      its own buffer.
    - a subscription survives reconnects: the broker restores it.
    - messages a node publishes are never handed back to that node when the broker
      supports it (NATS no-echo); otherwise the core drops its own by origin.
    """

    #: Short backend name used in metrics and /healthz.
    name: str = "abstract"
    #: whether a node can receive its own publications back (then the core needs
    #: every envelope's origin to drop them)
    echoes: bool = True

    @abc.abstractmethod
    async def start(self, handler: BrokerHandler, control_channel: str) -> None:
        """Connect (retrying in the background if no broker answers) and subscribe to
        ``control_channel``, this node's own channel."""

    @abc.abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Register interest in ``channel``; returns once the broker has it, or once it
        is queued for restoration when the broker is down."""

    @abc.abstractmethod
    async def unsubscribe(self, channel: str) -> None:
        """Drop interest in ``channel``; a no-op for a channel not subscribed."""

    @abc.abstractmethod
    async def publish(self, channel: str, data: bytes) -> None:
        """Send ``data`` to every node subscribed to ``channel``."""

    async def confirm_published(self) -> None:
        """Return once the broker has taken everything this node published so far;
        raise :class:`BrokerUnconfirmed` when it cannot say so in time. A no-op where a
        publish returns only once the broker took it (the default)."""
        return

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush what was already published, then disconnect. Idempotent."""

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Whether a broker connection is up right now."""

    def info(self) -> dict[str, Any]:
        """Details for health output (current server, counters); no secrets."""
        return {}

    def message_store(self, prefix: str, window: float) -> MessageStore:
        """The broker's :class:`MessageStore` for connection state recovery.

        Raises :class:`BrokerError` when this broker has none (the default).
        """
        raise BrokerError(f"the {self.name} broker does not support connection state "
                          "recovery (use NATS, with JetStream)")

    def repairs(self) -> dict[str, int]:
        """Gap repair of stored traffic delivered live, by counter (gaps_detected,
        messages_repaired, gaps_unrepairable, duplicates_dropped); {} where none runs."""
        return {}

    def losses(self) -> dict[str, int]:
        """Messages the broker client lost, by reason (since start).

        Mostly what is lost without the core seeing it, such as inbound messages a
        client library drops for a slow consumer. A reason may also name a kind of
        publish the broker refused (which the core counts as a publish error too).
        """
        return {}


class MessageStore(abc.ABC):
    """What a broker keeps for connection state recovery: recent messages with a
    sequence number each, and sessions that outlive their connection.

    Contract: ``publish`` returns once the message is stored, with its sequence
    (strictly increasing across the store); stored messages are also delivered live
    to the channel the broker maps them to, carrying that sequence.
    """

    @abc.abstractmethod
    async def setup(self, timeout: float = 20.0) -> None:
        """Create what the store needs (idempotent)."""

    @abc.abstractmethod
    async def publish(self, subject: str, data: bytes) -> int:
        """Store ``data`` under ``subject``; its sequence number."""

    @abc.abstractmethod
    async def bounds(self) -> tuple[int, int]:
        """(first, last) sequence numbers still stored."""

    @abc.abstractmethod
    async def replay(self, subjects: list[str], after: int, until: int,
                     since: float | None = None) -> list[tuple[int, str, bytes]]:
        """(sequence, subject, data) of the messages on ``subjects`` with
        ``after < sequence <= until``, in sequence order; with ``since`` (seconds since
        the epoch) only those stored since then (a look back before an offset)."""

    #: seconds a stored message is kept at least (older ones are not trusted when read)
    retention: float = 0.0
    _loss_watchers: tuple[Callable[[str], None], ...] = ()
    _gap_checkers: tuple[Callable[[], None], ...] = ()

    def watch_losses(self, callback: Callable[[str], None]) -> None:
        """Have ``callback`` told the live channel of stored messages this node will
        never deliver (a gap it could not repair: past retention, purged)."""
        self._loss_watchers = (*self._loss_watchers, callback)

    def watch_gap_checks(self, callback: Callable[[], None]) -> None:
        """Have ``callback`` called when :meth:`check_gaps` is."""
        self._gap_checkers = (*self._gap_checkers, callback)

    def check_gaps(self) -> None:
        """Live copies may have gone missing without a sign here (a node that was cut
        off from this one is back): the broker looks for what it has not delivered."""
        for callback in self._gap_checkers:
            callback()

    def report_lost(self, channel: str) -> None:
        """Stored messages on the live ``channel`` are lost to this node: tell the
        watchers (:meth:`watch_losses`)."""
        for callback in self._loss_watchers:
            callback(channel)

    @abc.abstractmethod
    async def history(self, subject: str, limit: int,
                      accept: Callable[[bytes], bool] | None = None
                      ) -> list[tuple[int, bytes]]:
        """The last ``limit`` messages on ``subject`` that ``accept`` (all when None)
        takes, oldest first."""

    @abc.abstractmethod
    async def put_session(self, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store a session (``ttl`` seconds, or the store's default)."""

    @abc.abstractmethod
    async def take_session(self, key: str, accept: Callable[[bytes], bool] | None = None
                           ) -> bytes | None:
        """Read and delete a session in one step: of two takers, one gets it. A session
        ``accept`` refuses is left as it is (and None returned)."""

    @abc.abstractmethod
    async def delete_session(self, key: str) -> None:
        """Forget a session (a no-op if there is none)."""


class FirstConnect:
    """A broker's first connection: made now, or retried in the background.

    Once connected, the client library's own reconnect logic takes over; this
    only covers a node that starts while no broker node answers.

    :param what: the broker's name in log lines ("NATS", "Redis Cluster").
    :param connect: makes the connection; raises one of ``errors`` on failure.
    :param retry_wait: seconds before the first retry, doubling up to ``max_wait``.
    """

    def __init__(self, what: str, connect: Callable[[], Awaitable[None]],
                 errors: tuple[type[BaseException], ...], retry_wait: float,
                 max_wait: float = 5.0) -> None:
        self._what = what
        self._connect = connect
        self._errors = errors
        self._retry_wait = retry_wait
        self._max_wait = max_wait
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, or log why not and keep trying in the background."""
        try:
            await self._connect()
        except self._errors as exc:
            logger.warning("no %s node answered (%s); retrying in the background",
                           self._what, exc)
            self._task = asyncio.get_running_loop().create_task(self._retry())

    async def _retry(self) -> None:
        delay = self._retry_wait
        while True:
            await asyncio.sleep(delay)
            try:
                await self._connect()
                return
            except self._errors as exc:
                logger.warning("%s still unreachable: %s", self._what, exc)
                delay = min(delay * 2, self._max_wait)

    async def cancel(self) -> None:
        """Stop retrying (the broker is closing)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
