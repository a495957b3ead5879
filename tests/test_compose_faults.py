"""Network faults between hosts, on the compose compose_stack: each node has its own address,
so links can fail one at a time (iptables rules inside a container's network
namespace, tests/containers.py). Measured from the host through each gateway's
compose-network address: delivery gap, messages lost, time to recover, and what /healthz said.

Every run appends its measurements to bench-results/reliability/results.jsonl;
docs/RELIABILITY.md reports them. Reproduce with
``scripts/test tests/test_compose_faults.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.processes import http_json
from tests.containers import (
    NATS_NODES,
    ComposeStack,
    mesh_is_whole,
    nats_service_of,
    packet_loss,
    partition,
)
from tests.helpers import SioClient, connect_all
from tests.traffic import Flow, Traffic, record, wait_for

#: the first test may build the images (a few minutes on a cold cache)
pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]


@pytest.fixture
async def traffic(compose_stack: ComposeStack, request: pytest.FixtureRequest
                  ) -> AsyncIterator[Traffic]:
    """Chat both ways between a client on each gateway, in a room of the test's own."""
    made: list[SioClient] = []
    await asyncio.to_thread(compose_stack.wait_healthy, 60)
    try:
        a, b = await connect_all(made, [("on-gw-1", compose_stack.gateway_urls[0]),
                                        ("on-gw-2", compose_stack.gateway_urls[1])])
        room = request.node.name
        for c in (a, b):
            await c.join(room)
        yield Traffic([Flow("gw1-to-gw2", a, b, room), Flow("gw2-to-gw1", b, a, room)],
                      compose_stack.gateway_urls)
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)
    # the next test starts from a whole mesh
    await wait_for(lambda: mesh_is_whole(compose_stack), 60, "the mesh to be whole again")


def deliveries_resumed(traffic: Traffic, since: float, window: float = 1.0) -> bool:
    """Both flows delivered something sent after ``since`` within the last ``window``."""
    now = time.monotonic()
    for flow in traffic.flows:
        arrivals = flow.arrivals()
        recent = [t for s, t in arrivals.items() if flow.sent.get(s, 0) >= since]
        if not recent or now - max(recent) > window:
            return False
    return True


async def measure(check: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``check()`` holds (polled in a thread), or None after ``timeout``."""
    start = time.monotonic()
    while not await asyncio.to_thread(check):
        if time.monotonic() - start > timeout:
            return None
        await asyncio.sleep(0.25)  # poll interval
    return round(time.monotonic() - start, 2)


METRICS = ("gateway_broker_connected", "gateway_broker_losses_total",
           "gateway_broker_publish_errors_total")


def summarise(traffic: Traffic, **extra: object) -> dict[str, object]:
    return {"flows": [traffic.flow_report(f) for f in traffic.flows],
            "health": [traffic.health_report(i) for i in (0, 1)],
            "metrics_delta": traffic.metric_deltas(METRICS),
            **extra}


async def test_gateway_partitioned_from_its_nats_node(
        compose_stack: ComposeStack, traffic: Traffic) -> None:
    """gateway-1 can no longer reach the NATS node it is connected to (the other two
    still can, and so can its clients). It must notice, move to another node and
    carry traffic both ways again while the partition lasts."""
    node = nats_service_of(compose_stack, 0)
    async with traffic.running():
        await traffic.delivered()
        fault = traffic.mark("fault")
        with partition(compose_stack, compose_stack.replica(0), [node]):
            took = await measure(lambda: deliveries_resumed(traffic, fault + 0.5)
                                 and nats_service_of(compose_stack, 0) != node, 60)
            traffic.mark("recovered")
            if took is not None:  # what is asserted: traffic from here, through another node
                await traffic.delivered(after=traffic.marks["recovered"])
        traffic.mark("healed")
        if took is not None:
            await traffic.delivered(after=traffic.marks["healed"])
    result = summarise(traffic, partitioned=f"gateway-1 from {node}", recovered_after_s=took)
    record("partition: gateway-1 from its NATS node", result)
    assert took is not None, f"gateway-1 did not carry traffic through another node: {result}"
    for flow in traffic.flows:
        after = traffic.flow_report(flow, since=traffic.marks["recovered"])
        assert after["lost"] == 0, after


async def test_nats_node_split_from_the_other_two(
        compose_stack: ComposeStack, traffic: Traffic) -> None:
    """gateway-1's NATS node loses both routes (split brain of the mesh) for 20 s while
    gateway-1 stays connected to it; then the split heals. Measures what crosses
    meanwhile and how soon the mesh and delivery recover after it heals."""
    node = nats_service_of(compose_stack, 0)
    others = [n for n in NATS_NODES if n != node]
    async with traffic.running():
        await traffic.delivered()
        traffic.mark("fault")
        with partition(compose_stack, node, others):
            await asyncio.sleep(20)  # the fault: split for 20 s (its length, not a wait)
        healed = traffic.mark("healed")
        mesh_took = await measure(lambda: mesh_is_whole(compose_stack), 90)
        took = await measure(lambda: deliveries_resumed(traffic, healed), 60)
        traffic.mark("recovered")
        if took is not None:  # what is asserted: traffic from here
            await traffic.delivered(after=traffic.marks["recovered"])
    result = summarise(traffic, split=f"{node} from {', '.join(others)}",
                       mesh_whole_after_heal_s=mesh_took, delivery_after_heal_s=took)
    record("partition: gateway-1's NATS node split from the other two", result)
    assert mesh_took is not None and took is not None, result
    for flow in traffic.flows:
        after = traffic.flow_report(flow, since=traffic.marks["recovered"])
        assert after["lost"] == 0, after


@pytest.mark.parametrize("probability", [0.2])
async def test_packet_loss_between_a_gateway_and_nats(
        compose_stack: ComposeStack, traffic: Traffic, probability: float) -> None:
    """A lossy link: each packet between gateway-1 and every NATS node is dropped with
    ``probability`` for 15 s. TCP retransmits: nothing is lost, delivery is late."""
    async with traffic.running(settle=5):
        await traffic.delivered()
        traffic.mark("fault")
        with packet_loss(compose_stack, compose_stack.replica(0), list(NATS_NODES),
                         probability):
            await asyncio.sleep(15)  # the fault: a lossy link for 15 s (its length)
        await traffic.delivered(after=traffic.mark("healed"))
    result = summarise(traffic, loss=probability)
    record(f"packet loss {probability:.0%} between gateway-1 and NATS", result)
    for flow in result["flows"]:  # type: ignore[attr-defined]
        assert flow["lost"] == 0, flow
    for url in compose_stack.gateway_urls:
        assert http_json(f"{url}/healthz")[0] == 200
