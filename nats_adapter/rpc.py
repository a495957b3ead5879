"""The cluster protocol: which nodes are alive, and calls between them.

Every node subscribes to ``{prefix}.cluster``; requests go there, each node answers
on the requester's own control channel, and operations on one node go straight to
that node's channel. Nodes announce themselves (:class:`~.codec.Hello`) when they
start and after every broker reconnect, send a :class:`~.codec.Heartbeat` every
``heartbeat_interval`` seconds, and say :class:`~.codec.Bye` when they close. A
request waits only for the nodes alive when it was sent, and stops waiting for one
as soon as it says bye or misses its heartbeats (``heartbeat_timeout``).

What travels is typed: :mod:`.codec` decodes and checks a body once, into the
dataclass of its :class:`~.codec.ClusterOp`, and :class:`ClusterRpc` hands it to the
handler registered for that operation. This module knows no operation but
presence and replies; the cluster API (:mod:`.cluster`) and connection state
recovery (:mod:`.recovery`) register the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from socketio import exceptions as sio_exceptions

from . import codec
from .codec import ClusterBody, ClusterOp
from .naming import ChannelNames
from .stats import ManagerStats
from .tracing import TRACE_KEY, BusTracer

logger = logging.getLogger(__name__)

#: a handler of one operation: (origin node, request id or None, typed body)
Handler = Callable[[str, "str | None", Any], Awaitable[None]]
Publish = Callable[[str, codec.Message], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]
#: holds a channel's subscription for good; whether the broker confirmed it in time
Subscribe = Callable[[str, float], Awaitable[bool]]
#: seconds a node that missed its heartbeats is remembered (to tell when it is back)
MISSED_KEPT = 3600.0


class ClusterTimeoutError(sio_exceptions.TimeoutError):  # type: ignore[misc]
    """Some node did not answer within the timeout.

    :attr:`responses` holds what the nodes that answered sent, in the shape the call
    returns; :attr:`missing` the names of the nodes that did not answer.
    """

    def __init__(self, message: str, responses: Any, missing: list[str]) -> None:
        super().__init__(message)
        self.responses = responses
        self.missing = missing


class Peers:
    """The other nodes known alive: heard from within ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        #: node tag -> (monotonic time last heard, its info: name, host, pid, started)
        self._nodes: dict[str, tuple[float, dict[str, Any]]] = {}

    def __contains__(self, tag: str) -> bool:
        return tag in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def saw(self, tag: str, info: Mapping[str, Any] | None = None) -> bool:
        """Record a sign of life; True when the node was not known."""
        known = self._nodes.get(tag)
        self._nodes[tag] = (time.monotonic(),
                            dict(info) if info is not None else (known[1] if known else {}))
        return known is None

    def drop(self, tag: str) -> bool:
        return self._nodes.pop(tag, None) is not None

    def expired(self) -> list[str]:
        horizon = time.monotonic() - self.timeout
        gone = [tag for tag, (seen, _) in self._nodes.items() if seen < horizon]
        for tag in gone:
            del self._nodes[tag]
        return gone

    def tags(self) -> set[str]:
        return set(self._nodes)

    def last_seen(self, tag: str) -> float | None:
        """When node ``tag`` was last heard from (``time.monotonic()``); None: not known."""
        entry = self._nodes.get(tag)
        return entry[0] if entry is not None else None

    def info(self, tag: str) -> dict[str, Any] | None:
        """What node ``tag`` said of itself (name, host, url ...); None when not known."""
        entry = self._nodes.get(tag)
        return entry[1] if entry is not None else None

    def name(self, tag: str) -> str:
        entry = self._nodes.get(tag)
        name = entry[1].get("name") if entry else None
        return f"{name} ({tag})" if isinstance(name, str) and name else tag

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [{"tag": tag, **info, "last_seen_s": round(now - seen, 3)}
                for tag, (seen, info) in sorted(self._nodes.items())]


class PendingCall:
    """One request in flight: which nodes still owe an answer, and what came.

    :meth:`wait` ends when every expected node has answered (or gone), or at the
    timeout: then :attr:`timed_out` is set and :attr:`expected` names who is missing.
    """

    def __init__(self, expected: set[str]) -> None:
        self.expected = set(expected)
        #: node tag -> reply payloads, in arrival order
        self.replies: dict[str, list[Any]] = {}
        self.timed_out = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._check()

    def _check(self) -> None:
        if not self.expected and not self.done.done():
            self.done.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """Wait for every answer; False (and :attr:`timed_out`) when some did not come."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self.done)
        except TimeoutError:
            self.timed_out = True
            return False
        return True

    def reply(self, tag: str, data: Any, last: bool) -> None:
        self.replies.setdefault(tag, []).append(data)
        if last:
            self.expected.discard(tag)
            self._check()

    def count(self, tag: str, n: int) -> None:
        """A broadcast count (only acked broadcasts wait for these)."""

    def ack(self, tag: str, args: list[Any] | None) -> None:
        """A broadcast recipient's ack (only acked broadcasts wait for these)."""

    def gone(self, tag: str) -> None:
        """The node died or left: stop waiting for it."""
        self.expected.discard(tag)
        self._check()


class PendingAcks(PendingCall):
    """An acked broadcast: each node first says how many it delivered to, then sends
    each recipient's ack (or that it went away)."""

    def __init__(self, expected: set[str]) -> None:
        self.counts: dict[str, int] = {}
        self.acks: list[Any] = []
        self.finished: dict[str, int] = {}
        super().__init__(expected)

    def _check(self) -> None:
        if self.done.done():
            return
        if all(tag in self.counts and self.finished.get(tag, 0) >= self.counts[tag]
               for tag in self.expected):
            self.done.set_result(None)

    def count(self, tag: str, n: int) -> None:
        self.counts[tag] = n
        self._check()

    def ack(self, tag: str, args: list[Any] | None) -> None:
        self.finished[tag] = self.finished.get(tag, 0) + 1
        if args is not None:
            self.acks.append(args)
        self._check()


@dataclass(frozen=True, slots=True)
class _Registration:
    handler: Handler
    #: run on the broker's reader (must not wait on the bus), else in a task of its own
    inline: bool
    #: a request: dropped when it carries no request id to answer
    answers: bool


class ClusterRpc:
    """This node's end of the cluster protocol (see the module).

    :param publish: sends an envelope on a channel (sealed, counted).
    :param spawn: runs a coroutine in the background, owned by the node.
    :param subscribe: subscribes the cluster channel at :meth:`start`.
    :param max_room_chars: the longest room name a call may carry.
    """

    def __init__(self, node_tag: str, channels: ChannelNames, stats: ManagerStats,
                 publish: Publish, spawn: Spawn, *, node_name: str = "", node_url: str = "",
                 heartbeat_interval: float = 2.0, heartbeat_timeout: float | None = None,
                 max_room_chars: int = 256, subscribe: Subscribe | None = None,
                 subscribe_timeout: float = 5.0) -> None:
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval!r}")
        self.node_tag = node_tag
        self.node_name = node_name
        #: where other nodes reach this one over HTTP ("": nowhere)
        self.node_url = node_url
        self.channels = channels
        self.stats = stats
        self.peers = Peers(heartbeat_timeout or 3 * heartbeat_interval)
        self.max_room_chars = max_room_chars
        self._publish = publish
        self._spawn = spawn
        self._subscribe = subscribe
        self._subscribe_timeout = subscribe_timeout
        self._heartbeat_interval = heartbeat_interval
        self._handlers: dict[ClusterOp, _Registration] = {}
        self._pending: dict[str, PendingCall] = {}
        self._request_ids = itertools.count(1)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._started_at = time.time()
        #: called with the tag of a node that just said hello (after it was answered)
        self.on_hello: list[Callable[[str], Awaitable[None]]] = []
        #: called with the tag of a node that left or missed its heartbeats
        self.on_gone: list[Callable[[str], None]] = []
        #: called with the tag of a node heard from again after it missed its heartbeats
        #: (the broker was split between the two, or it was frozen, and is whole again)
        self.on_back: list[Callable[[str], None]] = []
        #: node tag -> when it missed its heartbeats (forgotten after MISSED_KEPT)
        self._missed: dict[str, float] = {}
        #: optional operations this node serves, said in its heartbeats (a node of an
        #: older release says none: see :meth:`serves`)
        self.features: set[str] = set()
        #: spans around calls made and served (tracing on: see
        #: :func:`nats_adapter.tracing.install`)
        self.tracer: BusTracer | None = None

    # -- the registry --------------------------------------------------------------------

    def register(self, op: ClusterOp, handler: Handler, *, inline: bool = False,
                 answers: bool = True) -> None:
        """Handle ``op`` with ``handler(origin, req_id, body)``. ``inline``: run it on
        the broker's reader (it must not wait on the bus); else in a task of its own.
        ``answers``: a request, dropped when it carries no request id."""
        if op in self._handlers:
            raise ValueError(f"{op} already has a handler")
        self._handlers[op] = _Registration(handler, inline, answers)

    def decode(self, msg: codec.ClusterMessage) -> ClusterBody | str:
        """The typed body of ``msg``, or why it is not one a node could send."""
        try:
            return codec.decode_call(msg, self.max_room_chars)
        except codec.EnvelopeError as exc:
            return str(exc)

    # -- presence ------------------------------------------------------------------------

    @property
    def host_id(self) -> str:
        """This node's name and tag."""
        return f"{self.node_name}/{self.node_tag}" if self.node_name else self.node_tag

    def info(self) -> dict[str, Any]:
        return {"name": self.node_name, "host": socket.gethostname(), "pid": os.getpid(),
                "started": self._started_at, "url": self.node_url,
                "features": sorted(self.features), "envelope": codec.VERSION}

    def serves(self, tag: str, feature: str) -> bool:
        """Whether node ``tag`` is alive and said it serves ``feature``."""
        info = self.peers.info(tag)
        features = info.get("features") if info is not None else None
        return isinstance(features, list) and feature in features

    def all_serve(self, feature: str) -> bool:
        """Whether every node alive (as far as heartbeats tell) serves ``feature``: a
        node of an older release, mid rolling upgrade, says it does not."""
        return all(self.serves(tag, feature) for tag in self.peers.tags())

    async def start(self) -> None:
        channel = self.channels.cluster()
        if self._subscribe is not None and not await self._subscribe(
                channel, self._subscribe_timeout):
            logger.warning("the cluster channel is not confirmed yet; cluster calls will see "
                           "other nodes once it is")
        await self.notice(codec.Hello(self.info()))
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            try:
                await self.notice(codec.Heartbeat(self.info()))
                self.check_peers()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("heartbeat failed")

    async def stop(self) -> None:
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
            try:
                await self.notice(codec.Bye(self.info()))
            except Exception:  # the broker may be gone already
                logger.debug("could not say bye", exc_info=True)
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.cancel()

    def reconnected(self) -> None:
        """The broker connection is back: peers may have forgotten this node."""
        if self._heartbeat_task is not None:
            self._spawn(self.notice(codec.Hello(self.info())))

    def check_peers(self) -> None:
        """Give up on the nodes that missed their heartbeats (called every interval)."""
        now = time.monotonic()
        for tag in self.peers.expired():
            logger.warning("node %s missed its heartbeats; not waiting for it", tag)
            self._missed[tag] = now
            self._node_gone(tag)
        for tag, when in list(self._missed.items()):
            if now - when > MISSED_KEPT:
                del self._missed[tag]

    def _node_gone(self, tag: str) -> None:
        for pending in list(self._pending.values()):
            pending.gone(tag)
        for hook in self.on_gone:
            hook(tag)

    # -- calls ---------------------------------------------------------------------------

    async def notice(self, body: ClusterBody) -> None:
        """Tell every other node something (no reply)."""
        await self._publish(self.channels.cluster(),
                            codec.encode_call(self.node_tag, None, body))

    async def tell(self, node: str, body: ClusterBody) -> None:
        """Tell one node something (no reply)."""
        await self._publish(self.channels.node(node),
                            codec.encode_call(self.node_tag, None, body))

    def open(self, expected: set[str], acks: bool = False) -> tuple[str, PendingCall]:
        """A new call awaiting ``expected`` (close it with :meth:`close`)."""
        req_id = f"{self.node_tag}:{next(self._request_ids)}"
        pending = PendingAcks(expected) if acks else PendingCall(expected)
        self._pending[req_id] = pending
        return req_id, pending

    def close(self, req_id: str) -> None:
        del self._pending[req_id]

    def pending(self, req_id: str) -> PendingCall | None:
        return self._pending.get(req_id)

    async def ask(self, node: str, body: ClusterBody, timeout: float) -> Any:
        """Ask one node; its answer (raises ``TimeoutError`` when none comes)."""
        req_id, pending = self.open({node})
        try:
            with self._calling(body.OP, 1) as span:
                await self._publish(self.channels.node(node),
                                    codec.encode_call(self.node_tag, req_id, body))
                answered = await pending.wait(timeout)
                if span is not None:
                    span.record(int(answered), int(not answered))
            if not answered:
                raise TimeoutError(f"no answer from {self.peers.name(node)}")
        finally:
            self.close(req_id)
        replies = pending.replies.get(node)
        return replies[0] if replies else None

    async def request(self, body: ClusterBody, timeout: float, local: bool = False
                      ) -> PendingCall:
        """Send ``body`` to every live node (none when ``local``) and wait for all of
        them; the call's :attr:`~PendingCall.timed_out` says whether some did not answer
        (see :meth:`check`)."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        expected = set() if local else self.peers.tags()
        req_id, pending = self.open(expected)
        self.stats.cluster_requests += 1
        try:
            with self._calling(body.OP, len(expected)) as span:
                if expected:
                    await self._publish(self.channels.cluster(),
                                        codec.encode_call(self.node_tag, req_id, body))
                if not await pending.wait(timeout):
                    self.stats.cluster_timeouts += 1
                if span is not None:
                    span.record(len(expected) - len(pending.expected), len(pending.expected))
            return pending
        finally:
            self.close(req_id)

    def _calling(self, op: str, nodes: int) -> contextlib.AbstractContextManager[Any]:
        """The tracer's span around a call (tracing on), else nothing."""
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.calling(op, nodes)

    async def publish_request(self, req_id: str, body: ClusterBody) -> None:
        """Send ``body`` as the request ``req_id`` (from :meth:`open`) to every node."""
        await self._publish(self.channels.cluster(),
                            codec.encode_call(self.node_tag, req_id, body))

    def missing(self, pending: PendingCall) -> list[str]:
        """The names of the nodes ``pending`` still waits for."""
        return sorted(self.peers.name(tag) for tag in pending.expected)

    def check(self, pending: PendingCall, responses: Any, timeout: float,
              what: str = "") -> None:
        """Raise :class:`ClusterTimeoutError` carrying ``responses`` if ``pending`` timed
        out."""
        if not pending.timed_out:
            return
        missing = self.missing(pending)
        raise ClusterTimeoutError(
            what or f"no answer from {', '.join(missing)} in {timeout:g} s", responses,
            missing)

    async def reply(self, to: str, req_id: str, body: codec.Reply | codec.BcastCount
                    | codec.BcastAck) -> None:
        await self._publish(self.channels.node(to),
                            codec.encode_call(self.node_tag, req_id, body))

    # -- receiving -----------------------------------------------------------------------

    async def on_message(self, msg: codec.ClusterMessage, body: ClusterBody) -> None:
        """A cluster message from another node, already decoded (:meth:`decode`)."""
        origin = msg.origin
        if isinstance(body, codec.Bye):
            self.peers.drop(origin)
            self._node_gone(origin)
            return
        info = body.info if isinstance(body, (codec.Hello, codec.Heartbeat)) else None
        hello = isinstance(body, codec.Hello)
        if self.peers.saw(origin, info) and not hello:
            logger.info("node %s is in the cluster", self.peers.name(origin))
            if self._missed.pop(origin, None) is not None:
                for back in self.on_back:
                    back(origin)
        if hello:
            logger.info("node %s joined the cluster", self.peers.name(origin))
            await self.tell(origin, codec.Heartbeat(self.info()))
            for hook in self.on_hello:
                await hook(origin)
            return
        if isinstance(body, codec.Heartbeat):
            return
        if isinstance(body, (codec.Reply, codec.BcastCount, codec.BcastAck)):
            self._on_reply(msg.origin, msg.req_id, body)
            return
        registration = self._handlers.get(body.OP)
        if registration is None or (registration.answers and msg.req_id is None):
            return
        if registration.inline:
            with self._serving(msg):
                await registration.handler(origin, msg.req_id, body)
        else:  # off the broker's reader (joins wait for subscriptions)
            self._spawn(self._serve(registration.handler, msg, body))

    def _serving(self, msg: codec.ClusterMessage) -> contextlib.AbstractContextManager[Any]:
        """The tracer's span around serving a traced request (tracing on), else nothing."""
        trace = msg.body.get(TRACE_KEY) if self.tracer is not None else None
        if self.tracer is None or not isinstance(trace, str):
            return contextlib.nullcontext()
        return self.tracer.serving(trace, msg.op, self.peers.name(msg.origin))

    def _on_reply(self, origin: str, req_id: str | None,
                  body: codec.Reply | codec.BcastCount | codec.BcastAck) -> None:
        pending = self._pending.get(req_id or "")
        if pending is None:
            return  # answered after the caller stopped waiting
        if isinstance(body, codec.Reply):
            pending.reply(origin, body.data, body.last)
        elif isinstance(body, codec.BcastCount):
            pending.count(origin, body.n)
        else:
            pending.ack(origin, body.args)

    async def _serve(self, handler: Handler, msg: codec.ClusterMessage,
                     body: ClusterBody) -> None:
        try:
            with self._serving(msg):
                await handler(msg.origin, msg.req_id, body)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.stats.dropped_failed += 1
            logger.exception("cluster request %s from %s failed", msg.op,
                             self.peers.name(msg.origin))
