"""NATS broker: one subject per channel on a NATS cluster, via nats-py."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from .. import compat
from .._logging import ThrottledLog
from .base import Broker, BrokerError, BrokerHandler, BrokerUnconfirmed, FirstConnect, MessageStore
from .gaps import GapRepair

logger = logging.getLogger(__name__)

#: nats-py's default bound on the messages a subscription holds for a slow reader
DEFAULT_PENDING_MSGS_LIMIT = 512 * 1024


class _NoQueue:
    """Stands in for the per-subscription ``asyncio.Queue`` nats-py makes and a
    subscription on :class:`SharedInbox` never uses: always empty."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    async def join(self) -> None:
        return None


_NO_QUEUE = _NoQueue()


def shared_inbox_problem() -> str | None:
    """Why nats-py cannot deliver to a :class:`SharedInbox`, or None when it can.

    nats-py gives every ``subscribe(cb=...)`` its own ``asyncio.Queue`` (~3.3 KB)
    and task (~2 KB), the bulk of what a room costs a node when most rooms have one
    local member. A subscription made with ``future=`` gets neither: nats-py hands
    each message to ``future.set_result`` (meant for one reply; an inbox takes
    many), and its idle queue is dropped. :mod:`nats_adapter.compat` probes that
    nats-py still works that way (``nats.shared_inbox``).
    """
    return compat.problem("nats.shared_inbox")


class SharedInbox:
    """One FIFO of inbound messages for every subscription of a connection, read by
    one task, instead of a queue and a task per subscription.

    Looks like a never-cancelled future to nats-py (``cancelled``, ``set_result``).
    Holds at most ``limit`` messages for a node that falls behind; past it a message
    is dropped and ``on_drop`` is called with its subject (a slow consumer).
    """

    def __init__(self, deliver: Callable[[Msg], Awaitable[None]], limit: int,
                 on_drop: Callable[[str], None]) -> None:
        self._deliver = deliver
        self._limit = limit
        self._on_drop = on_drop
        self._items: deque[Msg] = deque()
        self._wake: asyncio.Event = asyncio.Event()
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    def set_result(self, msg: Msg) -> None:
        if len(self._items) >= self._limit:
            self._on_drop(msg.subject)
            return
        self._items.append(msg)
        self._wake.set()

    async def _run(self) -> None:
        items = self._items
        while not (self._closing and not items):
            await self._wake.wait()
            self._wake.clear()
            while items:
                msg = items.popleft()
                try:
                    await self._deliver(msg)
                except asyncio.CancelledError:
                    raise
                except Exception:  # the handler should not raise; keep serving the rest
                    logger.exception("handling a NATS message on %s failed", msg.subject)

    async def drain(self, timeout: float = 5.0) -> None:
        """Handle what was received (for up to ``timeout`` seconds), then stop."""
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            logger.warning("dropped %d inbound NATS messages at close", len(self._items))
        finally:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


#: how long a PING/PONG round given up on stays pending (see NatsBroker._round_trip)
ROUND_TRIP_LIMIT = 3600


class NatsBroker(Broker):
    """Moves envelopes over NATS subjects.

    The connection uses no-echo, so a node never receives its own publications,
    reconnects forever across the server list (and servers the cluster announces),
    and nats-py restores subscriptions after a reconnect. While disconnected,
    publications wait in nats-py's pending buffer (``pending_size`` bytes) and are
    sent on reconnect; past that buffer a publish raises :class:`BrokerError`.

    :param servers: NATS URLs, e.g. ``["nats://127.0.0.1:4222"]``.
    :param connect_options: extra keyword arguments for :func:`nats.connect`
        (``user``, ``password``, ``tls``, ``nkeys_seed`` ...).
    :param pending_msgs_limit: messages held per subscription for a node that falls
        behind before nats-py drops them (counted as slow-consumer losses).
    :param confirm_timeout: seconds a subscribe waits for the server's confirmation
        before it fails (the core usually gives up sooner, at its own deadline).
    :param ping_interval: whole seconds between the client's PINGs. A server that vanished
        without closing the connection (a network partition, a host gone) is noticed
        when ``max_outstanding_pings`` PINGs in a row went unanswered, then the client
        moves to another server: within ``ping_interval * (max_outstanding_pings + 1)``.
        nats-py's default (120 s, so 4 to 6 minutes blind) is far too long for a
        gateway whose rooms go silent meanwhile; 5 s gives 10 to 15 s, for one small
        PING per interval. The connection's socket also gets ``TCP_USER_TIMEOUT`` of
        ``ping_interval * max_outstanding_pings`` seconds: nats-py waits for the old
        socket to close before it reconnects, which never happens while unsent data
        sits on a dead link (nats-io/nats.py#671: about 15 minutes, until TCP gives up).
        With the timeout the kernel drops the socket once data stays unacknowledged
        that long.
    """

    name = "nats"
    echoes = False  # no-echo

    def __init__(
        self,
        servers: list[str],
        *,
        connect_options: dict[str, Any] | None = None,
        confirm_timeout: float = 10.0,
        publish_confirm_timeout: float = 2.0,
        reconnect_time_wait: float = 0.5,
        connection_name: str = "socketio-gateway",
        pending_msgs_limit: int | None = None,
        ping_interval: int = 5,
        max_outstanding_pings: int = 2,
    ) -> None:
        if ping_interval < 1 or max_outstanding_pings < 1:
            raise ValueError(f"ping_interval must be >= 1 and max_outstanding_pings >= 1, got "
                             f"{ping_interval!r} and {max_outstanding_pings!r}")
        if not servers or not all(isinstance(s, str) and s for s in servers):
            raise ValueError(f"servers must be a non-empty list of NATS URLs, got {servers!r}")
        self.servers = list(servers)
        self._options = dict(connect_options or {})
        self._confirm_timeout = confirm_timeout
        self._publish_confirm_timeout = publish_confirm_timeout
        #: the confirmation round not started yet, which a publish made now joins
        self._next_round: asyncio.Future[None] | None = None
        #: the same for a subscribe made now
        self._next_sub_round: asyncio.Future[None] | None = None
        self._round_trips: set[asyncio.Future[None]] = set()
        self._reconnect_time_wait = reconnect_time_wait
        self._connection_name = connection_name
        self._ping_interval = ping_interval
        self._max_outstanding_pings = max_outstanding_pings
        # per subscription: messages nats-py holds for a node that falls behind before
        # it drops them (a slow consumer); None keeps nats-py's default
        self._sub_limits: dict[str, Any] = {} if pending_msgs_limit is None \
            else {"pending_msgs_limit": pending_msgs_limit}
        self._nc: Client | None = None
        self._handler: BrokerHandler | None = None
        self._subs: dict[str, Subscription] = {}
        self._pending_limit = pending_msgs_limit or DEFAULT_PENDING_MSGS_LIMIT
        problem = shared_inbox_problem()
        if problem is not None:
            logger.warning("NATS subscriptions each get their own queue and task (%s)", problem)
        self._inbox_ok = problem is None
        self._inbox: SharedInbox | None = None
        self._wanted: set[str] = set()
        self._first_connect = FirstConnect("NATS", self._connect,
                                           (OSError, nats.errors.Error, TimeoutError),
                                           reconnect_time_wait)
        self._closing = False
        self.slow_consumer_drops = 0
        #: publishes refused because nats-py's reconnect buffer was full
        self.reconnect_buffer_overflows = 0
        self._log = ThrottledLog(logger)
        self._warned_no_socket = False
        #: stored traffic delivered live in order, gaps repaired (with a message store)
        self._gaps: GapRepair | None = None
        #: copies held since the connection dropped (GapRepair.hold), until the tail
        #: check after the reconnect
        self._gaps_held = False
        self._live_prefix = ""
        self._tail: Callable[[str], Awaitable[int | None]] | None = None
        self._tail_check: asyncio.Task[None] | None = None
        #: live subjects a copy was dropped on (slow consumer), to check soon
        self._dropped_live: set[str] = set()
        self._drop_check: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    async def start(self, handler: BrokerHandler, control_channel: str) -> None:
        self._handler = handler
        self._wanted.add(control_channel)
        await self._first_connect.start()

    async def _connect(self) -> None:
        nc = await nats.connect(
            servers=self.servers,
            name=self._connection_name,
            no_echo=True,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self._reconnect_time_wait,
            connect_timeout=2,
            ping_interval=self._ping_interval,
            max_outstanding_pings=self._max_outstanding_pings,
            disconnected_cb=self._disconnected_cb,
            reconnected_cb=self._reconnected_cb,
            error_cb=self._error_cb,
            closed_cb=self._closed_cb,
            **self._options,
        )
        self._nc = nc
        self._limit_unacked_time(nc)
        for channel in sorted(self._wanted):
            await self._subscribe(nc, channel)
        try:
            await self._confirm(nc)
        except BrokerError as exc:
            logger.warning("%s", exc)
        assert self._handler is not None
        self._handler.on_connection_state(True)

    async def _subscribe(self, nc: Client, channel: str) -> None:
        if channel in self._subs:
            return
        if not self._inbox_ok:
            self._subs[channel] = await nc.subscribe(channel, cb=self._on_msg, **self._sub_limits)
            return
        if self._inbox is None:
            self._inbox = SharedInbox(self._on_msg, self._pending_limit, self._dropped)
        sub = await nc.subscribe(channel, future=self._inbox)  # type: ignore[arg-type]
        sub._pending_queue = _NO_QUEUE  # type: ignore[assignment]  # never used: free it
        self._subs[channel] = sub

    def _dropped(self, subject: str) -> None:
        self._check_dropped(subject)
        self.slow_consumer_drops += 1
        self._log.warning("slow-consumer", "dropped an inbound NATS message on %s: this node "
                          "is not keeping up (slow consumer)", subject)

    async def _on_msg(self, msg: Msg) -> None:
        assert self._handler is not None
        headers = msg.headers
        # a stored message, re-published with its sequence; anyone may set the header,
        # so the core believes it only on the store's own subjects, and one that is not
        # a number is no sequence at all
        seq = _sequence(headers.get("Nats-Sequence")) if headers else None
        if seq is None:
            await self._handler.on_message(msg.subject, msg.data)
        elif self._gaps is not None and msg.subject.startswith(self._live_prefix):
            assert headers is not None  # a stored copy: in order, gaps repaired
            await self._gaps.arrive(msg.subject, seq,
                                    _sequence(headers.get("Nats-Last-Sequence")), msg.data)
        else:
            await self._handler.on_message(msg.subject, msg.data, seq)

    def _check_dropped(self, subject: str) -> None:
        """A copy on ``subject`` was dropped here: if no later copy shows the gap (the
        room went quiet), reading the subject's last sequence does."""
        if self._gaps is None or self._tail is None or not subject.startswith(self._live_prefix):
            return
        self._dropped_live.add(subject)
        if self._drop_check is None or self._drop_check.done():
            self._drop_check = asyncio.get_running_loop().create_task(self._check_drops())

    async def _check_drops(self) -> None:
        assert self._gaps is not None and self._tail is not None
        await asyncio.sleep(0)  # the drops of one read of the socket come together
        while self._dropped_live:
            subjects, self._dropped_live = sorted(self._dropped_live), set()
            await self._gaps.check_tails(self._tail, subjects)

    async def _deliver_stored(self, subject: str, data: bytes, seq: int) -> None:
        assert self._handler is not None
        await self._handler.on_message(subject, data, seq)

    async def _confirm(self, nc: Client) -> None:
        """Wait for the server to have processed everything sent so far (a PING/PONG).

        nats-py's ``flush()`` writes its PING straight to the socket while a SUB or PUB
        may still wait in the client's pending buffer for the flusher task, so the
        PONG could arrive before the server has read it. While something is pending,
        a first round lets the flusher write it; the second PING goes out after it,
        and its PONG confirms it (tests/unit/test_nats_confirm.py). With nothing
        pending, what was sent is on the socket before the PING: one round."""
        wait = self._confirm_timeout
        try:
            if nc.pending_data_size > 0:
                await self._round_trip(nc, wait)
            await self._round_trip(nc, wait)
        except (nats.errors.Error, TimeoutError) as exc:
            # a subscription stays registered; nats-py sends it again on reconnect
            raise BrokerError(f"NATS did not confirm the subscription: {exc!r}") from exc

    async def _round_trip(self, nc: Client, timeout: float) -> None:
        """One PING/PONG, waited on for at most ``timeout`` without cancelling it.

        nats-py pairs each PONG with the oldest PING it sent, and a PONG that comes
        after ``flush(timeout=)`` gave up finds a cancelled future there: setting its
        result raises in nats-py's read loop, which then stops reading (the
        connection goes deaf until the ping timer calls it stale). So a round given
        up on is left to end by itself: by its late PONG, or cancelled here when the
        connection it was sent on is replaced (whose PINGs get no PONG)."""
        if not nc.is_connected:
            raise nats.errors.ConnectionReconnectingError
        flush = asyncio.ensure_future(nc.flush(timeout=ROUND_TRIP_LIMIT))
        self._round_trips.add(flush)
        flush.add_done_callback(_round_trip_done)
        flush.add_done_callback(self._round_trips.discard)
        done, _ = await asyncio.wait({flush}, timeout=timeout)
        if not done:
            raise TimeoutError(f"no PONG within {timeout:g} s")
        flush.result()

    def _drop_round_trips(self) -> None:
        """The PINGs of a connection that is gone will get no PONG."""
        for flush in list(self._round_trips):
            flush.cancel()

    async def confirm_published(self) -> None:
        """One PING/PONG round (two, see :meth:`_confirm`) for every publish made before
        it starts: the callers of one loop turn share it, and a publish made while a
        round is under way waits for the next (that round's PING may have gone first)."""
        nc = self._nc
        if nc is None or nc.is_closed:
            raise BrokerUnconfirmed("no NATS connection")
        if not nc.is_connected:  # a PING now goes nowhere: what was buffered goes later
            raise BrokerUnconfirmed("NATS is reconnecting (what was published is sent "
                                    "once it is back)")
        round_ = self._next_round
        if round_ is None:
            self._next_round = round_ = self._new_round(nc, self._publish_confirm_timeout,
                                                        "publish")
        await asyncio.shield(round_)

    def _new_round(self, nc: Client, timeout: float, what: str) -> asyncio.Future[None]:
        """A confirmation round that starts once this turn of the loop is over: every
        caller of the turn waits for it; it fails with :class:`BrokerUnconfirmed`
        naming ``what`` when its PONG takes longer than ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        round_: asyncio.Future[None] = loop.create_future()
        round_.add_done_callback(_retrieved)
        loop.call_soon(self._start_round, nc, round_, timeout, what)
        return round_

    def _start_round(self, nc: Client, round_: asyncio.Future[None], timeout: float,
                     what: str) -> None:
        """The round's PINGs (never cancelled, see :meth:`_round_trip`) and its deadline."""
        # what is published (subscribed) from here on joins the next round
        if self._next_round is round_:
            self._next_round = None
        if self._next_sub_round is round_:
            self._next_sub_round = None
        pings = 2 if nc.pending_data_size > 0 else 1
        flush = asyncio.ensure_future(_pings(nc, pings))
        self._round_trips.add(flush)
        flush.add_done_callback(_round_trip_done)
        flush.add_done_callback(self._round_trips.discard)
        timer = asyncio.get_running_loop().call_later(
            timeout, _settle, round_, None, f"no PONG within {timeout:g} s", what)

        def done(flush: asyncio.Future[None]) -> None:
            timer.cancel()
            _settle(round_, flush, None, what)

        flush.add_done_callback(done)

    async def subscribe(self, channel: str) -> None:
        self._wanted.add(channel)
        nc = self._nc
        if nc is None or nc.is_closed:
            # made by _connect once a server answers; not confirmed until then
            raise BrokerError("no NATS connection yet")
        await self._subscribe(nc, channel)
        if not nc.is_connected:  # a PING now goes nowhere: restored on reconnect
            raise BrokerError("NATS did not confirm the subscription: reconnecting")
        # the subscribes of one loop turn share one confirmation round: their SUBs
        # leave in one write, then one PING (two while a SUB still waits in nats-py's
        # buffer, see _confirm) confirms them all
        round_ = self._next_sub_round
        if round_ is None:
            self._next_sub_round = round_ = self._new_round(nc, self._confirm_timeout,
                                                            "subscription")
        await asyncio.shield(round_)

    async def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        if self._gaps is not None:
            self._gaps.forget(channel)
        sub = self._subs.pop(channel, None)
        if sub is None or self._nc is None or self._nc.is_closed:
            return
        try:
            await sub.unsubscribe()
        except nats.errors.Error as exc:
            logger.warning("NATS unsubscribe from %s failed: %r", channel, exc)

    async def publish(self, channel: str, data: bytes) -> None:
        nc = self._nc
        if nc is None or nc.is_closed or nc.is_draining:
            raise BrokerError("no NATS connection")
        try:
            await nc.publish(channel, data)
        except nats.errors.OutboundBufferLimitError as exc:
            self.reconnect_buffer_overflows += 1
            raise BrokerError("NATS reconnect buffer full (no server for too long)") from exc
        except nats.errors.Error as exc:
            raise BrokerError(f"NATS publish failed: {exc!r}") from exc

    async def close(self) -> None:
        self._closing = True
        await self._first_connect.cancel()
        for task in (self._tail_check, self._drop_check):
            if task is not None:
                task.cancel()
        if self._gaps is not None:
            await self._gaps.close()
        self._drop_round_trips()
        nc, self._nc = self._nc, None
        inbox, self._inbox = self._inbox, None
        try:
            if nc is None or nc.is_closed:
                return
            try:
                await nc.drain()
            except (nats.errors.Error, TimeoutError) as exc:
                logger.warning("NATS drain failed (%r); closing", exc)
                await nc.close()
        finally:
            if inbox is not None:
                await inbox.drain()

    def message_store(self, prefix: str, window: float) -> MessageStore:
        from .nats_store import NatsMessageStore

        if self._nc is None or self._nc.is_closed:
            raise BrokerError("no NATS connection for JetStream")
        store = NatsMessageStore(self._nc, prefix, window)
        # stored copies come back live on {prefix}.live.>: delivered in order per subject,
        # what went missing on the way read back from the store (nats_adapter.brokers.gaps)
        self._gaps = GapRepair(store.read_range, self._deliver_stored, store.report_lost,
                               store.retention)
        self._live_prefix = f"{prefix}.live."
        self._tail = store.last_sequence
        store.watch_gap_checks(self._check_tails)
        return store

    def _check_tails(self) -> None:
        """Read what is stored after the last copy delivered of every subject (unless
        a check is under way)."""
        if self._gaps is not None and self._tail is not None and (
                self._tail_check is None or self._tail_check.done()):
            self._tail_check = asyncio.get_running_loop().create_task(
                self._gaps.check_tails(self._tail))

    def repairs(self) -> dict[str, int]:
        return self._gaps.stats() if self._gaps is not None else {}

    def losses(self) -> dict[str, int]:
        return {"slow_consumer": self.slow_consumer_drops,
                "reconnect_buffer_full": self.reconnect_buffer_overflows}

    def info(self) -> dict[str, Any]:
        nc = self._nc
        url = nc.connected_url if nc is not None else None
        return {
            "server": f"{url.scheme}://{url.hostname}:{url.port}" if url else None,
            "subscriptions": len(self._subs),
            "reconnects": nc.stats["reconnects"] if nc is not None else 0,
            "slow_consumer_drops": self.slow_consumer_drops,
        }

    async def _disconnected_cb(self) -> None:
        if self._gaps is not None and not self._gaps_held and not self._closing:
            # what comes after the reconnect waits for what was stored meanwhile
            self._gaps_held = True
            self._gaps.hold()
        if self._handler is not None and not self._closing:
            self._handler.on_connection_state(False)

    def _limit_unacked_time(self, nc: Client) -> None:
        """Set TCP_USER_TIMEOUT on the connection's socket (see the class docstring).

        nats-py has no option for it, so this reaches the socket through its transport;
        if that is not where this nats-py keeps it, reconnects after a partition are as
        slow as nats-py makes them, and a warning says so once."""
        seconds = self._ping_interval * self._max_outstanding_pings
        writer = getattr(getattr(nc, "_transport", None), "_io_writer", None) \
            if compat.check("nats.socket") else None
        sock = writer.get_extra_info("socket") if writer is not None else None
        option = getattr(socket, "TCP_USER_TIMEOUT", None)
        if sock is None or option is None:
            if not self._warned_no_socket:
                self._warned_no_socket = True
                logger.warning("cannot set TCP_USER_TIMEOUT on the NATS socket: after a "
                               "network partition, reconnecting may take minutes")
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, int(seconds * 1000))
        except OSError as exc:
            logger.warning("cannot set TCP_USER_TIMEOUT on the NATS socket: %r", exc)

    async def _reconnected_cb(self) -> None:
        self._drop_round_trips()
        if self._nc is not None:
            self._limit_unacked_time(self._nc)
        if self._handler is not None:
            self._handler.on_connection_state(True)
        # what was stored while this connection was down never came live: read it (a
        # check under way asked the connection that is gone)
        if self._tail_check is not None:
            self._tail_check.cancel()
            self._tail_check = None
        if self._gaps is not None and self._tail is not None and self._gaps_held:
            # every subject's copies wait until what it missed is read (in order
            # across rooms, not only within each); a later reconnect's check takes over
            self._gaps_held = False
            self._tail_check = asyncio.get_running_loop().create_task(
                self._gaps.check_tails_held(self._tail))
        else:
            self._check_tails()

    async def _closed_cb(self) -> None:
        if self._handler is not None and not self._closing:
            self._handler.on_connection_state(False)

    async def _error_cb(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # nats-py dropped an inbound message: this node fell behind its subscriptions
            self._dropped(exc.subject)
            return
        if not self._closing:
            logger.warning("NATS error: %r", exc)


def _sequence(raw: str | None) -> int | None:
    """A sequence header's number; None when absent or not a number."""
    if raw is not None and raw.isascii() and raw.isdigit() and len(raw) <= 20:
        return int(raw)
    return None


async def _pings(nc: Client, count: int) -> None:
    for _ in range(count):
        await nc.flush(timeout=ROUND_TRIP_LIMIT)


def _settle(round_: asyncio.Future[None], flush: asyncio.Future[None] | None,
            late: str | None, what: str = "publish") -> None:
    """End a confirmation round of a ``what`` (publish, subscription): by its PINGs'
    outcome, or ``late`` at its deadline."""
    if round_.done():
        return
    problem: BaseException | None = None
    if flush is None:
        problem = TimeoutError(late)
    elif flush.cancelled():
        problem = ConnectionError("the connection was replaced before the PONG")
    else:
        problem = flush.exception()
    if problem is None:
        round_.set_result(None)
    else:
        error = BrokerUnconfirmed(f"NATS did not confirm the {what}: {problem!r}")
        error.__cause__ = problem
        round_.set_exception(error)


def _round_trip_done(flush: asyncio.Future[None]) -> None:
    if not flush.cancelled():
        flush.exception()  # seen: a round given up on may fail with nobody waiting


def _retrieved(future: asyncio.Future[None]) -> None:
    """Marks a confirmation round's failure as seen when every waiter has gone."""
    if not future.cancelled():
        future.exception()
