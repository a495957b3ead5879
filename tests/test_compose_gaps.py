"""Network partitions on the compose stack with connection state recovery on
(GATEWAY_RECOVERY=on): clients that stay connected on both sides receive every chat
acked ok, once, in order, after the heal; the gap a partition leaves is read back
from the stream (nats_adapter.brokers.gaps).

The faults of tests/test_compose_faults.py, on a stack of its own. Every run appends
its measurements to bench-results/reliability/results.jsonl; docs/RELIABILITY.md
reports them. Reproduce with ``scripts/test tests/test_compose_gaps.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.conftest import stack_up
from tests.containers import (
    NATS_NODES,
    ComposeStack,
    Images,
    Podman,
    mesh_is_whole,
    nats_service_of,
    partition,
)
from tests.helpers import SioClient, connect_all
from tests.test_compose_faults import deliveries_resumed, measure
from tests.traffic import Flow, Traffic, record, wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

METRICS = ("gateway_broker_losses_total", "gateway_stream_gaps_detected_total",
           "gateway_stream_messages_repaired_total", "gateway_stream_gaps_unrepairable_total")


@pytest.fixture(scope="module")
def recovery_stack(podman: Podman, images: Images) -> Iterator[ComposeStack]:
    yield from stack_up(ComposeStack(podman, images, variables={"GATEWAY_RECOVERY": "on"}),
                        120)


@pytest.fixture
async def traffic(recovery_stack: ComposeStack, request: pytest.FixtureRequest
                  ) -> AsyncIterator[Traffic]:
    """Chat both ways between a client on each gateway, in a room of the test's own."""
    made: list[SioClient] = []
    await asyncio.to_thread(recovery_stack.wait_healthy, 60)
    try:
        a, b = await connect_all(made, [("on-gw-1", recovery_stack.gateway_urls[0]),
                                        ("on-gw-2", recovery_stack.gateway_urls[1])],
                                 offsets=True)
        room = request.node.name
        for c in (a, b):
            await c.join(room)
        yield Traffic([Flow("gw1-to-gw2", a, b, room), Flow("gw2-to-gw1", b, a, room)],
                      recovery_stack.gateway_urls)
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)
    await wait_for(lambda: mesh_is_whole(recovery_stack), 60, "the mesh to be whole again")


def order_report(flow: Flow) -> dict[str, int]:
    """How often the receiver got a chat of ``flow`` twice, or before an earlier one."""
    seqs: list[int] = []
    for event, data in flow.receiver.events:
        if event == "chat" and isinstance(data, dict) and data.get("room") == flow.room:
            name, _, seq = str(data.get("text", "")).partition(" ")
            if name == flow.name and seq.isdigit():
                seqs.append(int(seq))
    return {"duplicates": len(seqs) - len(set(seqs)),
            "out_of_order": sum(1 for a, b in itertools.pairwise(seqs) if b < a)}


def summarise(traffic: Traffic, **extra: object) -> dict[str, object]:
    return {"flows": [{**traffic.flow_report(f), **order_report(f)} for f in traffic.flows],
            "health": [traffic.health_report(i) for i in (0, 1)],
            "metrics_delta": traffic.metric_deltas(METRICS), "recovery": True, **extra}


def check_every_acked_chat_once_in_order(traffic: Traffic, result: dict[str, object]) -> None:
    for flow in traffic.flows:
        report = {**traffic.flow_report(flow), **order_report(flow)}
        assert report["lost"] == 0 and report["duplicates"] == 0 \
            and report["out_of_order"] == 0, result


async def test_gateway_partitioned_from_its_nats_node(
        recovery_stack: ComposeStack, traffic: Traffic) -> None:
    """gateway-1 can no longer reach its NATS node until it moves to another: what the
    other side stored meanwhile reaches gateway-1's client after the move."""
    stack = recovery_stack
    node = nats_service_of(stack, 0)
    async with traffic.running(settle=15.0):
        await traffic.delivered()
        fault = traffic.mark("fault")
        with partition(stack, stack.replica(0), [node]):
            took = await measure(lambda: deliveries_resumed(traffic, fault + 0.5)
                                 and nats_service_of(stack, 0) != node, 60)
            traffic.mark("recovered")
            if took is not None:
                await traffic.delivered(after=traffic.marks["recovered"])
        traffic.mark("healed")
        if took is not None:
            await traffic.delivered(after=traffic.marks["healed"])
    result = summarise(traffic, partitioned=f"gateway-1 from {node}", recovered_after_s=took)
    record("recovery on, partition: gateway-1 from its NATS node", result)
    assert took is not None, f"gateway-1 did not carry traffic through another node: {result}"
    check_every_acked_chat_once_in_order(traffic, result)


async def test_nats_node_split_from_the_other_two(
        recovery_stack: ComposeStack, traffic: Traffic) -> None:
    """gateway-1's NATS node loses both routes for 20 s while gateway-1 stays on it:
    its chats are refused quickly (no quorum to store them), and after the heal both
    sides have every chat that was acked ok."""
    stack = recovery_stack
    node = nats_service_of(stack, 0)
    others = [n for n in NATS_NODES if n != node]
    minority_acks: list[tuple[object, float]] = []
    async with traffic.running(settle=15.0):
        await traffic.delivered()
        traffic.mark("fault")
        with partition(stack, node, others):
            end = time.monotonic() + 20  # the fault: split for 20 s
            probe = traffic.flows[0].sender  # on gateway-1, the minority side
            await asyncio.sleep(5)  # past the first seconds of the split (its length)
            while time.monotonic() < end - 3:
                start = time.monotonic()
                try:
                    ack = await probe.call("chat", {"room": traffic.flows[0].room,
                                                    "text": "probe"}, timeout=5)
                except Exception as exc:  # no ack at all: recorded as such
                    ack = repr(exc)
                minority_acks.append((ack, round(time.monotonic() - start, 2)))
                await asyncio.sleep(1)  # one probe a second (pacing)
            await asyncio.sleep(max(0.0, end - time.monotonic()))
        healed = traffic.mark("healed")
        mesh_took = await measure(lambda: mesh_is_whole(stack), 90)
        took = await measure(lambda: deliveries_resumed(traffic, healed), 60)
        traffic.mark("recovered")
        if took is not None:
            await traffic.delivered(after=traffic.marks["recovered"])
    result = summarise(traffic, split=f"{node} from {', '.join(others)}",
                       mesh_whole_after_heal_s=mesh_took, delivery_after_heal_s=took,
                       minority_acks=[[str(a), t] for a, t in minority_acks])
    record("recovery on, partition: gateway-1's NATS node split from the other two", result)
    assert mesh_took is not None and took is not None, result
    check_every_acked_chat_once_in_order(traffic, result)
    assert minority_acks and all(isinstance(a, dict) and a.get("ok") is False and t <= 2.0
                                 for a, t in minority_acks), minority_acks
