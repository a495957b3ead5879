"""Type aliases shared by the core's modules."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TypeAlias

#: A Socket.IO packet already encoded: text, or text + binary attachments.
EncodedPacket: TypeAlias = str | list[str | bytes]
#: namespace -> room -> sid -> eio sid. The room None (every socket of the
#: namespace) is a bidict, since python-socketio looks sids up by eio sid there;
#: named rooms are plain dicts, a third of a bidict's memory.
RoomIndex: TypeAlias = dict[str, dict[str | None, MutableMapping[str, str]]]
