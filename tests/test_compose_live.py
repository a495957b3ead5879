"""The shipped docker-compose.yml, run: 3 NATS nodes, 2 gateway replicas and the
balancer in containers (podman behind docker-compose, tests/containers.py). Clients
are put on a chosen gateway through its compose-network address (nothing but the
balancer is published; tests/test_compose_balancer.py goes through it, as users do).

Brokers are stopped, killed and crashed under chat traffic; compose's restart policy
brings crashed containers back. The redis profile runs the same way.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import pytest

from gateway.processes import RedisNode, http_json
from nats_adapter.naming import ChannelNames
from tests.conftest import ERROR_COUNTERS
from tests.containers import (
    NATS_NODES,
    TEST_PASSWORDS,
    ComposeStack,
    Images,
    Podman,
    mesh_is_whole,
    nats_service_of,
    routes_carry_interest,
    served_by_other_than,
)
from tests.helpers import WAIT, NodeClient, SioClient, connect_all, metrics_of, owner_of
from tests.test_sealed_bus import forge
from tests.traffic import Flow, Traffic, record, wait_for

#: the first test may build the images (a few minutes on a cold cache)
pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

@pytest.fixture
async def pair(compose_stack: ComposeStack) -> AsyncIterator[list[SioClient]]:
    """One python-socketio client on each gateway (reconnecting clients are new ones)."""
    made: list[SioClient] = []
    try:
        yield await connect_all(made, [("on-gw-1", compose_stack.gateway_urls[0]),
                                       ("on-gw-2", compose_stack.gateway_urls[1])])
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


async def cross_traffic(pair: list[SioClient], room: str, urls: list[str]) -> Traffic:
    a, b = pair
    for c in (a, b):
        await c.join(room)
    return Traffic([Flow("gw1-to-gw2", a, b, room), Flow("gw2-to-gw1", b, a, room)], urls)


async def test_official_client_chats_across_the_two_gateways(
        compose_stack: ComposeStack, node_bin: str) -> None:
    a = await NodeClient.start(node_bin, compose_stack.gateway_urls[0], "js-gw-1")
    b = await NodeClient.start(node_bin, compose_stack.gateway_urls[1], "js-gw-2")
    try:
        for c in (a, b):
            assert await c.call("join", "containers") == {"ok": True, "room": "containers"}
        subject = ChannelNames().room("/", "containers")
        await wait_for(lambda: routes_carry_interest(compose_stack, subject), 10,
                       "every NATS node to know of the room's subscribers")
        assert (await a.call("chat", {"room": "containers", "text": "from gw-1"}))["ok"]
        assert (await b.call("chat", {"room": "containers", "text": "from gw-2"}))["ok"]
        await b.wait_for(lambda c: c.texts() == ["from gw-1"], what="gw-1's chat")
        await a.wait_for(lambda c: c.texts() == ["from gw-2"], what="gw-2's chat")
    finally:
        await asyncio.gather(a.close(), b.close())
    for i, url in enumerate(compose_stack.gateway_urls):
        status, body = http_json(f"{url}/healthz")
        assert status == 200 and body["broker_connected"] is True
        assert "broker" not in body, "the public port answers the minimal /healthz"
        assert http_json(f"{url}/metrics")[0] == 404, "no /metrics on the public port"
        metrics = metrics_of(compose_stack.admin_url(i))
        moved = {m: metrics.get(m) for m in ERROR_COUNTERS.values() if metrics.get(m)}
        assert not moved, f"{url}: error counters moved: {moved}"


def test_brokers_and_monitoring_are_not_published(compose_stack: ComposeStack) -> None:
    """Only the balancer has a host port; the gateways and NATS (client, route,
    monitoring) have none."""
    assert list(compose_stack.published("balancer")) == ["8000/tcp"]
    for name in (*NATS_NODES, compose_stack.replica(0), compose_stack.replica(1)):
        assert compose_stack.published(name) == {}, name


async def test_forged_envelopes_with_a_gateway_password_change_nothing(
        compose_stack: ComposeStack) -> None:
    """The stack as shipped, so sealed (compose requires GATEWAY_CLUSTER_KEY), its
    stream provisioned by jetstream-init: the gateways' NATS password, used from inside the
    compose network, forges a cluster fetch (unsealed it returned every socket's
    Cookie header), a cluster-wide disconnect and a DISCONNECT of one socket. No
    reply, nobody disconnected, chat still flows."""
    init = compose_stack.inspect("jetstream-init")["State"]
    assert (init["Status"], init["ExitCode"]) == ("exited", 0), init
    made: list[SioClient] = []
    try:
        victim = SioClient("victim")
        made.append(victim)
        await victim.sio.connect(compose_stack.gateway_urls[0], transports=["websocket"],
                                 wait_timeout=WAIT, headers={"Cookie": "session=compose-victim"})
        (peer,) = await connect_all(made, [("peer", compose_stack.gateway_urls[1])])
        for c in (victim, peer):
            await c.join("forged")
        url = f"nats://{compose_stack.ip('nats-1')}:4222"
        replies = await forge(url, TEST_PASSWORDS["NATS_GATEWAY_PASSWORD"], victim.sid)
        assert replies == [], replies
        assert victim.sio.connected and peer.sio.connected
        await peer.chat("forged", "sealed")
        await victim.wait_texts(["sealed"])
    finally:
        await asyncio.gather(*(x.close() for x in made), return_exceptions=True)


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_nats_container_stopped_under_traffic_then_started(
        compose_stack: ComposeStack, pair: list[SioClient], how: str) -> None:
    """``docker-compose stop``/``kill`` of the NATS node gateway-1 uses, under traffic:
    gateway-1 fails over to another node and traffic resumes; compose does not restart a
    container stopped by hand (as Docker), ``start`` brings it back into the mesh."""
    victim = nats_service_of(compose_stack, 0)
    traffic = await cross_traffic(pair, f"stop-{how}", compose_stack.gateway_urls)
    async with traffic.running():
        await traffic.delivered()
        fault = traffic.mark("fault")
        await asyncio.to_thread(compose_stack.compose, how, victim)
        # gateway-1 serves through another node and traffic flows again
        await wait_for(lambda: served_by_other_than(compose_stack, 0, victim), 30,
                       "gateway-1 to move to another NATS node")
        await traffic.delivered(after=fault + 1)
        assert compose_stack.inspect(victim)["State"]["Status"] == "exited", "restarted by itself"
        traffic.mark("restart")
        await asyncio.to_thread(compose_stack.compose, "start", victim)
        await wait_for(lambda: mesh_is_whole(compose_stack), 30, "the mesh to be whole again")
        await traffic.delivered(after=traffic.marks["restart"] + 2)
    flows = [traffic.flow_report(f) for f in traffic.flows]
    record(f"docker-compose {how} {victim} (gateway-1's node), then start",
           {"flows": flows, "health": [traffic.health_report(i) for i in (0, 1)]})
    for report in flows:
        assert report["max_gap_s"] < 15, report
    # traffic after the node came back is whole
    for flow in traffic.flows:
        late = traffic.flow_report(flow, since=traffic.marks["restart"] + 2)
        assert late["lost"] == 0 and late["delivered"] > 0, late


async def test_crashed_nats_container_is_restarted_by_the_policy(
        compose_stack: ComposeStack, pair: list[SioClient]) -> None:
    """The nats-server process of a node dies (SIGKILL by its PID): compose's
    ``restart: unless-stopped`` starts it again and it rejoins the mesh."""
    victim = nats_service_of(compose_stack, 1)
    before = compose_stack.inspect(victim)["RestartCount"]
    traffic = await cross_traffic(pair, "crash-nats", compose_stack.gateway_urls)
    async with traffic.running():
        await traffic.delivered()
        traffic.mark("fault")
        os.kill(compose_stack.pid(victim), signal.SIGKILL)
        await wait_for(lambda: compose_stack.inspect(victim)["RestartCount"] > before, 30,
                       f"{victim} to be restarted")
        await wait_for(lambda: mesh_is_whole(compose_stack), 30, "the mesh to be whole again")
        # the gateway that was on it may still be reconnecting (the restarted node
        # can come back before the gateway's next try)
        await asyncio.to_thread(compose_stack.wait_healthy, 30)
        await traffic.delivered(after=traffic.mark("restart"))
    flows = [traffic.flow_report(f) for f in traffic.flows]
    record(f"nats-server of {victim} (gateway-2's node) killed, restart policy",
           {"flows": flows, "health": [traffic.health_report(i) for i in (0, 1)]})
    for flow in traffic.flows:
        late = traffic.flow_report(flow, since=traffic.marks["restart"])
        assert late["lost"] == 0 and late["delivered"] > 0, late


async def test_crashed_gateway_is_restarted_and_the_other_keeps_serving(
        compose_stack: ComposeStack) -> None:
    """gateway-1's process dies: its clients are cut off, gateway-2's keep chatting
    without a gap; the restart policy brings gateway-1 back and it serves across."""
    made: list[SioClient] = []
    try:
        a, b, c = await connect_all(made, [("gw2-a", compose_stack.gateway_urls[1]),
                                           ("gw2-b", compose_stack.gateway_urls[1]),
                                           ("gw1-c", compose_stack.gateway_urls[0])])
        for client in (a, b, c):
            await client.join("crash-gateway")
        traffic = Traffic([Flow("gw2-local", a, b, "crash-gateway")], compose_stack.gateway_urls)
        before = compose_stack.inspect("gateway_1")["RestartCount"]
        async with traffic.running():
            await traffic.delivered()
            traffic.mark("fault")
            os.kill(compose_stack.pid("gateway_1"), signal.SIGKILL)
            await wait_for(lambda: compose_stack.inspect("gateway_1")["RestartCount"] > before, 30,
                           "gateway-1 to be restarted")
            await wait_for(lambda: http_json(f"{compose_stack.gateway_urls[0]}/healthz")[0]
                           == 200, 30, "gateway-1 to serve again")
            await traffic.delivered()
        report = traffic.flow_report(traffic.flows[0])
        record("gateway-1 process killed, restart policy", {
            "flows": [report], "health": [traffic.health_report(i) for i in (0, 1)]})
        assert report["lost"] == 0 and report["max_gap_s"] < 1.0, report
        assert not c.sio.connected
        d = SioClient("gw1-after")
        made.append(d)
        await d.connect(compose_stack.gateway_urls[0])
        await d.join("crash-gateway")
        await d.chat("crash-gateway", "gateway-1 is back")
        await a.wait_for(lambda x: "gateway-1 is back" in x.texts(), WAIT, "the chat")
    finally:
        await asyncio.gather(*(x.close() for x in made), return_exceptions=True)


async def test_gateway_container_restarted(compose_stack: ComposeStack) -> None:
    """One gateway replica restarted (``docker restart <project>_gateway_2``: compose
    restarts a whole service, not one replica): it closes its sockets, comes back,
    serves."""
    made: list[SioClient] = []
    try:
        a, = await connect_all(made, [("gw2", compose_stack.gateway_urls[1])])
        await asyncio.to_thread(compose_stack.podman.run, "restart", "-t", "10",
                                compose_stack.container(compose_stack.replica(1)))
        await wait_for(lambda: not a.sio.connected, 10, "the old socket to be closed")
        await asyncio.to_thread(compose_stack.wait_healthy, 30)
        b, c = await connect_all(made, [("gw2-new", compose_stack.gateway_urls[1]),
                                        ("gw1", compose_stack.gateway_urls[0])])
        for client in (b, c):
            await client.join("restarted")
        await c.chat("restarted", "to the restarted gateway")
        await b.wait_texts(["to the restarted gateway"])
    finally:
        await asyncio.gather(*(x.close() for x in made), return_exceptions=True)


@pytest.fixture(scope="module")
async def redis_stack(podman: Podman, images: Images, compose_stack: ComposeStack
                      ) -> AsyncIterator[ComposeStack]:
    """The redis profile with GATEWAY_BACKEND=redis-sharded (after the NATS compose_stack is
    down: one compose_stack at a time on two cores)."""
    compose_stack.down()
    compose = ComposeStack(podman, images, backend="redis-sharded", profiles=("redis",))
    try:
        await asyncio.to_thread(compose.up, 120)
        yield compose
    finally:
        compose.down()


def room_owner(compose_stack: ComposeStack, room: str) -> str:
    """The redis service whose master owns ``room``'s shard channel, asked of Redis."""
    password = TEST_PASSWORDS["REDIS_ADMIN_PASSWORD"]
    services = ("redis-1", "redis-2", "redis-3")
    nodes = [RedisNode(s, compose_stack.ip(s), 7000, password=password) for s in services]
    return owner_of(nodes, ChannelNames().room("/", room)).name


async def test_redis_profile_chats_and_survives_a_master_crash_and_stop(
        redis_stack: ComposeStack) -> None:
    """The master owning the room's slot dies; the restart policy brings it back with its
    slots, and the gateways re-subscribe there. Then it is stopped and started by hand."""
    made: list[SioClient] = []
    try:
        a, b = await connect_all(made, [("a", redis_stack.gateway_urls[0]),
                                        ("b", redis_stack.gateway_urls[1])])
        for c in (a, b):
            await c.join("sharded")
        await a.chat("sharded", "over sharded pub/sub")
        await b.wait_texts(["over sharded pub/sub"])
        traffic = Traffic([Flow("gw1-to-gw2", a, b, "sharded"),
                           Flow("gw2-to-gw1", b, a, "sharded")], redis_stack.gateway_urls)
        victim = room_owner(redis_stack, "sharded")
        before = redis_stack.inspect(victim)["RestartCount"]
        async with traffic.running():
            await traffic.delivered()
            traffic.mark("fault")
            os.kill(redis_stack.pid(victim), signal.SIGKILL)
            await wait_for(lambda: redis_stack.inspect(victim)["RestartCount"] > before, 30,
                           f"{victim} to be restarted")
            # what is asserted is the traffic from 5 s after the restart on
            await traffic.delivered(count=20, after=traffic.mark("restart") + 5)
        flows = [traffic.flow_report(f) for f in traffic.flows]
        record(f"redis profile: {victim} (the room's master) killed, restart policy",
               {"flows": flows, "health": [traffic.health_report(i) for i in (0, 1)]})
        for flow in traffic.flows:
            late = traffic.flow_report(flow, since=traffic.marks["restart"] + 5)
            assert late["lost"] == 0 and late["delivered"] > 0, late

        # stopped by hand: its slots are unserved until it is started again
        traffic = Traffic([Flow("gw1-to-gw2-stop", a, b, "sharded"),
                           Flow("gw2-to-gw1-stop", b, a, "sharded")], redis_stack.gateway_urls)
        async with traffic.running():
            await traffic.delivered()
            traffic.mark("fault")
            await asyncio.to_thread(redis_stack.compose, "stop", victim)
            await asyncio.sleep(3)  # the fault: stopped for 3 s (its length, not a wait)
            await asyncio.to_thread(redis_stack.compose, "start", victim)
            # what is asserted is the traffic from 5 s after the start on
            await traffic.delivered(count=20, after=traffic.mark("restart") + 5)
        flows = [traffic.flow_report(f) for f in traffic.flows]
        record(f"redis profile: docker-compose stop {victim} (the room's master) for 3 s, "
               "then start", {"flows": flows,
                              "health": [traffic.health_report(i) for i in (0, 1)]})
        for flow in traffic.flows:
            late = traffic.flow_report(flow, since=traffic.marks["restart"] + 5)
            assert late["lost"] == 0 and late["delivered"] > 0, late
    finally:
        await asyncio.gather(*(x.close() for x in made), return_exceptions=True)


async def test_recovery_on_the_stream_the_operator_provisioned(
        podman: Podman, images: Images, compose_stack: ComposeStack) -> None:
    """GATEWAY_RECOVERY=on: the gateways, logged in as the role user who may not
    create or change JetStream, store and read on the stream and bucket jetstream-init
    made as the operator; nothing they need is refused. (After the other stacks: one
    at a time on two cores.)"""
    compose_stack.down()
    stack = ComposeStack(podman, images, variables={"GATEWAY_RECOVERY": "on"})
    made: list[SioClient] = []
    try:
        await asyncio.to_thread(stack.up, 120)
        a, b = await connect_all(made, [("a", stack.gateway_urls[0]),
                                        ("b", stack.gateway_urls[1])], offsets=True)
        for c in (a, b):
            await c.join("stored")
        await a.chat("stored", "kept in the stream")
        await b.wait_for(lambda c: c.texts() == ["kept in the stream"], what="the chat")
        ack = await b.call("join", {"room": "stored", "history": 5})
        assert [m["text"] for m in ack["history"]] == ["kept in the stream"], ack
        log = stack.logs("gateway", tail=400)  # every replica's
        assert "ermissions" not in log, f"a gateway was refused something:\n{log}"
    finally:
        await asyncio.gather(*(x.close() for x in made), return_exceptions=True)
        stack.down()
