"""No sticky sessions: the official socket.io-client in its default mode (polling,
then the websocket upgrade) through a round-robin front without affinity, in front
of 2 and of 4 ``gateway serve`` processes on the NATS cluster.

Each of the client's HTTP connections goes to the next gateway, so its polls, its
CONNECT and its upgrade land on gateways that do not own its session; they are
served through the owner (gateway/forwarding.py). Every client connects without a
connect_error, upgrades, joins, and every chat reaches every other client exactly
once, none echoed, in both directions between gateways.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.processes import (
    GatewayNode,
    NatsCluster,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from tests.conftest import TEST_LINGER, broker_args
from tests.helpers import (
    INTEREST_PROPAGATION,
    REPO,
    SETTLE,
    WAIT,
    NodeClient,
    read_metric,
    wait_for_condition,
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


@pytest.mark.parametrize("count", [2, 4])
async def test_default_mode_clients_chat_through_a_round_robin_front(
        four_gateways: list[GatewayNode], node_bin: str, node_clients: list[NodeClient],
        count: int) -> None:
    gateways = four_gateways[:count]
    before = await forwarded(gateways)
    front = await Front(*(("127.0.0.1", g.port) for g in gateways)).start()
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
    before = await forwarded(gateways)
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
        assert await forwarded(gateways) > before, "nothing crossed between gateways"
    finally:
        if page is not None:
            await page.close()
        await front.close()
