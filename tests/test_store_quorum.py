"""With --recovery a chat is acked ok once the stream stored it on a quorum. When no
quorum can store it (two of the three NATS servers gone: the minority side of a
partition, as the gateway sees it) the sender hears ok: false within
STORE_ANSWER_WITHIN (1.5 s), never a 10 s hang, and chats are acked again once the
servers are back."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.processes import (
    NatsCluster,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from nats_adapter.brokers.nats_store import STORE_ANSWER_WITHIN
from tests.helpers import SioClient, running


@pytest.fixture(scope="module")
def quorum_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """A cluster of its own: this test takes two of its servers down."""
    with running(NatsCluster(tmp_path_factory.mktemp("quorum") / "nats", size=3)) as c:
        yield c


async def test_without_a_quorum_a_chat_is_refused_quickly(
        quorum_cluster: NatsCluster, tmp_path: Path, clients: list[SioClient]) -> None:
    cluster = quorum_cluster
    gw = start_gateway(tmp_path, f"quorum-{uuid.uuid4().hex[:4]}", free_ports(1)[0], "nats",
                       cluster.gateway_args(), extra=["--recovery", "on"])
    try:
        wait_gateways([gw], timeout=40)
        a = SioClient("a")
        clients.append(a)
        await a.connect(gw.url)
        await a.join("quorum")
        await a.chat("quorum", "stored")
        server = gw.healthz()[1]["broker"]["server"]
        others = [n for n in cluster.nodes if n.url != server]
        for node in others:
            assert node.child is not None
            node.child.signal(signal.SIGKILL)
            node.child.popen.wait()
        # the call's own timeout is the bound: past it the test fails (a 10 s hang did);
        # issue 25 asks for the answer within 2 s
        assert STORE_ANSWER_WITHIN < 2.0
        ack = await a.call("chat", {"room": "quorum", "text": "no quorum"}, timeout=2.0)
        assert ack["ok"] is False, ack
        assert ack["error"].startswith(("not delivered", "not confirmed")), ack
        for node in others:
            cluster.start_node(cluster.nodes.index(node))
        cluster.wait_ready()
        deadline = time.monotonic() + 30
        while True:
            ack = await a.call("chat", {"room": "quorum", "text": "stored again"})
            if ack["ok"]:
                break
            assert time.monotonic() < deadline, f"still refused: {ack}"
    finally:
        stop_all([gw.child])
