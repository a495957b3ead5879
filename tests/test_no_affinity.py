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
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from gateway.processes import (
    GatewayNode,
    NatsCluster,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from tests.conftest import ERROR_COUNTERS, TEST_LINGER, broker_args
from tests.helpers import (
    REPO,
    SETTLE,
    WAIT,
    NodeClient,
    SioClient,
    metrics_of,
    read_metric,
    running,
    wait_for_condition,
    wait_interest_everywhere,
    wait_room_interest,
)
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
    # a client opens 4 connections up to its upgrade, the websocket mostly third
    # (after the handshake and the CONNECT): with 2 gateways each in turn twice, so
    # that upgrades land on the gateway that does not own their session
    turns = [g for g in gateways for _ in range(2)] if count == 2 else gateways
    front = await Front(*(("127.0.0.1", g.port) for g in turns)).start()
    try:
        room = f"rr-{count}"
        for i in range(2 * count):
            # spreads the handshakes (no promise: the clients before it take turns too)
            front.turn = i
            node_clients.append(await NodeClient.start(node_bin, front.url, f"c{i}",
                                                       transports=DEFAULT_MODE))
        for c in node_clients:
            await c.wait_for(lambda c: c.upgraded, what=f"{c.name} to upgrade")
            assert (await c.call("join", room))["ok"]
        assert not [e for c in node_clients for e in c.events if e["type"] == "connect_error"]
        await wait_interest_everywhere(room)
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


async def test_the_front_passes_a_connection_a_dead_gateway_refuses_to_the_next(
        four_gateways: list[GatewayNode]) -> None:
    """A balancer redispatches a connection its server refused; a front that closed
    it instead failed the request on it (status 0 in the client), and a reconnecting
    client whose requests came round to the dead gateway in step with the turn
    failed every attempt."""
    dead = ("127.0.0.1", free_ports(1)[0])  # nothing listens there
    live = ("127.0.0.1", four_gateways[0].port)
    front = await Front(dead, live).start()
    try:
        for i in range(4):  # a connection each, every other one to the dead gateway first
            # (by hand: aiohttp's client would retry a GET on a connection closed unanswered)
            reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
            writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{front.port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), WAIT)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 200 "), (i, answer)
        assert front.refused == {dead: 2} and front.sent == {live: 4}
    finally:
        await front.close()


class Page:
    """The chat page in headless Chromium, driven line by line (tests/js/browser_page.mjs)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def open(cls, node_bin: str, chromium_bin: str, url: str, home: Path) -> Page:
        proc = await asyncio.create_subprocess_exec(
            node_bin, str(REPO / "tests" / "js" / "browser_page.mjs"), url, chromium_bin,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(REPO),
            env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
        page = cls(proc)
        ready = await page.answer()
        assert ready.get("ready"), ready
        return page

    async def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line, f"the page's driver exited with {await self.proc.wait()}"
        answer: dict[str, Any] = json.loads(line)
        assert not answer.get("errors"), answer["errors"]
        return answer

    async def ask(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.answer()

    async def close(self) -> None:
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the driver closes the browser and exits
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.mark.browser
async def test_the_chat_page_in_chromium_through_a_round_robin_front(
        four_gateways: list[GatewayNode], nats_cluster: NatsCluster, node_bin: str,
        chromium_bin: str, node_clients: list[NodeClient], tmp_path: Path) -> None:
    """The page the gateways serve, loaded through the front over 2 gateways (its
    page, script and socket.io requests spread over both), chats both ways with a
    Node client on each gateway (so one is on a gateway that does not own the page's
    session): every chat once, the page upgraded, never reconnected, no error shown."""
    gateways = four_gateways[:2]

    async def crossed() -> float:
        """Requests one gateway passed to another, and sessions moved on upgrade: which
        of the two the page's session takes depends on how Chromium spreads its
        requests over its kept-alive connections (its room-count fetches take some)."""
        return await forwarded(gateways) + await labelled(
            gateways, "gateway_session_moves_total", 'outcome="moved"')

    before = await crossed()
    monitors = [n.monitor_url for n in nats_cluster.nodes]
    room = f"page-rr-{uuid.uuid4().hex[:6]}"
    front = await Front(*(("127.0.0.1", g.port) for g in gateways)).start()
    page: Page | None = None
    try:
        for i, g in enumerate(gateways):
            node_clients.append(await NodeClient.start(node_bin, g.url, f"n{i}"))
        page = await Page.open(node_bin, chromium_bin, front.url, tmp_path)
        assert await page.ask(join=room) == {"joined": room}
        for c in node_clients:
            assert (await c.call("join", room))["ok"]
        await wait_room_interest(monitors, room)
        await page.ask(send="from the page")
        assert await page.ask(upgraded=True) == {"transport": "websocket"}
        await page.ask(send="from the page, upgraded")
        for c in node_clients:
            assert (await c.call("chat", {"room": room, "text": f"from {c.name}"}))["ok"]
        expected = ["from n0", "from n1"]
        page_texts = ["from the page", "from the page, upgraded"]
        for c in node_clients:
            others = sorted(page_texts + [t for t in expected if t != f"from {c.name}"])
            await c.wait_for(lambda c, e=others: sorted(c.texts()) == e,
                             what=f"{c.name}: every other chat")

        async def page_has_all() -> bool:
            seen = await page.ask(look=True)
            return sorted(m["text"] for m in seen["messages"]) == expected

        await wait_for_condition(page_has_all, "the page: both Node clients' chats", WAIT)
        await asyncio.sleep(SETTLE)  # a window in which no duplicate may arrive
        seen = await page.ask(look=True)
        assert sorted(m["text"] for m in seen["messages"]) == expected, "a copy too many"
        for c in node_clients:
            assert len(c.texts()) == 3, f"{c.name}: a copy too many: {c.texts()}"
        assert len(seen["connects"]) == 1, f"the page reconnected: {seen['connects']}"
        assert seen["connected"] and seen["transport"] == "websocket"
        assert not [text for cls, text in seen["log"] if cls == "err"], seen["log"]
        owner = seen["connects"][0]["id"][:8]
        assert owner in {c.sid[:8] for c in node_clients}, "the page's session on no gateway?"
        assert set(front.sent) == {("127.0.0.1", g.port) for g in gateways}
        assert await crossed() > before, "nothing crossed between gateways"
    finally:
        if page is not None:
            await page.close()
        await front.close()


@pytest.fixture(scope="module")
def recovery_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A NATS cluster for gateways with --recovery alone (their stream and bucket)."""
    with running(NatsCluster(tmp_path_factory.mktemp("rr-recovery") / "nats", size=3)) as c:
        yield c


class Gateways(NamedTuple):
    cluster: NatsCluster
    gateways: list[GatewayNode]
    recovery: bool


@pytest.fixture(params=["plain", "recovery"])
def three_gateways(workdir: Path, request: pytest.FixtureRequest) -> Iterator[Gateways]:
    """Three ``gateway serve`` processes of their own (a test kills one), with
    connection state recovery or without, and their NATS cluster."""
    recovery = request.param == "recovery"
    cluster: NatsCluster = request.getfixturevalue("recovery_nats" if recovery
                                                   else "nats_cluster")
    procs: list[GatewayNode] = []
    tag = uuid.uuid4().hex[:4]
    try:
        for i, port in enumerate(free_ports(3)):
            procs.append(start_gateway(workdir / "no-affinity-kill", f"kill-gw-{i + 1}-{tag}",
                                       port, "nats", cluster.gateway_args(i),
                                       extra=["--unsubscribe-linger", str(TEST_LINGER),
                                              "--heartbeat-interval", "0.5",
                                              *(["--recovery", "on"] if recovery else [])]))
        wait_gateways(procs, timeout=40)
        yield Gateways(cluster, procs, recovery)
    finally:
        stop_all([p.child for p in procs])


def error_counts(gateways: list[GatewayNode]) -> dict[str, float]:
    return {f"{g.node_id}.{metric}": metrics_of(g.url).get(metric, 0.0)
            for g in gateways for metric in ERROR_COUNTERS.values()}


def connected(c: NodeClient) -> bool:
    """Whether the client's last word on its connection was that it connected."""
    states = [e for e in c.events if e["type"] in ("connect", "disconnect")]
    return bool(states) and states[-1]["type"] == "connect"


def connects(c: NodeClient) -> list[dict[str, Any]]:
    return [e for e in c.events if e["type"] == "connect"]


def last_sid(c: NodeClient) -> str:
    return str(connects(c)[-1]["sid"])


#: socket.io-client's automatic reconnection, quick and without jitter
RECONNECTING = {"reconnection": True, "reconnectionDelay": 200, "reconnectionDelayMax": 1000,
                "randomizationFactor": 0}


@pytest.mark.parametrize("kill", ["SIGTERM", "SIGKILL"])
async def test_a_gateway_killed_while_sessions_it_owns_are_polling(
        kill: str, three_gateways: Gateways, node_bin: str,
        node_clients: list[NodeClient]) -> None:
    """Clients through the round-robin front over 3 gateways, on each gateway one
    polling only and one in the default mode (upgraded), chat; one gateway is
    killed. The clients it owned reconnect to the survivors (with --recovery:
    recovered, same sid, still in the room); those the survivors own whose requests
    went through it carry on or reconnect (a websocket spliced through it, or a poll
    in flight there, dies with it: without recovery that client starts a new
    session); none is left stuck: every client chats again and every chat reaches
    every other client once. The survivors' error counters do not move."""
    cluster, gateways, recovery = three_gateways
    monitors = [n.monitor_url for n in cluster.nodes]
    room = f"kill-{uuid.uuid4().hex[:6]}"
    tags = {}  # node tag -> gateway
    for g in gateways:
        probe = await SioClient("probe").connect(g.url)
        tags[probe.sid[:8]] = g
        await probe.close()
    front = await Front(*(("127.0.0.1", g.port) for g in gateways)).start()
    try:
        for i in range(6):
            polling = i < 3
            node_clients.append(await NodeClient.start(
                node_bin, front.url, f"{'poll' if polling else 'default'}-{i % 3}",
                transports=("polling",) if polling else DEFAULT_MODE, **RECONNECTING))
        # the gateway that owns the first polling client's session is killed
        victim_tag = node_clients[0].sid[:8]
        victim = tags[victim_tag]
        survivors = [g for g in gateways if g is not victim]
        first_sids = [c.sid for c in node_clients]
        print(f"\nowners: {[tags[c.sid[:8]].node_id for c in node_clients]}")
        for c in node_clients[3:]:
            await c.wait_for(lambda c: c.upgraded, what=f"{c.name} to upgrade")
        for c in node_clients:
            assert (await c.call("join", room))["ok"]
        await wait_room_interest(monitors, room)
        for c in node_clients:
            assert (await c.call("chat", {"room": room, "text": f"before {c.name}"}))["ok"]
        for c in node_clients:
            expected = sorted(f"before {o.name}" for o in node_clients if o is not c)
            await c.wait_for(lambda c, e=expected: sorted(c.texts()) == e,
                             what=f"{c.name}: every other chat")
        errors_before = error_counts(survivors)

        child = victim.child
        assert child is not None
        child.signal(getattr(signal, kill))
        await wait_for_condition(lambda: not child.alive, f"{victim.node_id} to exit",
                                 timeout=15)
        for c in node_clients[:3]:  # (polling only: its session never moved)
            if c.sid[:8] == victim_tag:
                await c.wait_for(lambda c: connected(c) and len(connects(c)) > 1, timeout=15,
                                 what=f"{c.name} to reconnect to a survivor")
        if recovery:  # every session that came back was recovered, in its rooms
            for c, sid in zip(node_clients, first_sids, strict=True):
                assert all(e["recovered"] and e["sid"] == sid for e in connects(c)[1:]), \
                    (c.name, connects(c))
        else:
            for c in node_clients:
                # a new session is in no room: join again (a session that carried on
                # is already in it, and joining twice is fine)
                ack = await c.call("join", room, timeout=15)
                assert ack == {"ok": True, "room": room}, (c.name, ack, c.events[-6:])
                # (a session that moved off it on its upgrade carries on, named after it)
                assert last_sid(c)[:8] != victim_tag or len(connects(c)) == 1
        await wait_room_interest(monitors, room)
        for c in node_clients:
            ack = await c.call("chat", {"room": room, "text": f"after {c.name}"})
            assert ack["ok"], (c.name, ack)
        for c in node_clients:
            expected = sorted(f"after {o.name}" for o in node_clients if o is not c)
            await c.wait_for(
                lambda c, e=expected: sorted(t for t in c.texts() if t.startswith("after")) == e,
                what=f"{c.name}: every other chat after the kill")
        await asyncio.sleep(SETTLE)  # a window in which no duplicate may arrive
        for c in node_clients:
            after = [t for t in c.texts() if t.startswith("after")]
            assert len(after) == len(set(after)) == 5, f"{c.name}: {after}"
            assert connected(c), c.events[-6:]
        reconnected = {c.name: tags[sid[:8]].node_id
                       for c, sid in zip(node_clients, first_sids, strict=True)
                       if len(connects(c)) > 1}
        print(f"\n{kill}: {victim.node_id} killed; reconnected (first owner): {reconnected}")
        assert await asyncio.to_thread(error_counts, survivors) == errors_before
    finally:
        await front.close()
