"""Closing every websocket at shutdown, without waiting for each client."""

from __future__ import annotations

from ._engineio import close_websockets

__all__ = ["close_websockets"]
