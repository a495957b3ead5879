"""What connection state recovery keeps on NATS: a JetStream stream of the traffic of
the last minutes, and a key-value bucket of sessions.

The stream holds every envelope published on ``{prefix}.store.>`` for twice the
recovery window and re-publishes each one, once stored, on ``{prefix}.live.>`` with
its stream sequence in the ``Nats-Sequence`` header: nodes receive room traffic from
those copies, so every node (the sender's included) delivers in one order, the
stream's, and that sequence is the offset a client remembers. Both the stream and
the bucket are replicated on three nodes when the cluster has them, so losing one
NATS node loses nothing.

A catch-up reads what a session missed with batched direct gets (nats-server 2.11+,
a stream with ``allow_direct``): one request per subject on
``$JS.API.DIRECT.GET.<stream>`` answers with every stored message of that subject
after a sequence, from the stream's replica on the gateway's own NATS server,
without a consumer, a JetStream API call or the metadata leader; the replays of
one subject that come while a read of it is under way share the next one (a storm
restores a room's members together). Before it reads,
it checks that this replica already holds the last message wanted (a replica may
lag its leader by a few messages); where direct gets cannot serve (an older server,
no replica on this server, a stream without ``allow_direct``, a NATS user not
allowed ``$JS.API.DIRECT.GET.<stream>``), the catch-up reads through an ephemeral
consumer, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js import api

from .. import compat
from .base import BrokerError, BrokerUnconfirmed, MessageStore
from .gaps import RangeLost

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

logger = logging.getLogger(__name__)

#: seconds the stream keeps messages at least: twice the window, never less than this,
#: so gateways with different windows agree on one stream configuration
MIN_RETENTION = 600.0
#: seconds a store operation is tried again while JetStream has no leader for it
PUBLISH_RETRY_FOR = 10.0
#: seconds an emit's store has to answer, retries included: its sender's ack waits
#: on it (ok: false past it; a leader election of a few seconds refuses meanwhile)
STORE_ANSWER_WITHIN = 1.5
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
#: messages one direct get asks for at most (the server also stops at its max_pending
#: bytes; the rest is asked for again)
DIRECT_BATCH = 512
#: seconds the replies to one direct get may take before direct gets are given up for
#: DIRECT_RETRY_AFTER (reads go through a consumer meanwhile)
DIRECT_TIMEOUT = 2.0
#: seconds after a failed direct get before they are tried again
DIRECT_RETRY_AFTER = 60.0
#: seconds a catch-up waits for the replica on this NATS server to hold the last
#: message it wants (it lags its leader by a few messages at most), then reads
#: through a consumer
DIRECT_CATCH_UP = 1.0
#: the first nats-server release with batched direct gets
DIRECT_BATCH_SINCE = (2, 11)
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


class _DirectUnavailable(Exception):
    """A direct get was refused, failed or not answered: read through a consumer."""


class _DirectReply:
    """The replies to one direct get, as they come: the messages, then the end."""

    __slots__ = ("batch", "done", "error", "messages", "pending")

    def __init__(self, batch: bool) -> None:
        self.batch = batch
        self.messages: list[tuple[int, str, bytes]] = []
        #: messages of the subject still stored after the last one returned
        self.pending = 0
        self.error = ""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finish(self, pending: int = 0, error: str = "") -> None:
        if not self.done.done():
            self.pending, self.error = pending, error
            self.done.set_result(None)

    def add(self, msg: Msg) -> None:
        """One reply (see nats-server's stream.go, getDirectRequest)."""
        headers = msg.headers or {}
        status = headers.get("Status")
        previous = self.messages[-1][0] if self.messages else 0
        try:
            if status is None:
                seq, subject = int(headers["Nats-Sequence"]), headers["Nats-Subject"]
                # each reply of a batch names the one before it: none went missing
                if self.batch and int(headers.get("Nats-Last-Sequence", -1)) != previous:
                    self.finish(error=f"a reply is missing before message {seq}")
                    return
                self.messages.append((seq, subject, msg.data))
                if not self.batch:
                    self.finish()
            elif status == "204":  # end of the batch
                if int(headers.get("Nats-Last-Sequence", -1)) != previous:
                    self.finish(error="the batch's last replies are missing")
                else:
                    self.finish(int(headers.get("Nats-Num-Pending", 0)))
            elif status == "404":  # nothing (more) stored
                self.finish()
            else:  # 408 a request this server does not take, 503 nobody serves it
                self.finish(error=f"status {status} {headers.get('Description', '')}")
        except (KeyError, ValueError):
            self.finish(error=f"a reply without its sequence ({headers!r})")


class _SharedRead:
    """A direct read of one subject not sent yet, which every replay of that subject
    that comes meanwhile joins: it reads from the lowest offset of them to the
    highest last message wanted."""

    __slots__ = ("after", "result", "until")

    def __init__(self, after: int, until: int) -> None:
        self.after = after
        self.until = until
        self.result: asyncio.Future[list[tuple[int, str, bytes]]] = \
            asyncio.get_running_loop().create_future()


class NatsMessageStore(MessageStore):
    """:class:`MessageStore` on NATS JetStream (see the module docstring).

    :param nc: a connected nats-py client.
    :param prefix: the channel prefix: the stream takes ``{prefix}.store.>``.
    :param window: seconds a disconnected session stays recoverable; the stream keeps
        messages twice as long (at least ``MIN_RETENTION``).
    :param replicas: copies of the stream and bucket (3 wants a 3-node cluster; falls
        back to 1 on a single server).
    :param direct_reads: whether replays may read with batched direct gets where
        they can (see the module); False reads through consumers only.
    """

    def __init__(self, nc: Client, prefix: str, window: float, replicas: int = 3,
                 direct_reads: bool = True) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self.prefix = prefix
        self.window = window
        self.replicas = replicas
        self.stream, self.bucket = _names(prefix)
        self.retention = max(window * 2, MIN_RETENTION)
        self._kv: Any = None
        self.direct_reads = direct_reads
        #: replays served by direct gets, and by consumers
        self.reads = {"direct": 0, "consumer": 0}
        self._direct_sub: Subscription | None = None
        self._direct_inbox = ""
        self._direct_replies: dict[str, _DirectReply] = {}
        self._direct_tokens = itertools.count(1)
        #: monotonic time before which direct gets are not tried (one failed)
        self._direct_off_until = 0.0
        #: whether the NATS server this client is on holds a current replica of the
        #: stream (from the last bounds()); direct gets go to it
        self._local_replica = True
        self._versions: dict[str, bool] = {}
        #: the highest sequence the replica answering direct gets has been seen to
        #: hold, and the NATS server it is on (see _direct_holds)
        self._replica_holds = (0, "")
        #: subject -> the read that replays of it made now join, and the task reading
        self._shared: dict[str, _SharedRead] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        #: sequence -> the direct get under way that checks the replica holds it
        self._checks: dict[int, asyncio.Task[tuple[list[tuple[int, str, bytes]], int]]] = {}
        #: bounds(): the answer that calls made now wait for, and the task asking
        self._bounds_next: asyncio.Future[tuple[int, int]] | None = None
        self._bounds_task: asyncio.Task[None] | None = None

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
                await self._start_direct()
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

    async def _start_direct(self) -> None:
        """Subscribe to the replies of direct gets and try one: where the server,
        the stream or this NATS user does not serve them, replays use consumers."""
        if not self.direct_reads or self._direct_sub is not None:
            return
        if not self._direct_server():
            logger.info("NATS server %s has no batched direct gets (%d.%d+): catch-ups "
                        "read the stream through consumers",
                        self._nc.connected_server_version, *DIRECT_BATCH_SINCE)
            return
        self._direct_inbox = self._nc.new_inbox()
        self._direct_sub = await self._nc.subscribe(f"{self._direct_inbox}.*",
                                                    cb=self._on_direct)
        try:  # anything at all after the stream's start (a 404 when it is empty)
            await self._direct_get({"seq": 1, "next_by_subj": f"{self.prefix}.store.>",
                                    "batch": 1})
        except _DirectUnavailable as exc:
            self._direct_off_until = float("inf")
            logger.warning(
                "direct gets on stream %s do not work (%s): catch-ups read it through "
                "consumers, which is slower (a gateway NATS user needs publish permission "
                "on $JS.API.DIRECT.GET.%s; README, Deploying securely)",
                self.stream, exc, self.stream)

    def _server_name(self) -> str:
        """The name of the NATS server this client is on (nats-py keeps its INFO;
        :func:`nats_adapter.compat.nats_server_name`); empty when unknown."""
        return compat.nats_server_name(self._nc)

    def _direct_server(self) -> bool:
        """Whether the NATS server this client is on has batched direct gets."""
        version = self._nc.connected_server_version
        key = str(version)
        if key not in self._versions:
            try:
                self._versions[key] = (version.major, version.minor) >= DIRECT_BATCH_SINCE
            except (TypeError, ValueError):  # unparsable: not known to have them
                self._versions[key] = False
        return self._versions[key]

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
        """(first, last) as the stream's leader tells them in an answer asked for after
        this call began. Concurrent calls (a reconnect storm) share their answers: a
        call waits for the request under way to end and joins the next one, which
        then serves every call that came meanwhile."""
        loop = asyncio.get_running_loop()
        if self._bounds_next is None:
            self._bounds_next = loop.create_future()
            if self._bounds_task is None or self._bounds_task.done():
                self._bounds_task = loop.create_task(self._ask_bounds())
        answer = self._bounds_next
        return await asyncio.shield(answer)

    async def _ask_bounds(self) -> None:
        """Ask for the bounds while calls wait for an answer (see :meth:`bounds`)."""
        while self._bounds_next is not None:
            answer, self._bounds_next = self._bounds_next, None
            try:
                answer.set_result(await self._read_bounds())
            except Exception as exc:  # every waiting call gets it
                answer.set_exception(exc)

    async def _read_bounds(self) -> tuple[int, int]:
        info = await self._retrying("cannot read the stream's bounds",
                                    lambda: self._js.stream_info(self.stream))
        cluster = info.cluster
        if cluster is not None and cluster.leader:
            # direct gets go to this server's replica when it has one (NATS prefers
            # local queue subscribers): only then are they all read from one replica
            here = self._server_name()
            self._local_replica = here == cluster.leader or any(
                peer.name == here and peer.current for peer in cluster.replicas or [])
        return int(info.state.first_seq), int(info.state.last_seq)

    # -- gap repair (see nats_adapter.brokers.gaps) --------------------------------------

    def stored_subject(self, live: str) -> str:
        """The subject a copy re-published on ``live`` is stored under."""
        head = f"{self.prefix}.live."
        if not live.startswith(head):
            raise ValueError(f"{live!r} is not a live subject of prefix {self.prefix!r}")
        return f"{self.prefix}.store.{live[len(head):]}"

    async def read_range(self, live: str, after: int, until: int) -> list[tuple[int, bytes]]:
        """The stored messages of the live subject ``live`` with ``after < sequence <=
        until``, in order (:meth:`replay`: direct gets, or a consumer); raises
        :class:`~nats_adapter.brokers.gaps.RangeLost` when the stream no longer holds
        every message after ``after`` (expired, purged, over its size limit): which of
        them were on ``live`` cannot be told any more."""
        found = [(seq, data) for seq, _, data in
                 await self.replay([self.stored_subject(live)], after, until)]
        first, _ = await self.bounds()
        if first > after + 1:
            raise RangeLost(f"the stream starts at message {first} now")
        return found

    async def last_sequence(self, live: str) -> int | None:
        """The sequence of the last message stored for the live subject ``live``, as the
        stream's leader says; None when none is stored."""
        subject = self.stored_subject(live)
        try:
            msg = await self._retrying("cannot read the stream", lambda: self._js.get_last_msg(
                self.stream, subject, direct=False), within=STORE_ANSWER_WITHIN)
        except nats.js.errors.NotFoundError:
            return None
        return int(msg.seq or 0) or None

    async def replay(self, subjects: list[str], after: int, until: int,
                     since: float | None = None) -> list[tuple[int, str, bytes]]:
        if until <= after:
            return []
        filters = sorted(set(subjects))
        wanted: set[str] | None = None
        if len(filters) > MAX_FILTERS:
            wanted, filters = set(filters), [f"{self.prefix}.store.>"]
        if self._direct_usable():
            try:
                found = await self._direct_replay(filters, after, until, since)
            except _DirectUnavailable as exc:
                self._direct_off_until = time.monotonic() + DIRECT_RETRY_AFTER
                logger.warning("a direct get on stream %s failed (%s): catch-ups read "
                               "through consumers for %.0f s", self.stream, exc,
                               DIRECT_RETRY_AFTER)
                found = None
            if found is not None:
                self.reads["direct"] += 1
                return [m for m in found if wanted is None or m[1] in wanted]
        self.reads["consumer"] += 1
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

    # -- direct gets (see the module) ---------------------------------------------------

    def _direct_usable(self) -> bool:
        return (self._direct_sub is not None and self._local_replica
                and time.monotonic() >= self._direct_off_until and self._direct_server())

    async def _direct_replay(self, filters: list[str], after: int, until: int,
                             since: float | None) -> list[tuple[int, str, bytes]] | None:
        """:meth:`replay` by direct gets, one per subject, merged in the stream's
        order; None when this server's replica does not hold ``until`` yet."""
        if not await self._direct_holds(until):
            return None
        if since is None:
            reads = await asyncio.gather(*(self._shared_read(subject, after, until)
                                           for subject in filters))
        else:  # a look back by time (rare): a read of its own
            reads = await asyncio.gather(*(self._direct_read(subject, after, until, since)
                                           for subject in filters))
        out: list[tuple[int, str, bytes]] = []
        for message in heapq.merge(*reads):
            if not out or message[0] != out[-1][0]:  # overlapping filters: once
                out.append(message)
        return out

    async def _direct_holds(self, until: int) -> bool:
        """Whether the replica answering direct gets holds message ``until`` (and so
        every one before it); waits DIRECT_CATCH_UP for it to catch up."""
        here = self._server_name()
        held, server = self._replica_holds
        if until <= held and server == here:  # messages are never taken back
            return True
        deadline = time.monotonic() + DIRECT_CATCH_UP
        delay = 0.005
        while True:
            if await self._replica_has(until):
                if here == self._server_name() and until > self._replica_holds[0]:
                    self._replica_holds = (until, here)
                return True
            if time.monotonic() + delay > deadline:
                logger.info("the replica of stream %s on this NATS server does not hold "
                            "message %d yet: reading through a consumer", self.stream, until)
                return False
            await asyncio.sleep(delay)  # a replica lags by milliseconds: poll, backing off
            delay = min(delay * 2, 0.2)

    async def _replica_has(self, seq: int) -> bool:
        """Whether the replica answering direct gets holds message ``seq``; one get
        answers every call for ``seq`` made while it is under way."""
        check = self._checks.get(seq)
        if check is None:
            check = self._checks[seq] = asyncio.get_running_loop().create_task(
                self._direct_get({"seq": seq}, batch=False))
            check.add_done_callback(lambda _: self._checks.pop(seq, None))
        messages, _ = await asyncio.shield(check)
        return bool(messages)

    async def _shared_read(self, subject: str, after: int, until: int
                           ) -> list[tuple[int, str, bytes]]:
        """:meth:`_direct_read`, shared by the replays of ``subject`` that come while
        another read of it is under way (a reconnect storm: the members of a room
        restore at once): they join one read sent once that one ends, so each gets
        an answer asked for after its call began, and the room's messages are read
        once for all of them, not once each."""
        shared = self._shared.get(subject)
        if shared is None:
            shared = self._shared[subject] = _SharedRead(after, until)
            if subject not in self._readers:
                self._readers[subject] = asyncio.get_running_loop().create_task(
                    self._read_shared(subject))
        else:
            shared.after, shared.until = min(shared.after, after), max(shared.until, until)
        messages = await asyncio.shield(shared.result)
        return [m for m in messages if after < m[0] <= until]

    async def _read_shared(self, subject: str) -> None:
        """Send the shared reads of ``subject`` one after the other while replays join
        them (see :meth:`_shared_read`)."""
        try:
            while (shared := self._shared.pop(subject, None)) is not None:
                try:
                    shared.result.set_result(
                        await self._direct_read(subject, shared.after, shared.until, None))
                except Exception as exc:  # every replay that joined gets it
                    shared.result.set_exception(exc)
        finally:
            del self._readers[subject]

    async def _direct_read(self, subject: str, after: int, until: int,
                           since: float | None) -> list[tuple[int, str, bytes]]:
        """The messages on ``subject`` after ``after`` (stored since ``since``) up to
        ``until``, in order, in batches of DIRECT_BATCH."""
        out: list[tuple[int, str, bytes]] = []
        request: dict[str, Any] = {"next_by_subj": subject, "batch": DIRECT_BATCH}
        if since is not None:
            request["start_time"] = datetime.fromtimestamp(since, UTC).isoformat()
        else:
            request["seq"] = after + 1
        while True:
            messages, pending = await self._direct_get(request)
            for seq, name, data in messages:
                if seq > until:
                    return out
                if seq > after:
                    out.append((seq, name, data))
            if not messages or not pending or messages[-1][0] >= until:
                return out
            request = {"next_by_subj": subject, "batch": DIRECT_BATCH,
                       "seq": messages[-1][0] + 1}

    async def _direct_get(self, request: dict[str, Any], batch: bool = True
                          ) -> tuple[list[tuple[int, str, bytes]], int]:
        """One direct get: its messages (seq, subject, data) and how many more of its
        subject are stored; :class:`_DirectUnavailable` if it fails or its replies
        stop coming for DIRECT_TIMEOUT."""
        token = str(next(self._direct_tokens))
        reply = _DirectReply(batch)
        self._direct_replies[token] = reply
        try:
            try:
                await self._nc.publish(f"$JS.API.DIRECT.GET.{self.stream}",
                                       json.dumps(request).encode(),
                                       reply=f"{self._direct_inbox}.{token}")
            except nats.errors.Error as exc:
                raise _DirectUnavailable(repr(exc)) from exc
            received = -1
            while not reply.done.done():
                if len(reply.messages) == received:  # nothing came for DIRECT_TIMEOUT
                    raise _DirectUnavailable(f"no reply for {DIRECT_TIMEOUT:.0f} s")
                received = len(reply.messages)
                await asyncio.wait([reply.done], timeout=DIRECT_TIMEOUT)
        finally:
            del self._direct_replies[token]
        if reply.error:
            raise _DirectUnavailable(reply.error)
        return reply.messages, reply.pending

    async def _on_direct(self, msg: Msg) -> None:
        reply = self._direct_replies.get(msg.subject[len(self._direct_inbox) + 1:])
        if reply is not None:  # else given up on
            reply.add(msg)

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
