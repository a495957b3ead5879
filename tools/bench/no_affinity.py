"""The ``no-affinity`` scenario: default-mode clients through a round-robin balancer.

socket.io-client's default mode connects by HTTP long-polling and then upgrades to
a websocket. Behind a balancer without affinity its requests land on any gateway;
a gateway serves a request of a session another one owns through the owner
(``gateway/forwarding.py``): a poll is forwarded over HTTP, and a websocket that
lands on a non-owner moves the session there (``nats_adapter/handover.py``), or,
with ``--upgrade-move off``, is spliced to the owner for as long as it lives. This
scenario measures what that costs against the same clients connected directly.

For 2 and 4 gateways on the 3-node NATS mesh, the same load runs in two modes,
alternately, ``repeats`` times (the tables show medians):

- ``direct``: socket i connects to gateway i % N, every request to its owner;
- ``front``: every socket through a TCP front that sends each new connection to
  the next gateway (HAProxy in TCP mode when it is installed, else :mod:`.front`'s
  own, in a process of its own; it stands for an external balancer, and its CPU is
  reported apart), every polling request on a
  fresh TCP connection and the websocket on another, so that about (N-1)/N of the
  websockets land on a gateway that does not own their session (and move there, or
  are spliced to the owner).

The load: ``sockets`` receivers in ``rooms`` rooms, each room spanning every
gateway (socket i is in room (i // N) % rooms), one sender per room. Two phases
per mode: ``ack-paced`` (each sender sends its next chat on the previous one's
ack: the gateways' CPU per delivery at the most they do) and ``rate-paced`` (the
chats at a fixed rate below saturation: latency). Gateway CPU is the sum over the
gateway processes, from /proc; a socket's gateway (for cross-node latency) is the
one its engine.io sid names.
"""

from __future__ import annotations

import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.processes import GatewayNode, stop_all, wait_gateways

from .backends import GATEWAY_BACKEND, Broker, start_bench_gateway
from .front import HAPROXY, FrontProcess, HaproxyFront
from .harness import LoadGenProcess, cpu_seconds, log

Front = FrontProcess | HaproxyFront

SCENARIO = "no-affinity"
MODES = ("direct", "front")
PHASES = ("ack-paced", "rate-paced")


@dataclass(frozen=True)
class NoAffinityParams:
    gateway_counts: tuple[int, ...]
    sockets: int
    rooms: int
    #: chats per sender in the ack-paced phase
    messages: int
    #: chats per second (all rooms) in the rate-paced phase, for ``seconds``
    rate: float
    seconds: float
    #: direct and front phases, alternately, this many times each
    repeats: int

    @classmethod
    def of(cls, quick: bool) -> NoAffinityParams:
        if quick:
            return cls((2, 4), 40, 4, 5, 40.0, 1.0, 1)
        return cls((2, 4), 400, 8, 40, 80.0, 5.0, 3)

    def describe(self) -> dict[str, Any]:
        return {"gateways": "/".join(map(str, self.gateway_counts)), "sockets": self.sockets,
                "rooms": self.rooms, "members_per_room": self.sockets // self.rooms,
                "senders": self.rooms, "ack_paced_messages_per_sender": self.messages,
                "rate_msgs_per_s": self.rate, "rate_seconds": self.seconds,
                "repeats": self.repeats,
                "clients": "polling, then upgrade to websocket (socket.io-client's default); "
                           "direct to gateway i % N, or through a round-robin TCP front "
                           "(a new TCP connection per polling request and for the websocket)"}


def _rooms(p: NoAffinityParams, gateways: int) -> tuple[list[list[Any]], list[int]]:
    """(socket, room) pairs and each room's sender (on gateway r % N when direct)."""
    pairs = [[i, f"na-{(i // gateways) % p.rooms}"] for i in range(p.sockets)]
    senders = [gateways * r + r % gateways for r in range(p.rooms)]
    return pairs, senders


def _forwarded(gws: list[GatewayNode]) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in gws:
        text = _metrics_text(g.url)
        for line in text.splitlines():
            if line.startswith("gateway_forwarded_requests_total{"):
                kind = line.split('kind="', 1)[1].split('"', 1)[0]
                out[kind] = out.get(kind, 0.0) + float(line.rpartition(" ")[2])
    return out


def _metrics_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _cpu(gws: list[GatewayNode], front: Front | None, lg: LoadGenProcess
         ) -> tuple[float, float, float]:
    gw = sum(cpu_seconds(g.child.pid) for g in gws if g.child is not None)
    return gw, cpu_seconds(front.pid) if front is not None else 0.0, cpu_seconds(lg.pid)


def _figures(before: tuple[float, float, float], after: tuple[float, float, float],
             res: dict[str, Any]) -> dict[str, Any]:
    delivered = res["delivered"]
    gw, front, lg = (a - b for a, b in zip(after, before, strict=True))

    def per_1k(cpu: float) -> float | None:
        return round(1000 * cpu / delivered, 4) if delivered else None

    return {
        "messages": res["messages"], "expected": res["expected"], "delivered": delivered,
        "lost": res["lost"], "duplicated": res["duplicated"],
        "misdelivered": res["misdelivered"], "failures": res.get("failures", 0),
        "seconds": res.get("seconds"),
        "deliveries_per_s": round(delivered / res["seconds"], 1) if res.get("seconds") else None,
        "gateway_cpu_s": round(gw, 3),
        "gateway_cpu_s_per_1000_deliveries": per_1k(gw),
        "front_cpu_s_per_1000_deliveries": per_1k(front),
        "loadgen_cpu_s_per_1000_deliveries": per_1k(lg),
        "latency_ms": res["latency_ms"],
    }


def run_mode(lg: LoadGenProcess, gws: list[GatewayNode], front: Front | None,
             p: NoAffinityParams, quick: bool) -> dict[str, Any]:
    """One mode: connect (direct, or through ``front``), join, both phases, close."""
    n = len(gws)
    pairs, senders = _rooms(p, n)
    forwarded0 = _forwarded(gws)
    if front is None:
        got = lg.call(op="connect", urls=[g.url for g in gws], count=p.sockets, upgrade=True)
    else:
        got = lg.call(op="connect", urls=[front.url], count=p.sockets, upgrade=True,
                      fresh=True, owner_from_sid=True, concurrency=50)
    forwarded = {k: int(v - forwarded0.get(k, 0.0)) for k, v in _forwarded(gws).items()}
    failures = lg.call(op="join", pairs=pairs)["failures"]
    out: dict[str, Any] = {"connect_seconds": got["seconds"], "upgraded": got["upgraded"],
                           "join_failures": failures,
                           "relayed_websockets": forwarded.get("websocket", 0),
                           "moved_websockets": forwarded.get("moved", 0),
                           "forwarded_polls": forwarded.get("polling", 0),
                           "refused": sum(v for k, v in forwarded.items()
                                          if k.startswith(("refused", "failed")))}
    burst = [[s, f"na-{r}", p.messages] for r, s in enumerate(senders)]
    if not quick:  # warm up
        lg.call(op="burst", plan=[[s, room, 2] for s, room, _ in burst])
    before = _cpu(gws, front, lg)
    res = lg.call(op="burst", plan=burst, timeout=120)
    out["ack-paced"] = _figures(before, _cpu(gws, front, lg), res)
    count = int(p.rate * p.seconds)
    plan = [[round(k / p.rate, 4), senders[k % p.rooms], f"na-{k % p.rooms}"]
            for k in range(count)]
    before = _cpu(gws, front, lg)
    res = lg.call(op="paced", plan=plan, timeout=60)
    out["rate-paced"] = _figures(before, _cpu(gws, front, lg), res)
    closed = lg.call(op="close")
    out["unexpected_closes"] = closed["unexpected_closes"]
    return out


def _median(values: list[Any]) -> Any:
    """The median of numbers; of dicts, key by key; else the first value."""
    if all(isinstance(v, dict) for v in values):
        return {k: _median([v[k] for v in values if k in v]) for k in values[0]}
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if numbers and len(numbers) == len(values):
        med = statistics.median(numbers)
        return round(med, 4) if isinstance(med, float) else med
    return values[0] if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(config: dict[str, Any]) -> dict[str, Any]:
    """Through the front over direct, per phase: gateway CPU per delivery, p50, p99 (all
    deliveries and cross-node)."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        d, f = config["direct"][phase], config["front"][phase]
        out[phase] = {
            "gateway_cpu": _ratio(f["gateway_cpu_s_per_1000_deliveries"],
                                  d["gateway_cpu_s_per_1000_deliveries"]),
            "p50": _ratio(f["latency_ms"]["all"]["p50"], d["latency_ms"]["all"]["p50"]),
            "p99": _ratio(f["latency_ms"]["all"]["p99"], d["latency_ms"]["all"]["p99"]),
            "cross_p99": _ratio(f["latency_ms"]["cross"]["p99"],
                                d["latency_ms"]["cross"]["p99"]),
        }
    return out


def run_no_affinity(backend: str, workdir: Path, quick: bool, upgrade_move: bool = True
                    ) -> dict[str, Any]:
    if GATEWAY_BACKEND.get(backend) != "nats":
        return {"skipped": "the no-affinity scenario runs on the nats backend"}
    p = NoAffinityParams.of(quick)
    broker = Broker(backend, workdir)
    log(f"{backend}: {SCENARIO}: starting the broker")
    broker.start()
    configs: list[dict[str, Any]] = []
    try:
        for count in p.gateway_counts:
            gws: list[GatewayNode] = []
            lg = LoadGenProcess()
            front: Front | None = None
            try:
                for i in range(count):
                    gws.append(start_bench_gateway(
                        broker, workdir, f"{backend}-na{count}-{i + 1}", i,
                        ["--upgrade-move", "on" if upgrade_move else "off"]))
                wait_gateways(gws)
                targets = [g.url.split("//", 1)[1] for g in gws]
                front = HaproxyFront(targets, workdir / f"front{count}") \
                    if shutil.which(HAPROXY) else FrontProcess(targets)
                every: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
                for k in range(p.repeats):
                    for mode in MODES:
                        log(f"{backend}: {SCENARIO}: {count} gateways, {mode} "
                            f"({k + 1} of {p.repeats})")
                        every[mode].append(run_mode(lg, gws, front if mode == "front" else None,
                                                    p, quick))
                config: dict[str, Any] = {"gateways": count, "balancer": HAPROXY if isinstance(
                    front, HaproxyFront) else "tools.bench.front"}
                config.update({m: _median(every[m]) for m in MODES})
                config["ratio"] = ratios(config)
                config["runs"] = every
                configs.append(config)
            finally:
                if front is not None:
                    front.stop()
                lg.stop()
                stop_all([g.child for g in gws])
    finally:
        broker.stop()
    return {"params": {**p.describe(), "upgrade_move": upgrade_move}, "configs": configs}


# -- the report --------------------------------------------------------------------


def _p(f: dict[str, Any], which: str, q: str) -> str:
    value = f["latency_ms"][which][q]
    return "-" if value is None else f"{value:.2f}"


def _n(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, dict[str, Any]]) -> list[str]:
    """The table of every no-affinity run in ``results`` (empty when none ran)."""
    lines: list[str] = []
    for backend, scenarios in results.items():
        data = scenarios.get(SCENARIO)
        if not data or "configs" not in data:
            continue
        fronts = sorted({c.get("balancer", "tools.bench.front") for c in data["configs"]})
        moves = "on" if data["params"].get("upgrade_move", True) else "off"
        lines += ["", f"No affinity ({backend}): default-mode clients direct to their gateway, "
                  f"and through a round-robin TCP front ({', '.join(fronts)}; medians of "
                  f"{data['params']['repeats']}; ratio = front / direct; --upgrade-move "
                  f"{moves})", "",
                  "| gateways | phase | mode | deliveries/s | gateway CPU-s per 1k deliveries "
                  "| front CPU-s per 1k | p50 / p99 ms (cross-node p99) | spliced / moved "
                  "websockets / forwarded polls | lost / dup / misdelivered / refused |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for config in data["configs"]:
            for phase in PHASES:
                for mode in MODES:
                    m = config[mode]
                    f = m[phase]
                    lines.append(
                        f"| {config['gateways']} | {phase} | {mode} | "
                        f"{_n(f['deliveries_per_s'], 0)} | "
                        f"{_n(f['gateway_cpu_s_per_1000_deliveries'])} | "
                        f"{_n(f['front_cpu_s_per_1000_deliveries']) if mode == 'front' else '-'}"
                        f" | {_p(f, 'all', 'p50')} / {_p(f, 'all', 'p99')} "
                        f"({_p(f, 'cross', 'p99')}) | {m['relayed_websockets']} / "
                        f"{m.get('moved_websockets', 0)} / "
                        f"{m['forwarded_polls']} | {f['lost']} / {f['duplicated']} / "
                        f"{f['misdelivered']} / {f['failures']} |")
                r = config["ratio"][phase]
                lines.append(f"| {config['gateways']} | {phase} | **ratio** | | "
                             f"**{_n(r['gateway_cpu'], 2)}x** | | {_n(r['p50'], 2)}x / "
                             f"{_n(r['p99'], 2)}x ({_n(r['cross_p99'], 2)}x) | | |")
    return lines


def faults(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every no-affinity phase (of every repeat) that lost, doubled, misdelivered or
    refused something, or whose sockets closed unexpectedly."""
    out = []
    for backend, scenarios in results.items():
        for config in (scenarios.get(SCENARIO) or {}).get("configs", []):
            for mode, runs in config["runs"].items():
                for k, run in enumerate(runs):
                    where = f"{SCENARIO} on {backend}, {config['gateways']} gateways, {mode} " \
                            f"(repeat {k + 1})"
                    for phase in PHASES:
                        bad = {key: run[phase][key] for key in
                               ("lost", "duplicated", "misdelivered", "failures")
                               if run[phase][key]}
                        if bad:
                            out.append(f"{where}, {phase}: " + ", ".join(
                                f"{v} {key}" for key, v in bad.items()))
                    for key in ("join_failures", "unexpected_closes", "refused"):
                        if run[key]:
                            out.append(f"{where}: {run[key]} {key.replace('_', ' ')}")
    return out
