"""Faults a user tries on the README's own local cluster (`python -m gateway cluster`).

Broker nodes are SIGKILLed under steady chat in both directions between the two
gateways; the launcher must restart them while the rest keeps serving, and
delivery must resume within 2 seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
import uuid

from gateway.processes import RedisNode, http_json
from tests.helpers import Loops, SioClient, owner_of, wait_for_condition
from tests.test_launcher import Launcher, child_pids, consecutive_free_ports, start_launcher, stop

#: how often each side sends while faults happen (seconds)
SEND_EVERY = 0.1
#: the longest a direction may go without a delivery while a broker node is down
MAX_GAP = 2.0


class Traffic:
    """Chat from a (on gw-1) to b (on gw-2) and back, every SEND_EVERY seconds."""

    def __init__(self, a: SioClient, b: SioClient, room: str) -> None:
        self.a, self.b, self.room = a, b, room
        self.sent = {"a": 0, "b": 0}
        self._loops = Loops()
        for c in (a, b):
            self._loops.start(self._send(c))

    async def _send(self, c: SioClient) -> None:
        while self._loops.running:
            self.sent[c.name] += 1
            await c.sio.emit("chat", {"room": self.room, "text": f"{c.name}-{self.sent[c.name]}"})
            await asyncio.sleep(SEND_EVERY)  # paces the traffic

    async def stop(self) -> None:
        await self._loops.stop()

    def longest_gap(self, receiver: SioClient, since: float, until: float) -> float:
        """The longest time ``receiver`` went without a chat between ``since`` and ``until``."""
        times = [since] + [t for (name, _), t in zip(receiver.events, receiver.times,
                                                     strict=True)
                           if name == "chat" and since <= t <= until] + [until]
        return max(b - a for a, b in itertools.pairwise(times))


async def chatting(launcher: Launcher, clients: list[SioClient]) -> tuple[Traffic, str]:
    urls = launcher.gateway_urls()
    room = f"faults-{uuid.uuid4().hex[:6]}"
    a, b = SioClient("a"), SioClient("b")
    clients += [a, b]
    await a.connect(urls[0])
    await b.connect(urls[1])
    await a.join(room)
    await b.join(room)
    traffic = Traffic(a, b, room)
    await a.wait_for(lambda c: len(c.texts()) >= 5, what="traffic from b")
    await b.wait_for(lambda c: len(c.texts()) >= 5, what="traffic from a")
    return traffic, room


async def assert_delivery_resumes(traffic: Traffic, killed_at: float, what: str) -> None:
    """Both directions receive again, and neither went MAX_GAP without a delivery."""
    await asyncio.sleep(MAX_GAP + 1.0)  # the window observed for gaps (not a wait)
    until = time.monotonic()
    for receiver in (traffic.a, traffic.b):
        gap = traffic.longest_gap(receiver, killed_at, until)
        print(f"\n{what}: longest gap at {receiver.name}: {gap * 1000:.0f} ms")
        assert gap < MAX_GAP, f"{receiver.name} got nothing for {gap:.2f} s after {what}"


def all_healthy(launcher: Launcher) -> bool:
    return all(http_json(f"{url}/healthz")[0] == 200 for url in launcher.gateway_urls())


def nats_pid(launcher: Launcher, name: str) -> int:
    pids = child_pids(launcher, lambda cmd, env: f"NATS_SERVER_NAME={name}\0".encode() in env
                      and b"nats-server" in cmd)
    assert len(pids) == 1, (name, pids)
    return pids[0]


async def test_killing_nats_nodes_under_chat_in_both_directions(
        clients: list[SioClient]) -> None:
    launcher = start_launcher("--port", str(consecutive_free_ports(2)))
    traffic = None
    try:
        traffic, _ = await chatting(launcher, clients)
        names = {f"nats://127.0.0.1:{client}": name
                 for name, (client, _) in launcher.nats_nodes().items()}
        # first the node gw-1 uses; then two at once: the one gw-2 uses and another
        for count, gateway in ((1, 0), (2, 1)):
            await asyncio.to_thread(wait_until_healthy, launcher)
            url = launcher.gateway_urls()[gateway]
            used = names[http_json(f"{url}/healthz")[1]["broker"]["server"]]
            victims = list(dict.fromkeys([used, *sorted(names.values())]))[:count]
            killed_at = time.monotonic()
            for name in victims:
                os.kill(nats_pid(launcher, name), signal.SIGKILL)
            for name in victims:
                await launcher.wait_line(rf"{name} \(pid \d+\) exited with code -9; restarting")
            await assert_delivery_resumes(traffic, killed_at, f"SIGKILL of {', '.join(victims)}")
            for name in victims:
                await launcher.wait_line(rf"{name} is back")
        await asyncio.to_thread(wait_until_healthy, launcher)
        assert launcher.proc.poll() is None
        received_before = [len(traffic.a.texts()), len(traffic.b.texts())]
        await wait_for_condition(lambda: len(traffic.a.texts()) > received_before[0]
                                 and len(traffic.b.texts()) > received_before[1],
                                 "chats in both directions after the restarts")
        assert len(traffic.a.texts()) > received_before[0]
        assert len(traffic.b.texts()) > received_before[1]
    finally:
        if traffic is not None:
            await traffic.stop()
        if launcher.proc.poll() is None:
            stop(launcher)


def wait_until_healthy(launcher: Launcher, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not all_healthy(launcher):
        assert time.monotonic() < deadline, "a gateway's /healthz stayed unhealthy"
        time.sleep(0.1)  # poll interval


async def test_killing_the_rooms_redis_master_under_chat(clients: list[SioClient]) -> None:
    launcher = start_launcher("--backend", "redis-sharded",
                              "--port", str(consecutive_free_ports(2)))
    traffic = None
    try:
        traffic, room = await chatting(launcher, clients)
        masters = [RedisNode(name, "127.0.0.1", port)
                   for name, port in launcher.redis_nodes().items()]
        victim = owner_of(masters, f"sio.room._2F.{room}")
        pids = child_pids(launcher, lambda cmd, env: b"redis-server" in cmd
                          and f"127.0.0.1:{victim.port}".encode() in cmd)  # its title
        assert len(pids) == 1, pids
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        await launcher.wait_line(rf"{victim.name} \(pid \d+\) exited with code -9; restarting")
        await assert_delivery_resumes(traffic, killed_at, f"SIGKILL of {victim.name}")
        await launcher.wait_line(rf"{victim.name} is back")
        await asyncio.to_thread(wait_until_healthy, launcher)
        assert launcher.proc.poll() is None
    finally:
        if traffic is not None:
            await traffic.stop()
        if launcher.proc.poll() is None:
            stop(launcher)
