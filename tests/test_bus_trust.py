"""One trust model for the bus, stored or live, tried as an attacker would.

The attacker holds the gateways' NATS password (the role user ``gateway`` every
gateway logs in as: what a compromised gateway host leaks) on a 3-node cluster
running the shipped ``infra/nats/node-secure.conf``; the gateways seal with a
cluster key, run ``--recovery`` and ``--auth jwt``; clients are real socket.io
clients. Whatever the attacker captures, re-routes, stores again or writes into the
session bucket must deliver nothing, move no offset and take no session.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import msgpack
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from gateway.config import Secrets
from gateway.processes import (
    GatewayNode,
    NatsCluster,
    free_ports,
    http_json,
    start_gateway,
    stop_all,
    wait_gateways,
)
from nats_adapter.naming import ChannelNames
from nats_adapter.sealing import ClusterKey
from nats_adapter.sids import sid_owner
from tests.conftest import start_node
from tests.helpers import WAIT, Node, SioClient, metrics_of, running, wait_for_condition
from tests.test_broker_permissions import GATEWAY_PASSWORD, secure_cluster_at

CLUSTER_KEY = "bus-trust-cluster-key-5d1f0a7c9e3b-0123456789"
JWT_SECRET = "bus-trust-jwt-secret-8c2e41f07a-0123456789abcdef"
ENV = {"GATEWAY_CLUSTER_KEY": CLUSTER_KEY, "GATEWAY_JWT_SECRET": JWT_SECRET}
#: the session bucket's subjects (nats_adapter/brokers/nats_store.py, prefix sio)
BUCKET = "SIO_sio_sessions"
CHANNELS = ChannelNames("sio", stored=True)


@contextlib.contextmanager
def secure_recovery_bus(workdir: Path) -> Iterator[tuple[NatsCluster, list[GatewayNode]]]:
    """The shipped node-secure.conf on 3 NATS nodes, and gw-1, gw-2 as compose runs
    them with a cluster key, --recovery and --auth jwt, on the gateways' NATS user."""
    cluster = secure_cluster_at(workdir / "nats")
    with running(cluster):
        cluster.provision()  # the operator's step: gateway users may not create the stream
        gws: list[GatewayNode] = []
        try:
            for i, port in enumerate(free_ports(2)):
                gws.append(start_gateway(
                    workdir / "gws", f"gw-{i + 1}", port, "nats", cluster.gateway_args(i),
                    extra=["--recovery", "on", "--auth", "jwt", "--heartbeat-interval", "0.5"],
                    env={**cluster.gateway_env(i), **ENV}))
            wait_gateways(gws, timeout=40)
            yield cluster, gws
        finally:
            stop_all([g.child for g in gws])


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[tuple[NatsCluster, list[GatewayNode]]]:
    with secure_recovery_bus(tmp_path_factory.mktemp("bus-trust")) as made:
        yield made


@contextlib.asynccontextmanager
async def in_process_gateways(cluster: NatsCluster, recovery: bool
                              ) -> AsyncIterator[list[Node]]:
    """gw-1 and gw-2 once more, in this process (the server API: close_room), on the
    same users and key."""
    made: list[Node] = []
    try:
        for i in (1, 2):
            made.append(await start_node("nats", f"gw-{i}-inproc", {
                "nats_urls": tuple(cluster.urls), "recovery": recovery, "auth": "jwt",
                "secrets": Secrets(cluster_key=CLUSTER_KEY, jwt_secret=JWT_SECRET,
                                   nats_user="gateway",
                                   nats_password=GATEWAY_PASSWORD)}))
        for node in made:
            await node.manager.start()
        yield made
    finally:
        for node in made:
            await node.runner.cleanup()


@pytest.fixture
async def in_process(bus: tuple[NatsCluster, list[GatewayNode]]
                     ) -> AsyncIterator[list[Node]]:
    async with in_process_gateways(bus[0], recovery=True) as made:
        yield made


@pytest.fixture
async def without_recovery(bus: tuple[NatsCluster, list[GatewayNode]]
                           ) -> AsyncIterator[list[Node]]:
    async with in_process_gateways(bus[0], recovery=False) as made:
        yield made


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, JWT_SECRET,
                      algorithm="HS256")


class Client_(SioClient):
    """A socket.io client that keeps the CONNECT reply (its ``pid``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, offsets=True)
        self.connect_data: dict[str, Any] = {}
        # python-socketio's client keeps no pid: read it where the reply is handled
        handle = self.sio._handle_connect

        async def handle_connect(namespace: str | None, data: Any) -> None:
            if isinstance(data, dict):
                self.connect_data = data
            await handle(namespace, data)

        self.sio._handle_connect = handle_connect

    @property
    def pid(self) -> str:
        return str(self.connect_data.get("pid"))


async def connect(clients: list[SioClient], gw: GatewayNode | Node, name: str,
                  sub: str | None = None, **restore: str) -> Client_:
    c = Client_(name)
    clients.append(c)
    await c.connect(gw.url, auth={"token": token(sub or name), **restore})
    return c


async def rogue(cluster: NatsCluster) -> Client:
    """A NATS client logged in with the gateways' password, inbox where theirs is."""
    return await nats.connect(cluster.urls[2], user="gateway", password=GATEWAY_PASSWORD,
                              inbox_prefix="sio.inbox.gateway", allow_reconnect=False,
                              connect_timeout=2)


async def session_written(cluster: NatsCluster, pid: str, room: str) -> None:
    """Wait until the session record of ``pid`` lists ``room`` (records are written
    shortly after a change), read as any gateway user could."""
    key = ClusterKey(CLUSTER_KEY.encode())
    nc = await rogue(cluster)
    try:
        kv = await nc.jetstream().key_value(BUCKET)
        deadline = time.monotonic() + WAIT
        while True:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                entry = await kv.get(key.record_name(pid))
                body = key.open_record(pid, entry.value or b"")
                if body is not None and room in msgpack.unpackb(body)["rooms"]:
                    return
            assert time.monotonic() < deadline, "the session was not written"
            await asyncio.sleep(0.05)
    finally:
        await nc.close()


def rejected(gw: GatewayNode, reason: str) -> float:
    return sum(v for k, v in metrics_of(gw.url).items()
               if k.startswith("gateway_broker_messages_rejected") and f'reason="{reason}"' in k)


async def until(done: Callable[[], bool], what: str, timeout: float = 2 * WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def routes_know(cluster: NatsCluster, subject: str) -> bool:
    """Every node but the rogue's (the last) has heard over a route that ``subject`` is
    subscribed to, so a publish on any node reaches the rogue."""
    for node in cluster.nodes[:-1]:
        status, body = http_json(f"{node.monitor_url}/routez?subs=1", 1.0)
        if status != 200 or not any(subject in (route.get("subscriptions_list") or [])
                                    for route in body.get("routes") or []):
            return False
    return True


async def capture(nc: Client, subject: str, cluster: NatsCluster) -> list[Msg]:
    """What arrives on ``subject``, from once every node routes it to the rogue: its
    server confirms the subscription at once, the others learn of it asynchronously."""
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=keep)
    await nc.flush()
    await wait_for_condition(lambda: routes_know(cluster, subject),
                             f"the routes to carry the interest in {subject}")
    return got


def room_name(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


async def test_a_forged_session_record_takes_no_session(
        bus: tuple[NatsCluster, list[GatewayNode]], clients: list[SioClient]) -> None:
    """The attacker writes a record naming the victim's sid (public: every chat carries
    it) and rooms into the session bucket, then connects with that record's pid."""
    cluster, (gw1, gw2) = bus
    room = room_name("vault")
    victim = await connect(clients, gw1, "victim")
    peer = await connect(clients, gw2, "peer")
    for c in (victim, peer):
        await c.join(room)
    await peer.chat(room, "hello")
    await victim.wait_texts(["hello"])
    nc = await rogue(cluster)
    try:
        pid = "forged" + uuid.uuid4().hex
        record = msgpack.packb({"sid": victim.sid, "ns": "/", "rooms": [room], "data": {},
                                "node": sid_owner(victim.sid), "connected": False,
                                "at": time.time(), "id": "mallory"}, use_bin_type=True)
        ack = await nc.jetstream().publish(f"$KV.{BUCKET}.{pid}", record)
        assert ack.stream == f"KV_{BUCKET}"  # the bucket took it: the permissions allow it
    finally:
        await nc.close()
    mallory = await connect(clients, gw2, "mallory", pid=pid, offset=victim.offsets[-1])
    assert mallory.sid != victim.sid and mallory.pid != pid
    refused = await mallory.call("chat", {"room": room, "text": "it's me"})
    assert refused["ok"] is False and "not a member" in refused["error"], refused
    assert victim.sio.connected
    await peer.chat(room, "still yours")
    await victim.wait_texts(["hello", "still yours"])


async def test_a_valid_jwt_of_another_user_with_the_victims_pid_gets_a_new_session(
        bus: tuple[NatsCluster, list[GatewayNode]], clients: list[SioClient]) -> None:
    cluster, (gw1, gw2) = bus
    room = room_name("jwt")
    victim = await connect(clients, gw1, "victim")
    victim_sid = victim.sid
    peer = await connect(clients, gw2, "peer")
    for c in (victim, peer):
        await c.join(room)
    await peer.chat(room, "one")
    await victim.wait_texts(["one"])
    await session_written(cluster, victim.pid, room)
    mallory = await connect(clients, gw2, "mallory", pid=victim.pid,
                            offset=victim.offsets[-1])
    assert mallory.sid != victim.sid and mallory.pid != victim.pid
    refused = await mallory.call("chat", {"room": room, "text": "it's me"})
    assert refused["ok"] is False and "not a member" in refused["error"], refused
    assert victim.sio.connected
    await peer.chat(room, "two")
    await victim.wait_texts(["one", "two"])
    # the victim's own record is untouched: its next reconnect restores it
    again = await connect(clients, gw2, "victim-again", sub="victim", pid=victim.pid,
                          offset=victim.offsets[-1])
    assert again.sid == victim_sid and again.pid == victim.pid


async def test_a_captured_chat_stored_again_or_with_a_forged_sequence_is_not_delivered(
        bus: tuple[NatsCluster, list[GatewayNode]], clients: list[SioClient]) -> None:
    """Re-published on the store twice, and on gw-1's node subject with a forged
    ``Nats-Sequence: 999999`` (and one that is no number): no extra delivery live, no
    offset moved, and the victim's next recovery from before the copies gets none of
    them either."""
    cluster, (gw1, gw2) = bus
    room = room_name("replay")
    victim = await connect(clients, gw1, "victim")
    victim_sid = victim.sid
    sender = await connect(clients, gw2, "sender")
    for c in (victim, sender):
        await c.join(room)
    nc = await rogue(cluster)
    try:
        captured = await capture(nc, CHANNELS.room("/", room), cluster)
        await sender.chat(room, "original")
        await victim.wait_texts(["original"])
        await until(lambda: bool(captured), "the capture")
        offset = victim.offsets[-1]
        await session_written(cluster, victim.pid, room)
        replayed, forged = rejected(gw1, "replayed"), rejected(gw1, "forged")
        data = captured[0].data
        for _ in range(2):
            await nc.publish(CHANNELS.stored_room("/", room), data)
        for forged_seq in ("999999", "not a number"):
            await nc.publish(CHANNELS.node(sid_owner(victim.sid)), data,
                             headers={"Nats-Sequence": forged_seq})
        await nc.flush()
        # the stored copies are replays; the one on the node subject was sealed for
        # another channel
        await until(lambda: victim.texts().count("original") > 1
                    or (rejected(gw1, "replayed") >= replayed + 2
                        and rejected(gw1, "forged") >= forged + 2), "the copies to arrive")
    finally:
        await nc.close()
    await sender.chat(room, "marker")
    await victim.wait_for(lambda c: "marker" in c.texts(), what="the marker")
    assert victim.texts() == ["original", "marker"]
    assert "999999" not in victim.offsets
    # reconnecting from the original's offset: the copies stored after it are not
    # what it missed
    again = await connect(clients, gw2, "victim-again", sub="victim", pid=victim.pid,
                          offset=offset)
    assert again.sid == victim_sid and again.pid == victim.pid
    assert again.texts() == ["marker"], again.texts()


async def test_a_live_room_envelope_re_routed_to_another_room_is_dropped(
        bus: tuple[NatsCluster, list[GatewayNode]], without_recovery: list[Node],
        clients: list[SioClient]) -> None:
    """Without recovery an emit to one room names no room: its channel does. Sealed for
    ``public`` and re-published on ``secret``'s channel to a gateway that never saw it
    (no member in ``public``: no replay to catch), it reaches no one."""
    cluster, _ = bus
    n1, n2 = without_recovery
    live = ChannelNames("sio")
    public, secret = room_name("public"), room_name("secret")
    member = await connect(clients, n1, "member")
    await member.join(secret)
    insider = await connect(clients, n2, "insider")
    await insider.join(secret)
    talker = await connect(clients, n2, "talker")
    await talker.join(public)
    nc = await rogue(cluster)
    try:
        captured = await capture(nc, live.room("/", public), cluster)
        await talker.chat(public, "for public only")
        await until(lambda: bool(captured), "the capture")
        before = n1.manager.stats.dropped_forged
        await nc.publish(live.room("/", secret), captured[0].data)
        await nc.flush()
        await until(lambda: "for public only" in member.texts()
                    or n1.manager.stats.dropped_forged > before, "the re-routed copy")
    finally:
        await nc.close()
    await insider.chat(secret, "marker")
    await member.wait_for(lambda c: "marker" in c.texts(), what="the marker")
    assert member.texts() == ["marker"]


async def test_a_stored_room_envelope_re_routed_to_another_room_is_dropped(
        bus: tuple[NatsCluster, list[GatewayNode]], clients: list[SioClient]) -> None:
    """The same through the store: a stored emit also names its room, and now its seal
    names the subject it was stored under, so the copy is counted as forged."""
    cluster, (gw1, gw2) = bus
    public, secret = room_name("public"), room_name("secret")
    member = await connect(clients, gw1, "member")
    await member.join(secret)
    insider = await connect(clients, gw2, "insider")
    await insider.join(secret)
    talker = await connect(clients, gw2, "talker")
    await talker.join(public)
    nc = await rogue(cluster)
    try:
        captured = await capture(nc, CHANNELS.room("/", public), cluster)
        await talker.chat(public, "for public only")
        await until(lambda: bool(captured), "the capture")
        before = rejected(gw1, "forged")
        await nc.publish(CHANNELS.stored_room("/", secret), captured[0].data)
        await nc.flush()
        await until(lambda: "for public only" in member.texts()
                    or rejected(gw1, "forged") > before, "the re-routed copy")
    finally:
        await nc.close()
    await insider.chat(secret, "marker")
    await member.wait_for(lambda c: "marker" in c.texts(), what="the marker")
    assert member.texts() == ["marker"]


async def test_close_room_works_under_the_shipped_permissions_and_not_from_the_store(
        bus: tuple[NatsCluster, list[GatewayNode]], in_process: list[Node],
        clients: list[SioClient]) -> None:
    cluster, _ = bus
    n1, n2 = in_process
    room = room_name("closing")
    a = await connect(clients, n1, "a")
    b = await connect(clients, n2, "b")
    for c in (a, b):
        await c.join(room)
    nc = await rogue(cluster)
    try:
        captured = await capture(nc, CHANNELS.cluster(), cluster)
        await n1.sio.close_room(room)
        await until(lambda: not n2.manager.hub.members("/", room), "b to leave the room")
        closing = [m for m in captured if len(m.data) < 200 and b"closing" in m.data]
        assert closing, "the sealed CLOSE_ROOM was not seen on the cluster channel"
        for c in (a, b):
            await c.join(room)
        before = n2.manager.stats.dropped_forged
        # stored on the room's subject, it comes back on the room's live channel
        await nc.publish(CHANNELS.stored_room("/", room), closing[0].data)
        await nc.flush()
        await until(lambda: n2.manager.stats.dropped_forged > before, "the stored copy")
    finally:
        await nc.close()
    assert b.sid in n2.manager.hub.members("/", room)
    await b.chat(room, "still in")
    await a.wait_texts(["still in"])
