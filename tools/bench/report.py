"""Benchmark output: JSON, a Markdown table with ratios against stock-redis, PNG charts."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from . import no_affinity, recovery_report, runs, scale_report
from .phases import BASELINE, all_runs, measured, phase_paths, phase_rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class _Cells:
    """Table cells from every run: median [min-max], and the ratio against the
    baseline taken within each run, summarised the same way."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.runs = all_runs(report)

    def value(self, path: tuple[str, ...], digits: int = 1) -> str:
        return runs.stat(runs.values(self.runs, path), digits)

    def ratio(self, path: tuple[str, ...], higher_is_better: bool = False) -> str:
        base = (BASELINE, *path[1:])
        if path[0] == BASELINE:
            return " (1.00x)" if runs.values(self.runs, base) else ""
        found = runs.ratios(self.runs, path, base, higher_is_better)
        return f" ({runs.stat(found, 2, 'x')})" if found else ""

    def both(self, path: tuple[str, ...], digits: int = 1, higher_is_better: bool = False
             ) -> str:
        return self.value(path, digits) + self.ratio(path, higher_is_better)

    def total(self, path: tuple[str, ...]) -> int:
        """A count added up over the runs (losses: one in any run counts)."""
        return int(sum(runs.values(self.runs, path)))


def markdown(report: dict[str, Any]) -> str:
    results: dict[str, dict[str, Any]] = report["results"]
    c = _Cells(report)
    lines = [
        "| scenario | backend | deliveries/s | gateway CPU-s per 1k deliveries | broker "
        "CPU-s per 1k | gateway + broker CPU-s per 1k | p50 / p99 / p99.9 ms "
        "(cross-node p99) | gateway-broker bytes per delivery, on the sockets | all "
        "broker-node bytes per delivery, on the sockets (with NATS routes, Redis cluster bus) "
        "| wasted receptions: gateways' count (broker's count) | lost / dup / misdelivered / "
        "refused, all runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, backend, path in sorted(phase_paths(results), key=lambda r: (r[0], r[1])):
        f = runs.get(results, path)
        lat = (*path, "latency_ms", "all")
        lines.append(
            f"| {scenario} | {backend} | {c.value((*path, 'deliveries_per_s'))} | "
            f"{c.both((*path, 'cpu_s_per_1000_deliveries'), 4)} | "
            f"{c.value((*path, 'broker_cpu_s_per_1000_deliveries'), 4)} | "
            f"{c.both((*path, 'total_cpu_s_per_1000_deliveries'), 4)} | "
            f"{c.value((*lat, 'p50'), 2)} / {c.value((*lat, 'p99'), 2)} / "
            f"{c.value((*lat, 'p999'), 2)} "
            f"({c.value((*path, 'latency_ms', 'cross', 'p99'), 2)}) | "
            f"{c.both((*path, 'broker_bytes_per_delivery'))} | "
            f"{c.both((*path, 'broker_node_bytes_per_delivery'))} | "
            f"{wasted_cell(f)} | {c.total((*path, 'lost'))} / "
            f"{c.total((*path, 'duplicated'))} / {c.total((*path, 'misdelivered'))} / "
            f"{c.total((*path, 'failures'))} |"
        )
    if len(lines) == 2:
        lines = []  # no scenario of this table ran (a scale-only run)
    joins = [f"{scenario} ({backend}) {c.total((*path, 'joins_refused'))}"
             for scenario, backend, path in sorted(phase_paths(results),
                                                   key=lambda r: (r[1], r[0]))
             if runs.values(c.runs, (*path, "joins_refused"))]
    if joins:
        lines += ["", "Joins and leaves refused, set-up included, all runs (any fails the "
                  "run): " + "; ".join(joins) + "."]
    coalesced = [f"{scenario} ({backend}) {c.value((*path, 'websocket_frames_per_send'), 2)}"
                 for scenario, backend, path in sorted(phase_paths(results),
                                                       key=lambda r: (r[1], r[0]))
                 if runs.get(results, (*path, "websocket_frames_per_send")) is not None]
    if coalesced:
        lines += ["", "Websocket frames per socket send on our gateways (frames written to one "
                  "connection in one turn of the event loop leave in one send): "
                  + "; ".join(coalesced) + "."]
    handled = [f"{scenario} ({backend}) "
               f"{c.value((*path, 'latency_handled_ms', 'cross', 'p99'), 2)}"
               for scenario, backend, path in sorted(phase_paths(results),
                                                     key=lambda r: (r[0], r[1]))
               if scenario.startswith("latency")
               and runs.get(results, (*path, "latency_handled_ms", "cross", "p99")) is not None]
    if handled:
        lines += ["", "Cross-node p99 ms to when the load generator had handled the chat "
                  "(the table's times end at the kernel's receive time): "
                  + "; ".join(handled) + "."]
    mem = [b for b, s in results.items() if "plain" in s.get("memory", {})]
    if mem:
        def kb(backend: str, variant: str, key: str) -> str:
            return c.both((backend, "memory", variant, key))

        lines += ["", "| idle memory | backend | KB per socket: websocket client | "
                  "polling, then upgraded | client offering permessage-deflate (negotiated) | "
                  "+KB for a first room of its own (websocket / upgraded) | +KB per further "
                  "room of its own | +KB per shared-room membership |",
                  "|---|---|---|---|---|---|---|---|"]
        for backend in mem:
            defl = results[backend]["memory"]["deflate-offered"]
            lines.append(
                f"| memory | {backend} | {kb(backend, 'plain', 'kb_per_socket')} | "
                f"{kb(backend, 'upgraded', 'kb_per_socket')} | "
                f"{kb(backend, 'deflate-offered', 'kb_per_socket')} "
                f"({defl['deflate_negotiated']} of {defl['sockets']}) | "
                f"{kb(backend, 'plain', 'kb_per_own_room')} / "
                f"{kb(backend, 'upgraded', 'kb_per_own_room')} | "
                f"{kb(backend, 'plain', 'kb_per_second_own_room')} / "
                f"{kb(backend, 'upgraded', 'kb_per_second_own_room')} | "
                f"{kb(backend, 'plain', 'kb_per_shared_room_membership')} / "
                f"{kb(backend, 'upgraded', 'kb_per_shared_room_membership')} |")
    idle = [b for b, s in results.items() if "sockets" in s.get("idle", {})]
    if idle:
        lines += ["", "| idle sockets | backend | sockets | KB per socket | CPU ms per s per "
                  "1k sockets | connect time s | sockets/s | alive at the end (least) |",
                  "|---|---|---|---|---|---|---|---|"]
        for backend in idle:
            d = (backend, "idle")
            alive = min(runs.values(c.runs, (*d, "alive_at_end")), default=0)
            lines.append(
                f"| idle | {backend} | {results[backend]['idle']['sockets']:,} | "
                f"{c.both((*d, 'kb_per_socket'), 2)} | "
                f"{c.both((*d, 'cpu_ms_per_s_per_1k'), 3)} | "
                f"{c.value((*d, 'connect_seconds'), 2)} | {c.value((*d, 'sockets_per_s'))} | "
                f"{int(alive):,} |")
    churn = [b for b, s in results.items() if "churn" in s.get("churn", {})]
    if churn:
        lines += ["", "| churn | backend | join/leave ops | broker subscription ops/s | "
                  "steady-room p99 ms during churn |", "|---|---|---|---|---|"]
        for backend in churn:
            d = (backend, "churn")
            lines.append(f"| churn | {backend} | {c.value((*d, 'churn', 'ops'), 0)} | "
                         f"{c.value((*d, 'broker_subscription_ops_per_s'))} | "
                         f"{c.value((*d, 'latency_ms', 'all', 'p99'), 2)} |")
    api = [b for b, s in results.items() if "all_alive_ms" in s.get("cluster-api", {})]
    if api:
        lines += ["", "| cluster-api | backend | all gateways alive: p50 / p99 ms | one "
                  "SIGSTOPped: longest ms (timeout 5000) | after its heartbeats are missed: "
                  "p50 ms |", "|---|---|---|---|---|"]
        for backend in api:
            d = (backend, "cluster-api")
            lines.append(f"| cluster-api | {backend} | {c.value((*d, 'all_alive_ms', 'p50'), 2)}"
                         f" / {c.value((*d, 'all_alive_ms', 'p99'), 2)} | "
                         f"{c.value((*d, 'one_stopped_ms', 'max'))} | "
                         f"{c.value((*d, 'after_heartbeats_missed_ms', 'p50'), 2)} |")
    lines += recovery_report.markdown(results)
    lines += no_affinity.markdown(results)
    scale = scale_report.markdown(results)
    if scale:
        lines += ["", scale.rstrip("\n")] if lines else [scale.rstrip("\n")]
    return "\n".join(lines) + "\n"


def wasted_cell(f: dict[str, Any]) -> str:
    """The gateways' count of wasted receptions, the broker's in parentheses; a
    disagreement is flagged."""
    own = _fmt(f["wasted_receptions"])
    check = f.get("wasted_cross_check") or {}
    if "wasted_by_broker" not in check:
        return own
    if check.get("agree") is None:
        return f"{own} (n/a)"
    if check["agree"]:
        return f"{own} ({_fmt(check['wasted_by_broker'])})"
    return f"{own} (**{_fmt(check['wasted_by_broker'])}: disagrees**)"


def disagreements(report: dict[str, Any]) -> list[str]:
    """Phases whose wasted receptions the broker counts differently from the gateways."""
    every = all_runs(report)
    return [f"{_run_label(k, every)}{scenario} on {backend}: gateways counted "
            f"{f['wasted_receptions']} wasted receptions, the broker "
            f"{f['wasted_cross_check']['wasted_by_broker']}"
            for k, results in enumerate(every) for scenario, backend, f in phase_rows(results)
            if (f.get("wasted_cross_check") or {}).get("agree") is False]


def _run_label(k: int, every: list[dict[str, dict[str, Any]]]) -> str:
    return f"run {k + 1}: " if len(every) > 1 else ""


def full_markdown(report: dict[str, Any]) -> str:
    """The tables, then the targets' verdicts derived from them."""
    from . import targets

    verdicts = targets.markdown(report)
    return markdown(report) + ("\n" + verdicts if verdicts else "")


def faults(report: dict[str, Any]) -> list[str]:
    """Every phase that lost, duplicated, misdelivered, refused or reordered a message."""
    out = []
    every = all_runs(report)
    for n, results in enumerate(every):
        for scenario, backend, f in phase_rows(results):
            bad = {k: f.get(k, 0) for k in ("lost", "duplicated", "misdelivered", "failures",
                                            "out_of_order") if f.get(k, 0)}
            if bad:
                out.append(f"{_run_label(n, every)}{scenario} on {backend}: "
                           + ", ".join(f"{v} {k.replace('failures', 'refused').replace('_', ' ')}"
                                       for k, v in bad.items()))
        for scenario, backend, f in phase_rows(results):
            if f.get("joins_refused"):
                out.append(f"{_run_label(n, every)}{scenario} on {backend}: "
                           f"{f['joins_refused']} joins or leaves refused")
    return out + recovery_report.faults(report) + [
        f"{_run_label(n, every)}{fault}" for n, results in enumerate(every)
        for fault in no_affinity.faults(results)]


def charts(report: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, dict[str, Any]] = report["results"]
    rows = phase_rows(results)
    scenarios = sorted({s for s, _, _ in rows})
    backends = list(results)
    made = []
    for metric, title, fname in (
        ("cpu_s_per_1000_deliveries", "Gateway CPU seconds per 1,000 deliveries (lower is better)",
         "cpu.png"),
        ("broker_bytes_per_delivery", "Broker bytes per delivered message (lower is better)",
         "broker-bytes.png"),
    ):
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / max(1, len(backends))
        for k, backend in enumerate(backends):
            values = []
            for scenario in scenarios:
                f = next((f for s, b, f in rows if s == scenario and b == backend), None)
                values.append((f or {}).get(metric) or 0)
            ax.bar([i + k * width for i in range(len(scenarios))], values, width, label=backend)
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(scenarios))])
        ax.set_xticklabels(scenarios, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / fname
        fig.savefig(path, dpi=100)
        plt.close(fig)
        made.append(path)
    return made


def write(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "results.json", "markdown": folder / "results.md"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(full_markdown(report))
    if charts_problem() is not None:
        return paths
    for path in [*charts(report, folder), *scale_report.charts(report["results"], folder)]:
        paths[path.stem] = path
    return paths


def charts_problem() -> str | None:
    """Why no charts can be drawn (matplotlib, the ``bench`` extra, is missing)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ("matplotlib is not installed (pip install 'nats-socketio-gateway[bench]'): "
                "results.json and results.md are written, the PNG charts are not")
    return None


def machine() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "kernel": platform.release()}


#: where --write-benchmarks-md keeps the run's full JSON, next to BENCHMARKS.md
JSON_BESIDE_BENCHMARKS = Path("docs") / "bench.json"


def benchmarks_md(report: dict[str, Any]) -> str:
    """BENCHMARKS.md's comparison section (between its markers): the run, its tables,
    and the targets' verdicts derived from them."""
    from . import targets

    m = report["machine"]
    count = len(all_runs(report))
    verdicts = targets.markdown(report)
    floors = measured(report.get("loopback_send_us"))
    return (
        f"{scale_report.MAIN_START}\n"
        f"## Latest comparison\n\n"
        f"Run: {report['finished']}, `{report['command']}` ({report['seconds']:.0f} s; "
        f"{count} run{'s' if count != 1 else ''} of every scenario"
        + ("; medians, with the range over the runs in brackets" if count > 1 else "")
        + f"). The full JSON is `{JSON_BESIDE_BENCHMARKS}`.\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Linux {m['kernel']}. "
        "Brokers, gateways and the load generator share these cores, so absolute figures "
        "drift between runs; the ratios in parentheses compare each backend with "
        f"`{BASELINE}` (python-socketio's AsyncRedisManager) measured in the same run."
        + (f" One send() of a 100-byte frame on loopback TCP costs its sender "
           f"{runs.stat(floors, 2)} CPU-us here, the receiving side included (measured "
           "at the start of each run: tools/bench/floor.py): the floor of a delivery "
           "for a server that sends each recipient's frame on its own."
           if floors else "") + "\n\n"
        "Backends: `nats` (NatsManager, 3-node NATS full mesh), `redis-sharded` "
        "(RedisShardedManager, 3-master Redis Cluster, SSUBSCRIBE/SPUBLISH), `stock-redis` "
        "(AsyncRedisManager on one Redis), `redis-cluster-classic` (AsyncRedisManager with "
        "classic PUBLISH/SUBSCRIBE on the same Redis Cluster), `node-peer` when named (Node "
        "socket.io 4.8 + @socket.io/redis-adapter's createShardedAdapter on a 3-master Redis "
        "Cluster, the same chat protocol: tools/bench/node_peer/server.mjs).\n\n"
        "Broker bytes are counted by the kernel on the sockets (`ss -tin`), the same way "
        "for every broker: between the gateways and the brokers, and on every socket of the "
        "broker nodes (so with NATS routes and the Redis Cluster bus). Wasted receptions are "
        "the gateways' count, with the broker's own count in parentheses (NATS: per "
        "gateway connection and subscription; Redis: channel subscribers x chats, all "
        "gateways together).\n\n"
        "Latency runs from the chat's send to the kernel's receive time at the "
        "recipient's socket (SO_TIMESTAMPNS): one load generator process reads for every "
        "socket, and when it had handled a chat, shown below the table, also counts "
        "its wait behind the sockets ahead in line, which no browser has.\n\n"
        "Scenario parameters:\n\n"
        + "".join(f"- **{k}**: {', '.join(f'{a}={b}' for a, b in v.items())}\n"
                  for k, v in report["scenarios"].items())
        + "\n" + markdown(report)
        + ("\n" + verdicts if verdicts else "")
        + f"{scale_report.MAIN_END}\n"
    )
