"""Test helpers: recording Socket.IO clients, the Node.js client driver, metrics parsing."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import socketio
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.processes import LocalCluster, NatsCluster, RedisNode, http_json
from nats_adapter import ClusterManager
from nats_adapter.naming import encode_token

REPO = Path(__file__).resolve().parent.parent
#: how long a test waits for something that should happen
WAIT = 5.0
#: how long a test waits before concluding that something did not happen
SETTLE = 0.4
#: how long a client's goodbye may take before its connection is just dropped
CLOSE_BOUND = 1.0
#: The NATS clusters the running tests' gateways use, each as a function that gives
#: its servers' monitoring URLs: what :meth:`SioClient.join` waits on (see
#: :func:`watching_interest`)
_WATCHED: list[Callable[[], Sequence[str]]] = []


@dataclass
class Node:
    """A gateway node running in the test's event loop."""

    node_id: str
    url: str
    runner: web.AppRunner
    sio: socketio.AsyncServer
    manager: ClusterManager
    config: GatewayConfig


Cluster = TypeVar("Cluster", bound=LocalCluster[Any])


@contextlib.contextmanager
def running(cluster: Cluster) -> Iterator[Cluster]:
    """Start ``cluster``; stop every process it started on the way out, a failed start
    too. While a NATS cluster runs, :meth:`SioClient.join` waits for its interest."""
    try:
        cluster.start()
        if isinstance(cluster, NatsCluster):
            nodes = cluster.nodes
            with watching_interest(lambda: [n.monitor_url for n in nodes]):
                yield cluster
        else:
            yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def watching_interest(monitor_urls: Callable[[], Sequence[str]]) -> Iterator[None]:
    """While inside, :meth:`SioClient.join` returns only once every server of the NATS
    cluster whose monitoring URLs ``monitor_urls()`` gives knows who subscribes to the
    room (:func:`interest_everywhere`)."""
    _WATCHED.append(monitor_urls)
    try:
        yield
    finally:
        _WATCHED.remove(monitor_urls)


async def wait_for_condition(check: Callable[[], Any], what: str, timeout: float = WAIT,
                             interval: float = 0.02) -> None:
    """Poll ``check()`` (a bool, or an awaitable of one) until it is true; fail naming
    ``what`` after ``timeout`` seconds. What a test waits for, instead of a fixed sleep."""
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state T or t)."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            continue  # the thread exited meanwhile
    return bool(states) and all(state in "Tt" for state in states)


async def freeze(pid: int) -> None:
    """SIGSTOP process ``pid`` and return once all its threads are stopped.

    ``kill`` only queues the signal: until one of the target's threads is scheduled
    and takes it, the others keep running, so on a loaded machine a server could
    still answer what is sent right after the kill (a PING seen answered 0.5 ms
    after it)."""
    os.kill(pid, signal.SIGSTOP)
    await wait_for_condition(lambda: all_threads_stopped(pid), f"process {pid} to stop",
                             interval=0.005)


async def wait_recorded(client: SioClient | NodeClient, done: Callable[[], bool],
                        timeout: float, what: str) -> None:
    """Wait until ``done()``, waking whenever ``client`` records an event."""
    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{client.name}: timed out waiting for {what}; "
                                 f"got {client.events!r}")
        client._changed.clear()
        try:
            async with asyncio.timeout(min(remaining, 0.2)):
                await client._changed.wait()
        except TimeoutError:
            pass


class Loops:
    """Background loops a test runs (senders) and stops. A loop asks ``running`` every
    turn besides being cancelled: on Python 3.11, asyncio.wait_for (which
    python-socketio's ``call`` awaits) swallows a cancellation that lands just as the
    awaited event fires (cpython gh-86296), and a ``while True`` loop would carry on
    while ``stop`` waits for it forever (ci-12: a recovery test hung 300 s with its
    senders still chatting)."""

    def __init__(self) -> None:
        self.running = True
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, loop: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(loop))

    async def stop(self) -> None:
        self.running = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class SioClient:
    """python-socketio's AsyncClient that records every event it receives."""

    def __init__(self, name: str = "client", offsets: bool = False,
                 connection_per_request: bool = False) -> None:
        self.name = name
        #: ``connection_per_request``: every HTTP request and the websocket on a new TCP
        #: connection, so a round-robin front spreads them as a balancer that balances
        #: each request would (aiohttp otherwise reuses one kept-alive connection for the
        #: polls and even the upgrade)
        self.http: aiohttp.ClientSession | None = None
        if connection_per_request:
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        self.sio = socketio.AsyncClient(reconnection=False, http_session=self.http)
        self.events: list[tuple[str, Any]] = []
        #: with connection state recovery, events end with an offset: kept apart here
        self.strip_offsets = offsets
        self.offsets: list[str] = []
        #: time.monotonic() of each event, in the order of ``events``
        self.times: list[float] = []
        self._changed = asyncio.Event()
        #: replies for server-initiated calls, by event name
        self.replies: dict[str, Callable[..., Any]] = {}
        self.sio.on("*", self._record)

    async def _record(self, event: str, *args: Any) -> Any:
        if self.strip_offsets and args and isinstance(args[-1], str):
            self.offsets.append(args[-1])
            args = args[:-1]
        self.events.append((event, args[0] if len(args) == 1 else list(args)))
        self.times.append(time.monotonic())
        self._changed.set()
        reply = self.replies.get(event)
        if reply is None:
            return None
        result = reply(*args)
        return await result if inspect.isawaitable(result) else result

    async def connect(self, url: str, auth: Any = None,
                      transports: list[str] | None = None) -> SioClient:
        """Connect websocket-first, or with ``transports`` (``["polling", "websocket"]``:
        the client's default mode, polling, then the upgrade)."""
        await self.sio.connect(url, transports=transports or ["websocket"], auth=auth,
                               wait_timeout=WAIT)
        return self

    @property
    def sid(self) -> str:
        sid = self.sio.get_sid("/")
        assert sid is not None
        return str(sid)

    async def call(self, event: str, *args: Any, timeout: float = WAIT) -> Any:
        data: Any = args[0] if len(args) == 1 else (tuple(args) if args else None)
        return await self.sio.call(event, data, timeout=timeout)

    async def join(self, room: str) -> None:
        ack = await self.call("join", room)
        assert ack == {"ok": True, "room": room}, ack
        await wait_interest_everywhere(room)

    async def chat(self, room: str, text: str) -> str:
        ack = await self.call("chat", {"room": room, "text": text})
        assert ack["ok"] is True, ack
        return str(ack["id"])

    def received(self, event: str = "chat") -> list[Any]:
        return [data for name, data in self.events if name == event]

    def texts(self) -> list[str]:
        return [m["text"] for m in self.received("chat")]

    async def wait_for(self, predicate: Callable[[SioClient], bool], timeout: float = WAIT,
                       what: str = "an event") -> None:
        await wait_recorded(self, lambda: predicate(self), timeout, what)

    async def wait_texts(self, texts: list[str], timeout: float = WAIT) -> None:
        await self.wait_for(lambda c: sorted(c.texts()) == sorted(texts), timeout,
                            f"chat texts {texts!r}")

    async def close(self) -> None:
        """Disconnect. When the server went away just before (a test stopped its
        gateway), python-engineio's client can hang here until its ping timeout (its
        write loop waits 30 s on an empty queue); past a bound the connection is
        dropped instead of said goodbye to."""
        try:
            if not self.sio.connected:
                return
            try:
                async with asyncio.timeout(CLOSE_BOUND):
                    await self.sio.disconnect()
            except TimeoutError:
                await self.sio.eio.disconnect(abort=True)
        finally:
            if self.http is not None:
                await self.http.close()


async def refusal(url: str, auth: Any) -> str:
    """The connect_error message a client connecting with ``auth`` gets."""
    client = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", lambda data: errors.append(data))
    try:
        await client.connect(url, transports=["websocket"], auth=auth, wait_timeout=5)
    except socketio.exceptions.ConnectionError:
        pass
    else:
        raise AssertionError(f"the connection with auth {auth!r} was not refused")
    finally:
        await client.disconnect()
    assert len(errors) == 1, errors
    return str(errors[0]["message"])


async def connect_all(clients: list[SioClient], pairs: list[tuple[str, Node | str]],
                      offsets: bool = False) -> list[SioClient]:
    """Connect one client per (name, node) and register them in ``clients`` for teardown."""
    made = []
    for name, node in pairs:
        c = SioClient(name, offsets)
        clients.append(c)
        await c.connect(node if isinstance(node, str) else node.url)
        made.append(c)
    return made


async def first_delivery_after(sender: SioClient, receiver: SioClient, room: str,
                               timeout: float) -> float:
    """Send every 50 ms until ``receiver`` gets one; seconds until it did. While the
    broker is away a chat is acked ``ok: false`` (refused or not confirmed), never
    with anything else."""
    start = time.monotonic()
    n = 0
    tag = uuid.uuid4().hex[:6]
    while time.monotonic() - start < timeout:
        n += 1
        text = f"probe-{tag}-{n}"
        ack = await sender.call("chat", {"room": room, "text": text}, timeout=10)
        assert ack["ok"] is True or ack["error"].startswith(("not delivered",
                                                             "not confirmed")), ack
        try:
            await receiver.wait_for(lambda c, t=text: t in c.texts(), timeout=0.05,
                                    what="probe")
            return time.monotonic() - start
        except AssertionError:
            continue
    raise AssertionError(f"no cross-node delivery within {timeout}s")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} plus {'name': sum over labels}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value) if name != key else float(value)
    return out


def metrics_of(url: str) -> dict[str, float]:
    """Every metric of the gateway at ``url`` (see :func:`parse_metrics`)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return parse_metrics(resp.read().decode())


def _metric(url: str, name: str) -> float:
    return metrics_of(url).get(name, 0.0)


async def read_metric(url: str, name: str) -> float:
    """The value of metric ``name`` (summed over labels) on the gateway at ``url``."""
    return await asyncio.to_thread(_metric, url, name)


def interest_everywhere(monitor_urls: Sequence[str], matches: Callable[[str], bool]) -> bool:
    """Whether every NATS server at ``monitor_urls`` (one cluster's monitoring
    endpoints) has heard, over its routes, of every other server's local
    subscriptions to the subjects ``matches``: then a message published on any
    server reaches every subscriber.

    A subscription is acked once the subscriber's own server holds it; the others
    learn of it asynchronously (RS+). What a test waits for after a join instead of a
    fixed sleep. A server that does not answer (stopped by the test) is left out."""
    local: dict[str, set[str]] = {}  # server id -> matching subjects its clients hold
    routed: dict[str, dict[str, set[str]]] = {}  # server -> peer -> subjects it announced
    for url in monitor_urls:
        status, connz = http_json(f"{url}/connz?subs=1&limit=4096")
        if status != 200:
            continue
        status, routez = http_json(f"{url}/routez?subs=1")
        if status != 200:
            return False
        name = str(connz["server_id"])
        local[name] = {s for conn in connz.get("connections") or []
                       for s in conn.get("subscriptions_list") or [] if matches(s)}
        peers: dict[str, set[str]] = {}
        for route in routez.get("routes") or []:  # (a pool of several per peer)
            peers.setdefault(str(route.get("remote_id")), set()).update(
                s for s in route.get("subscriptions_list") or [] if matches(s))
        routed[name] = peers
    return all(subjects <= routed[other].get(holder, set())
               for holder, subjects in local.items()
               for other in local if other != holder)


def room_subjects(room: str, namespace: str = "/") -> Callable[[str], bool]:
    """Whether a subject is ``room``'s channel (live or not, whatever the prefix)."""
    tail = f".room.{encode_token(namespace)}.{encode_token(room)}"
    return lambda subject: subject.endswith(tail)


async def wait_interest(monitor_urls: Sequence[str], matches: Callable[[str], bool],
                        what: str) -> None:
    """Wait until :func:`interest_everywhere`."""
    await wait_for_condition(
        lambda: asyncio.to_thread(interest_everywhere, monitor_urls, matches),
        f"every NATS server to know who subscribes to {what}")


async def wait_room_interest(monitor_urls: Sequence[str], room: str,
                             namespace: str = "/") -> None:
    """Wait until every server at ``monitor_urls`` knows who subscribes to ``room``."""
    await wait_interest(monitor_urls, room_subjects(room, namespace), f"room {room!r}")


async def wait_interest_everywhere(room: str, namespace: str = "/") -> None:
    """:func:`wait_room_interest` on every NATS cluster :func:`watching_interest` watches."""
    for monitor_urls in list(_WATCHED):
        await wait_room_interest(monitor_urls(), room, namespace)


async def wait_subject_everywhere(subject: str) -> None:
    """The same for one literal ``subject``."""
    for monitor_urls in list(_WATCHED):
        await wait_interest(monitor_urls(), subject.__eq__, repr(subject))


def nats_subjects(monitor_urls: list[str], connection_name: str) -> set[str]:
    """Subjects the NATS connection named ``connection_name`` subscribes to, on any server."""
    subjects: set[str] = set()
    for url in monitor_urls:
        status, body = http_json(f"{url}/connz?subs=1&limit=1024")
        assert status == 200, f"{url}/connz answered {status}"
        for conn in body.get("connections", []):
            if conn.get("name") == connection_name:
                subjects.update(conn.get("subscriptions_list") or [])
    return subjects


class NodeClient:
    """The official socket.io-client, in Node.js, driven line by line (tests/js/driver.mjs)."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self.events: list[dict[str, Any]] = []
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(cls, node_bin: str, url: str, name: str = "node",
                    transports: Sequence[str] = ("websocket",),
                    **options: Any) -> NodeClient:
        """Connect; ``transports`` as socket.io-client's option (its default, the one
        browsers use, is ``("polling", "websocket")``: polling, then an upgrade);
        ``options``, more of ``io()``'s (``reconnection=True``: the driver's default
        is to give up on the first loss)."""
        args = json.dumps({"transports": list(transports), **options})
        proc = await asyncio.create_subprocess_exec(
            node_bin, str(REPO / "tests" / "js" / "driver.mjs"), url, "", args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=str(REPO),
        )
        client = cls(proc, name)
        await client.wait_for(lambda c: any(e["type"] == "connect" for e in c.events),
                              what="connect")
        return client

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            msg = json.loads(line)
            if msg["type"] == "ack":
                fut = self._acks.pop(msg["ref"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg["data"])
            else:
                self.events.append(msg)
            self._changed.set()

    @property
    def sid(self) -> str:
        for e in self.events:
            if e["type"] == "connect":
                return str(e["sid"])
        raise AssertionError("not connected")

    async def call(self, event: str, *args: Any, timeout: float = WAIT) -> Any:
        assert self.proc.stdin is not None
        self._next += 1
        ref = self._next
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[ref] = fut
        self.proc.stdin.write(json.dumps({"ref": ref, "event": event, "args": list(args)})
                              .encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(timeout):
            return await fut

    def received(self, event: str = "chat") -> list[Any]:
        return [e["data"] for e in self.events if e["type"] == "event" and e["event"] == event]

    def texts(self) -> list[str]:
        return [m["text"] for m in self.received("chat")]

    @property
    def upgraded(self) -> bool:
        return any(e["type"] == "upgrade" for e in self.events)

    async def wait_for(self, predicate: Callable[[NodeClient], bool], timeout: float = WAIT,
                       what: str = "an event") -> None:
        def done() -> bool:
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.name}: node exited with {self.proc.returncode}")
            return predicate(self)

        await wait_recorded(self, done, timeout, what)

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._reader.cancel()



def owner_of(nodes: Sequence[RedisNode], channel: str) -> RedisNode:
    """The Redis Cluster master that owns ``channel``'s hash slot, asked of Redis itself."""
    slot = int(nodes[0].cli("CLUSTER", "KEYSLOT", channel).strip())
    for node in nodes:
        myself = next(line for line in node.cli("CLUSTER", "NODES").splitlines()
                      if "myself" in line)
        for part in myself.split()[8:]:
            lo, _, hi = part.partition("-")
            if lo.isdigit() and int(lo) <= slot <= int(hi or lo):
                return node
    raise AssertionError(f"no master owns slot {slot}")


def tls_files(folder: Path) -> dict[str, str]:
    """A CA and a node certificate for 127.0.0.1, made with openssl."""
    ca_key, ca, key, csr, cert = (str(folder / n) for n in
                                  ("ca.key", "ca.pem", "node.key", "node.csr", "node.pem"))
    ext = folder / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "2", "-subj", "/CN=test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
         "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", str(ext)],
    ):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)
    return {"NATS_TLS_CERT": cert, "NATS_TLS_KEY": key, "NATS_TLS_CA": ca}


#: one sealer per cluster key, so that its sequence numbers never repeat (a repeat is
#: dropped as a replay before anything else is checked)
_SEALERS: dict[str, Any] = {}


def seal_with(key: str, payload: bytes, channel: str) -> bytes:
    """``payload`` sealed with cluster key ``key`` for ``channel`` (a live or node
    channel, not a stored one), as a rogue holding the key would send it: what must
    then pass every check after the seal's."""
    from nats_adapter.sealing import ClusterKey

    sealer = _SEALERS.setdefault(key, ClusterKey(key.encode()))
    return bytes(sealer.seal(payload, channel))
