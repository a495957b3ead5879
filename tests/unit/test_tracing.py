"""OpenTelemetry tracing (``--otel``) in one process: three gateway apps on the memory
bus, each with the SDK's in-memory exporter. A chat from gateway A to members on B
and C is one trace: the sender's ``chat publish`` span on A, a ``chat deliver`` span,
its child, on B and on C, with the recipient counts. The envelope carries the trace
context only while tracing is on and every node reads it; off, nothing of the SDK
is imported (checked in a fresh interpreter)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from gateway.app import CHAT_KEY, SIO_KEY, advertised_url, create_app
from gateway.config import ConfigError, GatewayConfig, add_arguments, from_args
from gateway.processes import free_ports
from gateway.tracing import (
    CALL_ANSWERED,
    CALL_MISSING,
    CALL_NODES,
    CALLER,
    DELIVER_SPAN,
    DROPPED,
    NODE,
    PUBLISH_SPAN,
    RECIPIENTS,
    Tracing,
    start_tracing,
)
from nats_adapter import MemoryManager, codec
from nats_adapter.brokers.memory import MemoryBus
from tests.helpers import REPO, SioClient, wait_for_condition
from tests.unit.conftest import GatewayApp, settle


@dataclasses.dataclass
class Traced:
    gateways: list[GatewayApp]
    exporter: InMemorySpanExporter
    tracings: list[Tracing]


@pytest.fixture
async def traced() -> AsyncIterator[Traced]:
    """gw-1, gw-2, gw-3 on one memory bus, all tracing into one in-memory exporter."""
    bus = MemoryBus()
    exporter = InMemorySpanExporter()
    runners: list[web.AppRunner] = []
    made = Traced([], exporter, [])
    try:
        for i in (1, 2, 3):
            port = free_ports(1)[0]
            config = dataclasses.replace(GatewayConfig(), backend="memory", node_id=f"gw-{i}",
                                         port=port)
            manager = MemoryManager(bus, node_name=f"gw-{i}", node_url=advertised_url(config))
            app = create_app(config, manager)
            tracing = start_tracing(f"gw-{i}", {}, SimpleSpanProcessor(exporter))
            tracing.trace(app[SIO_KEY], app[CHAT_KEY].on_chat, manager)
            made.tracings.append(tracing)
            runner = web.AppRunner(app)
            runners.append(runner)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            made.gateways.append(GatewayApp(f"http://127.0.0.1:{port}", port, app, manager))
        yield made
    finally:
        for runner in runners:
            await runner.cleanup()
        for tracing in made.tracings:
            await tracing.close()


async def three_members(traced: Traced, clients: list[SioClient], room: str
                        ) -> tuple[SioClient, SioClient, SioClient]:
    a, b, c = SioClient("a"), SioClient("b"), SioClient("c")
    clients += [a, b, c]
    for client, gateway in zip((a, b, c), traced.gateways, strict=True):
        await client.connect(gateway.url)
        assert (await client.call("join", room))["ok"]
    return a, b, c


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_a_chat_is_one_trace_with_a_span_on_every_gateway(
        traced: Traced, clients: list[SioClient]) -> None:
    a, b, c = await three_members(traced, clients, "lobby")
    assert (await a.call("chat", {"room": "lobby", "text": "traced"}))["ok"]
    await b.wait_texts(["traced"])
    await c.wait_texts(["traced"])
    exporter = traced.exporter
    await wait_for_condition(lambda: len(named(exporter.get_finished_spans(),
                                               DELIVER_SPAN)) == 2, what="two deliver spans")
    spans = exporter.get_finished_spans()
    [publish] = named(spans, PUBLISH_SPAN)
    deliveries = named(spans, DELIVER_SPAN)
    assert publish.attributes is not None and publish.attributes[NODE] == "gw-1"
    assert publish.attributes["messaging.destination.name"] == "lobby"
    assert publish.context is not None and publish.parent is None
    trace_id = publish.context.trace_id
    assert {s.context.trace_id for s in deliveries if s.context} == {trace_id}
    assert all(s.parent is not None and s.parent.span_id == publish.context.span_id
               for s in deliveries)
    # the sender's gateway has no other member: it delivered to nobody
    assert (publish.attributes[RECIPIENTS], publish.attributes[DROPPED]) == (0, 0)
    assert sorted(str((s.attributes or {})[NODE]) for s in deliveries) == ["gw-2", "gw-3"]
    for s in deliveries:
        assert s.attributes is not None
        assert (s.attributes[RECIPIENTS], s.attributes[DROPPED]) == (1, 0)
        assert s.attributes["messaging.destination.name"] == "lobby"
    # the spans of other traffic (joins, acks) are not made up: only chats
    assert {s.name for s in spans} == {PUBLISH_SPAN, DELIVER_SPAN}


async def test_the_senders_own_delivery_is_on_its_publish_span(
        traced: Traced, clients: list[SioClient]) -> None:
    a, b, c = await three_members(traced, clients, "lobby")
    neighbours = [SioClient("a2"), SioClient("a3")]
    clients += neighbours
    for client in neighbours:
        await client.connect(traced.gateways[0].url)
        assert (await client.call("join", "lobby"))["ok"]
    assert (await a.call("chat", {"room": "lobby", "text": "near and far"}))["ok"]
    for client in (b, c, *neighbours):
        await client.wait_texts(["near and far"])
    await wait_for_condition(lambda: len(named(traced.exporter.get_finished_spans(),
                                               DELIVER_SPAN)) == 2, what="two deliver spans")
    spans = traced.exporter.get_finished_spans()
    [publish] = named(spans, PUBLISH_SPAN)
    assert publish.attributes is not None
    assert (publish.attributes[RECIPIENTS], publish.attributes[DROPPED]) == (2, 0)
    assert sorted(str((s.attributes or {})[NODE]) for s in named(spans, DELIVER_SPAN)) \
        == ["gw-2", "gw-3"]


async def test_a_refused_chat_says_why_on_its_span(traced: Traced,
                                                   clients: list[SioClient]) -> None:
    a, _, _ = await three_members(traced, clients, "lobby")
    answer = await a.call("chat", {"room": "elsewhere", "text": "no"})
    assert not answer["ok"]
    [publish] = named(traced.exporter.get_finished_spans(), PUBLISH_SPAN)
    assert publish.attributes is not None
    assert "not a member" in str(publish.attributes["gateway.refused"])


async def test_no_trace_context_reaches_a_node_that_does_not_read_it(
        traced: Traced, clients: list[SioClient]) -> None:
    """A node of an older release (heartbeats without the trace feature) drops an
    envelope with one more item as malformed: while one is alive, none is sent."""
    a, b, c = await three_members(traced, clients, "lobby")
    sender = traced.gateways[0].manager
    sender.rpc.peers.saw("0ldn0de1", {"name": "old", "features": ["move"]})
    published: list[codec.Message] = []
    encode = sender.bus.encode

    def spy(msg: codec.Message) -> bytes | None:
        data = encode(msg)
        if data is not None:
            published.append(codec.decode(data))
        return data

    sender.bus.encode = spy  # type: ignore[method-assign]
    assert (await a.call("chat", {"room": "lobby", "text": "plain"}))["ok"]
    await b.wait_texts(["plain"])
    await c.wait_texts(["plain"])
    await settle(traced.gateways, b, c)
    emits = [m for m in published if isinstance(m, codec.EmitMessage)]
    assert emits and all(m.trace is None for m in emits)
    assert len(named(traced.exporter.get_finished_spans(), PUBLISH_SPAN)) == 1
    assert not named(traced.exporter.get_finished_spans(), DELIVER_SPAN)


def test_every_node_says_it_reads_trace_context(two_gateways: list[GatewayApp]) -> None:
    for gateway in two_gateways:
        assert codec.TRACE_FEATURE in gateway.manager.rpc.features


def test_the_envelope_carries_trace_context_only_when_given() -> None:
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for msg in (codec.EmitMessage("abcd1234", "/", ["r"], [], '2["chat",{}]',
                                  channel_room=True),
                codec.EmitMessage("abcd1234", "/", ["r"], ["x"], '2["chat",{}]',
                                  channel_room=True),
                codec.EmitMessage("abcd1234", "/", ["r", "s"], [], '2["chat",{}]', "d:1")):
        plain = codec.encode(msg)
        stamped = codec.encode(dataclasses.replace(msg, trace=trace))
        assert trace.encode() not in plain and trace.encode() in stamped
        assert codec.decode(plain).trace is None  # type: ignore[union-attr]
        assert codec.decode(stamped).trace == trace  # type: ignore[union-attr]
        assert codec.decode(stamped) == dataclasses.replace(codec.decode(plain), trace=trace)
    # the envelope without a trace is the format of the previous release, byte for byte
    assert codec.encode(codec.EmitMessage("", "/", ["r"], [], "2[]", channel_room=True)) \
        == bytes([0x94, 0x01, 0x09, 0xA0, 0xA3]) + b"2[]"
    with pytest.raises(codec.EnvelopeError):
        codec.decode(codec.encode(codec.EmitMessage("", "/", ["r"], [], "2[]",
                                                    channel_room=True, trace="x" * 500)))


#: what tracing loads: the trace SDK, the exporter, the W3C propagator
TRACING_MODULES = ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http",
                   "opentelemetry.trace.propagation.tracecontext")

APP_WITH_TRACING = (
    "import sys, dataclasses\n"
    "from gateway.app import create_app\n"
    "from gateway.config import GatewayConfig\n"
    "from nats_adapter import MemoryManager\n"
    "from nats_adapter.brokers.memory import MemoryBus\n"
    "config = dataclasses.replace(GatewayConfig(), backend='memory', otel={otel})\n"
    "create_app(config, MemoryManager(MemoryBus()))\n"
    "print(sorted(m for m in {modules!r} if m in sys.modules))\n"
)


def loaded(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=False, env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_tracing_off_loads_no_tracing_sdk() -> None:
    """A gateway app made with tracing off (the default) loads nothing of tracing.
    (redis-py 8 imports OpenTelemetry's metrics SDK itself when it is installed, for
    its own opt-in metrics: not ours to avoid, and no tracing.)"""
    assert loaded(APP_WITH_TRACING.format(otel=False, modules=TRACING_MODULES)) == "[]"
    # the check can fail: with --otel the same app loads all of it
    assert loaded(APP_WITH_TRACING.format(otel=True, modules=TRACING_MODULES)) \
        == str(sorted(TRACING_MODULES))


def test_tracing_off_needs_no_opentelemetry_installed() -> None:
    """The otel extra is optional: with every opentelemetry module unimportable the
    gateway app is made (tracing off) all the same."""
    block = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'opentelemetry':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    assert loaded(block + APP_WITH_TRACING.format(otel=False, modules=("opentelemetry",))) \
        == "[]"


@pytest.mark.parametrize(("variable", "value"), [
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://:4318"),
    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:99999/v1/traces"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    ("OTEL_TRACES_EXPORTER", "zipkin"),
])
def test_a_bad_otel_setting_is_refused_naming_it(variable: str, value: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match=f"^--otel: {variable}: invalid value"):
        from_args(parser.parse_args(["--otel"]), env={variable: value})
    # ... and only with tracing on
    assert not from_args(parser.parse_args([]), env={variable: value}).otel


def test_gateway_serve_says_which_variable_is_bad() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--backend", "memory", "--otel"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": "localhost:4318"})
    assert proc.returncode == 2, proc.stderr
    assert "OTEL_EXPORTER_OTLP_ENDPOINT: invalid value 'localhost:4318': must be an " \
        "http:// or https:// URL" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_cluster_call_is_one_trace_with_a_span_on_every_gateway(
        traced: Traced, clients: list[SioClient]) -> None:
    await three_members(traced, clients, "lobby")
    caller = traced.gateways[0].manager
    await wait_for_condition(lambda: caller.server_count() == 3, what="three gateways")
    assert await caller.room_size("lobby") == 3
    spans = traced.exporter.get_finished_spans()
    [call] = [s for s in spans if s.kind is SpanKind.CLIENT]
    served = [s for s in spans if s.kind is SpanKind.SERVER]
    assert call.name == "cluster fetch" and call.attributes is not None
    assert (call.attributes[CALL_NODES], call.attributes[CALL_ANSWERED],
            call.attributes[CALL_MISSING]) == (2, 2, 0)
    assert call.context is not None
    assert sorted(str((s.attributes or {})[NODE]) for s in served) == ["gw-2", "gw-3"]
    for s in served:
        assert s.name == "cluster fetch" and s.context is not None
        assert s.context.trace_id == call.context.trace_id
        assert s.parent is not None and s.parent.span_id == call.context.span_id
        assert str((s.attributes or {})[CALLER]).startswith("gw-1 (")


async def test_closing_does_not_wait_for_a_collector_that_does_not_answer() -> None:
    """A gateway's exit waits for its batched spans a bounded time, not the exporter's
    retries against a collector that is down."""
    port = free_ports(1)[0]  # nobody listens there
    tracing = start_tracing("gw-x", {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    with tracing.tracer.tracer.start_as_current_span("unsent"):
        pass
    started = time.monotonic()
    await tracing.close(timeout=0.5)
    assert time.monotonic() - started < 2.0
