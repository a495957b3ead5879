"""Trace context across the bus: what a tracer plugs into.

The library imports no tracing SDK. A tracer (the gateway's, on OpenTelemetry:
``gateway/tracing.py``) implements :class:`BusTracer`, and :func:`install` hands
it to a manager: its bus then stamps each emit it encodes with the trace context of
the span current in the sending task (:attr:`~nats_adapter.codec.EmitMessage.trace`,
sealed with the rest of the envelope), and every other node that delivers a stamped
emit does so inside a span the tracer opens as a child of it, told how many local
sockets got it and how many were dropped (the sender's own delivery is told to the
sending span). A node stamps an emit only while every
node alive says it reads trace context (:data:`~nats_adapter.codec.TRACE_FEATURE`):
a node of an older release would drop such an envelope as malformed.

Cluster calls (``fetch_sockets``, ``sockets_join``, ``server_side_emit`` ...) are
traced the same way: a span around the call on the caller, its context under
:data:`TRACE_KEY` in the request's body (a key older releases ignore), and a span
around the handling on every node that answers. Without a tracer the envelope is
the same as before and no work is done beyond one check per message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from .codec import TRACE_FEATURE, ClusterMessage, ClusterOp, EmitMessage, Message

__all__ = ["TRACE_FEATURE", "TRACE_KEY", "BusTracer", "CallSpan", "DeliverySpan", "Stamper",
           "install"]

#: the key of a cluster request's body that carries the caller's trace context
TRACE_KEY = "trace"
#: cluster operations that answer a request: never stamped
_ANSWERS = frozenset((ClusterOp.REPLY, ClusterOp.BCAST_COUNT, ClusterOp.BCAST_ACK))


class DeliverySpan(Protocol):
    """The span of one emit's delivery on this node."""

    def record(self, recipients: int, dropped: int) -> None:
        """The local sockets it was written or queued to, and those it could not reach
        (closed meanwhile, or dropped as slow consumers)."""


class CallSpan(Protocol):
    """The span of one cluster call on the node that makes it."""

    def record(self, answered: int, missing: int) -> None:
        """The nodes that answered, and those that did not in time."""


class BusTracer(Protocol):
    """Spans around emits and cluster calls, in whatever tracing system the
    application uses."""

    def current(self) -> str | None:
        """The W3C ``traceparent`` of the span current in this task; None when there
        is none or it is not sampled (the emit then travels unstamped)."""

    def delivering(self, trace: str, namespace: str, rooms: list[str] | None,
                   stored: bool) -> AbstractContextManager[DeliverySpan]:
        """A span, child of ``trace``, around the local delivery of an emit to
        ``rooms`` of ``namespace`` (None: the whole namespace); ``stored``: a copy
        from the message store (connection state recovery)."""

    def delivered_here(self, recipients: int, dropped: int) -> None:
        """The sending node's own delivery of the emit made in the current span: the
        local sockets it was written or queued to, and those it could not reach."""

    def calling(self, op: str, nodes: int) -> AbstractContextManager[CallSpan]:
        """A span, current while it lasts, around a cluster call ``op`` to ``nodes``
        other nodes."""

    def serving(self, trace: str, op: str, origin: str) -> AbstractContextManager[object]:
        """A span, child of ``trace`` and current while it lasts, around the handling
        of cluster request ``op`` from node ``origin``."""


class Stamper:
    """Stamps what is sent with the current span's context: an emit while every node
    reads it, a cluster request always."""

    def __init__(self, tracer: BusTracer, all_serve: Callable[[str], bool]) -> None:
        self.tracer = tracer
        self.all_serve = all_serve

    def __call__(self, msg: Message) -> Message:
        if isinstance(msg, EmitMessage):
            if msg.trace is not None:
                return msg
            trace = self.tracer.current()
            if trace is None or not self.all_serve(TRACE_FEATURE):
                return msg
            return dataclasses.replace(msg, trace=trace)
        if isinstance(msg, ClusterMessage) and msg.req_id is not None \
                and msg.op not in _ANSWERS and TRACE_KEY not in msg.body:
            trace = self.tracer.current()
            if trace is not None:
                return dataclasses.replace(msg, body={**msg.body, TRACE_KEY: trace})
        return msg


class _Stamps(Protocol):
    stamp: Callable[[Message], Message] | None


class _Traces(Protocol):
    tracer: BusTracer | None


class _Serves(Protocol):
    tracer: BusTracer | None

    def all_serve(self, feature: str) -> bool: ...


class Traceable(Protocol):
    """A manager's parts :func:`install` wires (a ``ClusterManager`` has them)."""

    @property
    def bus(self) -> _Stamps: ...

    @property
    def ingest(self) -> _Traces: ...

    @property
    def rpc(self) -> _Serves: ...


def install(manager: Traceable, tracer: BusTracer | None) -> None:
    """Trace ``manager``'s emits and cluster calls with ``tracer`` (None: stop)."""
    manager.bus.stamp = None if tracer is None else Stamper(tracer, manager.rpc.all_serve)
    manager.ingest.tracer = tracer
    manager.rpc.tracer = tracer
