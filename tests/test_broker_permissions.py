"""The production broker configs, live: the gateways' one NATS role user confined to
the gateways' subjects, and a Redis ACL user confined to the gateway's shard channels.

These are the configs docker-compose.yml runs (infra/nats/node-secure.conf,
infra/redis/users.acl), started here by the launcher's process layer on 127.0.0.1.
A gateway's credentials in the wrong hands reach chat traffic and nothing else.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
import redis.asyncio
import redis.exceptions
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from gateway.processes import (
    NATS_SECURE_CONFIG,
    GatewayNode,
    NatsCluster,
    RedisCluster,
    free_ports,
    http_json,
    start_gateway,
    stop_all,
    wait_gateways,
)
from tests.helpers import REPO, WAIT, SioClient, connect_all, owner_of, running
from tests.test_launcher import consecutive_free_ports, start_launcher
from tests.test_recovery import DefaultClient
from tools.bench.front import Front

#: the password of the NATS role user every gateway logs in as (node-secure.conf)
GATEWAY_PASSWORD = "gateway-pass-4d2a9f"
ROUTE_AUTH = ("route", "route-pass-6b0e2c")


def secure_cluster_at(workdir: Path) -> NatsCluster:
    """3 NATS nodes on the shipped node-secure.conf, with the gateways' role user
    (GATEWAY_PASSWORD) and route credentials: what compose runs, for the tests that
    attack it."""
    return NatsCluster(workdir, size=3, config=NATS_SECURE_CONFIG, route_auth=ROUTE_AUTH,
                       gateway_password=GATEWAY_PASSWORD)


@pytest.fixture(scope="module")
def secure_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with running(secure_cluster_at(tmp_path_factory.mktemp("secure-nats"))) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def role_gateways(secure_nats: NatsCluster, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[list[GatewayNode]]:
    """gw-1 and gw-2, both logged in as the NATS role user ``gateway``."""
    workdir = tmp_path_factory.mktemp("secure-gws")
    gws: list[GatewayNode] = []
    try:
        for i, port in enumerate(free_ports(2)):
            gws.append(start_gateway(workdir, f"gw-{i + 1}", port, "nats",
                                     secure_nats.gateway_args(), env=secure_nats.gateway_env(i)))
        wait_gateways(gws)
        yield gws
    finally:
        stop_all([g.child for g in gws])


class Rogue:
    """A NATS client holding a gateway's credentials, recording the server's refusals."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.nc: Client | None = None

    async def connect(self, url: str, user: str, password: str,
                      inbox_prefix: str = "_INBOX") -> Rogue:
        async def error_cb(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(url, user=user, password=password, error_cb=error_cb,
                                     allow_reconnect=False, connect_timeout=2,
                                     inbox_prefix=inbox_prefix)
        return self

    async def refused(self, fragment: str) -> bool:
        """Whether the server refused something naming ``fragment`` (within WAIT)."""
        assert self.nc is not None
        deadline = asyncio.get_running_loop().time() + WAIT
        while asyncio.get_running_loop().time() < deadline:
            await self.nc.flush()
            # nats-py lower-cases the server's -ERR text
            if any("permissions" in e.lower() and fragment.lower() in e.lower()
                   for e in self.errors):
                return True
            await asyncio.sleep(0.05)
        return False


async def test_gateways_sharing_the_role_user_chat_across_nodes(
        role_gateways: list[GatewayNode], secure_nats: NatsCluster,
        clients: list[SioClient]) -> None:
    a, b = await connect_all(clients, [("a", role_gateways[0].url),
                                       ("b", role_gateways[1].url)])
    for c in (a, b):
        await c.join("vault")
    await a.chat("vault", "gw-1 to gw-2")
    await b.chat("vault", "gw-2 to gw-1")
    await b.wait_texts(["gw-1 to gw-2"])
    await a.wait_texts(["gw-2 to gw-1"])
    for gw in role_gateways:
        assert gw.child is not None
        log = gw.child.log_path.read_text()
        assert "ermissions" not in log, f"{gw.node_id} was refused something it needs:\n{log}"
        assert GATEWAY_PASSWORD not in log


@pytest.mark.parametrize(("recovery", "gateways"), [(False, 3), (True, 2)])
async def test_launcher_secure_runs_gateways_on_the_role_user(
        clients: list[SioClient], recovery: bool, gateways: int) -> None:
    """``python -m gateway cluster --secure``: the brokers as compose runs them, every
    gateway logged in as the role user (three as well as two: nothing to add per
    gateway), and nothing gets in without a password; with --recovery too (JetStream's
    API within the same permissions)."""
    launcher = start_launcher("--secure", *(["--recovery"] if recovery else []),
                              "--gateways", str(gateways),
                              "--port", str(consecutive_free_ports(gateways)))
    try:
        nats_nodes = launcher.nats_nodes()
        urls = launcher.gateway_urls()
        assert len(urls) == gateways
        a, b = await connect_all(clients, [("a", urls[0]), ("b", urls[-1])], offsets=recovery)
        for c in (a, b):
            await c.join("launched")
        await a.chat("launched", "secure launcher")
        await b.wait_for(lambda c: [m["text"] for m in c.received()] == ["secure launcher"],
                         what="the chat")
        if recovery:  # the stream and the session bucket are reachable under the rules
            ack = await b.call("join", {"room": "launched", "history": 5})
            assert [m["text"] for m in ack["history"]] == ["secure launcher"], ack
        users = set()
        for _client, monitor in nats_nodes.values():
            _, body = http_json(f"http://127.0.0.1:{monitor}/connz?auth=1")
            users |= {c.get("authorized_user") for c in body["connections"]}
        assert users == {"gateway"}, users
        client_port = next(iter(nats_nodes.values()))[0]
        with pytest.raises(nats.errors.Error):
            await nats.connect(f"nats://127.0.0.1:{client_port}", allow_reconnect=False,
                               connect_timeout=2, max_reconnect_attempts=0)
    finally:
        launcher.proc.send_signal(signal.SIGTERM)
        launcher.proc.wait(30)


async def test_without_a_password_nothing_connects(secure_nats: NatsCluster) -> None:
    with pytest.raises(nats.errors.Error):
        await nats.connect(secure_nats.urls[0], allow_reconnect=False, connect_timeout=2,
                           max_reconnect_attempts=0)
    with pytest.raises(nats.errors.Error):
        await nats.connect(secure_nats.urls[0], user="gateway", password="not-the-password",
                           allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)
    # the gateways' password is no other user's
    with pytest.raises(nats.errors.Error):
        await nats.connect(secure_nats.urls[0], user="operator", password=GATEWAY_PASSWORD,
                           allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)


@pytest.mark.parametrize("subject", [">", "sio.>", "_INBOX.>", "$SYS.>", "billing.invoices"])
async def test_gateway_credentials_cannot_subscribe_outside_the_prefix(
        secure_nats: NatsCluster, subject: str) -> None:
    rogue = await Rogue().connect(secure_nats.urls[1], "gateway", GATEWAY_PASSWORD)
    try:
        assert rogue.nc is not None
        await rogue.nc.subscribe(subject)
        assert await rogue.refused(subject), f"subscribing to {subject!r} was allowed"
    finally:
        assert rogue.nc is not None
        await rogue.nc.close()


@pytest.mark.parametrize("subject", ["sio.inbox.>", "sio.inbox.operator.>", "_INBOX.x",
                                     "_INBOX.*.*"])
async def test_gateway_credentials_read_no_inbox_but_the_gateways(
        secure_nats: NatsCluster, subject: str) -> None:
    """JetStream's replies to the gateways (consumer names, session reads, catch-up
    fetches) come to the role's inbox, ``sio.inbox.gateway.>``; the operator's replies
    (stream and bucket configs while provisioning) to ``_INBOX.>``. The gateways'
    password may subscribe to its own inbox and to no other. (Gateways share the role's
    inbox since they share the role: each of them may read the room subjects, the
    stream and the session bucket anyway, and what is in them is sealed.)"""
    rogue = await Rogue().connect(secure_nats.urls[1], "gateway", GATEWAY_PASSWORD)
    try:
        assert rogue.nc is not None
        await rogue.nc.subscribe("sio.inbox.gateway.>")
        await rogue.nc.subscribe(subject)
        assert await rogue.refused(subject), f"the gateway role could subscribe to {subject!r}"
        assert not any("sio.inbox.gateway" in e for e in rogue.errors), rogue.errors
    finally:
        assert rogue.nc is not None
        await rogue.nc.close()


async def test_gateway_credentials_cannot_publish_outside_the_prefix(
        secure_nats: NatsCluster) -> None:
    rogue = await Rogue().connect(secure_nats.urls[0], "gateway", GATEWAY_PASSWORD)
    listener = await Rogue().connect(secure_nats.urls[0], "gateway", GATEWAY_PASSWORD)
    try:
        assert rogue.nc is not None and listener.nc is not None
        got: list[str] = []

        async def record(msg: Msg) -> None:
            got.append(msg.subject)

        await listener.nc.subscribe("sio.room.>", cb=record)
        await listener.nc.flush()
        for subject in ("billing.invoices", "$SYS.REQ.SERVER.PING", "_INBOX.stolen"):
            await rogue.nc.publish(subject, b"forged")
            assert await rogue.refused(subject), f"publishing to {subject!r} was allowed"
        # what the gateway's own subjects allow still passes: the refusals above are
        # the permissions at work, not a broken connection
        await rogue.nc.publish("sio.room.x.y", b"inside the prefix")
        await rogue.nc.flush()
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got == ["sio.room.x.y"]
    finally:
        for client in (rogue, listener):
            if client.nc is not None:
                await client.nc.close()


async def test_redis_gateway_user_has_only_its_shard_channels(
        tmp_path: Path, clients: list[SioClient]) -> None:
    cluster = RedisCluster(tmp_path / "redis", size=3, password="admin-pass-0f3b7d",
                           gateway_password="gateway-pass-a91c55")
    gws: list[GatewayNode] = []
    try:
        with running(cluster):
            for i, port in enumerate(free_ports(2)):
                gws.append(start_gateway(tmp_path / "gw", f"acl-gw-{i}", port, "redis-sharded",
                                         cluster.gateway_args(i), env=cluster.gateway_env(i)))
            wait_gateways(gws)
            a, b = await connect_all(clients, [("a", gws[0].url), ("b", gws[1].url)])
            for c in (a, b):
                await c.join("ledger")
            await a.chat("ledger", "under the gateway user")
            await b.wait_texts(["under the gateway user"])
            denied = [n.cli("ACL", "LOG") for n in cluster.nodes]
            assert all(not log.strip() for log in denied), f"the gateway was refused: {denied}"

            node = owner_of(cluster.nodes, "sio.room.x.y")
            rogue = redis.asyncio.Redis(host=node.host, port=node.port, username="gateway",
                                        password="gateway-pass-a91c55")
            try:
                assert await rogue.ping()
                assert await rogue.execute_command("SPUBLISH", "sio.room.x.y", b"ok") >= 0
                for command in (("GET", "k"), ("SET", "k", "v"), ("PUBLISH", "sio.room.x", "m"),
                                ("SPUBLISH", "other.channel", "m"), ("CONFIG", "GET", "*"),
                                ("KEYS", "*"), ("FLUSHALL",), ("CLUSTER", "RESET"),
                                ("ACL", "LIST")):
                    with pytest.raises(redis.exceptions.NoPermissionError):
                        await rogue.execute_command(*command)
            finally:
                await rogue.aclose()
            anonymous = redis.asyncio.Redis(host=node.host, port=node.port)
            try:
                with pytest.raises(redis.exceptions.AuthenticationError):
                    await anonymous.ping()
            finally:
                await anonymous.aclose()
    finally:
        stop_all([g.child for g in gws])


# -- JetStream: provisioned by the operator, only used by gateways ----------------------

STREAM, BUCKET = "SIO_sio", "SIO_sio_sessions"


@pytest.fixture(scope="module")
def provisioned(secure_nats: NatsCluster) -> NatsCluster:
    """The stream and the session bucket, made by the operator (`gateway provision`)."""
    secure_nats.provision()
    secure_nats.provision()  # idempotent
    return secure_nats


async def operator_of(cluster: NatsCluster) -> Client:
    return await nats.connect(cluster.urls[0], user="operator",
                              password=cluster.operator_password, allow_reconnect=False,
                              connect_timeout=2)


async def attempt(what: str, call: Any) -> str:
    """Run one admin call with a stolen gateway login; what came back (it must fail)."""
    try:
        result = await call
    except (TimeoutError, nats.errors.Error) as exc:
        return f"{what}: {exc!r}"
    raise AssertionError(f"{what} was allowed with a gateway's password: {result!r}")


async def test_gateway_credentials_cannot_administer_jetstream(provisioned: NatsCluster) -> None:
    """The gateways' password, as a compromised gateway host leaks it: every JetStream
    admin call is refused, and the stream, its messages and the bucket are as
    provisioned."""
    # the attacker takes the gateways' inbox prefix to get JetStream's answers at all
    rogue = await Rogue().connect(provisioned.urls[1], "gateway", GATEWAY_PASSWORD,
                                  inbox_prefix="sio.inbox.gateway")
    operator = await operator_of(provisioned)
    try:
        assert rogue.nc is not None
        js = rogue.nc.jetstream(timeout=1.0)
        # what a gateway does is allowed: store, read the stream's info
        for i in range(3):
            await js.publish(f"sio.store.r.admin-test.{i}", b"stored", stream=STREAM)
        before = await operator.jetstream().stream_info(STREAM)
        assert before.state.messages >= 3
        # and session records, as gateways put them
        for key in ("rec-a", "rec-b"):
            await js.publish(f"$KV.{BUCKET}.{key}", b"sealed", timeout=2.0)
        evil = before.config.evolve(republish=api.RePublish(src="sio.store.>",
                                                            dest="billing.>"))
        wiped = before.config.evolve(max_msgs=1)
        refusals = [
            await attempt("stream create", js.add_stream(name="EVIL", subjects=["billing.>"])),
            await attempt("stream create (ours)", js.add_stream(before.config)),
            await attempt("republish to billing.>", js.update_stream(evil)),
            await attempt("max_msgs=1", js.update_stream(wiped)),
            await attempt("purge", js.purge_stream(STREAM)),
            await attempt("message delete", js.delete_msg(STREAM, before.state.last_seq)),
            await attempt("stream delete", js.delete_stream(STREAM)),
            await attempt("durable consumer", js.add_consumer(
                STREAM, durable_name="evil", ack_policy=api.AckPolicy.EXPLICIT)),
            await attempt("named durable consumer", js.add_consumer(
                STREAM, name="evil2", durable_name="evil2")),
            await attempt("consumer on the bucket", js.add_consumer(f"KV_{BUCKET}")),
            await attempt("bucket create", js.create_key_value(bucket="evil")),
            await attempt("bucket delete", js.delete_key_value(BUCKET)),
            await attempt("bucket purge", js.purge_stream(f"KV_{BUCKET}")),
            # a rollup wipes the whole bucket where rollups are allowed
            await attempt("bucket rollup", js.publish(
                f"$KV.{BUCKET}.x", b"", headers={"Nats-Rollup": "all"}, timeout=2.0)),
            await attempt("stream list", js.streams_info()),
            await attempt("account info", js.account_info()),
        ]
        for subject in ("$JS.API.STREAM.NAMES", "$JS.API.META.LEADER.STEPDOWN",
                        f"$JS.API.STREAM.LEADER.STEPDOWN.{STREAM}",
                        "$JS.API.ACCOUNT.PURGE.SIO", f"$JS.API.STREAM.SNAPSHOT.{STREAM}"):
            refusals.append(await attempt(subject, rogue.nc.request(subject, b"{}",
                                                                   timeout=1.0)))
        # the ephemeral-consumer subject a gateway has takes no durable name
        reply = await rogue.nc.request(f"$JS.API.CONSUMER.CREATE.{STREAM}", json.dumps(
            {"stream_name": STREAM, "config": {"durable_name": "evil3",
                                               "ack_policy": "explicit"}}).encode(),
                                       timeout=2.0)
        assert "error" in json.loads(reply.data), reply.data
        assert await rogue.refused("$JS.API.STREAM.UPDATE.SIO_sio"), refusals
        # a foreign subject, where the republish would have sent our traffic
        await rogue.nc.publish("billing.x", b"forged")
        assert await rogue.refused("billing.x")

        after = await operator.jetstream().stream_info(STREAM)
        assert after.config.republish is not None
        assert after.config.republish.dest == "sio.live.>", after.config.republish
        assert after.config.max_msgs in (None, -1) and after.config.max_age == \
            before.config.max_age
        assert after.state.messages == before.state.messages
        assert after.state.last_seq == before.state.last_seq
        kv = await js.key_value(BUCKET)
        for key in ("rec-a", "rec-b"):
            assert (await kv.get(key)).value == b"sealed", key
        consumers = await operator.jetstream().consumers_info(STREAM)
        assert [c.name for c in consumers if c.config.durable_name] == []
        names = {s.config.name for s in await operator.jetstream().streams_info()}
        assert names == {STREAM, f"KV_{BUCKET}"}, names
    finally:
        for client in (rogue.nc, operator):
            if client is not None:
                await client.close()


async def test_gateway_credentials_cannot_fill_the_stream(provisioned: NatsCluster) -> None:
    """The gateways' password storing big messages on sio.store.>: each is refused past
    the stream's message size, and the stream is bounded in bytes and consumers."""
    rogue = await Rogue().connect(provisioned.urls[1], "gateway", GATEWAY_PASSWORD,
                                  inbox_prefix="sio.inbox.gateway")
    operator = await operator_of(provisioned)
    try:
        assert rogue.nc is not None
        js = rogue.nc.jetstream(timeout=2.0)
        before = await operator.jetstream().stream_info(STREAM)
        refusal = await attempt("a 200 KB message", js.publish(
            "sio.store.x", b"x" * 200_000, stream=STREAM))
        assert "BadRequestError" in refusal, refusal  # JetStream says no, not a timeout
        await js.publish("sio.store.x", b"x" * 60_000, stream=STREAM)  # a real one fits
        after = await operator.jetstream().stream_info(STREAM)
        assert after.state.messages == before.state.messages + 1
        assert 0 < (after.config.max_bytes or 0) <= 1024 ** 3
        assert after.config.discard == api.DiscardPolicy.OLD
        assert 0 < (after.config.max_consumers or 0) <= 1000
    finally:
        for client in (rogue.nc, operator):
            if client is not None:
                await client.close()


async def test_operator_has_jetstream_only(provisioned: NatsCluster) -> None:
    """The operator identity administers JetStream and reaches no chat subject."""
    operator = await Rogue().connect(provisioned.urls[0], "operator",
                                     provisioned.operator_password)
    try:
        assert operator.nc is not None
        await operator.nc.subscribe("sio.room.>")
        assert await operator.refused("sio.room.>")
        await operator.nc.publish("sio.cluster", b"forged")
        assert await operator.refused("sio.cluster")
    finally:
        assert operator.nc is not None
        await operator.nc.close()


async def test_gateway_on_an_unprovisioned_secure_broker_names_the_step(
        tmp_path: Path) -> None:
    """Without the operator's step a gateway with --recovery may not create the stream
    itself: it fails naming `gateway provision` (and the stream stays uncreated)."""
    cluster = NatsCluster(tmp_path / "nats", size=3, config=NATS_SECURE_CONFIG,
                          route_auth=ROUTE_AUTH, gateway_password=GATEWAY_PASSWORD)
    with running(cluster):
        gw = start_gateway(tmp_path / "gw", "gw-1", free_ports(1)[0], "nats",
                           cluster.gateway_args(), extra=["--recovery", "on"],
                           env=cluster.gateway_env(0))
        assert gw.child is not None
        try:
            assert gw.child.popen.wait(90) != 0
        finally:
            stop_all([gw.child])
        log = gw.child.log_path.read_text()
        assert "python -m gateway provision" in log and "SIO_sio does not exist" in log, log
        assert GATEWAY_PASSWORD not in log
        operator = await operator_of(cluster)
        try:
            with pytest.raises(nats.js.errors.NotFoundError):
                await operator.jetstream().stream_info(STREAM)
        finally:
            await operator.close()


async def test_recovery_across_gateways_logged_in_as_gateway_users(
        provisioned: NatsCluster, tmp_path: Path, clients: list[SioClient],
        node_bin: str) -> None:
    """With the stream provisioned by the operator, gateways on the role user keep
    Socket.IO connection state recovery: socket.io-client cut off gw-1 comes back on
    gw-2 recovered, same sid, with what it missed; and nobody was refused anything."""
    gws: list[GatewayNode] = []
    front: Front | None = None
    js: DefaultClient | None = None
    try:
        for i, port in enumerate(free_ports(2)):
            gws.append(start_gateway(tmp_path, f"gw-{i + 1}", port, "nats",
                                     provisioned.gateway_args(),
                                     extra=["--recovery", "on"], env=provisioned.gateway_env(i)))
        wait_gateways(gws, timeout=40)
        front = await Front(("127.0.0.1", gws[0].port)).start()
        (b,) = await connect_all(clients, [("b", gws[1].url)], offsets=True)
        js = await DefaultClient.start(node_bin, front.url, "js")
        await b.join("kept")
        assert (await js.call("join", "kept"))["ok"] is True
        await b.chat("kept", "before")
        await js.wait_for(lambda c: len(c.chats()) == 1, what="the first chat")
        first = js.connects()[0]
        front.refusing = True
        front.cut()
        await b.chat("kept", "while away")
        front.target = ("127.0.0.1", gws[1].port)
        front.refusing = False
        await js.wait_for(lambda c: len(c.connects()) >= 2, timeout=30, what="a reconnect")
        again = js.connects()[-1]
        assert again["recovered"] is True and again["sid"] == first["sid"], js.events[-5:]
        await js.wait_for(lambda c: [m["text"] for m, _ in c.chats()] == ["before", "while away"],
                          what="the missed chat")
    finally:
        if js is not None:
            await js.close()
        if front is not None:
            await front.close()
        stop_all([g.child for g in gws])
    for gw in gws:
        assert gw.child is not None
        log = gw.child.log_path.read_text()
        assert "ermissions" not in log, f"{gw.node_id} was refused something it needs:\n{log}"


@pytest.mark.parametrize("login", ["wrong operator password", "a gateway's login"])
def test_provision_with_the_wrong_login_fails_naming_it(provisioned: NatsCluster,
                                                      login: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "GATEWAY_"))}
    if login == "a gateway's login":
        env.update(NATS_USER="gateway", NATS_PASSWORD=GATEWAY_PASSWORD)
        expected = "may not administer JetStream"
    else:
        env.update(NATS_OPERATOR_PASSWORD="not-the-password")
        expected = "refused the login"
    proc = subprocess.run([sys.executable, "-m", "gateway", "provision", "--nats-url",
                           ",".join(provisioned.urls), "--timeout", "20"],
                          capture_output=True, text=True, timeout=90, cwd=REPO, env=env)
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and GATEWAY_PASSWORD not in proc.stderr


@pytest.mark.parametrize("flag", ["--max-bytes", "--max-msg-size"])
def test_provision_refuses_a_stream_limit_below_the_floor(flag: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "provision", "--nats-url",
                           "nats://127.0.0.1:1", flag, "1000"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and flag in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
