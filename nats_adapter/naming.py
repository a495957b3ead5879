"""Room and node names to broker channel names.

Every channel name is a dot-separated list of literal tokens. A room name is an
arbitrary Python string; :func:`encode_token` maps it to exactly one token that
contains only ``[A-Za-z0-9-_]`` so it can never act as a NATS wildcard (``*``,
``>``), span tokens (``.``), contain whitespace or control characters, or form a
Redis Cluster hash tag (``{...}``). The mapping is total and injective, and
:func:`decode_token` inverts it.

Encoding: the UTF-8 bytes of the name (lone surrogates kept with
``surrogatepass`` so every ``str`` is accepted); ``A-Z a-z 0-9 -`` stand for
themselves and every other byte becomes ``_`` followed by two upper-case hex
digits. The empty string becomes the token ``_`` (a lone ``_`` can never be
produced otherwise, because every ``_`` of a non-empty encoding is followed by
two hex digits).
"""

from __future__ import annotations

import re

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_ESCAPES = [chr(b) if b in _SAFE else f"_{b:02X}" for b in range(256)]
_TOKEN_RE = re.compile(r"(?:[A-Za-z0-9-]|_[0-9A-F]{2})+|_")
_PREFIX_RE = re.compile(r"[A-Za-z0-9-_]+(?:\.[A-Za-z0-9-_]+)*")

EMPTY_TOKEN = "_"
#: The longest channel name produced. NATS takes a subject on one protocol line of at
#: most max_control_line (4096 bytes by default) with the verb, reply and size; a
#: longer name must be refused here, not by the broker on the wire.
MAX_CHANNEL_CHARS = 2048


class ChannelNameTooLong(ValueError):
    """A room or namespace name encodes to a channel longer than MAX_CHANNEL_CHARS."""


def encode_token(name: str) -> str:
    """Return the one literal channel token that stands for ``name``."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, not {type(name).__name__}: {name!r}")
    if name == "":
        return EMPTY_TOKEN
    if name.isascii() and name.isalnum():
        return name
    return "".join([_ESCAPES[b] for b in name.encode("utf-8", "surrogatepass")])


def decode_token(token: str) -> str:
    """Invert :func:`encode_token`; raise ``ValueError`` for a token it cannot produce."""
    if _TOKEN_RE.fullmatch(token) is None:
        raise ValueError(f"not an encoded channel token: {token!r}")
    if token == EMPTY_TOKEN:
        return ""
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "_":
            out.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(ord(token[i]))
            i += 1
    name = out.decode("utf-8", "surrogatepass")
    if encode_token(name) != token:  # e.g. "_41" decodes to "A", which encodes as "A"
        raise ValueError(f"not a canonical channel token: {token!r}")
    return name


def validate_prefix(prefix: str) -> str:
    """Check a channel prefix (``sio`` or ``app.sio``): literal tokens only."""
    if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
        raise ValueError(
            f"channel prefix must be dot-separated tokens of [A-Za-z0-9-_]: {prefix!r}"
        )
    return prefix


class ChannelNames:
    """Channel names for one cluster of managers sharing ``prefix``.

    - ``{prefix}.room.{ns}.{room}``: traffic for one room of one namespace
    - ``{prefix}.ns.{ns}``: broadcasts to a whole namespace
    - ``{prefix}.node.{node_id}``: control traffic for one node
    - ``{prefix}.cluster``: requests and heartbeats of the cluster-wide server API

    With ``stored=True`` (connection state recovery) room traffic is published to
    ``{prefix}.store.…`` subjects, kept by the broker's message store, and comes
    back on the matching ``{prefix}.live.…`` ones: :meth:`room` then names the live
    channel a node subscribes to, :meth:`stored_room` the subject to publish to.
    """

    __slots__ = ("_cluster", "_live", "_node", "_ns", "_room", "_store", "prefix", "stored")

    def __init__(self, prefix: str = "sio", stored: bool = False) -> None:
        self.prefix = validate_prefix(prefix)
        self.stored = stored
        live = f"{prefix}.live." if stored else f"{prefix}."
        self._room = f"{live}room."
        self._ns = f"{live}ns."
        self._node = f"{prefix}.node."
        self._cluster = f"{prefix}.cluster"
        self._live = f"{prefix}.live."
        self._store = f"{prefix}.store."

    def is_live(self, channel: str) -> bool:
        """Whether ``channel`` is one the message store re-publishes stored traffic on
        (``{prefix}.live.…``): the only channels whose store sequence is believed."""
        return self.stored and channel.startswith(self._live)

    def logical(self, channel: str) -> str:
        """The channel an envelope on ``channel`` was sealed for: a stored copy coming
        back live (``{prefix}.live.X``) was sealed for ``{prefix}.store.X``."""
        if channel.startswith(self._live):
            return self._store + channel[len(self._live):]
        return channel

    def stored_room(self, namespace: str, room: str | None) -> str:
        """The subject an emit to ``room`` (None: the namespace) is stored under."""
        live = self.room(namespace, room)
        return f"{self.prefix}.store.{live[len(self.prefix) + len('.live.'):]}"

    def stored_sid(self, namespace: str, sid: str) -> str:
        """The subject an emit to one socket is stored under (its node, then the rest)."""
        tag, _, rest = sid.partition(":")
        return (f"{self.prefix}.store.sid.{encode_token(namespace)}.{encode_token(tag)}."
                f"{encode_token(rest)}")

    def live_sids(self, node_tag: str) -> str:
        """The live channel of every emit to a socket named after ``node_tag``."""
        return f"{self.prefix}.live.sid.*.{encode_token(node_tag)}.*"

    def live_sid(self, sid: str) -> str:
        """The live channel of emits to one socket (in any namespace)."""
        tag, _, rest = sid.partition(":")
        return f"{self.prefix}.live.sid.*.{encode_token(tag)}.{encode_token(rest)}"

    def cluster(self) -> str:
        """The channel every node listens on for cluster-wide requests."""
        return self._cluster

    def room(self, namespace: str, room: str | None) -> str:
        """The channel of ``room`` in ``namespace``; ``None`` is the whole namespace.

        Raises :class:`ChannelNameTooLong` past :data:`MAX_CHANNEL_CHARS` (a 128
        character name always fits: each character encodes to at most 12).
        """
        if room is None:
            channel = self._ns + encode_token(namespace)
        else:
            channel = f"{self._room}{encode_token(namespace)}.{encode_token(room)}"
        if len(channel) > MAX_CHANNEL_CHARS:
            raise ChannelNameTooLong(
                f"room {room!r:.60} of namespace {namespace!r:.60} encodes to a channel of "
                f"{len(channel)} characters, more than {MAX_CHANNEL_CHARS}")
        return channel

    def node(self, node_id: str) -> str:
        """The control channel of the node ``node_id``."""
        return self._node + encode_token(node_id)

    def parse_room(self, channel: str) -> tuple[str, str | None] | None:
        """Invert :meth:`room`: ``(namespace, room)``, or ``None`` if not a room channel."""
        try:
            if channel.startswith(self._room):
                ns, room = channel[len(self._room) :].split(".")
                return decode_token(ns), decode_token(room)
            if channel.startswith(self._ns):
                return decode_token(channel[len(self._ns) :]), None
        except ValueError:
            return None
        return None
