"""``--otel`` across processes: three ``gateway serve`` processes with tracing on, each
on another node of a real NATS cluster (sealed with the run's cluster key), export
over OTLP/HTTP to a receiver in this test (tools/otlp_receiver.py). A chat from
gateway A to members on B and C arrives there as one trace: A's ``chat publish``
span and a ``chat deliver`` span, its child, from B and from C, each with its one
recipient. A cluster call (the room's member count, asked of gateway A over HTTP) is
one trace too: A's call and a span from each gateway that answered it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.processes import GatewayNode, free_ports, start_gateway, stop_all, wait_gateways
from gateway.tracing import (
    CALL_ANSWERED,
    CALL_MISSING,
    DELIVER_SPAN,
    DROPPED,
    NODE,
    PUBLISH_SPAN,
    RECIPIENTS,
)
from tests.conftest import TEST_HEARTBEAT, broker_args
from tests.helpers import SioClient, http_json, wait_for_condition
from tools.otlp_receiver import OtlpReceiver, ReceivedSpan

SERVICE = "chat-gateway-under-test"
#: OTLP's span kinds
SERVER, CLIENT = 2, 3


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[OtlpReceiver]:
    made = OtlpReceiver()
    await made.start()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture(scope="module")
def traced_gateways(workdir: Path, receiver: OtlpReceiver, request: pytest.FixtureRequest
                    ) -> Iterator[list[GatewayNode]]:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": SERVICE,
           # export each batch within 50 ms (the SDK's default waits 5 s)
           "OTEL_BSP_SCHEDULE_DELAY": "50"}
    gateways = [start_gateway(workdir / "otel", f"otel-{name}", port, "nats",
                              broker_args("nats", request, index), env=env,
                              extra=["--otel", "--heartbeat-interval", str(TEST_HEARTBEAT)])
                for index, (name, port) in enumerate(zip("abc", free_ports(3), strict=True))]
    try:
        wait_gateways(gateways)
        yield gateways
    finally:
        stop_all([g.child for g in gateways])


def trace_of(receiver: OtlpReceiver, msg_id: str) -> list[ReceivedSpan]:
    """The spans of the trace whose publish span is the chat ``msg_id``'s."""
    publish = [s for s in receiver.spans if s.name == PUBLISH_SPAN
               and s.attributes.get("messaging.message.id") == msg_id]
    if not publish:
        return []
    return [s for s in receiver.spans if s.trace_id == publish[0].trace_id]


async def test_a_chat_from_a_to_b_and_c_is_one_trace_at_the_otlp_receiver(
        traced_gateways: list[GatewayNode], receiver: OtlpReceiver,
        clients: list[SioClient]) -> None:
    room = f"otel-{uuid.uuid4().hex[:6]}"
    a, b, c = SioClient("a"), SioClient("b"), SioClient("c")
    clients += [a, b, c]
    for client, gateway in zip((a, b, c), traced_gateways, strict=True):
        await client.connect(gateway.url)
        await client.join(room)
    answer = await a.call("chat", {"room": room, "text": "traced across"})
    assert answer["ok"], answer
    await b.wait_texts(["traced across"])
    await c.wait_texts(["traced across"])
    await wait_for_condition(
        lambda: len([s for s in trace_of(receiver, answer["id"])
                     if s.name == DELIVER_SPAN]) == 2,
        what="the deliver spans of B and C at the receiver")
    spans = trace_of(receiver, answer["id"])
    [publish] = [s for s in spans if s.name == PUBLISH_SPAN]
    deliveries = [s for s in spans if s.name == DELIVER_SPAN]
    assert publish.attributes[NODE] == "otel-a" and publish.instance == "otel-a"
    assert publish.parent_span_id == "" and publish.service == SERVICE
    assert publish.attributes["messaging.destination.name"] == room
    assert sorted(s.instance for s in deliveries) == ["otel-b", "otel-c"]
    for span in deliveries:
        assert span.parent_span_id == publish.span_id
        assert (span.attributes[RECIPIENTS], span.attributes[DROPPED]) == (1, 0)
        assert span.attributes["messaging.destination.name"] == room
    assert len(spans) == 3, spans


async def test_a_cluster_call_is_one_trace_at_the_otlp_receiver(
        traced_gateways: list[GatewayNode], receiver: OtlpReceiver,
        clients: list[SioClient]) -> None:
    room = f"otel-{uuid.uuid4().hex[:6]}"
    members = [SioClient(name) for name in "bc"]
    clients += members
    for client, gateway in zip(members, traced_gateways[1:], strict=True):
        await client.connect(gateway.url)
        await client.join(room)

    def calls() -> list[ReceivedSpan]:
        return [s for s in receiver.spans if s.kind == CLIENT and s.instance == "otel-a"
                and s.name == "cluster fetch"]

    before = len(calls())
    status, body = await asyncio.to_thread(
        http_json, f"{traced_gateways[0].url}/api/rooms/{room}")
    assert status == 200 and body["members"] == 2, body
    await wait_for_condition(lambda: len(calls()) > before, what="A's call span")
    call = calls()[-1]
    assert call.attributes[CALL_ANSWERED] == 2 and call.attributes[CALL_MISSING] == 0

    def served() -> list[ReceivedSpan]:
        return [s for s in receiver.spans if s.kind == SERVER and s.trace_id == call.trace_id]

    await wait_for_condition(lambda: len(served()) == 2, what="B's and C's serving spans")
    assert sorted(s.instance for s in served()) == ["otel-b", "otel-c"]
    assert all(s.parent_span_id == call.span_id and s.name == "cluster fetch"
               for s in served())
