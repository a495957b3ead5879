"""OpenTelemetry traces of chats across the cluster (``--otel``; off by default).

One trace per chat: a ``chat publish`` span on the sender's gateway around its
handling (checks, publish, its own members' delivery, the ack), whose context
travels in the emit's envelope (sealed with the rest, see
:mod:`nats_adapter.tracing`), and a ``chat deliver`` span, its child, on every other
gateway that delivers it; both carry the local recipients and drops as attributes.
A cluster call (``cluster fetch``, ``cluster join`` ...) is a span on its caller
with a child on every gateway that serves it. Spans go out over OTLP/HTTP with the
SDK's batch processor (a thread of its own), configured by the standard ``OTEL_*``
variables (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_SERVICE_NAME``,
``OTEL_TRACES_SAMPLER`` ...).

This module imports the SDK only in :func:`start_tracing`: with tracing off nothing of
OpenTelemetry's tracing is imported, and the only cost per message is one check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from nats_adapter import ClusterManager
from nats_adapter import tracing as emit_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Span, Tracer

logger = logging.getLogger(__name__)

#: the service name when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names one
SERVICE_NAME = "nats-socketio-gateway"
#: span names (low cardinality: the room is an attribute)
PUBLISH_SPAN = "chat publish"
DELIVER_SPAN = "chat deliver"
#: attribute names beyond OpenTelemetry's messaging conventions
RECIPIENTS = "gateway.recipients"
DROPPED = "gateway.dropped"
STORED = "gateway.stored"
NODE = "gateway.node"
REFUSED = "gateway.refused"
#: a cluster call's: the other nodes asked, those that answered, those that did not
CALL_NODES = "gateway.cluster.nodes"
CALL_ANSWERED = "gateway.cluster.answered"
CALL_MISSING = "gateway.cluster.missing"
#: the node a served cluster request came from
CALLER = "gateway.cluster.caller"
RPC_SYSTEM = "nats_adapter.cluster"

#: seconds a gateway's exit waits for the spans still batched to be exported
CLOSE_TIMEOUT = 3.0
#: the exporters OTEL_TRACES_EXPORTER may name
EXPORTERS = ("otlp", "none")

ChatHandler = Callable[..., Awaitable[Any]]


class _Delivery:
    """A ``chat deliver`` span (:class:`nats_adapter.tracing.DeliverySpan`), ended when
    the delivery is; never made current (nothing runs inside it that would trace)."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def __enter__(self) -> _Delivery:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self.span.record_exception(exc)
            self.span.set_attribute("error.type", type(exc).__qualname__)
        self.span.end()

    def record(self, recipients: int, dropped: int) -> None:
        self.span.set_attributes({RECIPIENTS: recipients, DROPPED: dropped})


class _Call:
    """A cluster call's span (:class:`nats_adapter.tracing.CallSpan`)."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def record(self, answered: int, missing: int) -> None:
        self.span.set_attributes({CALL_ANSWERED: answered, CALL_MISSING: missing})


class GatewayTracer:
    """The gateway's :class:`nats_adapter.tracing.BusTracer` on an OpenTelemetry
    tracer, and the span around the chat handler."""

    def __init__(self, tracer: Tracer, node_id: str) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = tracer
        self.node_id = node_id
        self._current_span = trace.get_current_span
        self._propagator = TraceContextTextMapPropagator()
        self._producer = SpanKind.PRODUCER
        self._consumer = SpanKind.CONSUMER
        self._client = SpanKind.CLIENT
        self._server = SpanKind.SERVER

    def current(self) -> str | None:
        context = self._current_span().get_span_context()
        if not context.is_valid or not context.trace_flags.sampled:
            return None
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    def delivered_here(self, recipients: int, dropped: int) -> None:
        span = self._current_span()
        if span.is_recording():
            span.set_attributes({RECIPIENTS: recipients, DROPPED: dropped})

    def delivering(self, trace: str, namespace: str, rooms: list[str] | None,
                   stored: bool) -> _Delivery:
        parent = self._propagator.extract({"traceparent": trace})
        attributes: dict[str, Any] = {"messaging.system": "socketio",
                                      "messaging.operation.type": "process",
                                      "messaging.destination.name": _destination(rooms),
                                      NODE: self.node_id}
        if namespace != "/":
            attributes["socketio.namespace"] = namespace
        if stored:
            attributes[STORED] = True
        return _Delivery(self.tracer.start_span(DELIVER_SPAN, context=parent,
                                                kind=self._consumer, attributes=attributes))

    @contextlib.contextmanager
    def calling(self, op: str, nodes: int) -> Iterator[_Call]:
        with self.tracer.start_as_current_span(
                f"cluster {op}", kind=self._client,
                attributes={"rpc.system": RPC_SYSTEM, "rpc.method": op, CALL_NODES: nodes,
                            NODE: self.node_id}) as span:
            yield _Call(span)

    @contextlib.contextmanager
    def serving(self, trace: str, op: str, origin: str) -> Iterator[object]:
        parent = self._propagator.extract({"traceparent": trace})
        with self.tracer.start_as_current_span(
                f"cluster {op}", context=parent, kind=self._server,
                attributes={"rpc.system": RPC_SYSTEM, "rpc.method": op, CALLER: origin,
                            NODE: self.node_id}) as span:
            yield span

    def wrap_chat(self, handler: ChatHandler) -> ChatHandler:
        """``handler`` (the chat event's) inside a ``chat publish`` span, the ack's
        outcome on it."""
        tracer, node_id, kind = self.tracer, self.node_id, self._producer

        async def traced_chat(sid: str, *args: Any) -> Any:
            body = args[0] if len(args) == 1 and isinstance(args[0], dict) else {}
            room = body.get("room")
            attributes: dict[str, Any] = {"messaging.system": "socketio",
                                          "messaging.operation.type": "send",
                                          "socketio.sid": sid, NODE: node_id}
            if isinstance(room, str):
                attributes["messaging.destination.name"] = room
            with tracer.start_as_current_span(PUBLISH_SPAN, kind=kind,
                                              attributes=attributes) as span:
                ack = await handler(sid, *args)
                if isinstance(ack, dict) and ack.get("ok") is False:
                    span.set_attribute(REFUSED, str(ack.get("error", "")))
                elif isinstance(ack, dict) and isinstance(ack.get("id"), str):
                    span.set_attribute("messaging.message.id", ack["id"])
                return ack

        return traced_chat


def _destination(rooms: list[str] | None) -> str:
    """The room an emit went to; for several (up to thousands), how many."""
    if rooms is None:
        return "(namespace)"
    return rooms[0] if len(rooms) == 1 else f"({len(rooms)} rooms)"


class Tracing:
    """Tracing as this gateway runs it: the tracer, and the provider to flush at exit."""

    def __init__(self, tracer: GatewayTracer, provider: TracerProvider) -> None:
        self.tracer = tracer
        self.provider = provider

    def trace(self, sio: Any, chat_handler: ChatHandler, manager: Any) -> None:
        """Trace the chat event of ``sio`` (handled by ``chat_handler``) and the emits
        of ``manager`` (a ``ClusterManager``: the stock baseline's are not)."""
        sio.on("chat", self.tracer.wrap_chat(chat_handler))
        if isinstance(manager, ClusterManager):
            emit_tracing.install(manager, self.tracer)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Export what is still batched, then stop; waits ``timeout`` seconds at most
        (a collector that does not answer must not hold the gateway's exit: the
        export goes on in a daemon thread, dropped at exit)."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        def shutdown() -> None:
            try:
                self.provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone already
                    loop.call_soon_threadsafe(done.set)

        threading.Thread(target=shutdown, name="otel-shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(timeout):
                await done.wait()
        except TimeoutError:
            logger.warning("the OpenTelemetry exporter did not finish within %.0f s: the "
                           "spans not yet sent are dropped", timeout)


def start_tracing(node_id: str, env: Mapping[str, str] | None = None,
                  processor: SpanProcessor | None = None) -> Tracing:
    """The SDK set up from the ``OTEL_*`` variables in ``env`` (default the process's),
    its spans naming this node; ``processor`` replaces the OTLP batch exporter (tests
    pass one with an in-memory exporter). Raises ``ValueError`` naming the variable
    at fault (see :func:`check_environment`)."""
    env = os.environ if env is None else env
    check_environment(env)
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.instance.id": node_id})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    # shut down by Tracing.close, within its timeout (not at exit, without one)
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    if processor is None and env.get("OTEL_TRACES_EXPORTER", "otlp").strip() != "none":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_endpoint(env)))
    if processor is not None:
        provider.add_span_processor(processor)
    tracer = provider.get_tracer("gateway.tracing")
    return Tracing(GatewayTracer(tracer, node_id), provider)


def traces_endpoint(env: Mapping[str, str]) -> str | None:
    """The URL spans are posted to, as the OTLP exporter reads the variables: the
    traces endpoint as it is, or the base endpoint plus ``/v1/traces``; None: the
    exporter's default (``http://localhost:4318/v1/traces``)."""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return f"{base.rstrip('/')}/v1/traces" if base else None


#: OTEL_* variables read as an endpoint URL, most specific first
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def check_environment(env: Mapping[str, str]) -> None:
    """Raise ``ValueError`` naming the ``OTEL_*`` variable whose value the gateway
    cannot trace with: an endpoint that is not an http(s) URL with a host, a protocol
    other than http/protobuf (the one exporter installed), an unknown exporter; or
    saying how to install the SDK when it is not."""
    import importlib.util
    import urllib.parse

    if importlib.util.find_spec("opentelemetry") is None or \
            importlib.util.find_spec("opentelemetry.sdk") is None or \
            importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
        raise ValueError("the OpenTelemetry SDK is not installed: pip install "
                         "'nats-socketio-gateway[otel]'")

    for name in ENDPOINT_VARIABLES:
        value = env.get(name)
        if value is None or not value.strip():
            continue
        try:
            parsed = urllib.parse.urlsplit(value.strip())
            port_ok = parsed.port is None or parsed.port > 0
        except ValueError:
            port_ok = False
            parsed = urllib.parse.urlsplit("")
        if parsed.scheme not in ("http", "https") or not parsed.hostname or not port_ok:
            raise ValueError(f"{name}: invalid value {value!r}: must be an http:// or "
                             f"https:// URL with a host (an OTLP/HTTP receiver, e.g. "
                             f"http://collector:4318)")
    for name in PROTOCOL_VARIABLES:
        value = env.get(name)
        if value is not None and value.strip() not in ("", "http/protobuf"):
            raise ValueError(f"{name}: invalid value {value!r}: the gateway exports with "
                             f"OTLP over HTTP: http/protobuf")
    exporter = env.get("OTEL_TRACES_EXPORTER")
    if exporter is not None and exporter.strip() not in ("", *EXPORTERS):
        raise ValueError(f"OTEL_TRACES_EXPORTER: invalid value {exporter!r}: must be one of "
                         f"{', '.join(EXPORTERS)}")
