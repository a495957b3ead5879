"""Connection state recovery across gateways, with the official socket.io-client in its
default settings, reconnecting through a front that sends it to the other gateway.

A dedicated 3-node NATS cluster with JetStream; gateways run with --recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.processes import (
    GatewayNode,
    NatsCluster,
    NatsNode,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from tests.helpers import (
    REPO,
    WAIT,
    Loops,
    NodeClient,
    SioClient,
    connect_all,
    http_json,
    metrics_of,
    running,
)
from tools.bench.front import Front


class DefaultClient(NodeClient):
    """socket.io-client with default options (tests/js/recovery_driver.mjs)."""

    @classmethod
    async def start(cls, node_bin: str, url: str, name: str = "node") -> DefaultClient:
        proc = await asyncio.create_subprocess_exec(
            node_bin, str(REPO / "tests" / "js" / "recovery_driver.mjs"), url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(REPO))
        client = cls(proc, name)
        await client.wait_for(lambda c: c.connects(), what="connect")
        return client

    def connects(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "connect"]

    def chats(self) -> list[tuple[dict[str, Any], str]]:
        """(message, offset) of every chat received."""
        return [(e["args"][0], e["args"][-1]) for e in self.events
                if e["type"] == "event" and e["event"] == "chat"]


def metadata_leader(cluster: NatsCluster) -> NatsNode:
    """The NATS node that leads JetStream's metadata (stream and consumer placement)."""
    for node in cluster.nodes:
        jsz = node.varz("jsz")
        leader = (jsz or {}).get("meta_cluster", {}).get("leader")
        if leader:
            return next(n for n in cluster.nodes if n.name == leader)
    raise AssertionError("no JetStream metadata leader")


@pytest.fixture(scope="module")
def nats3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    with running(NatsCluster(tmp_path_factory.mktemp("recovery") / "nats", size=3)) as c:
        yield c


def start_gateways(workdir: Path, cluster: NatsCluster, count: int, *extra: str
                   ) -> list[GatewayNode]:
    gws: list[GatewayNode] = []
    try:
        for i, port in enumerate(free_ports(count)):
            gws.append(start_gateway(workdir, f"rec-gw-{i + 1}-{uuid.uuid4().hex[:4]}", port,
                                     "nats", cluster.gateway_args(),
                                     extra=["--recovery", "on", "--heartbeat-interval", "0.5",
                                            *extra]))
        wait_gateways(gws, timeout=40)
    except BaseException:
        stop_all([g.child for g in gws])
        raise
    return gws


@pytest.fixture
def trio(tmp_path: Path, nats3: NatsCluster) -> Iterator[list[GatewayNode]]:
    """gw-1: where the client starts; gw-2: where the front sends it back; gw-3: a sender."""
    gws = start_gateways(tmp_path, nats3, 3)
    try:
        yield gws
    finally:
        stop_all([g.child for g in gws])


@pytest.fixture
async def front(trio: list[GatewayNode]) -> AsyncIterator[Front]:
    f = await Front(("127.0.0.1", trio[0].port)).start()
    try:
        yield f
    finally:
        await f.close()


class Senders:
    """a on gw-1 and b on gw-2 chat on every room every 100 ms."""

    def __init__(self, a: SioClient, b: SioClient, rooms: list[str]) -> None:
        self.sent: list[tuple[str, str]] = []  # (room, text)
        self._loops = Loops()
        for c in (a, b):
            self._loops.start(self._run(c, rooms))

    async def _run(self, c: SioClient, rooms: list[str]) -> None:
        n = 0
        while self._loops.running:
            n += 1
            for room in rooms:
                text = f"{c.name}-{room}-{n}"
                ack = await c.call("chat", {"room": room, "text": text})
                if isinstance(ack, dict) and ack.get("ok"):
                    self.sent.append((room, text))
            await asyncio.sleep(0.1)  # paces the senders

    async def stop(self) -> None:
        await self._loops.stop()


async def until(done: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


OUTAGES = ["network", "sigterm", "sigkill", "nats-node"]


@pytest.mark.parametrize("outage", OUTAGES)
async def test_a_dropped_client_comes_back_on_the_other_gateway_with_nothing_missed(
        outage: str, trio: list[GatewayNode], front: Front, nats3: NatsCluster,
        clients: list[SioClient], node_bin: str) -> None:
    """In two rooms, with chat flowing on both from two gateways, the client loses its
    connection for 5 s (its network drops; its gateway is stopped for a rolling
    deploy; its gateway crashes; a NATS node dies meanwhile) and comes back through
    the front on another gateway: recovered, same sid, both rooms, every message it
    missed once and in order, none of its own."""
    rooms = [f"rec-{uuid.uuid4().hex[:4]}" for _ in range(2)]
    a, b = await connect_all(clients, [("a", trio[2].url), ("b", trio[1].url)], offsets=True)
    js = await DefaultClient.start(node_bin, front.url, "js")
    senders = None
    killed_nats = None
    try:
        for room in rooms:
            for c in (a, b):
                await c.join(room)
            assert (await js.call("join", room))["ok"] is True
        first = js.connects()[0]
        assert first["recovered"] is False
        mine = (await js.call("chat", {"room": rooms[0], "text": "from js"}))["id"]
        senders = Senders(a, b, rooms)
        await until(lambda: len(js.chats()) >= 10)
        front.refusing = True
        gw1 = trio[0].child
        assert gw1 is not None
        if outage == "sigterm":
            gw1.signal(signal.SIGTERM)
        elif outage == "sigkill":
            gw1.signal(signal.SIGKILL)
        else:
            front.cut()
        if outage == "nats-node":
            # the one leading JetStream's metadata: no consumer can be created until
            # the others elect a new leader, which takes seconds
            killed_nats = metadata_leader(nats3)
            assert killed_nats.child is not None
            killed_nats.child.signal(signal.SIGKILL)
        await asyncio.sleep(5)  # the outage's length (not a wait)
        front.target = ("127.0.0.1", trio[1].port)
        front.refusing = False
        await until(lambda: len(js.connects()) >= 2, timeout=20)
        again = js.connects()[-1]
        assert again["recovered"] is True, js.events[-10:]
        assert again["sid"] == first["sid"]
        await asyncio.sleep(1.0)  # live traffic after the seam (its length, not a wait)
        await senders.stop()
        sent = set(senders.sent)
        # the last chats are on their way; what never comes is reported below
        with contextlib.suppress(AssertionError):
            await until(lambda: sent <= {(m["room"], m["text"]) for m, _ in js.chats()})
        got = [(m["room"], m["text"]) for m, _ in js.chats()]
        print(f"\n{outage}: sent {len(sent)}, received {len(got)}")
        assert len(got) == len(set(got)), "a message arrived twice"
        assert all(m["id"] != mine for m, _ in js.chats()), "its own message came back"
        missing = sent - set(got)
        assert not missing, f"{len(missing)} of {len(sent)} never arrived: {sorted(missing)[:5]}"
        offsets = [int(o) for _, o in js.chats()]
        assert offsets == sorted(offsets), "not in the store's order"
        for sender in ("a", "b"):
            for room in rooms:
                seq = [int(t.rsplit("-", 1)[1]) for r, t in got
                       if r == room and t.startswith(f"{sender}-")]
                assert seq == sorted(seq), f"{sender} on {room} out of order"
        # both rooms are still joined, now on gw-2
        ack = await js.call("chat", {"room": rooms[1], "text": "back"})
        assert ack["ok"] is True, ack
        await a.wait_for(lambda c: "back" in c.texts(), what="the recovered client's chat")
    finally:
        if senders is not None:
            await senders.stop()
        await js.close()
        if killed_nats is not None:
            nats3.start_node(nats3.nodes.index(killed_nats))
            nats3.wait_ready()


async def test_a_session_moved_on_upgrade_is_recovered_after_a_drop(
        trio: list[GatewayNode], clients: list[SioClient], node_bin: str) -> None:
    """socket.io-client in its default mode through a round-robin front over gw-1 and
    gw-2: its upgrade lands on the gateway that does not own its session, which takes
    the session over (nats_adapter.handover) with its recovery pid. Chats reach it
    once; its connection then drops for 2 s, and it comes back through the front,
    recovered (same sid, its room, every missed chat once)."""
    room = f"mv-{uuid.uuid4().hex[:4]}"
    (a,) = await connect_all(clients, [("a", trio[2].url)], offsets=True)
    await a.join(room)
    pair = [("127.0.0.1", g.port) for g in trio[:2] for _ in range(2)]
    front = await Front(*pair).start()
    js = await DefaultClient.start(node_bin, front.url, "js")
    try:
        async def moved() -> float:
            found = [await asyncio.to_thread(metrics_of, g.url) for g in trio[:2]]
            return sum(v for f in found for k, v in f.items()
                       if k.startswith("gateway_session_moves_total{")
                       and 'outcome="moved"' in k)

        deadline = time.monotonic() + WAIT
        while await moved() < 1:
            assert time.monotonic() < deadline, "the session did not move"
            await asyncio.sleep(0.05)
        assert (await js.call("join", room))["ok"] is True
        first = js.connects()[0]
        sent = []
        for i in range(3):
            sent.append(f"live-{i}")
            await a.chat(room, sent[-1])
        await until(lambda: len(js.chats()) == 3)
        front.refusing = True
        front.cut()
        for i in range(3):
            sent.append(f"missed-{i}")
            await a.chat(room, sent[-1])
        await asyncio.sleep(2)  # the outage's length (not a wait)
        front.refusing = False
        with contextlib.suppress(AssertionError):
            await until(lambda: len(js.connects()) >= 2, timeout=20)
        assert len(js.connects()) >= 2, [e for e in js.events if e["type"] != "event"]
        again = js.connects()[-1]
        assert again["recovered"] is True, js.events[-10:]
        assert again["sid"] == first["sid"]
        sent.append("after")
        await a.chat(room, "after")
        await until(lambda: len(js.chats()) >= len(sent))
        assert [m["text"] for m, _ in js.chats()] == sent
    finally:
        await js.close()
        await front.close()


async def test_bad_pids_and_offsets_get_a_new_session_never_someone_elses(
        trio: list[GatewayNode], clients: list[SioClient]) -> None:
    room = f"rec-{uuid.uuid4().hex[:4]}"
    (owner,) = await connect_all(clients, [("owner", trio[0].url)], offsets=True)
    await owner.join(room)
    (other,) = await connect_all(clients, [("other", trio[1].url)], offsets=True)
    await other.join(room)
    await other.chat(room, "so owner has an offset")
    await owner.wait_for(lambda c: c.texts() == ["so owner has an offset"], what="a chat")
    # what a forger might send in its CONNECT auth
    attempts = [
        {"pid": "forged-pid", "offset": owner.offsets[-1]},
        {"pid": "x" * 5000, "offset": "1"},
        {"pid": 5, "offset": "1"},
        {"pid": "AAAAAAAAAAAAAAAAAAAAAA", "offset": "not a number"},
        {"pid": "AAAAAAAAAAAAAAAAAAAAAA", "offset": "99999999999999999999999"},
    ]
    for auth in attempts:
        c = SioClient("forger", offsets=True)
        clients.append(c)
        await c.connect(trio[2].url, auth=auth)
        assert c.sid != owner.sid
        refused = await c.call("chat", {"room": room, "text": "let me in"})
        assert refused["ok"] is False and "not a member" in refused["error"], (auth, refused)
        await c.close()
    assert owner.sio.connected, "an attempt disturbed the real session"


async def test_history_on_join_and_over_http(trio: list[GatewayNode],
                                           clients: list[SioClient]) -> None:
    room = f"hist-{uuid.uuid4().hex[:4]}"
    (talker,) = await connect_all(clients, [("talker", trio[0].url)], offsets=True)
    await talker.join(room)
    for i in range(8):
        await talker.chat(room, f"h{i}")
    (late,) = await connect_all(clients, [("late", trio[1].url)], offsets=True)
    ack = await late.call("join", {"room": room, "history": 5})
    assert ack["ok"] is True and [m["text"] for m in ack["history"]] == \
        [f"h{i}" for i in range(3, 8)], ack
    too_many = await late.call("join", {"room": room, "history": 10**9})
    assert too_many["ok"] is False and "history must be" in too_many["error"]
    status, body = await asyncio.to_thread(
        http_json, f"{trio[2].url}/api/rooms/{room}/messages?limit=3")
    assert status == 200 and [m["text"] for m in body["messages"]] == ["h5", "h6", "h7"]
    status, body = await asyncio.to_thread(
        http_json, f"{trio[2].url}/api/rooms/{room}/messages?limit=100000")
    assert status == 400


async def test_past_the_window_a_client_gets_a_fresh_session(
        tmp_path: Path, nats3: NatsCluster, clients: list[SioClient], node_bin: str) -> None:
    gws = start_gateways(tmp_path, nats3, 1, "--recovery-window", "2")
    front = await Front(("127.0.0.1", gws[0].port)).start()
    js = await DefaultClient.start(node_bin, front.url, "js")
    try:
        room = f"rec-{uuid.uuid4().hex[:4]}"
        assert (await js.call("join", room))["ok"] is True
        (other,) = await connect_all(clients, [("other", gws[0].url)], offsets=True)
        await other.join(room)
        await other.chat(room, "one")
        await js.wait_for(lambda c: len(c.chats()) == 1, what="a chat")
        front.refusing = True
        front.cut()
        await asyncio.sleep(4)  # twice the window: time itself is the condition
        front.refusing = False
        await until(lambda: len(js.connects()) >= 2, timeout=15)
        again = js.connects()[-1]
        assert again["recovered"] is False
        assert again["sid"] != js.connects()[0]["sid"]
        refused = await js.call("chat", {"room": room, "text": "still here?"})
        assert refused["ok"] is False and "not a member" in refused["error"]
    finally:
        await js.close()
        await front.close()
        stop_all([g.child for g in gws])


@pytest.mark.browser
async def test_the_chat_page_in_chromium_recovers_and_says_so(
        trio: list[GatewayNode], front: Front, clients: list[SioClient], node_bin: str,
        chromium_bin: str, tmp_path: Path) -> None:
    room = f"page-{uuid.uuid4().hex[:4]}"
    (talker,) = await connect_all(clients, [("talker", trio[2].url)], offsets=True)
    await talker.join(room)
    await talker.chat(room, "before the page came")
    proc = await asyncio.create_subprocess_exec(
        node_bin, str(REPO / "tests" / "js" / "browser_recovery.mjs"), front.url, room,
        chromium_bin, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=str(REPO), env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                            "SCREENSHOT": str(tmp_path / "recovered.png")})
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        assert ready.get("ready"), ready
        sent = []
        for i in range(5):
            sent.append(f"live-{i}")
            await talker.chat(room, sent[-1])
        front.refusing = True
        front.cut()
        for i in range(5):  # while the page is away
            sent.append(f"missed-{i}")
            await talker.chat(room, sent[-1])
            await asyncio.sleep(0.5)  # paces the chats while it is away
        front.target = ("127.0.0.1", trio[1].port)
        front.refusing = False
        proc.stdin.write(json.dumps({"messages": len(sent)}).encode() + b"\n")
        await proc.stdin.drain()
        seen = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert seen["errors"] == [], seen["errors"]
    assert [c["recovered"] for c in seen["connects"]] == [False, True]
    assert seen["connects"][1]["id"] == ready["id"]
    assert [m["text"] for m in seen["messages"]] == sent
    assert "reconnected: session recovered, nothing was missed" in seen["log"]
    # and says so where it is seen, not only in the log
    assert seen["banner"] == ["Reconnected: session recovered, nothing was missed", "ok"]
    assert seen["bannerVisible"] is True
    assert (tmp_path / "recovered.png").stat().st_size > 0
    assert f"[{room}] {talker.sid}: before the page came (earlier)" in seen["log"]


async def test_a_replay_whose_consumer_is_drained_under_it_fails_loudly(
        nats3: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone else (a stolen gateway password) pulls messages from the ephemeral
    consumer a catch-up reads: the replay raises BrokerError instead of returning a
    list with a hole in it (a restored client would silently miss messages)."""
    import nats
    from nats.js.client import JetStreamContext

    from nats_adapter.brokers.base import BrokerError
    from nats_adapter.brokers.nats_store import NatsMessageStore

    nc = await nats.connect(nats3.urls[0], allow_reconnect=False, connect_timeout=2)
    thief = await nats.connect(nats3.urls[0], allow_reconnect=False, connect_timeout=2)
    try:
        # the consumer path (where direct gets cannot serve; see the tests below)
        store = NatsMessageStore(nc, "drained", window=60.0, direct_reads=False)
        await store.setup()
        seqs = [await store.publish("drained.store.r.x", f"m{i}".encode()) for i in range(5)]
        fetch = JetStreamContext.PullSubscription.fetch
        stolen: list[bytes] = []

        async def fetch_after_a_theft(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not stolen:
                name = (await self.consumer_info()).name
                other = await thief.jetstream().pull_subscribe_bind(stream=store.stream,
                                                                     name=name)
                stolen.extend(m.data for m in await fetch(other, 1, timeout=5))
            return await fetch(self, *args, **kwargs)

        monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", fetch_after_a_theft)
        with pytest.raises(BrokerError, match="someone else"):
            await store.replay(["drained.store.r.x"], seqs[0] - 1, seqs[-1])
        assert stolen == [b"m0"]
    finally:
        await thief.close()
        await nc.close()


class ApiWatch:
    """Counts the JetStream API requests on ``$JS.API.{kind}.{stream}…`` that any
    client makes (a plain subscriber sees requests as the server does)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def _cb(self, msg: Any) -> None:
        self.seen.append(msg.subject)

    async def watch(self, nc: Any, kind: str, stream: str) -> None:
        await nc.subscribe(f"$JS.API.{kind}.{stream}", cb=self._cb)
        await nc.subscribe(f"$JS.API.{kind}.{stream}.>", cb=self._cb)
        await nc.flush()


async def test_a_replay_reads_by_direct_gets_with_no_consumer(
        nats3: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A catch-up's replay reads with batched direct gets: the same messages, in the
    same order, as a consumer reads, and no consumer is created (JetStream's metadata
    leader is not asked). Pages of a batch each, and a look back by time, too."""
    import nats

    from nats_adapter.brokers import nats_store
    from nats_adapter.brokers.nats_store import NatsMessageStore

    monkeypatch.setattr(nats_store, "DIRECT_BATCH", 3)  # several pages per subject
    nc = await nats.connect(nats3.urls[1], allow_reconnect=False, connect_timeout=2)
    try:
        # the gateways' stream, on subjects of this test's (the test cluster has room
        # for few streams)
        direct = NatsMessageStore(nc, "sio", window=120.0)
        by_consumer = NatsMessageStore(nc, "sio", window=120.0, direct_reads=False)
        await direct.setup()
        await by_consumer.setup()
        started = time.time()
        test = uuid.uuid4().hex[:6]
        subjects = [f"sio.store.t{test}.{name}" for name in ("a", "b", "c", "noise")]
        seqs = [await direct.publish(subjects[i % 4], f"m{i}".encode()) for i in range(40)]
        wanted = subjects[:3]
        watch = ApiWatch()
        await watch.watch(nc, "CONSUMER.CREATE", direct.stream)
        _, last = await direct.bounds()
        assert last == seqs[-1]
        cases = [(seqs[4], seqs[30], None), (0, seqs[-1], None), (seqs[-1], seqs[-1], None),
                 (0, seqs[20], started - 1)]
        got = [await direct.replay(wanted, after, until, since)
               for after, until, since in cases]
        await nc.flush()
        assert watch.seen == [], "a direct replay created a consumer"
        assert direct.reads == {"direct": 3, "consumer": 0}
        expected = [await by_consumer.replay(wanted, after, until, since)
                    for after, until, since in cases]
        assert got == expected
        assert [seq for seq, _, _ in got[0]] == [s for i, s in enumerate(seqs)
                                                 if i % 4 < 3 and seqs[4] < s <= seqs[30]]
        assert {subject for _, subject, _ in got[1]} == set(wanted)
        assert got[2] == []
        await nc.flush()
        assert len(watch.seen) == 3  # the consumer path's, for comparison
    finally:
        await nc.close()


async def test_replays_of_one_room_at_once_share_their_reads(nats3: NatsCluster) -> None:
    """A storm: many sessions of one room restore at once, from different offsets.
    Their replays share direct reads of the room (one read serves those that came
    while another was under way), and each gets exactly its own range."""
    import nats

    from nats_adapter.brokers.nats_store import NatsMessageStore

    nc = await nats.connect(nats3.urls[0], allow_reconnect=False, connect_timeout=2)
    try:
        store = NatsMessageStore(nc, "sio", window=120.0)
        await store.setup()
        test = uuid.uuid4().hex[:6]
        room, other = f"sio.store.t{test}.room", f"sio.store.t{test}.other"
        seqs = [await store.publish(room if i % 3 else other, f"m{i}".encode())
                for i in range(30)]
        _, last = await store.bounds()
        watch = ApiWatch()
        await watch.watch(nc, "DIRECT.GET", store.stream)
        offsets = [seqs[i] for i in range(0, 20)]
        got = await asyncio.gather(*(store.replay([room, other], after, last)
                                     for after in offsets))
        for after, replayed in zip(offsets, got, strict=True):
            assert [seq for seq, _, _ in replayed] == [s for s in seqs if s > after]
        await nc.flush()
        # 20 replays of 2 subjects: a read each would be 40 (and a check each)
        assert len(watch.seen) <= 8, watch.seen
        assert store.reads == {"direct": 20, "consumer": 0}
    finally:
        await nc.close()


async def test_where_direct_gets_cannot_serve_a_replay_reads_through_a_consumer(
        nats3: NatsCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Detected, not guessed: a server older than 2.11, a server without a replica of
    the stream, a replica that lags behind the last message wanted, or direct gets
    that fail (a NATS user without the permission) leave the catch-up to a consumer,
    with the same result."""
    import nats
    from nats.aio.client import ServerVersion

    from nats_adapter.brokers import nats_store
    from nats_adapter.brokers.nats_store import NatsMessageStore

    nc = await nats.connect(nats3.urls[2], allow_reconnect=False, connect_timeout=2)
    subject = f"sio.store.t{uuid.uuid4().hex[:6]}.x"  # on the gateways' stream
    try:
        store = NatsMessageStore(nc, "sio", window=120.0)
        await store.setup()
        seqs = [await store.publish(subject, f"m{i}".encode())
                for i in range(5)]
        expected = [(s, subject, f"m{i}".encode()) for i, s in enumerate(seqs)]
        _, last = await store.bounds()
        assert await store.replay([subject], 0, last) == expected
        assert store.reads == {"direct": 1, "consumer": 0}

        # a replica that never catches up with the last message wanted
        monkeypatch.setattr(nats_store, "DIRECT_CATCH_UP", 0.05)
        assert await store.replay([subject], 0, last + 1) == expected
        assert store.reads == {"direct": 1, "consumer": 1}

        # no replica on this server
        store._local_replica = False
        assert await store.replay([subject], 0, last) == expected
        assert store.reads == {"direct": 1, "consumer": 2}
        await store.bounds()  # the cluster's answer: R3 on 3 nodes has one here
        assert store._local_replica is True

        # a direct get that is refused: consumers for a while
        monkeypatch.setattr(nats_store.NatsMessageStore, "_direct_get",
                            _refused_direct_get)
        assert await store.replay([subject], 0, last) == expected
        assert store.reads == {"direct": 1, "consumer": 3}
        assert store._direct_off_until > time.monotonic()
        monkeypatch.undo()

        # an older server: its version decides, from setup on
        monkeypatch.setattr(type(nc), "connected_server_version",
                            property(lambda self: ServerVersion("2.10.22")))
        old = NatsMessageStore(nc, "sio", window=120.0)
        await old.setup()
        assert await old.replay([subject], 0, last) == expected
        assert old.reads == {"direct": 0, "consumer": 1}
    finally:
        await nc.close()


async def test_a_restore_through_a_gateway_creates_no_consumer(
        trio: list[GatewayNode], front: Front, nats3: NatsCluster,
        clients: list[SioClient], node_bin: str) -> None:
    """A client cut off comes back on another gateway and gets what it missed, while
    JetStream sees no consumer created: the catch-up read the stream by direct gets
    (a storm of restores does not queue behind JetStream's metadata leader)."""
    import nats

    watcher = await nats.connect(nats3.urls[0], allow_reconnect=False, connect_timeout=2)
    watch = ApiWatch()
    await watch.watch(watcher, "CONSUMER.CREATE", "SIO_sio")
    js = await DefaultClient.start(node_bin, front.url, "js")
    try:
        room = f"rec-{uuid.uuid4().hex[:4]}"
        assert (await js.call("join", room))["ok"] is True
        (other,) = await connect_all(clients, [("other", trio[2].url)], offsets=True)
        await other.join(room)
        await other.chat(room, "one")
        await until(lambda: len(js.chats()) == 1)
        front.refusing = True
        front.cut()
        for text in ("two", "three"):  # stored while it is away
            await other.chat(room, text)
        front.target = ("127.0.0.1", trio[1].port)
        front.refusing = False
        await until(lambda: len(js.connects()) >= 2, timeout=20)
        assert js.connects()[-1]["recovered"] is True, js.events[-10:]
        await until(lambda: len(js.chats()) >= 3)
        assert [m["text"] for m, _ in js.chats()] == ["one", "two", "three"]
        await watcher.flush()
        assert watch.seen == [], "the restore created a consumer"
    finally:
        await js.close()
        await watcher.close()


async def _refused_direct_get(self: Any, request: dict[str, Any], batch: bool = True) -> Any:
    from nats_adapter.brokers.nats_store import _DirectUnavailable

    raise _DirectUnavailable("status 503 No Responders")


@pytest.mark.parametrize("lands_on", ["the other gateway", "its gateway"])
async def test_a_dropped_client_recovers_through_a_round_robin_front(
        lands_on: str, trio: list[GatewayNode], clients: list[SioClient],
        node_bin: str) -> None:
    """No affinity and recovery together: a default-mode client behind a round-robin
    front over gw-1 and gw-2 (its polls and its upgrade spread over both), chat
    flowing from gw-2 and gw-3, loses its network for 5 s and comes back through the
    front, its new handshake landing on ``lands_on``: recovered, same sid, every chat
    sent meanwhile once and in order, and its own chats reach both senders again."""
    room = f"rec-rr-{uuid.uuid4().hex[:4]}"
    a, b = await connect_all(clients, [("a", trio[2].url), ("b", trio[1].url)], offsets=True)
    targets = [("127.0.0.1", trio[0].port), ("127.0.0.1", trio[1].port)]
    front = await Front(*targets).start()
    js = await DefaultClient.start(node_bin, front.url, "js")
    senders = None
    try:
        for c in (a, b):
            await c.join(room)
        assert (await js.call("join", room))["ok"] is True
        first = js.connects()[0]
        assert first["recovered"] is False
        owner = targets[0] if first["sid"][:8] != b.sid[:8] else targets[1]
        assert (await js.call("chat", {"room": room, "text": "from js"}))["ok"] is True
        for c in (a, b):
            await c.wait_for(lambda c: "from js" in c.texts(), what="js's chat")
        senders = Senders(a, b, [room])
        await until(lambda: len(js.chats()) >= 10)
        front.refusing = True
        front.cut()
        await asyncio.sleep(5)  # the outage's length (not a wait)
        back = owner if lands_on == "its gateway" else next(t for t in targets if t != owner)
        front.turn = targets.index(back)  # the next connection, its new handshake
        front.refusing = False
        await until(lambda: len(js.connects()) >= 2, timeout=20)
        again = js.connects()[-1]
        assert again["recovered"] is True, js.events[-10:]
        assert again["sid"] == first["sid"]
        await asyncio.sleep(1.0)  # live traffic after the seam (its length, not a wait)
        await senders.stop()
        sent = set(senders.sent)
        with contextlib.suppress(AssertionError):  # what never comes is reported below
            await until(lambda: sent <= {(m["room"], m["text"]) for m, _ in js.chats()})
        got = [(m["room"], m["text"]) for m, _ in js.chats()]
        assert len(got) == len(set(got)), "a message arrived twice"
        missing = sent - set(got)
        assert not missing, f"{len(missing)} of {len(sent)} never arrived: {sorted(missing)[:5]}"
        offsets = [int(o) for _, o in js.chats()]
        assert offsets == sorted(offsets), "not in the store's order"
        for sender in ("a", "b"):
            seq = [int(t.rsplit("-", 1)[1]) for _, t in got if t.startswith(f"{sender}-")]
            assert seq == sorted(seq), f"{sender} out of order"
        after = js.events[js.events.index(again):]
        assert not [e for e in after if e["type"] in ("connect_error", "disconnect")], after
        ack = await js.call("chat", {"room": room, "text": "back"})
        assert ack["ok"] is True, ack
        for c in (a, b):
            await c.wait_for(lambda c: c.texts().count("back") == 1,
                             what="the recovered client's chat")
            assert c.texts().count("from js") == 1
    finally:
        if senders is not None:
            await senders.stop()
        await js.close()
        await front.close()
