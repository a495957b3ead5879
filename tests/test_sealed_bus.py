"""Sealed by default wherever more than one gateway runs (issue 21, item 5).

``gateway serve`` on a multi-node backend refuses to run without a cluster key unless
``--insecure-bus`` says the operator means it; every gateway the project starts gets
a key (gateway.processes: one per run). An attacker holding one gateway's NATS
password, on the shipped node-secure.conf and a real 3-node cluster, then gets
nothing from a forged cluster ``fetch`` (unsealed, it returned every socket's
Cookie and Authorization headers) and closes nothing with a forged ``disconnect``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
import socketio
from nats.aio.msg import Msg

from gateway.processes import (
    GatewayNode,
    NatsCluster,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from nats_adapter import codec
from nats_adapter.naming import ChannelNames
from nats_adapter.sids import new_node_tag, sid_owner
from tests.helpers import REPO, WAIT, SioClient, connect_all, running, wait_subject_everywhere
from tests.test_broker_permissions import GATEWAY_PASSWORD, secure_cluster_at

COOKIE = "session=victim-cookie-5f1e0c"
BEARER = "Bearer victim-token-a83d2b"


def serve(*args: str, env: dict[str, str] | None = None, timeout: float = 30
          ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("GATEWAY_", "NATS_", "REDIS_"))}
    return subprocess.run([sys.executable, "-m", "gateway", "serve", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**base, **(env or {})})


@pytest.mark.parametrize("backend", ["nats", "redis-sharded"])
def test_serve_without_a_cluster_key_refuses_naming_the_way_out(backend: str) -> None:
    proc = serve("--backend", backend, "--port", str(free_ports(1)[0]))
    assert proc.returncode == 2, proc.stderr
    for name in ("GATEWAY_CLUSTER_KEY", "GATEWAY_CLUSTER_KEY_FILE", "--insecure-bus"):
        assert name in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_short_cluster_key_is_refused() -> None:
    proc = serve("--backend", "nats", env={"GATEWAY_CLUSTER_KEY": "too-short"})
    assert proc.returncode == 2 and "GATEWAY_CLUSTER_KEY" in proc.stderr, proc.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_insecure_bus_starts_and_warns_once(tmp_path: Path, how: str) -> None:
    cluster = NatsCluster(tmp_path / "nats", size=1)
    with running(cluster):
        extra = ["--insecure-bus"] if how == "flag" else []
        env = {"GATEWAY_INSECURE_BUS": "on"} if how == "env" else {}
        gw = start_gateway(tmp_path / "gw", "insecure-gw", free_ports(1)[0], "nats",
                           cluster.gateway_args(), extra=extra, env=env)
        try:
            wait_gateways([gw])
            assert gw.child is not None
            log = gw.child.log_path.read_text()
        finally:
            stop_all([gw.child])
    assert log.count("--insecure-bus: the bus between gateways is NOT sealed") == 1, log


def test_the_memory_backend_needs_no_key(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, "mem-gw", free_ports(1)[0], "memory", [])
    try:
        wait_gateways([gw])
    finally:
        stop_all([gw.child])


# -- forged cluster operations with one gateway's password ------------------------------


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with running(secure_cluster_at(tmp_path_factory.mktemp("sealed-nats"))) as cluster:
        yield cluster


def start_pair(cluster: NatsCluster, workdir: Path, *extra: str) -> list[GatewayNode]:
    gws: list[GatewayNode] = []
    try:
        for i, port in enumerate(free_ports(2)):
            gws.append(start_gateway(workdir, f"gw-{i + 1}", port, "nats",
                                     cluster.gateway_args(), extra=extra,
                                     env=cluster.gateway_env(i)))
        wait_gateways(gws)
    except BaseException:
        stop_all([g.child for g in gws])
        raise
    return gws


async def forge(url: str, password: str, victim_sid: str) -> list[bytes]:
    """As a holder of the gateways' NATS password: a cluster ``fetch`` of every
    socket, a cluster-wide ``disconnect`` and a DISCONNECT of the victim's sid on its
    node's channel; what came back to the forged origin's control channel."""
    channels = ChannelNames()
    rogue = await nats.connect(url, user="gateway", password=password, allow_reconnect=False,
                               connect_timeout=2)
    origin = new_node_tag()
    replies: list[bytes] = []

    async def record(msg: Msg) -> None:
        replies.append(msg.data)

    try:
        await rogue.subscribe(channels.node(origin), cb=record)
        await rogue.flush()
        await wait_subject_everywhere(channels.node(origin))
        everyone = {"ns": "/", "rooms": None, "except": None}
        fetch = codec.ClusterMessage(origin, "fetch", f"{origin}:1", {**everyone, "fmt": "full"})
        await rogue.publish(channels.cluster(), codec.encode(fetch))
        await rogue.flush()
        await asyncio.sleep(2.0)  # no answer is the point: nothing to wait on
        # then (after the fetch was served, or not) the disconnects
        disconnect = codec.ClusterMessage(origin, "disconnect", f"{origin}:2",
                                          {**everyone, "close": True})
        await rogue.publish(channels.cluster(), codec.encode(disconnect))
        direct = codec.RoomMessage(codec.DISCONNECT, origin, "/", victim_sid, None)
        await rogue.publish(channels.node(sid_owner(victim_sid)), codec.encode(direct))
        await rogue.flush()
        await asyncio.sleep(2.0)
    finally:
        await rogue.close()
    return replies


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "insecure-bus"])
async def test_forged_fetch_and_disconnect_with_a_gateway_password(
        secure_cluster: NatsCluster, tmp_path: Path, clients: list[SioClient],
        sealed: bool) -> None:
    """Sealed (what every shipped start does): the forged fetch gets no reply and the
    victim stays connected. With --insecure-bus, the same probe reads the victim's
    Cookie and Authorization headers and closes it: what item 5 of issue 21 found."""
    gws = start_pair(secure_cluster, tmp_path / "gw", *([] if sealed else ["--insecure-bus"]))
    try:
        victim = SioClient("victim")
        clients.append(victim)
        await victim.sio.connect(gws[0].url, transports=["websocket"], wait_timeout=WAIT,
                                 headers={"Cookie": COOKIE, "Authorization": BEARER})
        (peer,) = await connect_all(clients, [("peer", gws[1].url)])
        room = f"sealed-{uuid.uuid4().hex[:6]}"
        for c in (victim, peer):
            await c.join(room)
        replies = await forge(secure_cluster.urls[1], GATEWAY_PASSWORD, victim.sid)
        leaked = b"".join(replies)
        if not sealed:  # the probe works: unsealed, it is all there
            assert COOKIE.encode() in leaked and BEARER.encode() in leaked, \
                "\n".join(repr(codec.decode(r)) for r in replies)
            deadline = asyncio.get_running_loop().time() + WAIT
            while victim.sio.connected and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert not victim.sio.connected
            return
        assert replies == [], replies
        assert victim.sio.connected and peer.sio.connected
        await peer.chat(room, "still here")
        await victim.wait_texts(["still here"])
        await victim.chat(room, "and served")
        await peer.wait_texts(["and served"])
    finally:
        stop_all([g.child for g in gws])


def test_socketio_client_headers_reach_the_handshake() -> None:
    """The probe above relies on python-socketio sending ``headers`` on the websocket."""
    assert "headers" in socketio.AsyncClient.connect.__code__.co_varnames
