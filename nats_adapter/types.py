"""Type aliases shared by the core's modules."""

from __future__ import annotations

from typing import TypeAlias

from bidict import bidict

#: A Socket.IO packet already encoded: text, or text + binary attachments.
EncodedPacket: TypeAlias = str | list[str | bytes]
#: namespace -> room (None: every socket of the namespace) -> sid <-> eio sid
RoomIndex: TypeAlias = dict[str, dict[str | None, bidict[str, str]]]
