"""No sticky sessions: the official socket.io-client in its default mode (polling,
then the websocket upgrade) through a round-robin front without affinity, in front
of 2 and of 4 ``gateway serve`` processes on the NATS cluster.

Each of the client's HTTP connections goes to the next gateway, so its polls, its
CONNECT and its upgrade land on gateways that do not own its session; polls are
served through the owner (gateway/forwarding.py), and an upgrade moves its session
to the gateway it landed on (nats_adapter/handover.py). Every client connects
without a connect_error, upgrades, joins, and every chat reaches every other client
exactly once, none echoed, in both directions between gateways.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.processes import GatewayNode, free_ports, start_gateway, stop_all, wait_gateways
from tests.conftest import TEST_LINGER, broker_args
from tests.helpers import INTEREST_PROPAGATION, SETTLE, NodeClient, metrics_of, read_metric
from tools.bench.front import Front

DEFAULT_MODE = ("polling", "websocket")


@pytest.fixture(scope="module")
def four_gateways(workdir: Path, request: pytest.FixtureRequest) -> Iterator[list[GatewayNode]]:
    procs: list[GatewayNode] = []
    try:
        for i, port in enumerate(free_ports(4)):
            procs.append(start_gateway(workdir / "no-affinity", f"rr-gw-{i + 1}", port, "nats",
                                       broker_args("nats", request, i % 2),
                                       extra=["--unsubscribe-linger", str(TEST_LINGER)]))
        wait_gateways(procs)
        yield procs
    finally:
        stop_all([p.child for p in procs])


@pytest.fixture
async def node_clients(node_bin: str) -> AsyncIterator[list[NodeClient]]:
    made: list[NodeClient] = []
    try:
        yield made
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


async def forwarded(gateways: list[GatewayNode]) -> float:
    return sum([await read_metric(g.url, "gateway_forwarded_requests_total")
                for g in gateways])


async def labelled(gateways: list[GatewayNode], name: str, label: str) -> float:
    """Metric ``name`` with ``label`` among its labels, summed over ``gateways``."""
    total = 0.0
    for g in gateways:
        found = await asyncio.to_thread(metrics_of, g.url)
        total += sum(v for k, v in found.items() if k.startswith(name + "{") and label in k)
    return total


@pytest.mark.parametrize("count", [2, 4])
async def test_default_mode_clients_chat_through_a_round_robin_front(
        four_gateways: list[GatewayNode], node_bin: str, node_clients: list[NodeClient],
        count: int) -> None:
    gateways = four_gateways[:count]
    before = await forwarded(gateways)
    moved_before = await labelled(gateways, "gateway_session_moves_total", 'outcome="moved"')
    spliced_before = await labelled(gateways, "gateway_forwarded_requests_total",
                                    'kind="websocket"')
    # a client opens 4 connections up to its upgrade, the websocket third (after the
    # handshake and the CONNECT): with 2 gateways, each in turn twice, so the upgrade
    # lands on the gateway that does not own the session
    turns = [g for g in gateways for _ in range(2)] if count == 2 else gateways
    front = await Front(*(("127.0.0.1", g.port) for g in turns)).start()
    try:
        room = f"rr-{count}"
        for i in range(2 * count):
            front.turn = i  # one session owned by each gateway at least
            node_clients.append(await NodeClient.start(node_bin, front.url, f"c{i}",
                                                       transports=DEFAULT_MODE))
        for c in node_clients:
            await c.wait_for(lambda c: c.upgraded, what=f"{c.name} to upgrade")
            assert (await c.call("join", room))["ok"]
        assert not [e for c in node_clients for e in c.events if e["type"] == "connect_error"]
        await asyncio.sleep(INTEREST_PROPAGATION)
        for c in node_clients:
            assert (await c.call("chat", {"room": room, "text": f"from {c.name}"}))["ok"]
        for c in node_clients:
            expected = sorted(f"from {o.name}" for o in node_clients if o is not c)
            await c.wait_for(lambda c, e=expected: sorted(c.texts()) == e,
                             what=f"{c.name}: every other chat")
        await asyncio.sleep(SETTLE)  # nothing more may come
        for c in node_clients:
            assert sorted(c.texts()) == sorted(f"from {o.name}" for o in node_clients
                                               if o is not c), f"{c.name}: a copy too many"
        assert set(front.sent) == {("127.0.0.1", g.port) for g in gateways}
        assert await forwarded(gateways) > before, "nothing crossed between gateways"
        # the upgrades that landed on another gateway than their session's moved it
        # there (none was spliced)
        moved = await labelled(gateways, "gateway_session_moves_total", 'outcome="moved"')
        assert moved - moved_before > 0, "no session moved"
        assert await labelled(gateways, "gateway_forwarded_requests_total",
                              'kind="websocket"') == spliced_before, "an upgrade was spliced"
    finally:
        await front.close()
