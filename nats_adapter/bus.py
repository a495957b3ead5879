"""This node's end of the wire: envelopes encoded, sealed and published, and opened.

Every part of the node that sends goes through :class:`Bus` (so what is published is
counted once, in one place), and everything that arrives is opened here: unsealed
for its channel when there is a cluster key, decoded, and, for an emit to its
channel's room, given the namespace and room its channel names.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable

from . import codec
from ._logging import ThrottledLog
from .brokers.base import Broker, BrokerError, BrokerUnconfirmed
from .naming import ChannelNames
from .sealing import ClusterKey, Verdict
from .stats import ManagerStats

logger = logging.getLogger(__name__)


class Bus:
    """Publishes and opens envelopes for one node.

    :param ensure_started: starts the node (once) and returns an awaitable of its
        start; what is published before it is done waits for it.
    """

    def __init__(self, broker: Broker, channels: ChannelNames, stats: ManagerStats,
                 key: ClusterKey | None,
                 ensure_started: Callable[[], Awaitable[None]]) -> None:
        self.broker = broker
        self.channels = channels
        self.stats = stats
        self.key = key
        #: set once the node's start is done (or failed, or was cancelled)
        self.ready = False
        self.log = ThrottledLog(logger)
        #: stamps emits and cluster requests with the current span's trace context
        #: (tracing on: see :func:`nats_adapter.tracing.install`)
        self.stamp: Callable[[codec.Message], codec.Message] | None = None
        self._ensure_started = ensure_started

    # -- sending -------------------------------------------------------------------------

    def encode(self, msg: codec.Message) -> bytes | None:
        """``msg`` as bytes, not yet sealed (see :meth:`seal`); None when it cannot be
        encoded (counted and logged)."""
        if self.stamp is not None:
            msg = self.stamp(msg)
        try:
            return codec.encode(msg)
        except (TypeError, ValueError):
            self.stats.publish_errors += 1
            logger.exception("cannot encode %s for the bus", type(msg).__name__)
            return None

    def seal(self, data: bytes, channel: str) -> bytes:
        """An encoded envelope as sent on ``channel``: sealed for that channel when
        there is a cluster key (it opens on no other), as is without."""
        if self.key is None:
            return data
        return self.key.seal(data, self.channels.logical(channel))

    async def publish(self, channel: str, msg: codec.Message, *, strict: bool = False) -> None:
        data = self.encode(msg)
        if data is not None:
            await self.publish_bytes(channel, self.seal(data, channel), strict=strict)

    async def publish_bytes(self, channel: str, data: bytes, *, strict: bool = False) -> None:
        """Publish ``data`` on ``channel``. A publish the broker refuses is counted and
        logged, then raised (:class:`BrokerError`) when ``strict`` (an emit, whose
        sender is told), dropped when not (a notice nobody waits on)."""
        if not self.ready:
            await self._ensure_started()
        try:
            await self.broker.publish(channel, data)
        except BrokerUnconfirmed as exc:
            # sent, but maybe not to every node: a notice goes on as sent
            if strict:
                self.stats.publish_errors += 1
                self.log.warning("publish", "publish to %s not confirmed: %s", channel, exc)
                raise
        except BrokerError as exc:
            self.stats.publish_errors += 1
            self.log.warning("publish", "publish to %s failed: %s", channel, exc)
            if strict:
                raise
            return
        self.stats.published += 1
        self.stats.published_bytes += len(data)

    async def confirm_published(self) -> None:
        """Return once the broker took everything published so far (:class:`BrokerError`
        when it did not say so in time, counted as a publish error)."""
        try:
            await self.broker.confirm_published()
        except BrokerError:
            self.stats.publish_errors += 1
            raise

    # -- receiving -----------------------------------------------------------------------

    def open(self, channel: str, data: bytes, stored: bool
             ) -> tuple[codec.Message, int] | None:
        """The envelope in ``data`` and its seal's sequence (0 without a cluster key),
        or None when it is unsealed, forged (sealed for another channel included),
        stale or malformed (counted and logged). A stored copy comes back live as it is
        stored: its age is checked like any other's."""
        sealed_seq = 0
        if self.key is not None:
            verdict, body, sealed_seq, _ = self.key.open(data, self.channels.logical(channel))
            if verdict is not Verdict.OK:
                self._reject_unsealed(verdict, data, channel)
                return None
            data = body
        try:
            msg = codec.decode(data)
            if isinstance(msg, codec.EmitMessage) and msg.channel_room:
                msg = self._with_channel_room(msg, channel)
            return msg, sealed_seq
        except codec.NewerEnvelope as exc:
            # malformed to this release (anyone can claim a version), and told apart
            self.stats.dropped_malformed += 1
            self.stats.dropped_newer += 1
            self.log.warning("newer", "dropped an envelope on %s of format %d from a gateway "
                             "of a newer release (this one reads format %d): finish the "
                             "upgrade; a newer release must speak the oldest format its "
                             "peers advertise", channel, exc.version, codec.VERSION)
            return None
        except codec.EnvelopeError as exc:
            self.stats.dropped_malformed += 1
            self.log.warning("malformed", "dropped malformed %spayload of %d bytes on %s: %s",
                             "stored " if stored else "", len(data), channel, exc)
            return None

    def open_stored(self, subject: str, data: bytes, max_age: float
                    ) -> tuple[codec.Message, int, int] | None:
        """The envelope stored under ``subject``, its seal's sequence and stamp (ms;
        both 0 without a cluster key), read back from the message store: None when it
        does not open for that subject or is older than ``max_age`` seconds (plus the
        clock skew allowed). Not counted: it was counted when it came by live."""
        seq = stamp = 0
        if self.key is not None:
            opened = self.key.open(data, self.channels.logical(subject),
                                   max_age=max_age + self.key.max_skew_ms / 1000)
            if opened.verdict is not Verdict.OK:
                return None
            data, seq, stamp = opened.body, opened.seq, opened.stamp_ms
        try:
            return codec.decode(data), seq, stamp
        except codec.EnvelopeError:
            return None

    def _with_channel_room(self, msg: codec.EmitMessage, channel: str) -> codec.EmitMessage:
        """``msg`` for the namespace and room its channel names (the envelope has neither)."""
        parsed = self.channels.parse_room(channel)
        if parsed is None or parsed[1] is None:
            raise codec.EnvelopeError("an emit to its channel's room on a channel that names "
                                      "no room")
        return dataclasses.replace(msg, namespace=parsed[0], rooms=[parsed[1]],
                                   channel_room=False)

    def _reject_unsealed(self, verdict: Verdict, data: bytes, channel: str) -> None:
        if verdict is Verdict.STALE:
            self.stats.dropped_stale += 1
        else:
            try:
                codec.decode(data)  # a whole envelope with no seal at all
                verdict = Verdict.UNSIGNED
            except codec.EnvelopeError:
                verdict = Verdict.FORGED
            if verdict is Verdict.UNSIGNED:
                self.stats.dropped_unsigned += 1
            else:
                self.stats.dropped_forged += 1
        self.log.warning(verdict.value, "dropped a %s envelope of %d bytes on %s (cluster key "
                         "set)", verdict.value, len(data), channel)
