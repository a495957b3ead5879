"""What a feature that changes how a node routes and keeps sockets plugs into.

The node core calls these hooks at fixed points (a socket connects, changes rooms,
leaves; an emit is sent; a stored message arrives) and never asks whether a
feature is on: without one, :class:`NoPlugin` answers as a plain node would.
Connection state recovery (:class:`~nats_adapter.recovery.Recovery`) is the one
plugin today; it registers its own cluster operations on the node's
:class:`~nats_adapter.rpc.ClusterRpc` itself.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from .codec import EmitMessage
from .hub import HoldBack
from .sids import sid_owner
from .types import EncodedPacket


class NodePlugin(Protocol):
    """The hooks the core calls (see the module)."""

    #: emits are stored, then delivered (here too) from the store's copy; rooms'
    #: channels carry only what the store publishes
    stores_emits: bool

    def install(self, server: Any, held: dict[str, HoldBack]) -> None:
        """The python-socketio server is set; ``held`` is the local writer's table of
        sockets whose traffic is held back (eio sid -> a ``hold(seq, packet)``)."""

    async def start(self) -> None:
        """The broker is connected."""

    def work(self) -> list[asyncio.Task[None]]:
        """Work under way that a close should let finish."""

    def owner(self, sid: str) -> str:
        """The node tag of the node that has ``sid``."""

    def restored_sid(self, eio_sid: str, namespace: str) -> str | None:
        """The sid a connecting socket gets back, or None for a new one."""

    async def reattach(self, sid: str, eio_sid: str, namespace: str) -> None:
        """``restored_sid`` gave ``sid`` back: give it what it had."""

    def touch(self, sid: str) -> None:
        """``sid``'s rooms changed."""

    def on_disconnect(self, sid: str, namespace: str, eio_sid: str) -> None:
        """``sid`` is leaving (before its rooms are)."""

    async def store_emit(self, namespace: str, targets: list[str] | None,
                         skip: frozenset[str], pkt: EncodedPacket) -> None:
        """Send an emit through the store (only called when :attr:`stores_emits`)."""

    async def deliver_stored(self, msg: EmitMessage, seq: int) -> None:
        """A stored emit came back (checked like live traffic)."""


class NoPlugin:
    """A plain node: sids never move, emits travel live, nothing is stored."""

    stores_emits = False

    def install(self, server: Any, held: dict[str, HoldBack]) -> None:
        pass

    async def start(self) -> None:
        pass

    def work(self) -> list[asyncio.Task[None]]:
        return []

    def owner(self, sid: str) -> str:
        return sid_owner(sid)

    def restored_sid(self, eio_sid: str, namespace: str) -> str | None:
        return None

    async def reattach(self, sid: str, eio_sid: str, namespace: str) -> None:
        pass

    def touch(self, sid: str) -> None:
        pass

    def on_disconnect(self, sid: str, namespace: str, eio_sid: str) -> None:
        pass

    async def store_emit(self, namespace: str, targets: list[str] | None,
                         skip: frozenset[str], pkt: EncodedPacket) -> None:
        raise RuntimeError("emits are not stored on this node")

    async def deliver_stored(self, msg: EmitMessage, seq: int) -> None:
        pass
