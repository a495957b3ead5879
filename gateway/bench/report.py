"""Benchmark output: JSON, a Markdown table with ratios against stock-redis, PNG charts."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from . import recovery_report, scale_report

BASELINE = "stock-redis"


def _rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(scenario/phase, backend, figures) for every measured phase."""
    rows = []
    for backend, scenarios in results.items():
        for scenario, data in scenarios.items():
            if scenario in ("memory", "idle", "cluster-api", "scale",
                            *recovery_report.OWN_TABLES):
                continue  # tables of their own
            if scenario == "reference":
                for phase, figures in data.items():
                    rows.append((f"reference/{phase}", backend, figures))
            else:
                rows.append((scenario, backend, data))
    return rows


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio(value: float | None, base: float | None, higher_is_better: bool) -> str:
    if not value or not base:
        return ""
    ratio = value / base if higher_is_better else base / value
    return f" ({ratio:.2f}x)"


def markdown(report: dict[str, Any]) -> str:
    results: dict[str, dict[str, Any]] = report["results"]
    lines = [
        "| scenario | backend | deliveries/s | gateway CPU-s per 1k deliveries | broker "
        "CPU-s per 1k | gateway + broker CPU-s per 1k | p50 / p99 / p99.9 ms "
        "(cross-node p99) | gateway-broker bytes per delivery | all broker-node bytes per "
        "delivery | wasted receptions | lost / dup / misdelivered / refused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_of: dict[str, dict[str, Any]] = {s: f for s, b, f in _rows(results) if b == BASELINE}
    for scenario, backend, f in sorted(_rows(results), key=lambda r: (r[0], r[1])):
        base = base_of.get(scenario, {})
        lat = f["latency_ms"]["all"]
        cross = f["latency_ms"]["cross"]
        cpu = f["cpu_s_per_1000_deliveries"]
        bcpu = f.get("broker_cpu_s_per_1000_deliveries")
        total = f.get("total_cpu_s_per_1000_deliveries")
        per = f["broker_bytes_per_delivery"]
        node = f.get("broker_node_bytes_per_delivery")
        lines.append(
            f"| {scenario} | {backend} | {_fmt(f['deliveries_per_s'])} | "
            f"{_fmt(cpu, 4)}{_ratio(cpu, base.get('cpu_s_per_1000_deliveries'), False)} | "
            f"{_fmt(bcpu, 4)} | "
            f"{_fmt(total, 4)}{_ratio(total, base.get('total_cpu_s_per_1000_deliveries'), False)}"
            " | "
            f"{_fmt(lat['p50'], 2)} / {_fmt(lat['p99'], 2)} / {_fmt(lat['p999'], 2)} "
            f"({_fmt(cross['p99'], 2)}) | "
            f"{_fmt(per)}{_ratio(per, base.get('broker_bytes_per_delivery'), False)} | "
            f"{_fmt(node)}{_ratio(node, base.get('broker_node_bytes_per_delivery'), False)} | "
            f"{_fmt(f['wasted_receptions'])} | {f['lost']} / {f['duplicated']} / "
            f"{f['misdelivered']} / {f.get('failures', 0)} |"
        )
    if len(lines) == 2:
        lines = []  # no scenario of this table ran (a scale-only run)
    mem = [(b, s["memory"]) for b, s in results.items() if "memory" in s]
    if mem:
        base_mem = dict(mem).get(BASELINE, {})

        def kb(m: dict[str, Any], variant: str, key: str) -> str:
            value = m.get(variant, {}).get(key)
            return f"{_fmt(value)}{_ratio(value, base_mem.get(variant, {}).get(key), False)}"

        lines += ["", "| idle memory | backend | KB per socket: websocket client | "
                  "polling, then upgraded | client offering permessage-deflate (negotiated) | "
                  "+KB for a first room of its own (websocket / upgraded) | +KB per further "
                  "room of its own | +KB per shared-room membership |",
                  "|---|---|---|---|---|---|---|---|"]
        for backend, m in mem:
            defl = m["deflate-offered"]
            lines.append(
                f"| memory | {backend} | {kb(m, 'plain', 'kb_per_socket')} | "
                f"{kb(m, 'upgraded', 'kb_per_socket')} | "
                f"{kb(m, 'deflate-offered', 'kb_per_socket')} "
                f"({defl['deflate_negotiated']} of {defl['sockets']}) | "
                f"{kb(m, 'plain', 'kb_per_own_room')} / {kb(m, 'upgraded', 'kb_per_own_room')} | "
                f"{kb(m, 'plain', 'kb_per_second_own_room')} / "
                f"{kb(m, 'upgraded', 'kb_per_second_own_room')} | "
                f"{kb(m, 'plain', 'kb_per_shared_room_membership')} / "
                f"{kb(m, 'upgraded', 'kb_per_shared_room_membership')} |")
    idle = [(b, s["idle"]) for b, s in results.items() if "idle" in s]
    if idle:
        base_idle = dict(idle).get(BASELINE, {})
        lines += ["", "| idle sockets | backend | sockets | KB per socket | CPU ms per s per "
                  "1k sockets | connect time s (sockets/s) | alive at the end |",
                  "|---|---|---|---|---|---|---|"]
        for backend, d in idle:
            lines.append(
                f"| idle | {backend} | {d['sockets']:,} | {d['kb_per_socket']}"
                f"{_ratio(d['kb_per_socket'], base_idle.get('kb_per_socket'), False)} | "
                f"{d['cpu_ms_per_s_per_1k']}"
                f"{_ratio(d['cpu_ms_per_s_per_1k'], base_idle.get('cpu_ms_per_s_per_1k'), False)}"
                f" | {d['connect_seconds']} ({_fmt(d['sockets_per_s'])}) | "
                f"{d['alive_at_end']:,} |")
    churn = [(b, s["churn"]) for b, s in results.items() if "churn" in s]
    if churn:
        lines += ["", "| churn | backend | join/leave ops | broker subscription ops/s | "
                  "steady-room p99 ms during churn |", "|---|---|---|---|---|"]
        for backend, c in churn:
            lines.append(f"| churn | {backend} | {c['churn']['ops']} | "
                         f"{c['broker_subscription_ops_per_s']} | "
                         f"{_fmt(c['latency_ms']['all']['p99'], 2)} |")
    api = [(b, s["cluster-api"]) for b, s in results.items()
           if "all_alive_ms" in s.get("cluster-api", {})]
    if api:
        lines += ["", "| cluster-api | backend | all gateways alive: p50 / p99 ms | one "
                  "SIGSTOPped: longest ms (timeout 5000) | after its heartbeats are missed: "
                  "p50 ms |", "|---|---|---|---|---|"]
        for backend, a in api:
            lines.append(f"| cluster-api | {backend} | {a['all_alive_ms']['p50']} / "
                         f"{a['all_alive_ms']['p99']} | {a['one_stopped_ms']['max']} | "
                         f"{a['after_heartbeats_missed_ms']['p50']} |")
    lines += recovery_report.markdown(results)
    scale = scale_report.markdown(results)
    if scale:
        lines += ["", scale.rstrip("\n")] if lines else [scale.rstrip("\n")]
    return "\n".join(lines) + "\n"


def faults(report: dict[str, Any]) -> list[str]:
    """Every phase that lost, duplicated, misdelivered, refused or reordered a message."""
    out = []
    for scenario, backend, f in _rows(report["results"]):
        bad = {k: f.get(k, 0) for k in ("lost", "duplicated", "misdelivered", "failures",
                                        "out_of_order") if f.get(k, 0)}
        if bad:
            out.append(f"{scenario} on {backend}: "
                       + ", ".join(f"{v} {k.replace('failures', 'refused').replace('_', ' ')}"
                                   for k, v in bad.items()))
    return out + recovery_report.faults(report)


def charts(report: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, dict[str, Any]] = report["results"]
    rows = _rows(results)
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
    paths["markdown"].write_text(markdown(report))
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


def benchmarks_md(report: dict[str, Any]) -> str:
    m = report["machine"]
    return (
        "# Benchmarks\n\n"
        f"Latest run: {report['finished']}, `{report['command']}`.\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Linux {m['kernel']}. "
        "Brokers, gateways and the load generator share these cores, so absolute figures "
        "drift between runs; the ratios in parentheses compare each backend with "
        f"`{BASELINE}` (python-socketio's AsyncRedisManager) measured in the same run.\n\n"
        "Backends: `nats` (NatsManager, 3-node NATS full mesh), `redis-sharded` "
        "(RedisShardedManager, 3-master Redis Cluster, SSUBSCRIBE/SPUBLISH), `stock-redis` "
        "(AsyncRedisManager on one Redis), `redis-cluster-classic` (AsyncRedisManager with "
        "classic PUBLISH/SUBSCRIBE on the same Redis Cluster).\n\n"
        "Scenario parameters:\n\n"
        + "".join(f"- **{k}**: {', '.join(f'{a}={b}' for a, b in v.items())}\n"
                  for k, v in report["scenarios"].items())
        + "\n" + markdown(report)
        + "\nCharts and the full JSON are written next to `results.md` in the output folder.\n"
    )
