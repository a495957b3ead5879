"""Runs the benchmark: brokers, gateways and the load generator, side by side.

Every backend runs the same scenarios in one run, with the same load generator
(a separate process) and the same gateway handlers; only the client manager and
its broker change. CPU comes from /proc, broker bytes from the kernel's counters of
the gateway<->broker sockets (``broker_traffic.py``), the same way for every broker,
gateway traffic from /metrics.
"""

from __future__ import annotations

import json
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gateway.processes import GatewayNode, stop_all, wait_gateways, wait_until

from . import broker_traffic, no_affinity, node_peer, recovery
from .backends import GATEWAY_BACKEND, Broker, start_bench_gateway
from .harness import LoadGenProcess, Params, cpu_seconds, log, metrics, rss_bytes

SCENARIOS = ("reference", "fanout", "fanout-upgrade", "many-rooms", "latency",
             "latency-upgrade", "churn", "memory", "idle", "cluster-api")
#: scenarios run only when named (--scenario scale): heavier, with brokers of their own;
#: reconnect-storm needs a recovery backend; no-affinity runs on nats only
EXTRA_SCENARIOS = ("scale", *recovery.SCENARIOS, no_affinity.SCENARIO)

# -- measuring -----------------------------------------------------------------------


@dataclass
class Snapshot:
    cpu: dict[str, float]
    gateway: dict[str, dict[str, float]]
    broker: dict[str, dict[str, float]]
    #: CPU seconds of each broker node process
    broker_cpu: dict[str, float] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)
    #: gateway<->broker sockets and the brokers' per-connection counts
    wire: broker_traffic.BrokerView | None = None


def snapshot(gateways: list[GatewayNode], broker: Broker) -> Snapshot:
    nodes = broker.cluster.nodes if broker.cluster is not None else []
    wire = broker_traffic.view(broker.name, gateways, broker.cluster)  # first: see view()
    return Snapshot(
        wire=wire,
        cpu={g.node_id: cpu_seconds(g.child.pid) for g in gateways if g.child},
        gateway={g.node_id: metrics(g.url) for g in gateways},
        broker=broker.counters(),
        broker_cpu={n.name: cpu_seconds(n.child.pid) for n in nodes
                    if n.child is not None and n.child.alive},
    )


def measure(before: Snapshot, after: Snapshot, result: dict[str, Any]) -> dict[str, Any]:
    """Figures for one phase from two snapshots and the load generator's tally."""
    delivered = result["delivered"]
    cpu = sum(after.cpu[k] - before.cpu[k] for k in after.cpu)
    broker_cpu = sum(after.broker_cpu[k] - before.broker_cpu.get(k, after.broker_cpu[k])
                     for k in after.broker_cpu)

    def gw_delta(name: str) -> dict[str, float]:
        return {k: after.gateway[k].get(name, 0) - before.gateway[k].get(name, 0)
                for k in after.gateway}

    received = gw_delta("gateway_broker_messages_received_total")
    received_bytes = gw_delta("gateway_broker_bytes_received_total")
    unwanted = gw_delta("gateway_broker_messages_unwanted_total")
    frames = sum(gw_delta("gateway_websocket_frames_written_total").values())
    sends = sum(gw_delta("gateway_websocket_sends_total").values())
    broker = {node: {k: after.broker[node][k] - before.broker[node].get(k, 0)
                     for k in after.broker[node]} for node in after.broker}
    assert before.wire is not None and after.wire is not None
    seconds = result.get("seconds") or (after.at - before.at)
    return {
        "messages": result["messages"],
        "expected": result["expected"],
        "delivered": delivered,
        "lost": result["lost"],
        "duplicated": result["duplicated"],
        "misdelivered": result["misdelivered"],
        "failures": result.get("failures", 0),
        # with recovery on, chats carry the store's offsets, rising in every socket
        "out_of_order": result.get("out_of_order", 0),
        "with_offsets": result.get("with_offsets", 0),
        "seconds": round(seconds, 3),
        "deliveries_per_s": round(delivered / seconds, 1) if seconds else None,
        "gateway_cpu_s": round(cpu, 3),
        "cpu_s_per_1000_deliveries": round(1000 * cpu / delivered, 4) if delivered else None,
        "broker_cpu_s": round(broker_cpu, 3),
        "broker_cpu_s_per_1000_deliveries": round(1000 * broker_cpu / delivered, 4)
        if delivered else None,
        "total_cpu_s_per_1000_deliveries": round(1000 * (cpu + broker_cpu) / delivered, 4)
        if delivered else None,
        "deliveries_per_cpu_s": round(delivered / cpu, 1) if cpu else None,
        # lean websockets (ours): frames written per socket send (several frames to one
        # connection in one turn of the event loop go out in one send)
        "websocket_frames_per_send": round(frames / sends, 2) if sends else None,
        "latency_ms": result["latency_ms"],
        "latency_handled_ms": result.get("latency_handled_ms"),
        "gateway_received_msgs": {k: int(v) for k, v in received.items()},
        "gateway_received_bytes": {k: int(v) for k, v in received_bytes.items()},
        "wasted_receptions": int(sum(unwanted.values())),
        "wasted_cross_check": broker_traffic.cross_check(
            before.wire, after.wire, result, {k: int(v) for k, v in unwanted.items()}),
        # the brokers' own counters (NATS /varz: payload bytes; Redis INFO: its clients)
        "broker": {n: {k: int(v) for k, v in d.items()} for n, d in broker.items()},
        **broker_traffic.traffic(before.wire, after.wire, delivered),
    }


# -- scenarios ---------------------------------------------------------------------



def describe(p: Params) -> dict[str, dict[str, Any]]:
    described = _describe(p)
    if p.client_deflate:  # the scenarios the runner's load generator connects
        for name in (*JOINS_COUNTED, "reference", "cluster-api"):
            described[name]["client_deflate"] = "offered (permessage-deflate), as browsers do"
    return described


def _describe(p: Params) -> dict[str, dict[str, Any]]:
    from .scale import ScaleParams

    return {
        "scale": ScaleParams.of(p.quick, p.seed).describe(),
        no_affinity.SCENARIO: no_affinity.NoAffinityParams.of(p.quick).describe(),
        "reference": {"gateways": 3, "users": p.reference_users, "chats_per_user": 3,
                      "phases": "one room; then 10 rooms, each on one gateway only"},
        "fanout": {"gateways": 2, "members": p.fanout_members, "senders": p.fanout_senders,
                   "messages_per_sender": p.fanout_messages,
                   "pacing": "next send on ack" if p.fanout_window == 1 else
                   f"{p.fanout_window} chats of each sender in flight, the next on an ack",
                   "window": p.fanout_window,
                   "clients": "websocket from the start"},
        "fanout-upgrade": {"as": "fanout", "clients": "polling, then upgrade to websocket "
                           "(socket.io-client's default)"},
        "many-rooms": {"gateways": 3, "rooms": p.rooms, "members_per_room": "2-20",
                       "sockets": p.room_sockets, "messages": p.room_messages,
                       "rate": "Zipf-like: a few busy rooms, many quiet ones"},
        "latency": {"gateways": 2, "members": p.latency_members,
                    "rate_msgs_per_s": p.latency_rate, "seconds": p.latency_seconds,
                    "clients": "websocket from the start"},
        "latency-upgrade": {"as": "latency", "clients": "polling, then upgrade to websocket "
                            "(socket.io-client's default)"},
        "churn": {"gateways": 2, "sockets": p.churn_sockets,
                  "join_leave_ops_per_s": p.churn_ops_per_s, "rooms": 50,
                  "background_rate_msgs_per_s": p.latency_rate / 2,
                  "seconds": p.latency_seconds * 2},
        "cluster-api": {"gateways": 3, "sockets": 30 if p.quick else 300,
                        "call": "GET /api/rooms/{room} (a member count from every gateway)",
                        "phases": "all alive; one SIGSTOPped; after its heartbeats are missed"},
        "idle": {"gateways": 1, "idle_sockets": p.idle_count, "seconds": p.idle_seconds,
                 "clients": "websocket, answering engine.io pings (interval 25 s)",
                 "load_generators": _idle_generators(p.idle_count)},
        "memory": {"gateways": 1, "idle_sockets": p.idle_sockets,
                   "variants": "websocket client offering permessage-deflate, and not; "
                               "polling then upgrade", "rooms": "one of its own per socket, "
                               "then one shared by all"},
        **recovery.describe(p.quick),
    }


def scenario_reference(lg: LoadGenProcess, gws: list[GatewayNode], broker: Broker,
                       p: Params) -> dict[str, Any]:
    urls = [g.url for g in gws]
    n = p.reference_users
    lg.call(op="connect", urls=urls, count=n)
    out: dict[str, Any] = {}
    refused = lg.joins_refused
    lg.call(op="join", pairs=[[i, "reference"] for i in range(n)])
    before = snapshot(gws, broker)
    res = lg.call(op="burst", plan=[[i, "reference", 3] for i in range(n)], text="hello")
    out["one-room"] = measure(before, snapshot(gws, broker), res)
    out["one-room"]["joins_refused"] = lg.joins_refused - refused
    refused = lg.joins_refused
    lg.call(op="join", pairs=[[i, "reference"] for i in range(n)], leave=True)
    # 10 rooms, each living on one gateway: socket i is on gateway i % 3, room r on r % 3
    rooms_of = {g: [r for r in range(10) if r % 3 == g] for g in range(3)}
    rooms = {i: f"local-{rooms_of[i % 3][(i // 3) % len(rooms_of[i % 3])]}" for i in range(n)}
    lg.call(op="join", pairs=[[i, r] for i, r in rooms.items()])
    before = snapshot(gws, broker)
    res = lg.call(op="burst", plan=[[i, r, 3] for i, r in rooms.items()], text="hello")
    out["ten-local-rooms"] = measure(before, snapshot(gws, broker), res)
    out["ten-local-rooms"]["joins_refused"] = lg.joins_refused - refused
    lg.call(op="close")
    return out


def scenario_fanout(lg: LoadGenProcess, gws: list[GatewayNode], broker: Broker,
                    p: Params, upgrade: bool = False) -> dict[str, Any]:
    n = p.fanout_members
    lg.call(op="connect", urls=[g.url for g in gws], count=n, upgrade=upgrade)
    lg.call(op="join", pairs=[[i, "fanout"] for i in range(n)])
    if not p.quick:  # warm up, then measure
        lg.call(op="burst", plan=[[i, "fanout", 1] for i in range(p.fanout_senders)])
    before = snapshot(gws, broker)
    res = lg.call(op="burst", plan=[[i, "fanout", p.fanout_messages]
                                    for i in range(p.fanout_senders)], timeout=120,
                  window=p.fanout_window)
    out = measure(before, snapshot(gws, broker), res)
    lg.call(op="close")
    return out


def scenario_many_rooms(lg: LoadGenProcess, gws: list[GatewayNode], broker: Broker,
                        p: Params) -> dict[str, Any]:
    rng = random.Random(p.seed)
    lg.call(op="connect", urls=[g.url for g in gws], count=p.room_sockets)
    members: dict[str, list[int]] = {}
    for r in range(p.rooms):
        members[f"room-{r}"] = rng.sample(range(p.room_sockets), rng.randint(2, 20))
    pairs = [[i, room] for room, ms in members.items() for i in ms]
    for k in range(0, len(pairs), 5000):
        lg.call(op="join", pairs=pairs[k:k + 5000])
    names = list(members)
    weights = [1 / (k + 1) for k in range(len(names))]
    total = p.room_messages
    duration = max(2.0, total / (250 if p.quick else 800))
    plan = []
    for m in range(total):
        room = rng.choices(names, weights)[0]
        plan.append([round(m * duration / total, 4), rng.choice(members[room]), room])
    before = snapshot(gws, broker)
    res = lg.call(op="paced", plan=plan, timeout=120)
    out = measure(before, snapshot(gws, broker), res)
    out["joins"] = len(pairs)
    lg.call(op="close")
    return out


def scenario_latency(lg: LoadGenProcess, gws: list[GatewayNode], broker: Broker,
                     p: Params, upgrade: bool = False) -> dict[str, Any]:
    n = p.latency_members
    lg.call(op="connect", urls=[g.url for g in gws], count=n, upgrade=upgrade)
    lg.call(op="join", pairs=[[i, "latency"] for i in range(n)])
    count = int(p.latency_rate * p.latency_seconds)
    plan = [[round(k / p.latency_rate, 4), k % n, "latency"] for k in range(count)]
    if not p.quick:
        lg.call(op="paced", plan=plan[: max(1, count // 10)])  # warm-up
    before = snapshot(gws, broker)
    res = lg.call(op="paced", plan=plan, timeout=60)
    out = measure(before, snapshot(gws, broker), res)
    lg.call(op="close")
    return out


def scenario_churn(lg: LoadGenProcess, gws: list[GatewayNode], broker: Broker,
                   p: Params) -> dict[str, Any]:
    n = p.churn_sockets
    lg.call(op="connect", urls=[g.url for g in gws], count=n + 20)
    listeners = list(range(n, n + 20))
    lg.call(op="join", pairs=[[i, "steady"] for i in listeners])
    seconds = p.latency_seconds * 2
    rate = p.latency_rate / 2
    count = int(rate * seconds)
    plan = [[round(k / rate, 4), listeners[k % 20], "steady"] for k in range(count)]
    before = snapshot(gws, broker)
    res = lg.call(op="churn", sockets=list(range(n)), rooms=[f"churn-{r}" for r in range(50)],
                  ops_per_s=p.churn_ops_per_s, seconds=seconds, plan=plan, seed=p.seed)
    after = snapshot(gws, broker)
    out = measure(before, after, res)
    elapsed = after.at - before.at

    def ops(name: str) -> float:
        return sum(after.gateway[g].get(name, 0) - before.gateway[g].get(name, 0)
                   for g in after.gateway)

    out["churn"] = res["churn"]
    out["broker_subscription_ops_per_s"] = round(
        (ops("gateway_broker_subscribe_ops_total") + ops("gateway_broker_unsubscribe_ops_total"))
        / elapsed, 1)
    lg.call(op="close")
    return out


def scenario_memory(backend: str, broker: Broker, workdir: Path, p: Params) -> dict[str, Any]:
    """RSS growth per idle socket on a fresh gateway, per client kind; for the plain and
    upgraded clients also the growth per room membership: each socket in a room of its
    own (a room, its index entry and broker subscription per socket), then all of them
    in one shared room."""
    variants = (("plain", False, False), ("deflate-offered", True, False),
                ("upgraded", False, True))
    gws = [start_bench_gateway(broker, workdir, f"{backend}-mem-{variant}")
           for variant, _, _ in variants]
    out: dict[str, Any] = {}
    lg = LoadGenProcess()
    n = p.idle_sockets
    # memory settles after each step before RSS is read: measurement boundaries, not
    # waits for an event
    settle = 0.3 if p.quick else 1.0
    try:
        wait_gateways(gws)
        for gw, (variant, deflate, upgrade) in zip(gws, variants, strict=True):
            assert gw.child is not None
            # warm up
            lg.call(op="connect", urls=[gw.url], count=20, deflate=deflate, upgrade=upgrade)
            lg.call(op="join", pairs=[[i, f"warm-{i}"] for i in range(20)])
            lg.call(op="close")
            time.sleep(settle)
            base = rss_bytes(gw.child.pid)
            got = lg.call(op="connect", urls=[gw.url], count=n, deflate=deflate,
                          upgrade=upgrade)
            time.sleep(settle)
            idle = rss_bytes(gw.child.pid)
            grown = idle - base
            figures: dict[str, Any] = {
                "sockets": n, "deflate_negotiated": got["deflate"],
                "upgraded": got.get("upgraded", 0),
                "rss_bytes_per_socket": round(grown / n),
                "kb_per_socket": round(grown / n / 1024, 1)}
            if not deflate:
                # the first room also pays for what a socket's first request creates; the
                # second shows a room's own cost. Joins go 20 at a time, so what is
                # measured is what stays, not the peak of many requests in flight.
                rss = [idle]
                failures = 0
                for rooms in ([f"own-{i}" for i in range(n)], [f"own2-{i}" for i in range(n)],
                              ["shared"] * n):
                    failures += lg.call(op="join", concurrency=20, pairs=[
                        [i, room] for i, room in enumerate(rooms)])["failures"]
                    time.sleep(settle)
                    rss.append(rss_bytes(gw.child.pid))
                figures.update({
                    "join_failures": failures,
                    "kb_per_own_room": round((rss[1] - rss[0]) / n / 1024, 2),
                    "kb_per_second_own_room": round((rss[2] - rss[1]) / n / 1024, 2),
                    "kb_per_shared_room_membership": round((rss[3] - rss[2]) / n / 1024, 2)})
            out[variant] = figures
            lg.call(op="close")
    finally:
        lg.stop()
        stop_all([g.child for g in gws])
    return out


def scenario_cluster_api(lg: LoadGenProcess, gws: list[GatewayNode], broker: Broker,
                         p: Params) -> dict[str, Any]:
    """How long a cluster-wide call takes (GET /api/rooms/{room}: a count from every
    gateway), with every gateway alive, then with one SIGSTOPped (the call's timeout,
    5 s, is the bound), then after it has missed its heartbeats."""
    import urllib.request

    if GATEWAY_BACKEND[broker.name] == "stock-redis":
        return {"skipped": "python-socketio's manager has no cluster-wide calls"}
    n = 30 if p.quick else 300
    lg.call(op="connect", urls=[g.url for g in gws], count=n)
    lg.call(op="join", pairs=[[i, "census"] for i in range(n)])
    url = f"{gws[0].url}/api/rooms/census"

    def timed(count: int) -> list[float]:
        took = []
        for _ in range(count):
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=30) as resp:
                body = json.loads(resp.read())
            took.append((time.perf_counter() - started) * 1000)
            if body.get("members") is None:
                raise RuntimeError(f"bad answer {body}")
        return sorted(took)

    out: dict[str, Any] = {}
    alive = timed(20 if p.quick else 200)
    out["all_alive_ms"] = {"p50": round(alive[len(alive) // 2], 2),
                           "p99": round(alive[int(len(alive) * 0.99) - 1], 2)}
    victim = gws[-1].child
    assert victim is not None

    def alive_seen_by_first() -> int:
        return int(metrics(gws[0].url).get("gateway_cluster_nodes", 0))

    victim.signal(signal.SIGSTOP)
    try:
        stopped = timed(2)
        out["one_stopped_ms"] = {"max": round(stopped[-1], 1), "timeout_ms": 5000}
        # past three missed heartbeats (2 s apart) it is no longer waited for
        wait_until(lambda: alive_seen_by_first() == len(gws) - 1, 30,
                   "the stopped gateway's heartbeats to be missed")
        after = timed(20)
        out["after_heartbeats_missed_ms"] = {"p50": round(after[len(after) // 2], 2)}
    finally:
        victim.signal(signal.SIGCONT)
    wait_until(lambda: alive_seen_by_first() == len(gws), 30,
               "the continued gateway to announce itself again")
    lg.call(op="close")
    return out
#: sockets per load generator process in the idle scenario (its file limit and one
#: source address's ephemeral ports bound it)
IDLE_PER_GENERATOR = 15_000


def _idle_generators(count: int) -> int:
    return -(-count // IDLE_PER_GENERATOR)


def scenario_idle(backend: str, broker: Broker, workdir: Path, p: Params) -> dict[str, Any]:
    """Many idle websocket sockets on one gateway: KB per socket, gateway CPU per
    second per 1,000 sockets while engine.io pings flow, and the time to connect
    them all (load generators connect in parallel, each from its own 127.0.0.x)."""
    n = p.idle_count
    gw = start_bench_gateway(broker, workdir, f"{backend}-idle")
    gens = [LoadGenProcess() for _ in range(_idle_generators(n))]
    try:
        wait_gateways([gw])
        assert gw.child is not None
        pid = gw.child.pid
        gens[0].call(op="connect", urls=[gw.url], count=20)  # warm up
        gens[0].call(op="close")
        time.sleep(1.0)  # RSS settles (a measurement boundary)
        base = rss_bytes(pid)
        shares = [n // len(gens) + (k < n % len(gens)) for k in range(len(gens))]
        started = time.monotonic()
        for k, (lg, share) in enumerate(zip(gens, shares, strict=True)):
            lg.send(op="connect", urls=[gw.url], count=share, local_host=f"127.0.0.{k + 2}")
        for lg in gens:
            lg.reply()
        connect_s = time.monotonic() - started
        time.sleep(2.0)  # RSS settles (a measurement boundary)
        rss = rss_bytes(pid)
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(p.idle_seconds)  # the measured idle period
        cpu = cpu_seconds(pid) - cpu0
        seconds = time.monotonic() - t0
        status = [lg.call(op="status") for lg in gens]
        return {
            "sockets": n, "connect_seconds": round(connect_s, 2),
            "sockets_per_s": round(n / connect_s, 1),
            "kb_per_socket": round((rss - base) / n / 1024, 2),
            "cpu_ms_per_s_per_1k": round(1000 * cpu / seconds / (n / 1000), 3),
            "seconds": round(seconds, 1),
            "alive_at_end": sum(s["open"] for s in status),
            "unexpected_closes": sum(s["unexpected_closes"] for s in status),
        }
    finally:
        for lg in gens:
            lg.stop()
        stop_all([gw.child])


SCENARIO_FUNCS: dict[str, tuple[int, Callable[..., dict[str, Any]]]] = {
    "cluster-api": (3, scenario_cluster_api),
    "reference": (3, scenario_reference),
    "many-rooms": (3, scenario_many_rooms),
    "fanout": (2, scenario_fanout),
    "fanout-upgrade": (2, partial(scenario_fanout, upgrade=True)),
    "latency": (2, scenario_latency),
    "latency-upgrade": (2, partial(scenario_latency, upgrade=True)),
    "churn": (2, scenario_churn),
    recovery.STORM: (2, recovery.scenario_reconnect_storm),
}


#: delivery scenarios of one phase whose refused joins the runner counts (reference
#: counts per phase itself; the others' tables count what they need)
JOINS_COUNTED = ("fanout", "fanout-upgrade", "many-rooms", "latency", "latency-upgrade",
                 "churn")


def run_backend(backend: str, scenarios: list[str], workdir: Path, p: Params
                ) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if backend == node_peer.NODE_PEER:
        results.update({s: {"skipped": why} for s, why in node_peer.SKIPPED.items()
                        if s in scenarios})
        scenarios = [s for s in scenarios if s not in node_peer.SKIPPED]
    if "scale" in scenarios:  # brokers of its own (3 and 5 NATS nodes)
        from .scale import run_scale

        results["scale"] = run_scale(backend, workdir / backend / "scale", p.quick, p.seed)
        scenarios = [s for s in scenarios if s != "scale"]
        if not scenarios:
            return results
    if no_affinity.SCENARIO in scenarios:  # gateways and a front of its own
        results[no_affinity.SCENARIO] = no_affinity.run_no_affinity(
            backend, workdir / backend / "no-affinity", p.quick, p.upgrade_move)
        scenarios = [s for s in scenarios if s != no_affinity.SCENARIO]
        if not scenarios:
            return results
    broker = Broker(backend, workdir / backend)
    log(f"{backend}: starting the broker")
    broker.start()
    try:
        for count in (3, 2):
            group = [s for s in scenarios if s in SCENARIO_FUNCS
                     and SCENARIO_FUNCS[s][0] == count]
            if not group:
                continue
            gws: list[GatewayNode] = []
            lg = LoadGenProcess(deflate=p.client_deflate)
            try:
                for i in range(count):
                    gws.append(start_bench_gateway(broker, workdir / backend,
                                                   f"{backend}-gw{count}-{i + 1}", i))
                wait_gateways(gws)
                for scenario in group:
                    log(f"{backend}: {scenario} on {count} gateways")
                    refused = lg.joins_refused
                    results[scenario] = SCENARIO_FUNCS[scenario][1](lg, gws, broker, p)
                    if scenario in JOINS_COUNTED:
                        # set-up joins included: they fail the run (tools/bench/report.py)
                        results[scenario]["joins_refused"] = lg.joins_refused - refused
            finally:
                lg.stop()
                stop_all([g.child for g in gws])
        if "memory" in scenarios and backend != "redis-cluster-classic":
            log(f"{backend}: memory per idle socket")
            results["memory"] = scenario_memory(backend, broker, workdir / backend, p)
        if "idle" in scenarios and backend != "redis-cluster-classic":
            log(f"{backend}: {p.idle_count} idle sockets for {p.idle_seconds:g} s")
            results["idle"] = scenario_idle(backend, broker, workdir / backend, p)
    finally:
        broker.stop()
    return results
