"""Trace context across the bus: what an emit tracer plugs into.

The library imports no tracing SDK. A tracer (the gateway's, on OpenTelemetry:
``gateway/tracing.py``) implements :class:`EmitTracer`, and :func:`install` hands
it to a manager: its bus then stamps each emit it encodes with the trace context of
the span current in the sending task (:attr:`~nats_adapter.codec.EmitMessage.trace`,
sealed with the rest of the envelope), and every node that delivers a stamped emit
does so inside a span the tracer opens as a child of it, told how many local
sockets got it and how many were dropped. A node stamps only while every node alive
says it reads trace context (:data:`~nats_adapter.codec.TRACE_FEATURE`): a node of
an older release would drop such an envelope as malformed. Without a tracer the
envelope is the same as before and no work is done beyond one check per emit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from .codec import TRACE_FEATURE, EmitMessage

__all__ = ["TRACE_FEATURE", "DeliverySpan", "EmitTracer", "Stamper", "install"]


class DeliverySpan(Protocol):
    """The span of one emit's delivery on this node."""

    def record(self, recipients: int, dropped: int) -> None:
        """The local sockets it was written or queued to, and those it could not reach
        (closed meanwhile, or dropped as slow consumers)."""


class EmitTracer(Protocol):
    """Spans around emits, in whatever tracing system the application uses."""

    def current(self) -> str | None:
        """The W3C ``traceparent`` of the span current in this task; None when there
        is none or it is not sampled (the emit then travels unstamped)."""

    def delivering(self, trace: str, namespace: str, rooms: list[str] | None,
                   stored: bool) -> AbstractContextManager[DeliverySpan]:
        """A span, child of ``trace``, around the local delivery of an emit to
        ``rooms`` of ``namespace`` (None: the whole namespace); ``stored``: a copy
        from the message store (connection state recovery)."""


class Stamper:
    """Stamps an emit with the current span's context while every node reads it."""

    def __init__(self, tracer: EmitTracer, all_serve: Callable[[str], bool]) -> None:
        self.tracer = tracer
        self.all_serve = all_serve

    def __call__(self, msg: EmitMessage) -> EmitMessage:
        trace = self.tracer.current()
        if trace is None or msg.trace is not None or not self.all_serve(TRACE_FEATURE):
            return msg
        return dataclasses.replace(msg, trace=trace)


class _Stamps(Protocol):
    stamp: Callable[[EmitMessage], EmitMessage] | None


class _Traces(Protocol):
    tracer: EmitTracer | None


class _Serves(Protocol):
    def all_serve(self, feature: str) -> bool: ...


class Traceable(Protocol):
    """A manager's parts :func:`install` wires (a ``ClusterManager`` has them)."""

    @property
    def bus(self) -> _Stamps: ...

    @property
    def ingest(self) -> _Traces: ...

    @property
    def rpc(self) -> _Serves: ...


def install(manager: Traceable, tracer: EmitTracer | None) -> None:
    """Trace ``manager``'s emits with ``tracer`` (None: stop tracing)."""
    manager.bus.stamp = None if tracer is None else Stamper(tracer, manager.rpc.all_serve)
    manager.ingest.tracer = tracer
