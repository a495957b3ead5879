"""The interface between the node core and a broker transport.

A transport only moves bytes: it owns the broker connection, reconnects, and
(re)subscription; it never sees a Socket.IO object. The core owns membership,
naming, the envelope and fan-out, and calls :meth:`Transport.subscribe` only
for a channel's first local member.
"""

from __future__ import annotations

import abc
from typing import Any, Protocol


class TransportHandler(Protocol):
    """What a transport calls back into; implemented by the node core."""

    async def on_message(self, channel: str, data: bytes) -> None:
        """A payload arrived on ``channel`` (a room channel or this node's control channel).

        Called once per payload in arrival order per channel; must not raise.
        """

    def on_connection_state(self, connected: bool) -> None:
        """The broker connection went up (``True``) or down (``False``)."""


class TransportError(RuntimeError):
    """The broker could not take a publish (down, closed, buffer full)."""


class Transport(abc.ABC):
    """A pub/sub broker connection with at-most-once delivery.

    Contract:
    - ``publish`` is fire-and-forget; it raises :class:`TransportError` when the
      payload certainly cannot be sent, and never blocks on a slow broker beyond
      its own buffer.
    - a subscription survives reconnects: the transport restores it.
    - messages a node publishes are never handed back to that node when the broker
      supports it (NATS no-echo); otherwise the core drops its own by origin.
    """

    #: Short backend name used in metrics and /healthz.
    name: str = "abstract"

    @abc.abstractmethod
    async def start(self, handler: TransportHandler, control_channel: str) -> None:
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
