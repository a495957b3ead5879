"""``--otel`` across processes: three ``gateway serve`` processes with tracing on, each
on another node of a real NATS cluster (sealed with the run's cluster key), export
over OTLP/HTTP to a receiver in this test (tools/otlp_receiver.py). A chat from
gateway A to members on B and C arrives there as one trace: A's ``chat publish``
span and a ``chat deliver`` span, its child, from B and from C, each with its one
recipient (with --recovery too, where every gateway delivers the stored copy). A
cluster call (the room's member count, asked of gateway A over HTTP) is
one trace too: A's call and a span from each gateway that answered it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.processes import (
    GatewayNode,
    NatsCluster,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from gateway.tracing import (
    CALL_ANSWERED,
    CALL_MISSING,
    DELIVER_SPAN,
    DROPPED,
    NODE,
    PUBLISH_SPAN,
    RECIPIENTS,
    STORED,
)
from tests.conftest import TEST_HEARTBEAT, broker_args
from tests.helpers import SioClient, http_json, read_metric, running, wait_for_condition
from tests.test_mixed_release import (  # noqa: F401 (previous_release: a fixture)
    chat_both_ways,
    errors_of,
    previous_release,
    start_previous,
)
from tests.test_recovery import start_gateways as start_recovery_gateways
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


def otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": SERVICE,
            # export each batch within 50 ms (the SDK's default waits 5 s)
            "OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture(scope="module")
def traced_gateways(workdir: Path, receiver: OtlpReceiver, request: pytest.FixtureRequest
                    ) -> Iterator[list[GatewayNode]]:
    gateways = [start_gateway(workdir / "otel", f"otel-{name}", port, "nats",
                              broker_args("nats", request, index), env=otel_env(receiver),
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
    # B and C answer; so may gateways of other tests that share the session's NATS
    # cluster on this worker (ci-14 saw 4): they do not trace, so only B and C serve
    # spans below
    assert call.attributes[CALL_ANSWERED] >= 2 and call.attributes[CALL_MISSING] == 0

    def served() -> list[ReceivedSpan]:
        return [s for s in receiver.spans if s.kind == SERVER and s.trace_id == call.trace_id]

    await wait_for_condition(lambda: len(served()) == 2, what="B's and C's serving spans")
    assert sorted(s.instance for s in served()) == ["otel-b", "otel-c"]
    assert all(s.parent_span_id == call.span_id and s.name == "cluster fetch"
               for s in served())


async def test_a_gateway_of_the_previous_release_never_gets_trace_context(
        tmp_path: Path, receiver: OtlpReceiver, clients: list[SioClient],
        request: pytest.FixtureRequest) -> None:
    """A rolling upgrade with tracing on the new gateway: while a gateway of the
    previous release is alive (it says so in its heartbeats) no envelope carries
    trace context, so the old one drops nothing; the new one still traces its side."""
    previous: Path = request.getfixturevalue("previous_release")
    port_old, port_new = free_ports(2)
    suffix = uuid.uuid4().hex[:4]
    # a NATS node of its own: the two are the only gateways there, so the new one
    # counting two means it heard the old one
    with running(NatsCluster(tmp_path / "nats", size=1)) as cluster:
        old = start_previous(previous, tmp_path / "old", f"old-{suffix}", port_old, cluster)
        new = start_gateway(tmp_path / "new", f"otel-new-{suffix}", port_new, "nats",
                            cluster.gateway_args(), env=otel_env(receiver), extra=["--otel"])
        try:
            await old_and_new(old, new, receiver, clients, suffix)
        finally:
            stop_all([old.child, new.child])


async def old_and_new(old: GatewayNode, new: GatewayNode, receiver: OtlpReceiver,
                      clients: list[SioClient], suffix: str) -> None:
    wait_gateways([old, new], timeout=40)

    async def knows_the_old_one() -> bool:
        return await read_metric(new.url, "gateway_cluster_nodes") == 2

    await wait_for_condition(knows_the_old_one, what="the new gateway to hear the old")
    room = f"otel-mixed-{suffix}"
    a, b = SioClient("a"), SioClient("b")
    clients += [a, b]
    await a.connect(old.url)
    await b.connect(new.url)
    for client in (a, b):  # one NATS node: its interest is there once the join is acked
        assert (await client.call("join", room))["ok"]
    await chat_both_ways(a, b, room, "old and traced")
    msg_id = await b.chat(room, "traced, to the old one")
    await a.wait_for(lambda r: "traced, to the old one" in r.texts(), what="the chat")
    await wait_for_condition(lambda: trace_of(receiver, msg_id), what="its publish span")
    assert [s.name for s in trace_of(receiver, msg_id)] == [PUBLISH_SPAN]
    assert await errors_of(old) == 0 and await errors_of(new) == 0


async def test_with_recovery_each_delivery_of_the_stored_copy_is_traced(
        tmp_path: Path, receiver: OtlpReceiver, clients: list[SioClient],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With --recovery every gateway, the sender's included, delivers the copy the
    message store sends back: the copy carries the trace context it was stored with."""
    for name, value in otel_env(receiver).items():
        monkeypatch.setenv(name, value)  # the gateways' environment (spawn passes ours)
    with running(NatsCluster(tmp_path / "nats", size=3)) as cluster:
        gws = start_recovery_gateways(tmp_path, cluster, 3, "--otel")
        try:
            room = f"otel-rec-{uuid.uuid4().hex[:6]}"
            a, near, b, c = (SioClient(n, offsets=True) for n in ("a", "near", "b", "c"))
            clients += [a, near, b, c]
            for client, gw in zip((a, near, b, c), (gws[0], gws[0], gws[1], gws[2]),
                                  strict=True):
                await client.connect(gw.url)
                assert (await client.call("join", room))["ok"]
            msg_id = await a.chat(room, "stored and traced")
            for client in (near, b, c):
                await client.wait_for(lambda r: "stored and traced" in r.texts(),
                                      what="the chat")
            await wait_for_condition(
                lambda: len([s for s in trace_of(receiver, msg_id)
                             if s.name == DELIVER_SPAN]) == 3,
                what="a deliver span from each gateway")
            spans = trace_of(receiver, msg_id)
            [publish] = [s for s in spans if s.name == PUBLISH_SPAN]
            deliveries = [s for s in spans if s.name == DELIVER_SPAN]
            assert sorted(s.instance for s in deliveries) == sorted(g.node_id for g in gws)
            for span in deliveries:
                assert span.parent_span_id == publish.span_id
                assert span.attributes[STORED] is True
        finally:
            stop_all([g.child for g in gws])
