"""What connection state recovery keeps on NATS: a JetStream stream of the traffic of
the last minutes, and a key-value bucket of sessions.

The stream holds every envelope published on ``{prefix}.store.>`` for twice the
recovery window and re-publishes each one, once stored, on ``{prefix}.live.>`` with
its stream sequence in the ``Nats-Sequence`` header: nodes receive room traffic from
those copies, so every node (the sender's included) delivers in one order, the
stream's, and that sequence is the offset a client remembers. Both the stream and
the bucket are replicated on three nodes when the cluster has them, so losing one
NATS node loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js import api

from .base import BrokerError, BrokerUnconfirmed, MessageStore

if TYPE_CHECKING:
    from nats.aio.client import Client

logger = logging.getLogger(__name__)

#: seconds the stream keeps messages at least: twice the window, never less than this,
#: so gateways with different windows agree on one stream configuration
MIN_RETENTION = 600.0
#: seconds a store operation is tried again while JetStream has no leader for it
PUBLISH_RETRY_FOR = 10.0
#: seconds an emit's store has to answer, retries included: its sender's ack waits
#: on it (ok: false past it; a leader election of a few seconds refuses meanwhile)
STORE_ANSWER_WITHIN = 2.0
#: at most this many subject filters on one replay consumer; more read the whole
#: stream's subjects and filter here (servers slow down with many filters)
MAX_FILTERS = 32
#: errors after which a published message is certainly not stored
NOT_STORED: tuple[type[BaseException], ...] = (nats.js.errors.NoStreamResponseError,
                                               nats.js.errors.ServiceUnavailableError)
#: seconds one attempt at creating a reading consumer waits for JetStream
CONSUMER_CREATE_TIMEOUT = 2.0
#: bytes the stream holds at most by default (oldest messages go first beyond it), so
#: a gateway's credential cannot fill the file store (``gateway provision --max-bytes``)
STREAM_MAX_BYTES = 1024 ** 3
#: bytes of one stored message at most by default: twice the gateway's default
#: --max-message-bytes (64 KiB), room for the envelope around a client's message (its
#: JSON escaping and sealing); ``gateway provision --max-msg-size`` for larger messages
STREAM_MAX_MSG_SIZE = 128 * 1024
#: consumers on the stream at most (catch-ups use one each, briefly)
STREAM_MAX_CONSUMERS = 1000
#: limits an operator may set, but not below these (a gateway refuses such a stream)
MIN_MAX_BYTES = 64 * 1024 ** 2
MIN_MAX_MSG_SIZE = 64 * 1024
MIN_MAX_MSGS = 100_000
#: seconds a gateway's attempt at provisioning waits (where it may not, it is refused
#: and the request times out)
PROVISION_ATTEMPT_TIMEOUT = 2.0


def _names(prefix: str) -> tuple[str, str]:
    safe = prefix.replace(".", "_").replace("-", "_")
    return f"SIO_{safe}", f"SIO_{safe}_sessions"


class NotProvisionedError(Exception):
    """The stream or the bucket is missing or configured otherwise than a gateway needs."""


def stream_config(prefix: str, window: float, replicas: int,
                  max_bytes: int = STREAM_MAX_BYTES,
                  max_msg_size: int = STREAM_MAX_MSG_SIZE) -> api.StreamConfig:
    """The stream of ``{prefix}.store.>``: kept twice the window (at least
    MIN_RETENTION), re-published on ``{prefix}.live.>`` once stored; at most
    ``max_bytes`` (oldest dropped first), ``max_msg_size`` a message and
    STREAM_MAX_CONSUMERS consumers."""
    return api.StreamConfig(
        name=_names(prefix)[0], subjects=[f"{prefix}.store.>"],
        max_age=max(window * 2, MIN_RETENTION), storage=api.StorageType.FILE,
        num_replicas=replicas, allow_direct=True, discard=api.DiscardPolicy.OLD,
        max_bytes=max_bytes, max_msg_size=max_msg_size,
        max_consumers=STREAM_MAX_CONSUMERS,
        republish=api.RePublish(src=f"{prefix}.store.>", dest=f"{prefix}.live.>"),
    )


def bucket_config(prefix: str, window: float, replicas: int) -> api.StreamConfig:
    """The key-value bucket of sessions, as the stream nats-py's create_key_value
    makes (one value per key, per-message TTLs allowed) except that it takes no
    rollups and no purges: gateways only put, get and delete (a marker message), and
    with rollups allowed one ``Nats-Rollup: all`` header from a gateway's credential
    would wipe every session record."""
    bucket = _names(prefix)[1]
    return api.StreamConfig(
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], allow_rollup_hdrs=False,
        deny_purge=True, allow_msg_ttl=True, deny_delete=True, discard=api.DiscardPolicy.NEW,
        duplicate_window=120.0, max_age=max(window * 2, 24 * 3600.0), max_consumers=-1,
        max_msgs=-1, max_msgs_per_subject=1, num_replicas=replicas,
        storage=api.StorageType.FILE,
    )


def _differences(have: api.StreamConfig, wanted: api.StreamConfig) -> list[str]:
    """How ``have`` falls short of ``wanted`` (retention may be longer, replicas fewer)."""
    out = []
    if sorted(have.subjects or []) != sorted(wanted.subjects or []):
        out.append(f"subjects {have.subjects} instead of {wanted.subjects}")
    republish = (have.republish.src, have.republish.dest) if have.republish else None
    expected = (wanted.republish.src, wanted.republish.dest) if wanted.republish else None
    if republish != expected:
        out.append(f"republishes {republish} instead of {expected}")
    if (have.max_age or 0) < (wanted.max_age or 0) - 1:
        out.append(f"keeps messages {have.max_age or 0:.0f} s, this gateway needs "
                   f"{wanted.max_age or 0:.0f} s")
    for name in ("allow_direct", "allow_msg_ttl", "max_msgs_per_subject", "discard"):
        if getattr(wanted, name) and getattr(have, name) != getattr(wanted, name):
            out.append(f"{name} is {getattr(have, name)!r}, not {getattr(wanted, name)!r}")
    if have.allow_rollup_hdrs and not wanted.allow_rollup_hdrs:
        out.append("allows rollups (one rollup header wipes every record)")
    if wanted.deny_purge and not have.deny_purge:
        out.append("allows purges")
    for name, floor in (("max_msgs", MIN_MAX_MSGS), ("max_bytes", MIN_MAX_BYTES),
                        ("max_msg_size", MIN_MAX_MSG_SIZE)):
        limit = getattr(have, name)
        if limit is not None and 0 < limit < floor:
            out.append(f"{name} is limited to {limit}, below {floor}")
    return out


async def provision(nc: Client, prefix: str, window: float, replicas: int = 3,
                    timeout: float = 5.0, max_bytes: int = STREAM_MAX_BYTES,
                    max_msg_size: int = STREAM_MAX_MSG_SIZE) -> None:
    """Create the stream and the bucket of ``prefix``, or bring them up to date:
    the operator's step (``python -m gateway provision``), idempotent. ``replicas``
    falls back to 1 on a single server; ``max_bytes`` and ``max_msg_size`` limit the
    stream (:func:`stream_config`). Raises what nats-py raises."""
    js = nc.jetstream(timeout=timeout)
    for config in (stream_config(prefix, window, replicas, max_bytes, max_msg_size),
                   bucket_config(prefix, window, replicas)):
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code == 10058:  # exists with another configuration: update it
                await js.update_stream(config)
            elif replicas > 1 and exc.err_code in (10074, 10023):  # not enough servers
                logger.warning("JetStream has too few servers for %d replicas; using 1",
                               replicas)
                await provision(nc, prefix, window, 1, timeout, max_bytes, max_msg_size)
                return
            else:
                raise


class NatsMessageStore(MessageStore):
    """:class:`MessageStore` on NATS JetStream (see the module docstring).

    :param nc: a connected nats-py client.
    :param prefix: the channel prefix: the stream takes ``{prefix}.store.>``.
    :param window: seconds a disconnected session stays recoverable; the stream keeps
        messages twice as long (at least ``MIN_RETENTION``).
    :param replicas: copies of the stream and bucket (3 wants a 3-node cluster; falls
        back to 1 on a single server).
    """

    def __init__(self, nc: Client, prefix: str, window: float, replicas: int = 3) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.prefix = prefix
        self.window = window
        self.replicas = replicas
        self.stream, self.bucket = _names(prefix)
        self.retention = max(window * 2, MIN_RETENTION)
        self._kv: Any = None

    async def setup(self, timeout: float = 20.0) -> None:
        """Bind to the stream and the bucket and check that they are configured as
        this gateway needs; retries while JetStream elects its leaders after the
        cluster starts, and while they are not provisioned yet.

        Missing or misconfigured, they are created or updated here only where the
        broker lets this NATS user do it (a development broker without users); on a
        broker with gateway users (infra/nats/node-secure.conf) the operator
        provisions them (:func:`provision`, ``python -m gateway provision``) and a
        gateway may not: :class:`BrokerError` then names that step."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            try:
                await self._bind()
                return
            except NotProvisionedError as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(str(exc)) from None
                logger.info("%s; waiting for it to be provisioned", exc)
            except (TimeoutError, nats.errors.Error) as exc:
                if time.monotonic() > deadline:
                    raise BrokerError(f"JetStream is not available: {exc!r}") from exc
                logger.info("JetStream not ready yet (%r); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _bind(self) -> None:
        problems = await self._problems()
        if problems:
            # a development broker lets any client administer JetStream; with gateway
            # users the attempt is refused (the request then times out)
            try:
                await provision(self._nc, self.prefix, self.window, self.replicas,
                                timeout=PROVISION_ATTEMPT_TIMEOUT)
            except (TimeoutError, nats.errors.Error) as exc:
                raise NotProvisionedError(
                    f"{'; '.join(problems)}, and this NATS user may not change that "
                    f"({exc!r}): provision them as the NATS operator first: "
                    f"`python -m gateway provision` (README, Deploying securely)") from None
            problems = await self._problems()
            if problems:
                raise NotProvisionedError("; ".join(problems))
        self._kv = await self._js.key_value(self.bucket)

    async def _problems(self) -> list[str]:
        """What keeps the stream and the bucket from serving this gateway; [] if nothing."""
        problems = []
        wanted = stream_config(self.prefix, self.window, self.replicas)
        try:
            info = await self._js.stream_info(self.stream)
            problems += [f"stream {self.stream}: {p}" for p in
                         _differences(info.config, wanted)]
        except nats.js.errors.NotFoundError:
            problems.append(f"stream {self.stream} does not exist")
        wanted = bucket_config(self.prefix, self.window, self.replicas)
        try:
            info = await self._js.stream_info(wanted.name or "")
            problems += [f"bucket {self.bucket}: {p}" for p in _differences(info.config, wanted)]
        except nats.js.errors.NotFoundError:
            problems.append(f"bucket {self.bucket} does not exist")
        return problems

    # -- messages ----------------------------------------------------------------------

    async def publish(self, subject: str, data: bytes) -> int:
        # While the stream elects a leader (its leader's NATS node died) nobody answers
        # a publish: certainly not stored, so tried again, within STORE_ANSWER_WITHIN
        # in all (a sender waits on it: on the minority side of a partition, where no
        # quorum can store it, it hears so quickly). A timeout is not: the message may
        # be stored, and a second copy would be delivered twice.
        deadline = time.monotonic() + STORE_ANSWER_WITHIN
        try:
            ack = await self._retrying(
                "JetStream did not store the message",
                lambda: self._js.publish(
                    subject, data, stream=self.stream,
                    timeout=max(0.1, deadline - time.monotonic())),
                retry=NOT_STORED, within=STORE_ANSWER_WITHIN)
        except (TimeoutError, nats.errors.TimeoutError) as exc:  # asked, never answered
            raise BrokerUnconfirmed(f"JetStream did not confirm the message: {exc!r}") \
                from exc
        except nats.errors.Error as exc:
            raise BrokerError(f"JetStream did not store the message: {exc!r}") from exc
        return int(ack.seq)

    async def bounds(self) -> tuple[int, int]:
        info = await self._retrying("cannot read the stream's bounds",
                                    lambda: self._js.stream_info(self.stream))
        return int(info.state.first_seq), int(info.state.last_seq)

    async def replay(self, subjects: list[str], after: int, until: int,
                     since: float | None = None) -> list[tuple[int, str, bytes]]:
        if until <= after:
            return []
        filters = sorted(set(subjects))
        wanted: set[str] | None = None
        if len(filters) > MAX_FILTERS:
            wanted, filters = set(filters), [f"{self.prefix}.store.>"]
        if since is not None:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME,
                                        opt_start_time=datetime.fromtimestamp(since, UTC))
        else:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1)
        out: list[tuple[int, str, bytes]] = []
        async for seq, subject, data in self._read(filters, config):
            if seq > until:
                break
            if seq > after and (wanted is None or subject in wanted):
                out.append((seq, subject, data))
        return out

    async def history(self, subject: str, limit: int,
                      accept: Callable[[bytes], bool] | None = None
                      ) -> list[tuple[int, bytes]]:
        """The last ``limit`` messages on ``subject`` within the window that ``accept``
        takes, oldest first."""
        start = datetime.now(UTC) - timedelta(seconds=self.window)
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME,
                                    opt_start_time=start)
        out: list[tuple[int, bytes]] = []
        async for seq, _, data in self._read([subject], config):
            if accept is not None and not accept(data):
                continue
            out.append((seq, data))
            if len(out) > 2 * limit:
                out = out[-limit:]
        return out[-limit:]

    async def _read(self, filters: list[str], config: api.ConsumerConfig
                    ) -> AsyncIterator[tuple[int, str, bytes]]:
        """Every stored message on ``filters`` from ``config``'s start, in order, read
        by an ephemeral consumer that is deleted afterwards."""
        config.ack_policy = api.AckPolicy.NONE
        config.inactive_threshold = 10.0
        config.mem_storage = True
        config.num_replicas = 1
        if len(filters) > 1:
            config.filter_subjects = filters
        else:
            config.filter_subject = filters[0]
        # Creating a consumer needs JetStream's metadata leader, which a killed NATS
        # node can take with it for several seconds (raft elections wait 4-9 s): short
        # attempts, tried again, so a client reconnecting meanwhile is still restored.
        # Unnamed: the API subject of ephemeral consumers, the only one gateway users
        # may create (node-secure.conf); the server names it.
        try:
            info = await self._retrying("cannot read the stream", lambda: self._js.add_consumer(
                self.stream, config=config, timeout=CONSUMER_CREATE_TIMEOUT))
            config.name = info.name
            sub = await self._js.pull_subscribe_bind(stream=self.stream, name=info.name)
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerError(f"cannot read the stream: {exc!r}") from exc
        # Nobody else reads this consumer: every delivery is ours, numbered 1, 2, 3 ...
        # by the consumer. A gap means messages went elsewhere (the consumer was
        # drained or deleted under us): raised, never returned as a short list.
        delivered = 0
        try:
            pending = int((await sub.consumer_info()).num_pending or 0)
            while pending > 0:
                batch = await sub.fetch(min(pending, 256), timeout=5)
                if not batch:
                    raise BrokerError("reading the stream failed: the consumer returned "
                                      f"nothing with {pending} messages pending")
                for msg in batch:
                    meta = msg.metadata
                    delivered += 1
                    if int(meta.sequence.consumer) != delivered:
                        raise BrokerError(
                            f"reading the stream failed: consumer {config.name} delivered "
                            f"its message {meta.sequence.consumer} as our {delivered}th "
                            "(someone else took messages from it)")
                    pending = int(meta.num_pending)
                    yield int(meta.sequence.stream), msg.subject, msg.data
        except (TimeoutError, nats.errors.Error) as exc:
            raise BrokerError(f"reading the stream failed: {exc!r}") from exc
        finally:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await sub.unsubscribe()
            if config.name:
                with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                    await self._js.delete_consumer(self.stream, config.name)

    # -- sessions ----------------------------------------------------------------------

    async def _retrying(self, what: str, op: Any,
                        retry: tuple[type[BaseException], ...] = (TimeoutError,
                                                                  nats.errors.Error),
                        within: float = PUBLISH_RETRY_FOR) -> Any:
        """``op()``, tried again on ``retry`` errors while JetStream elects leaders, for
        ``within`` seconds; :class:`BrokerError` once that is over."""
        deadline = time.monotonic() + within
        delay = 0.05
        while True:
            try:
                return await op()
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.BadRequestError):
                raise
            except retry as exc:
                if time.monotonic() + delay > deadline:
                    raise BrokerError(f"{what}: {exc!r}") from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def put_session(self, key: str, value: bytes, ttl: float | None = None) -> None:
        async def put() -> None:
            if ttl is None:
                await self._kv.put(key, value)
            else:  # a per-message TTL: nats-py's put takes none
                await self._js.publish(f"$KV.{self.bucket}.{key}", value,
                                       headers={"Nats-TTL": str(max(1, int(ttl)))},
                                       timeout=2.0)

        await self._retrying("could not store session", put)

    async def take_session(self, key: str, accept: Callable[[bytes], bool] | None = None
                           ) -> bytes | None:
        try:
            entry = await self._retrying("could not read session", lambda: self._kv.get(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        if accept is not None and not accept(bytes(entry.value)):
            return None
        try:  # single use: of two nodes restoring it, one wins
            await self._retrying("could not take session",
                                 lambda: self._kv.delete(key, last=entry.revision))
        except nats.js.errors.BadRequestError:
            return None
        return bytes(entry.value)

    async def delete_session(self, key: str) -> None:
        with contextlib.suppress(BrokerError, nats.errors.Error, asyncio.TimeoutError):
            await self._retrying("could not delete session", lambda: self._kv.delete(key))
