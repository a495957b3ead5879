"""Two releases in one cluster, as a rolling upgrade has them: the previous release
(the last one that landed, taken from git) and this one, on one NATS cluster with
the same cluster key. Chats cross both ways while one gateway runs each release,
and again after the old one is restarted as the new one; the gateway that stays up
keeps its clients and drops nothing as malformed, rejected or undecodable."""

from __future__ import annotations

import signal
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway.processes import (
    GatewayNode,
    NatsCluster,
    free_ports,
    spawn,
    start_gateway,
    stop_all,
    wait_gateways,
)
from gateway.processes.gateways import gateway_argv, sealing_env
from tests.helpers import REPO, SioClient, read_metric
from tests.test_recovery import DefaultClient, until
from tools.bench.front import Front

#: the previous release: the last commit that landed (stop 29)
PREVIOUS_RELEASE = "5c2089d"
#: error counters that must not move on either release while they share a cluster
ERRORS = ("gateway_broker_messages_malformed_total", "gateway_broker_messages_rejected_total",
          "gateway_broker_messages_failed_total", "gateway_broker_publish_errors_total")


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The previous release's source tree (git archive of PREVIOUS_RELEASE)."""
    folder = tmp_path_factory.mktemp("previous-release")
    archive = folder / "release.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), PREVIOUS_RELEASE],
                   check=True, capture_output=True, timeout=60)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "src", filter="data")
    yield folder / "src"


def start_previous(source: Path, workdir: Path, node_id: str, port: int,
                   cluster: NatsCluster, *extra: str) -> GatewayNode:
    """A gateway of the previous release: its own code (run from its tree), this
    checkout's virtualenv (the same pinned dependencies)."""
    node = GatewayNode(node_id, "127.0.0.1", port)
    argv = gateway_argv(node_id, "127.0.0.1", port, "nats", [*cluster.gateway_args(), *extra])
    node.child = spawn(node_id, argv, workdir, env=sealing_env("nats", None), cwd=source)
    return node


async def metrics_text(gw: GatewayNode) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/metrics") as answer:
        assert answer.status == 200
        return await answer.text()


async def errors_of(gw: GatewayNode) -> float:
    return sum([await read_metric(gw.url, name) for name in ERRORS])


async def chat_both_ways(a: SioClient, b: SioClient, room: str, tag: str) -> None:
    """a -> b and b -> a, each exactly once."""
    for sender, receiver in ((a, b), (b, a)):
        text = f"{tag}: {sender.name} to {receiver.name}"
        await sender.chat(room, text)
        await receiver.wait_for(lambda r, t=text: t in r.texts(), what=text)
        assert receiver.texts().count(text) == 1


async def test_the_previous_release_and_this_one_share_a_cluster(
        previous_release: Path, nats_cluster: NatsCluster, tmp_path: Path,
        clients: list[SioClient]) -> None:
    port_a, port_b = free_ports(2)
    suffix = uuid.uuid4().hex[:4]
    old = start_previous(previous_release, tmp_path / "old", f"old-{suffix}", port_a,
                         nats_cluster)
    new_b = start_gateway(tmp_path / "new", f"new-b-{suffix}", port_b, "nats",
                          nats_cluster.gateway_args())
    running = [old, new_b]
    try:
        wait_gateways([old, new_b], timeout=40)
        # each runs its own release: only this one moves sessions (and counts it)
        assert "gateway_session_moves_total" not in await metrics_text(old)
        assert "gateway_session_moves_total" in await metrics_text(new_b)
        room = f"mixed-{suffix}"
        a, b = SioClient("a"), SioClient("b")
        clients += [a, b]
        await a.connect(old.url)
        await b.connect(new_b.url)
        await a.join(room)
        await b.join(room)
        await chat_both_ways(a, b, room, "old and new")
        # socket.io-client's default mode through a round-robin front over both: its
        # requests and its upgrade land on either release (no move while one is old)
        front = await Front(("127.0.0.1", port_a), ("127.0.0.1", port_b)).start()
        try:
            c = SioClient("c", connection_per_request=True)
            clients.append(c)
            await c.connect(front.url, transports=["polling", "websocket"])
            await c.join(room)
            await chat_both_ways(c, a, room, "through the front")
            await chat_both_ways(c, b, room, "through the front")
        finally:
            await front.close()
        assert await errors_of(new_b) == 0 and await errors_of(old) == 0

        # the old gateway is restarted as this release; b stays connected to the other
        stop_all([old.child])
        new_a = start_gateway(tmp_path / "new", f"new-a-{suffix}", port_a, "nats",
                              nats_cluster.gateway_args())
        running.append(new_a)
        wait_gateways([new_a], timeout=40)
        a2 = SioClient("a2")
        clients.append(a2)
        await a2.connect(new_a.url)
        await a2.join(room)
        await chat_both_ways(a2, b, room, "both new")
        assert b.sio.connected, "the gateway that stayed up kept its client"
        assert await errors_of(new_b) == 0 and await errors_of(new_a) == 0
    finally:
        stop_all([g.child for g in running])


async def test_a_session_of_the_previous_release_is_recovered_by_this_one(
        previous_release: Path, nats_cluster: NatsCluster, tmp_path: Path,
        clients: list[SioClient], node_bin: str) -> None:
    """With --recovery on both: socket.io-client (default options) on a gateway of
    the previous release, chat flowing to it from this release's; the old gateway
    is stopped for the upgrade (SIGTERM) and started again as this release on the
    same address. The client reconnects there: recovered, same sid, every chat sent
    meanwhile once and in order."""
    port_a, port_b = free_ports(2)
    suffix = uuid.uuid4().hex[:4]
    recovery = ("--recovery", "on", "--heartbeat-interval", "0.5")
    old = start_previous(previous_release, tmp_path / "old", f"old-{suffix}", port_a,
                         nats_cluster, *recovery)
    new_b = start_gateway(tmp_path / "new", f"new-b-{suffix}", port_b, "nats",
                          nats_cluster.gateway_args(), extra=recovery)
    running = [old, new_b]
    room = f"mixed-rec-{suffix}"
    js = None
    try:
        wait_gateways([old, new_b], timeout=40)
        b = SioClient("b", offsets=True)
        clients.append(b)
        await b.connect(new_b.url)
        await b.join(room)
        js = await DefaultClient.start(node_bin, old.url, "js")
        assert (await js.call("join", room))["ok"] is True
        first = js.connects()[0]
        sent = []
        for n in range(5):
            sent.append(f"before-{n}")
            await b.chat(room, sent[-1])
        await until(lambda: len(js.chats()) == 5)

        assert old.child is not None
        old.child.signal(signal.SIGTERM)  # the rolling upgrade takes the old one down
        await until(lambda: not old.child.alive, timeout=30)
        for n in range(5):
            sent.append(f"meanwhile-{n}")
            await b.chat(room, sent[-1])
        new_a = start_gateway(tmp_path / "new", f"new-a-{suffix}", port_a, "nats",
                              nats_cluster.gateway_args(), extra=recovery)
        running.append(new_a)
        wait_gateways([new_a], timeout=40)
        await until(lambda: len(js.connects()) >= 2, timeout=30)
        again = js.connects()[-1]
        assert again["recovered"] is True, js.events[-10:]
        assert again["sid"] == first["sid"]
        await until(lambda: len(js.chats()) >= len(sent))
        got = [m["text"] for m, _ in js.chats()]
        assert got == sent, "every chat once, in order, across the upgrade"
        assert await errors_of(new_b) == 0 and await errors_of(new_a) == 0
    finally:
        if js is not None:
            await js.close()
        stop_all([g.child for g in running])
