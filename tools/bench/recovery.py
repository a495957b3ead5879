"""Connection state recovery in the benchmark: the ``nats-recovery`` backend and the
``reconnect-storm`` scenario.

``nats-recovery`` is the ``nats`` backend (the same 3-node NATS mesh, which runs
JetStream for both) with gateways started with ``--recovery on``: every scenario
runs on it unchanged, so recovery's cost shows beside ``nats`` in the same run
(:mod:`.recovery_report` sets them side by side). It runs only when named in
``--backends``.

``reconnect-storm`` (run only when named; recovery backends only) connects many
sockets over two gateways into rooms with chat flowing, then all of them lose
their connection at once while the chat goes on, and they come back with the pid
and offset they kept, as socket.io-client does. Two phases:

- ``network-drop``: every member's TCP connection is reset by the load generator
  (no close frame, no DISCONNECT); after ``outage_s`` each reconnects, within a
  random ``spread_s`` (socket.io-client randomizes its reconnection delay), to the
  *other* gateway (a load balancer's choice: the session is adopted there).
- ``gateway-kill``: the second gateway is SIGKILLed; its members reconnect to the
  first (their sessions still say "connected" on a node that no longer answers).
  The gateway is started again afterwards.

Just before the drop one member of each room chats, so that its own message sits in
the part of the stream that is replayed to it (it must not get it back). The load
generator then checks what every socket got: nothing lost, nothing twice, nothing
misdelivered, offsets rising in every socket, and every chat stored while a socket
was away replayed to it before its CONNECT reply. A refused session (a new pid) is
reported and loses what its rooms carried, so the run fails.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from gateway.processes import start_gateway, wait_gateways

from .backends import RECOVERY
from .harness import GATEWAY_FLAGS, LoadGenProcess, Params, cpu_seconds, metrics

if TYPE_CHECKING:
    from gateway.processes import GatewayNode

    from .backends import Broker

STORM = "reconnect-storm"
SCENARIOS = (STORM,)
#: the scenarios whose figures are set beside the same backend without recovery
COMPARED = ("fanout", "fanout-upgrade", "latency", "latency-upgrade")


@dataclass(frozen=True)
class StormParams:
    members: int
    rooms: int
    #: sockets that chat throughout and are never dropped (members of every room)
    senders: int
    rate_msgs_per_s: float
    warm_s: float
    outage_s: float
    spread_s: float
    #: live traffic after the last socket is back, before the tally
    tail_s: float

    @classmethod
    def of(cls, quick: bool) -> StormParams:
        if quick:
            return cls(members=100, rooms=10, senders=4, rate_msgs_per_s=50.0, warm_s=1.0,
                       outage_s=1.0, spread_s=0.5, tail_s=0.5)
        return cls(members=1000, rooms=50, senders=4, rate_msgs_per_s=200.0, warm_s=2.0,
                   outage_s=3.0, spread_s=1.0, tail_s=1.0)

    def rooms_of(self, i: int) -> tuple[int, int]:
        """Member ``i``'s two rooms (distinct)."""
        a = i % self.rooms
        return a, (a + 1 + (i // self.rooms) % (self.rooms - 1)) % self.rooms


def describe(quick: bool) -> dict[str, dict[str, Any]]:
    sp = StormParams.of(quick)
    return {STORM: {"gateways": 2, **asdict(sp), "rooms_per_member": 2,
                    "phases": "network-drop (every member reset, back on the other gateway); "
                              "gateway-kill (gateway 2 SIGKILLed, its members back on 1)",
                    "backends": "with recovery only"}}


def scenario_reconnect_storm(lg: LoadGenProcess, gws: list[GatewayNode], broker: Broker,
                             p: Params) -> dict[str, Any]:
    if broker.name not in RECOVERY:
        return {"skipped": "needs connection state recovery (--backends nats-recovery)"}
    sp = StormParams.of(p.quick)
    return {"network-drop": _phase(lg, gws, broker, sp, p.seed, kill=False),
            "gateway-kill": _phase(lg, gws, broker, sp, p.seed + 1, kill=True)}


def _quiet(cpu: Callable[[], tuple[float, float, float]], timeout: float = 10.0) -> None:
    """Wait until the gateways and brokers use under 10% of a core, or ``timeout``."""
    deadline = time.monotonic() + timeout
    last = cpu()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu()
        if (now[1] + now[2] - last[1] - last[2]) < 0.1 * (now[0] - last[0]):
            return
        last = now


def _phase(lg: LoadGenProcess, gws: list[GatewayNode], broker: Broker, sp: StormParams,
           seed: int, kill: bool) -> dict[str, Any]:
    urls = [g.url for g in gws]
    rooms = [f"storm-{r}" for r in range(sp.rooms)]
    lg.call(op="connect", urls=urls, count=sp.members)  # member i on gateway i % 2
    # the senders stay connected: on both gateways, or on the one that survives
    lg.call(op="connect", urls=urls[:1] if kill else urls, count=sp.senders)
    senders = list(range(sp.members, sp.members + sp.senders))
    joins = [[i, rooms[r]] for i in range(sp.members) for r in sp.rooms_of(i)]
    joins += [[s, room] for s in senders for room in rooms]
    failures = lg.call(op="join", pairs=joins)["failures"]
    # every room hears from every sender in turn
    pairs = [[senders[(r + k) % sp.senders], rooms[r]] for k in range(sp.senders)
             for r in range(sp.rooms)]
    dropped = [i for i in range(sp.members) if not kill or i % 2 == 1]
    # back on the other gateway (network drop) or on the one left (kill)
    targets = [[i, 0 if kill else 1 - i % 2] for i in dropped]
    # one dropped member per room has the last word before the drop
    last_words: dict[str, int] = {}
    for i in dropped:
        last_words.setdefault(rooms[sp.rooms_of(i)[0]], i)
    survivors = [gws[0]] if kill else list(gws)
    before = {g.url: metrics(g.url) for g in survivors}
    gateway_pids = [g.child.pid for g in survivors if g.child is not None]
    assert broker.cluster is not None
    broker_pids = [n.child.pid for n in broker.cluster.nodes if n.child is not None]

    def cpu() -> tuple[float, float, float]:
        """(time, gateway CPU-s, broker CPU-s) so far"""
        return (time.monotonic(), sum(cpu_seconds(pid) for pid in gateway_pids),
                sum(cpu_seconds(pid) for pid in broker_pids))

    # the sessions written at connect and join (and at the last phase's close) first,
    # so that the CPU before the drop is the traffic's alone
    _quiet(cpu)
    lg.call(op="traffic", pairs=pairs, rate=sp.rate_msgs_per_s)
    cpu0 = cpu()
    time.sleep(sp.warm_s)  # the phases' lengths: pacing, not waits
    failures += lg.call(op="say", pairs=[[i, room] for room, i in last_words.items()],
                        text="last words")["failures"]
    cpu1 = cpu()
    if kill:
        victim = gws[1].child
        assert victim is not None
        victim.signal(signal.SIGKILL)
        victim.popen.wait()
    lg.call(op="drop", sockets=dropped, reset=not kill)
    time.sleep(sp.outage_s)
    lg.call(op="recover", targets=targets, urls=urls, spread=sp.spread_s, seed=seed)
    cpu2 = cpu()
    time.sleep(sp.tail_s)
    res = lg.call(op="finish", timeout=60)
    after = {g.url: metrics(g.url) for g in survivors}
    lg.call(op="close")
    if kill:  # the next scenario gets its two gateways back
        name, args = broker.gateway(1)
        gws[1] = start_gateway(broker.workdir, gws[1].node_id, gws[1].port, name, args,
                               extra=GATEWAY_FLAGS)
        wait_gateways(gws)

    def server(counter: str) -> int:
        return int(sum(after[u].get(counter, 0) - before[u].get(counter, 0) for u in after))

    rec = res.pop("recovery")
    sessions = max(1, int(rec["recovered"]))

    def per_session(k: int) -> float:
        """CPU-ms per restore from the drop to the last CONNECT reply, above what the
        traffic alone cost per second before the drop"""
        traffic_rate = (cpu1[k] - cpu0[k]) / (cpu1[0] - cpu0[0])
        storm = (cpu2[k] - cpu1[k]) - traffic_rate * (cpu2[0] - cpu1[0])
        return round(1000 * max(storm, 0.0) / sessions, 2)

    res.pop("latency_ms")  # chats that waited out the outage: not a latency
    res.pop("latency_handled_ms", None)
    return {**res, "failures": res["failures"] + failures, **rec,
            "server_recovered": server("gateway_sessions_recovered_total"),
            "server_refused": server("gateway_sessions_recovery_refused_total"),
            "gateway_cpu_ms_per_session": per_session(1),
            "broker_cpu_ms_per_session": per_session(2)}
