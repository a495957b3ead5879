"""``python -m tools.bench.soak``: the local cluster under fire for a given time.

Starts README's local cluster (``python -m gateway cluster --recovery``: 3 NATS
nodes, the gateways, its supervisor restarting what dies) and, for ``--minutes``:

- steady chat across many rooms from lean websocket clients (the bench's
  :class:`~tools.bench.loadgen.LeanSocket`), and join/leave churn;
- a reconnect storm every ``--storm-every`` s: a share of the clients (as many from
  each gateway) lose their TCP connection (reset, no goodbye) and come back, on the
  other gateway, with the pid and offset they kept (socket.io-client's recovery);
- a NATS node SIGKILLed every ``--kill-nats-every`` s (the launcher restarts it);
- a gateway restarted (SIGTERM; the launcher starts it again) every
  ``--restart-gateway-every`` s; its clients reconnect to it, recovering.

The intervals are multiplied by ``--scale`` (default: 1, or less when the run is
too short to see the longest interval once: 0.75 x run / longest).

Every ``--sample-every`` s it records each gateway's RSS and open fds, the
gateways' subscriptions on the NATS nodes (/connz), JetStream storage (/jsz), the
chat latency p50/p99 of the window, and the running loss counts. Every chat acked
``ok`` is checked against every member of its room at the send that stayed a
member: each must get it exactly once (after a reconnect too), offsets rising.

The output folder gets ``samples.csv``, ``summary.json`` (parameters, samples,
events, totals, verdict), ``soak.png`` and the cluster's log. The exit code is 0
when every check passes, 1 when one fails, 2 for bad arguments. SIGTERM (or SIGINT)
to its PID during the run ends it early with the same report, over what ran (a
Ctrl-C in its terminal stops the cluster at once too, so clients still away then
count as losses).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import time
from collections import defaultdict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.processes import (
    REPO_ROOT,
    Child,
    free_ports,
    http_json,
    port_is_free,
    spawn,
)

from . import soak_report as report
from .harness import rss_bytes
from .loadgen import LeanSocket, StampedSocket

MB = 1024 * 1024
STREAM_RETENTION_S = report.STREAM_RETENTION_S


@dataclass(frozen=True)
class SoakParams:
    minutes: float
    output: Path
    gateways: int = 2
    clients: int = 200
    rooms: int = 40
    rooms_per_client: int = 2
    #: chats per second, all clients together
    rate: float = 40.0
    #: joins and leaves per second, all clients together
    churn_rate: float = 4.0
    sample_every: float = 10.0
    storm_every: float = 300.0
    kill_nats_every: float = 600.0
    restart_gateway_every: float = 900.0
    scale: float | None = None
    storm_share: float = 0.25
    warmup: float | None = None
    #: seconds after a chat's ack before its deliveries are judged
    grace: float = 20.0
    rss_limit: float = 5.0
    seed: int = 7

    @property
    def duration(self) -> float:
        return self.minutes * 60

    @property
    def effective_scale(self) -> float:
        if self.scale is not None:
            return self.scale
        longest = max(self.storm_every, self.kill_nats_every, self.restart_gateway_every)
        return min(1.0, 0.75 * self.duration / longest)

    def every(self, kind: str) -> float:
        base = {"storm": self.storm_every, "kill-nats": self.kill_nats_every,
                "restart-gateway": self.restart_gateway_every}[kind]
        return base * self.effective_scale

    def times(self, kind: str) -> list[float]:
        """When the faults of ``kind`` begin (seconds into the run): every interval,
        the kills a third and the restarts two thirds of a storm interval earlier, so
        that no two begin together; none in the last 10% (at most 20 s) of the run."""
        every = self.every(kind)
        shift = {"storm": 0.0, "kill-nats": 1 / 3,
                 "restart-gateway": 2 / 3}[kind] * self.every("storm")
        end = self.duration - min(20.0, 0.1 * self.duration)
        out: list[float] = []
        k = 1
        while k * every - shift < end:
            if k * every - shift > 0:
                out.append(round(k * every - shift, 1))
            k += 1
        return out

    @property
    def warmup_s(self) -> float:
        """Seconds left out of the fits at the start: the stream's retention, which
        every time-bounded window of a gateway is within (at most 20% of the run)."""
        if self.warmup is not None:
            return self.warmup
        return min(STREAM_RETENTION_S, 0.2 * self.duration)

    @property
    def restart_warmup_s(self) -> float:
        """The same for a restarted gateway's own curves."""
        return self.warmup_s


def parse_args(argv: list[str]) -> SoakParams:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.soak",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--minutes", type=float, required=True, help="how long to run")
    parser.add_argument("--output", type=Path, required=True,
                        help="folder for samples.csv, summary.json, soak.png, logs")
    parser.add_argument("--gateways", type=int, default=2, help="gateways (default 2, at least 2)")
    parser.add_argument("--clients", type=int, default=200, help="websocket clients (default 200)")
    parser.add_argument("--rooms", type=int, default=40, help="rooms (default 40)")
    parser.add_argument("--rooms-per-client", type=int, default=2,
                        help="rooms each client stays in (default 2); churn adds and removes "
                             "one more")
    parser.add_argument("--rate", type=float, default=40.0,
                        help="chats per second, all clients together (default 40)")
    parser.add_argument("--churn-rate", type=float, default=4.0,
                        help="joins and leaves per second (default 4)")
    parser.add_argument("--sample-every", type=float, default=10.0,
                        help="seconds between samples (default 10)")
    parser.add_argument("--storm-every", type=float, default=300.0,
                        help="seconds between reconnect storms (default 300)")
    parser.add_argument("--kill-nats-every", type=float, default=600.0,
                        help="seconds between NATS node SIGKILLs (default 600)")
    parser.add_argument("--restart-gateway-every", type=float, default=900.0,
                        help="seconds between gateway restarts (default 900)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiplies the three intervals (default 1, or 0.75 x run / the "
                             "longest interval when that is less, so a short run sees each once)")
    parser.add_argument("--storm-share", type=float, default=0.25,
                        help="share of the clients a storm drops (default 0.25)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds left out of the flatness fits, at the start and after a "
                             "gateway's restart (default: the stream's retention, 600, or 20%% of "
                             "the run when less)")
    parser.add_argument("--rss-limit", type=float, default=5.0,
                        help="MB per hour a gateway's RSS may grow (default 5)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    def bad(flag: str, why: str) -> None:
        parser.error(f"{flag} {why}")

    if not args.minutes > 0:
        bad("--minutes", f"must be above 0, got {args.minutes}")
    if args.gateways < 2:
        bad("--gateways", f"must be at least 2 (storms move clients across), got {args.gateways}")
    if args.clients < 2 * args.gateways:
        bad("--clients", f"must be at least {2 * args.gateways}, got {args.clients}")
    if args.rooms < 1:
        bad("--rooms", f"must be at least 1, got {args.rooms}")
    if not 1 <= args.rooms_per_client < args.rooms:
        bad("--rooms-per-client", f"must be from 1 to --rooms - 1, got {args.rooms_per_client}")
    for flag, value in (("--rate", args.rate), ("--sample-every", args.sample_every),
                        ("--storm-every", args.storm_every),
                        ("--kill-nats-every", args.kill_nats_every),
                        ("--restart-gateway-every", args.restart_gateway_every)):
        if not value > 0:
            bad(flag, f"must be above 0, got {value}")
    if args.churn_rate < 0:
        bad("--churn-rate", f"must not be negative, got {args.churn_rate}")
    if args.scale is not None and not args.scale > 0:
        bad("--scale", f"must be above 0, got {args.scale}")
    if not 0 < args.storm_share <= 1:
        bad("--storm-share", f"must be in (0, 1], got {args.storm_share}")
    if args.warmup is not None and not 0 <= args.warmup < args.minutes * 60:
        bad("--warmup", f"must be from 0 to the run's length, got {args.warmup}")
    return SoakParams(
        minutes=args.minutes, output=args.output, gateways=args.gateways, clients=args.clients,
        rooms=args.rooms, rooms_per_client=args.rooms_per_client, rate=args.rate,
        churn_rate=args.churn_rate, sample_every=args.sample_every,
        storm_every=args.storm_every, kill_nats_every=args.kill_nats_every,
        restart_gateway_every=args.restart_gateway_every, scale=args.scale,
        storm_share=args.storm_share, warmup=args.warmup, rss_limit=args.rss_limit,
        seed=args.seed)


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the cluster: python -m gateway cluster as a child ------------------------------


class LocalCluster:
    """README's cluster (``python -m gateway cluster --recovery``) run as one child,
    whose own children are found by their parent PID."""

    def __init__(self, workdir: Path, gateways: int) -> None:
        self.workdir = workdir
        self.gateways = gateways
        self.child: Child | None = None
        self.gateway_urls: dict[str, str] = {}
        self.nats_monitors: dict[str, str] = {}
        self.log_path = workdir / "cluster.log"
        self._read = 0
        #: supervisor lines: (name, "exited"|"back", pid)
        self.lines: list[str] = []

    def start(self, timeout: float = 120.0) -> None:
        port = self._gateway_ports()
        argv = [sys.executable, "-m", "gateway", "cluster", "--recovery",
                "--gateways", str(self.gateways), "--port", str(port)]
        self.child = spawn("cluster", argv, self.workdir, cwd=REPO_ROOT)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.new_lines():
                if line.startswith("nats "):
                    _, name, _url, monitor = line.split()
                    self.nats_monitors[name] = monitor
                elif line.startswith("gateway ") and not line.startswith("gateway cluster"):
                    _, name, url = line.split()
                    self.gateway_urls[name] = url
                elif line == "cluster ready":
                    return
            if not self.child.alive:
                raise RuntimeError(f"the cluster exited with {self.child.returncode}:\n"
                                   f"{self.child.log_tail(40)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster was not ready in {timeout:.0f} s:\n"
                                   f"{self.child.log_tail(40)}")
            time.sleep(0.1)

    def _gateway_ports(self) -> int:
        for _ in range(200):
            base = free_ports(1)[0]
            if base + self.gateways < 65535 and all(
                    port_is_free(base + i) for i in range(self.gateways)):
                return base
        raise RuntimeError("no run of free ports for the gateways")

    def new_lines(self) -> list[str]:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._read)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1
        self._read += end
        lines = data[:end].decode(errors="replace").splitlines()
        self.lines += [ln for ln in lines if ln.startswith("gateway cluster:")]
        return lines

    def pids(self) -> dict[str, int]:
        """The launcher's children by name (``gw-1``, ``nats-2``)."""
        if self.child is None:
            return {}
        parent = str(self.child.pid)
        out: dict[str, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[1] != parent:
                    continue
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if b"--node-id" in argv:
                out[argv[argv.index(b"--node-id") + 1].decode()] = int(entry)
            elif any(a.endswith(b"nats-server") for a in argv):
                with contextlib.suppress(OSError):
                    env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                    for var in env:
                        if var.startswith(b"NATS_SERVER_NAME="):
                            out[var.split(b"=", 1)[1].decode()] = int(entry)
        return out

    def signal(self, name: str, sig: int) -> int | None:
        pid = self.pids().get(name)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pid

    def stop(self) -> None:
        if self.child is not None:
            self.child.stop(timeout=30)


# -- the clients ------------------------------------------------------------------


@dataclass
class Client:
    index: int
    gateway: int
    sock: LeanSocket | None = None
    #: the socket being opened (its replayed events count before its CONNECT reply)
    opening: LeanSocket | None = None
    connected: bool = False
    #: monotonic ns since when it has been connected without a break
    connected_since: int = 0
    pid: str | None = None
    offset: str | None = None
    last_offset: int = -1
    sid: str | None = None
    #: rooms it keeps (re-joined after a refused recovery)
    rooms: set[str] = field(default_factory=set)
    churn_room: str | None = None
    #: the next reconnect goes to the other gateway (a storm)
    move: bool = False
    #: connections opened after the first
    reconnects: int = 0


@dataclass
class Sent:
    room: str
    sender: int
    send_ns: int
    ack_ns: int
    #: (recipient, membership epoch) of every member at the send but the sender
    members: list[tuple[int, int]]
    got: dict[int, int] = field(default_factory=dict)


@dataclass
class Totals:
    sent: int = 0
    acked: int = 0
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    judged: int = 0
    deliveries: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    recovered: int = 0
    refused_sessions: int = 0
    #: reconnects that asked for no recovery (nothing received before: no offset)
    fresh_sessions: int = 0
    reconnect_failures: int = 0
    unplanned_exits: int = 0
    #: the soak's own tasks that failed (a bug here, not in the gateways)
    task_errors: int = 0


class Fleet:
    """The clients, what they sent and got, and the judge of every acked chat."""

    def __init__(self, p: SoakParams, urls: list[str]) -> None:
        self.p = p
        self.urls = urls
        self.rng = random.Random(p.seed)
        self.rooms = [f"soak-{r}" for r in range(p.rooms)]
        self.clients = [Client(i, i % len(urls)) for i in range(p.clients)]
        #: room -> client -> (epoch, join acked ns)
        self.members: dict[str, dict[int, tuple[int, int]]] = defaultdict(dict)
        self.epoch = 0
        self.sent: dict[str, Sent] = {}
        self.judge_queue: deque[str] = deque()
        #: judged chats kept a while to catch late second copies
        self.recent: dict[str, tuple[Sent, int]] = {}
        #: copies whose ack has not come yet: id -> [(recipient, ns)]
        self.early: dict[str, list[tuple[int, int]]] = {}
        self.totals = Totals()
        self.window_latency: list[int] = []
        self.window_ack: list[int] = []
        self.window_deliveries = 0
        #: the chat and churn loops run while this is set
        self.traffic_on = True
        #: no reconnects once set (the end)
        self.stopping = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.pings_answered = 0  # LeanSocket counts here
        self.events: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    # LeanSocket's callbacks ------------------------------------------------------

    def on_event(self, sock: LeanSocket, data: list[Any], now: int) -> None:
        c = self.clients[sock.index]
        if sock is not c.sock and sock is not c.opening:
            return
        offset = data[-1] if sock.pid is not None and len(data) > 1 \
            and isinstance(data[-1], str) else None
        if offset is not None:
            c.offset = offset
            with contextlib.suppress(ValueError):
                n = int(offset)
                if n <= c.last_offset:
                    self.totals.out_of_order += 1
                c.last_offset = n
        if len(data) < 2 or data[0] != "chat" or not isinstance(data[1], dict):
            return
        msg_id = data[1].get("id")
        if not isinstance(msg_id, str):
            return
        s = self.sent.get(msg_id)
        if s is None:
            old = self.recent.get(msg_id)
            if old is not None:
                old[0].got[c.index] = old[0].got.get(c.index, 0) + 1
                if old[0].got[c.index] > 1:
                    self.totals.duplicated += 1
                return
            self.early.setdefault(msg_id, []).append((c.index, now))
            return
        self._got(s, c, now)

    def _got(self, s: Sent, c: Client, now: int) -> None:
        n = s.got.get(c.index, 0) + 1
        s.got[c.index] = n
        self.totals.deliveries += 1
        self.window_deliveries += 1
        if n > 1:
            self.totals.duplicated += 1
        elif c.connected and c.connected_since < s.send_ns:
            self.window_latency.append(now - s.send_ns)

    def on_closed(self, sock: LeanSocket) -> None:
        c = self.clients[sock.index]
        # a socket that never connected is the opener's to retry
        if c.sock is not sock or not c.connected or self.stopping:
            return
        c.connected = False
        self.spawn(self._reconnect(c))

    # connecting ----------------------------------------------------------------------

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.totals.task_errors += 1
            exc = task.exception()
            log(f"a client task failed: {type(exc).__name__}: {exc}")

    async def _open(self, c: Client, gateway: int) -> LeanSocket:
        url = self.urls[gateway]
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        loop = asyncio.get_running_loop()
        raw = StampedSocket(2)  # AF_INET
        raw.setblocking(False)
        try:
            await loop.sock_connect(raw, (host, int(port)))
            auth = None
            if c.pid is not None:
                auth = {"pid": c.pid} if c.offset is None else {"pid": c.pid, "offset": c.offset}
            _, proto = await loop.create_connection(
                lambda: LeanSocket(c.index, host, int(port), self, False, None, auth, raw),
                sock=raw)
        except BaseException:
            raw.close()
            raise
        c.opening = proto
        try:
            async with asyncio.timeout(30):
                await proto.connected
        except BaseException:
            proto.close()
            raise
        finally:
            c.opening = None
        c.sock = proto
        return proto

    async def connect_all(self) -> None:
        sem = asyncio.Semaphore(50)

        async def one(c: Client) -> None:
            async with sem:
                sock = await self._open(c, c.gateway)
            self._connected(c, sock)
            for r in range(self.p.rooms_per_client):
                room = self.rooms[(c.index + r * 7) % len(self.rooms)]
                c.rooms.add(room)
            await self._join_all(c)

        await asyncio.gather(*(one(c) for c in self.clients))

    def _connected(self, c: Client, sock: LeanSocket) -> None:
        c.pid, c.sid = sock.pid, sock.sid
        c.connected = True
        c.connected_since = time.monotonic_ns()
        if sock.closed:  # lost before we saw it connected
            self.on_closed(sock)

    async def _join_all(self, c: Client) -> None:
        for room in sorted(c.rooms):
            await self._join(c, room)

    async def _join(self, c: Client, room: str) -> bool:
        if c.sock is None or not c.connected:
            return False
        try:
            ack = await asyncio.wait_for(c.sock.call("join", room), 30)
        except (TimeoutError, ConnectionError):
            return False
        if not isinstance(ack, dict) or not ack.get("ok"):
            return False
        self.epoch += 1
        self.members[room][c.index] = (self.epoch, time.monotonic_ns())
        return True

    async def _reconnect(self, c: Client) -> None:
        """Back with the pid and offset it kept, as socket.io-client: to the other
        gateway after a storm, else to its own (restarted) one, retrying meanwhile."""
        previous_sid, had_offset = c.sid, c.offset is not None
        if c.move:
            c.move = False
            c.gateway = (c.gateway + 1) % len(self.urls)
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
        else:
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
        delay = 0.5
        while not self.stopping:
            try:
                sock = await self._open(c, c.gateway)
                break
            except (OSError, TimeoutError, ConnectionError):
                self.totals.reconnect_failures += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        else:
            return
        recovered = sock.recovered and sock.sid == previous_sid
        c.reconnects += 1
        self._connected(c, sock)
        if recovered:
            self.totals.recovered += 1
            return
        # a new session: it is in no room, and its rooms are joined again (new
        # memberships). Refused, unless it had no offset to send (it had received
        # nothing: socket.io-client then asks for no recovery either)
        if had_offset:
            self.totals.refused_sessions += 1
        else:
            self.totals.fresh_sessions += 1
        c.last_offset = -1
        for room in list(c.rooms) + ([c.churn_room] if c.churn_room else []):
            self.members[room].pop(c.index, None)
        c.churn_room = None
        await self._join_all(c)

    # traffic ------------------------------------------------------------------------

    async def chat_loop(self) -> None:
        start = time.monotonic()
        n = 0
        while self.traffic_on:
            n += 1
            c = self.clients[self.rng.randrange(len(self.clients))]
            if c.connected and c.rooms:
                self.spawn(self._chat(c, self.rng.choice(sorted(c.rooms))))
            await asyncio.sleep(max(0.0, start + n / self.p.rate - time.monotonic()))

    async def _chat(self, c: Client, room: str) -> None:
        sock = c.sock
        if sock is None:
            return
        send_ns = time.monotonic_ns()
        members = [(i, epoch) for i, (epoch, joined) in self.members[room].items()
                   if joined < send_ns and i != c.index]
        self.totals.sent += 1
        try:
            ack = await asyncio.wait_for(sock.call("chat", {"room": room, "text": "soak"}), 30)
        except (TimeoutError, ConnectionError):
            self.totals.refused["no ack"] += 1
            return
        if not isinstance(ack, dict) or not ack.get("ok"):
            reason = ack.get("error", "?") if isinstance(ack, dict) else "?"
            self.totals.refused[str(reason).split(":", 1)[0]] += 1
            return
        ack_ns = time.monotonic_ns()
        self.totals.acked += 1
        self.window_ack.append(ack_ns - send_ns)
        s = Sent(room, c.index, send_ns, ack_ns, members)
        self.sent[ack["id"]] = s
        self.judge_queue.append(ack["id"])
        for rcpt, at in self.early.pop(ack["id"], []):
            self._got(s, self.clients[rcpt], at)

    async def churn_loop(self) -> None:
        if self.p.churn_rate <= 0:
            return
        start = time.monotonic()
        n = 0
        while self.traffic_on:
            n += 1
            c = self.clients[self.rng.randrange(len(self.clients))]
            if c.connected:
                self.spawn(self._churn(c))
            await asyncio.sleep(max(0.0, start + n / self.p.churn_rate - time.monotonic()))

    async def _churn(self, c: Client) -> None:
        if c.churn_room is not None:
            room, c.churn_room = c.churn_room, None
            self.members[room].pop(c.index, None)  # no longer expected to get anything
            if c.sock is not None:
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(c.sock.call("leave", room), 30)
            return
        room = self.rng.choice([r for r in self.rooms if r not in c.rooms])
        c.churn_room = room
        if not await self._join(c, room) and c.churn_room == room:
            c.churn_room = None

    # the judge ----------------------------------------------------------------------

    def judge(self, final: bool = False) -> None:
        """Judge the chats acked more than ``grace`` ago (all of them when ``final``):
        every member at the send that is still a member (same membership) must have
        got it once. A chat with a recipient still reconnecting waits (up to 120 s)."""
        now = time.monotonic_ns()
        grace = int(self.p.grace * 1e9)
        waiting: list[str] = []
        while self.judge_queue:
            msg_id = self.judge_queue[0]
            s = self.sent[msg_id]
            if not final and s.ack_ns + grace > now:
                break
            self.judge_queue.popleft()
            required = [i for i, epoch in s.members
                        if self.members[s.room].get(i, (None,))[0] == epoch]
            if not final and now - s.ack_ns < 120e9 and any(
                    not self.clients[i].connected for i in required):
                waiting.append(msg_id)
                continue
            self.totals.judged += 1
            self.totals.lost += sum(1 for i in required if i not in s.got)
            del self.sent[msg_id]
            self.recent[msg_id] = (s, now)
        self.judge_queue.extendleft(reversed(waiting))
        horizon = now - int(60e9)
        for msg_id in [m for m, (_, at) in self.recent.items() if at < horizon]:
            del self.recent[msg_id]
        early_horizon = now - int(120e9)
        for msg_id in [m for m, got in self.early.items() if got[0][1] < early_horizon]:
            del self.early[msg_id]

    # faults -------------------------------------------------------------------------

    async def storm(self) -> dict[str, Any]:
        """Drop a share of each gateway's connected clients at once; they come back on
        the other gateway. Returns once they are all back (or after 120 s)."""
        victims: list[Client] = []
        for g in range(len(self.urls)):
            on = [c for c in self.clients if c.connected and c.gateway == g]
            victims += self.rng.sample(on, int(len(on) * self.p.storm_share))
        recovered0, refused0 = self.totals.recovered, self.totals.refused_sessions
        before = {c.index: c.reconnects for c in victims}
        t0 = time.monotonic()
        for c in victims:
            c.move = True
            if c.sock is not None:
                c.sock.drop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(120):
                while not all(c.connected and c.reconnects > before[c.index] for c in victims):
                    await asyncio.sleep(0.05)
        return {"dropped": len(victims), "back_s": round(time.monotonic() - t0, 2),
                "recovered": self.totals.recovered - recovered0,
                "refused": self.totals.refused_sessions - refused0}

    def window(self) -> dict[str, Any]:
        """The window's latency figures (and start a new window)."""
        lat = sorted(self.window_latency)
        acks = sorted(self.window_ack)
        self.window_latency, self.window_ack = [], []

        def at(v: list[int], q: float) -> float | None:
            return round(v[min(len(v) - 1, int(q * len(v)))] / 1e6, 2) if v else None

        out = {"latency_p50_ms": at(lat, 0.5), "latency_p99_ms": at(lat, 0.99),
               "latency_max_ms": at(lat, 1.0), "ack_p99_ms": at(acks, 0.99),
               "window_deliveries": self.window_deliveries}
        self.window_deliveries = 0
        return out

    async def close(self) -> None:
        self.stopping = True
        for c in self.clients:
            if c.sock is not None:
                c.sock.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# -- sampling ----------------------------------------------------------------------


def _fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


#: what the gateways subscribe to, by the subject's second token (sio.live.room...)
SUBSCRIPTION_KINDS = ("room", "sid", "node", "inbox", "other")


def subscription_kind(subject: str) -> str:
    parts = subject.split(".")
    if len(parts) > 2 and parts[1] == "live" and parts[2] in ("room", "sid"):
        return parts[2]
    if len(parts) > 1 and parts[1] in ("node", "inbox"):
        return parts[1]
    return "other"


def broker_sample(monitors: dict[str, str]) -> dict[str, Any]:
    """The gateways' subscriptions and connections on every NATS node (/connz) and the
    largest node's JetStream storage (/jsz); None where no node answered."""
    subs = conns = 0
    answered = False
    storage: list[float] = []
    messages: list[int] = []
    consumers: list[int] = []
    kinds: dict[str, int] = defaultdict(int)
    for monitor in monitors.values():
        status, body = http_json(f"{monitor}/connz?subs=1&limit=4096", timeout=3.0)
        if status == 200 and isinstance(body, dict):
            answered = True
            for conn in body.get("connections") or []:
                conns += 1
                subs += int(conn.get("subscriptions") or 0)
                for subject in conn.get("subscriptions_list") or []:
                    kinds[subscription_kind(subject)] += 1
        status, body = http_json(f"{monitor}/jsz", timeout=3.0)
        if status == 200 and isinstance(body, dict):
            storage.append(float(body.get("storage") or 0) / MB)
            messages.append(int(body.get("messages") or 0))
            consumers.append(int(body.get("consumers") or 0))
    return {"broker_subscriptions": subs if answered else None,
            "broker_connections": conns if answered else None,
            **{f"subs_{k}": (kinds.get(k, 0) if answered else None) for k in SUBSCRIPTION_KINDS},
            "js_storage_mb": round(max(storage), 3) if storage else None,
            "js_messages": max(messages) if messages else None,
            "js_consumers": max(consumers) if consumers else None}


def dump_subscriptions(monitors: dict[str, str], path: Path) -> None:
    """Every client connection's subjects on every node, at the end (to read a leak)."""
    out: dict[str, Any] = {}
    for name, monitor in monitors.items():
        _, body = http_json(f"{monitor}/connz?subs=1&limit=4096", timeout=3.0)
        conns = (body or {}).get("connections") or [] if isinstance(body, dict) else []
        out[name] = {str(c.get("name")): sorted(c.get("subscriptions_list") or [])
                     for c in conns}
    path.write_text(json.dumps(out, indent=1))


async def sample(cluster: LocalCluster, fleet: Fleet) -> dict[str, Any]:
    t = round(time.monotonic() - fleet.t0, 2)
    out: dict[str, Any] = {"t": t}
    pids = await asyncio.to_thread(cluster.pids)
    for i, name in enumerate(sorted(cluster.gateway_urls)):
        pid = pids.get(name)
        rss: float | None = None
        if pid is not None:
            with contextlib.suppress(OSError):
                rss = round(rss_bytes(pid) / MB, 3)
        out[f"{name}.pid"] = pid
        out[f"{name}.rss_mb"] = rss
        out[f"{name}.fds"] = _fds(pid) if pid is not None else None
        out[f"{name}.sockets"] = sum(1 for c in fleet.clients if c.connected and c.gateway == i)
    out.update(await asyncio.to_thread(broker_sample, cluster.nats_monitors))
    out.update(fleet.window())
    tot = fleet.totals
    out.update({"clients_connected": sum(c.connected for c in fleet.clients),
                "chats_sent": tot.sent, "chats_acked": tot.acked,
                "chats_refused": sum(tot.refused.values()), "deliveries": tot.deliveries,
                "judged": tot.judged, "lost": tot.lost, "duplicated": tot.duplicated,
                "out_of_order": tot.out_of_order, "recovered": tot.recovered,
                "refused_sessions": tot.refused_sessions})
    return out


# -- the run ------------------------------------------------------------------------


async def _run(p: SoakParams, cluster: LocalCluster) -> dict[str, Any]:
    urls = [cluster.gateway_urls[name] for name in sorted(cluster.gateway_urls)]
    nats_names = sorted(cluster.nats_monitors)
    fleet = Fleet(p, urls)
    await fleet.connect_all()
    log(f"{p.clients} clients connected over {len(urls)} gateways, in {p.rooms} rooms")
    fleet.t0 = time.monotonic()
    samples: list[dict[str, Any]] = []
    events = fleet.events
    fleet.spawn(fleet.chat_loop())
    fleet.spawn(fleet.churn_loop())
    planned: set[int] = set()
    schedule: list[tuple[float, str]] = []
    for kind in ("storm", "kill-nats", "restart-gateway"):
        for at in p.times(kind):
            schedule.append((at, kind))
    schedule.sort()
    counters = {"kill-nats": 0, "restart-gateway": 0}
    next_sample = 0.0

    async def fire(kind: str) -> None:
        event: dict[str, Any] = {"t": round(time.monotonic() - fleet.t0, 2), "kind": kind}
        if kind == "storm":
            event.update(await fleet.storm())
        elif kind == "kill-nats":
            name = nats_names[counters[kind] % len(nats_names)]
            counters[kind] += 1
            pid = await asyncio.to_thread(cluster.signal, name, signal.SIGKILL)
            planned.add(pid or -1)
            event.update({"node": name, "pid": pid})
        else:
            name = sorted(cluster.gateway_urls)[counters[kind] % len(urls)]
            counters[kind] += 1
            pid = await asyncio.to_thread(cluster.signal, name, signal.SIGTERM)
            planned.add(pid or -1)
            event.update({"node": name, "pid": pid})
        events.append(event)
        log(f"{kind}: {json.dumps({k: v for k, v in event.items() if k != 'kind'})}")

    # SIGINT or SIGTERM ends the run early: the tail, the verdict and the files as usual
    cut = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cut.set)
    while True:
        now = time.monotonic() - fleet.t0
        if now >= p.duration:
            break
        if cut.is_set():
            events.append({"t": round(now, 2), "kind": "cut-short"})
            log(f"stopping early at {now:.0f} s (signal): judging what was sent")
            break
        if now >= next_sample:
            fleet.judge()
            s = await sample(cluster, fleet)
            samples.append(s)
            next_sample += p.sample_every
            _progress(s)
        while schedule and schedule[0][0] <= now:
            _, kind = schedule.pop(0)
            fleet.spawn(fire(kind))
        for line in cluster.new_lines():
            m = re.match(r"gateway cluster: (\S+) \(pid (\d+)\) exited", line)
            if m:
                events.append({"t": round(now, 2), "kind": "exit", "node": m.group(1),
                               "pid": int(m.group(2)), "planned": int(m.group(2)) in planned})
                if int(m.group(2)) not in planned:
                    fleet.totals.unplanned_exits += 1
                    log(f"unplanned: {line}")
            elif line.startswith("gateway cluster:") and " is back " in line:
                events.append({"t": round(now, 2), "kind": "back", "line": line})
        await asyncio.sleep(0.2)
    # the tail: no new chats; every one sent is judged once its recipients are back
    fleet.traffic_on = False
    tail_end = time.monotonic() + p.grace
    deadline = time.monotonic() + 120
    # (a Ctrl-C in a terminal reaches the cluster too: then nobody comes back)
    while time.monotonic() < deadline and cluster.child is not None and cluster.child.alive \
            and (time.monotonic() < tail_end or any(not c.connected for c in fleet.clients)):
        fleet.judge()
        await asyncio.sleep(0.5)
    fleet.judge(final=True)
    # after the tail: what the clients got once traffic stopped (no chat's latency)
    samples.append({**await sample(cluster, fleet), "final": 1})
    await asyncio.to_thread(dump_subscriptions, cluster.nats_monitors,
                            p.output / "subscriptions.json")
    await fleet.close()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    totals = {k: v for k, v in vars(fleet.totals).items() if k != "refused"}
    totals["refused"] = dict(fleet.totals.refused)
    return {"samples": samples, "events": events, "totals": totals}


def _progress(s: dict[str, Any]) -> None:
    gws = ", ".join(f"{k.split('.')[0]} {v} MB" for k, v in s.items() if k.endswith(".rss_mb"))
    log(f"t={s['t']:.0f}s {gws}; subs {s['broker_subscriptions']}, js "
        f"{s['js_storage_mb']} MB; p99 {s['latency_p99_ms']} ms; acked {s['chats_acked']}, "
        f"lost {s['lost']}, dup {s['duplicated']}, refused sessions {s['refused_sessions']}")


def run(p: SoakParams) -> int:
    p.output.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(p.output, p.gateways)
    log(f"starting the cluster (log: {cluster.log_path}); {p.minutes:g} min, storms every "
        f"{p.every('storm'):.0f} s, a NATS node killed every {p.every('kill-nats'):.0f} s, a "
        f"gateway restarted every {p.every('restart-gateway'):.0f} s")
    try:
        cluster.start()
        result = asyncio.run(_run(p, cluster))
    finally:
        cluster.stop()
    params = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(p).items()}
    params.update({"effective_scale": p.effective_scale, "warmup_s": p.warmup_s,
                   "restart_warmup_s": p.restart_warmup_s,
                   "intervals_s": {k: p.every(k) for k in
                                   ("storm", "kill-nats", "restart-gateway")},
                   "fault_times_s": {k: p.times(k) for k in
                                     ("storm", "kill-nats", "restart-gateway")}})
    ok = report.write_report(p.output, params, result, say=log)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = parse_args(sys.argv[1:] if argv is None else argv)
    return run(p)


if __name__ == "__main__":
    sys.exit(main())
