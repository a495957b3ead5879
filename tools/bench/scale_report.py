"""The ``scale`` scenario's tables and charts, measurements beside the model's predictions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

#: what BENCHMARKS.md keeps between runs of other scenarios
SECTION_START = "<!-- scale: written by `python -m gateway bench --scenario scale "\
    "--write-benchmarks-md` -->"
SECTION_END = "<!-- /scale -->"
#: a prediction within this many percent counts as validated
TOLERANCE_PCT = 20.0


def runs_of(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for scenarios in results.values():
        out += (scenarios.get("scale") or {}).get("runs") or []
    order = {"nats (3 nodes)": 0, "nats (5 nodes)": 1, "redis-sharded": 2, "stock-redis": 3}
    return sorted(out, key=lambda r: (order.get(r["system"], 9), r["system"], r["gateways"]))


def _check(run: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((v for v in run["validation"] if v["key"] == key), None)


def _cell(run: dict[str, Any], key: str, digits: int = 1) -> str:
    """``measured (model)``, or just the measurement when the model has no figure."""
    value = run["mean"].get(key)
    if value is None:
        return "n/a"
    check = _check(run, key)
    if check is None:
        return f"{value:,.{digits}f}"
    return f"{value:,.{digits}f} ({check['predicted']:,.{digits}f})"


def markdown(results: dict[str, dict[str, Any]]) -> str:
    runs = runs_of(results)
    if not runs:
        return ""
    lines = [
        "| scale | gateways | room msgs/s received per gateway (model) | broker bytes/s "
        "received per gateway, on its sockets (model) | wasted receptions/s per gateway "
        "(model) | heartbeats/s per gateway | receptions per delivery | gateway CPU-s per 1k "
        "deliveries | broker CPU-s per 1k deliveries | subscriptions per broker node, over "
        "idle | NATS "
        "route msgs/s per server (model) | NATS interest entries per server (model) | "
        "lost / dup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        m = r["mean"]
        lines.append(
            f"| {r['system']} | {r['gateways']} | {_cell(r, 'room_msgs_per_s')} | "
            f"{_cell(r, 'socket_bytes_per_s', 0)} | {_cell(r, 'wasted_msgs_per_s')} | "
            f"{m['heartbeat_msgs_per_s']:.2f} | {m['receptions_per_delivery']:.3f} | "
            f"{_fmt(r['gateway_cpu_s_per_1000_deliveries'], 4)} | "
            f"{_fmt(r['broker_cpu_s_per_1000_deliveries'], 4)} | "
            f"{m['broker_subscriptions_per_node']:,.0f} | "
            f"{_cell(r, 'nats_route_msgs_per_s')} | {_cell(r, 'nats_interest_entries', 0)} | "
            f"{r['lost']} / {r['duplicated']} |")
    lines += ["", validation_summary(runs), "", *node_table(runs)]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def validation_summary(runs: list[dict[str, Any]]) -> str:
    """Which predictions fell within the tolerance, and which did not."""
    checked = misses = 0
    worst: dict[str, float] = {}
    outside = []
    for r in runs:
        for v in r["validation"]:
            if v["error_pct"] is None:
                continue
            checked += 1
            err = abs(v["error_pct"])
            worst[v["what"]] = max(worst.get(v["what"], 0.0), err)
            if err > TOLERANCE_PCT:
                misses += 1
                outside.append(f"{r['system']} at {r['gateways']} gateways, {v['what']}: "
                               f"measured {v['measured']:,.2f}, model {v['predicted']:,.2f} "
                               f"({v['error_pct']:+.1f}%)")
    text = (f"Model check: {checked - misses} of {checked} predictions within "
            f"{TOLERANCE_PCT:.0f}% of the measurement. Largest error per figure: "
            + "; ".join(f"{k} {v:.1f}%" for k, v in worst.items()) + ".")
    if outside:
        text += " Outside:\n\n" + "\n".join(f"- {line}" for line in outside)
    return text


def node_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| scale, per broker node | gateways | node (gateways on it) | msgs in / out | "
             "bytes in / out from gateways (socket) | bytes in / out between nodes (socket) "
             "| CPU-s | subscriptions (over idle) |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for name, n in r["broker_nodes"].items():
            out = f"{n['out_msgs']:,}" if "out_msgs" in n else "n/a"
            lines.append(
                f"| {r['system']} | {r['gateways']} | {name} ({n['gateways'] or '-'}) | "
                f"{n.get('in_msgs', 0):,} / {out} | {n['client_socket_bytes_in']:,} / "
                f"{n['client_socket_bytes_out']:,} | {n['cluster_socket_bytes_in']:,} / "
                f"{n['cluster_socket_bytes_out']:,} | {n.get('cpu_s', 0.0):.2f} | "
                f"{n['subscriptions_over_idle']:,} |")
    return lines


#: (panel title, the figure: a key of the run's "mean", or of the run itself)
CHART_PANELS = (
    ("Room messages received per gateway per s", "room_msgs_per_s"),
    ("Broker bytes received per gateway per s (socket)", "socket_bytes_per_s"),
    ("Wasted receptions per gateway per s", "wasted_msgs_per_s"),
    ("Broker receptions per local delivery", "receptions_per_delivery"),
    ("Gateway CPU-s per 1k deliveries", "gateway_cpu_s_per_1000_deliveries"),
    ("Broker CPU-s per 1k deliveries", "broker_cpu_s_per_1000_deliveries"),
    ("Subscriptions per broker node", "broker_subscriptions_per_node"),
    ("NATS route messages per server per s", "nats_route_msgs_per_s"),
)


def charts(results: dict[str, dict[str, Any]], folder: Path) -> list[Path]:
    """scale.png: every panel against the gateway count; the model dashed."""
    runs = runs_of(results)
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(dict.fromkeys(r["system"] for r in runs))
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    for ax, (title, key) in zip(axes.flat, CHART_PANELS, strict=True):
        for k, system in enumerate(systems):
            mine = [r for r in runs if r["system"] == system]
            xs = [r["gateways"] for r in mine]
            ys = [r["mean"].get(key, r.get(key)) for r in mine]
            if all(y is None for y in ys):
                continue
            color = f"C{k}"
            ax.plot(xs, [y or 0 for y in ys], marker="o", color=color, label=system)
            predicted = [(_check(r, key) or {}).get("predicted") for r in mine]
            if any(p is not None for p in predicted):
                ax.plot(xs, [p or 0 for p in predicted], linestyle="--", color=color,
                        alpha=0.7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("gateways", fontsize=8)
        ax.set_xticks(sorted({r["gateways"] for r in runs}))
        ax.tick_params(labelsize=8)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("scale: measured (solid) and the capacity model (dashed)", fontsize=10)
    fig.tight_layout()
    path = folder / "scale.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def section(report: dict[str, Any]) -> str:
    """The BENCHMARKS.md section for a scale run."""
    params: dict[str, Any] = next((s["scale"]["params"] for s in report["results"].values()
                   if "params" in s.get("scale", {})), {})
    return (
        f"{SECTION_START}\n## Scale-out (`scale` scenario)\n\n"
        f"Run: {report['finished']}, `{report['command']}`, {report['seconds']:.0f} s. "
        "Parameters: " + ", ".join(f"{k}={v}" for k, v in params.items()) + ".\n\n"
        "The load grows with the cluster (the same sockets, rooms and message rate per "
        "gateway). Each figure is measured, with the capacity model's prediction for the "
        "same room sizes, rates, gateways and NATS nodes in parentheses (`python -m "
        "tools.capacity`, docs/SCALING.md). Broker bytes are counted by the kernel on "
        "each gateway's broker sockets (`ss -tin`), the same way for every broker; "
        "messages by the gateway's counter of what its broker client handed it, with the "
        "cluster API's heartbeats apart.\n\n"
        + markdown(report["results"]) + f"\n![scale: measured and the model]({CHART})\n\n"
        f"{SECTION_END}\n"
    )


def without(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` without the scale scenario (for the text around its section)."""
    results = {b: {k: v for k, v in s.items() if k != "scale"}
               for b, s in report["results"].items()}
    scenarios = {k: v for k, v in report["scenarios"].items() if k != "scale"}
    out = {**report, "results": results, "scenarios": scenarios}
    if "runs" in report:
        out["runs"] = [{b: {k: v for k, v in s.items() if k != "scale"} for b, s in r.items()}
                       for r in report["runs"]]
    return out


#: where BENCHMARKS.md's scale chart lives (next to it)
CHART = Path("docs") / "scale.png"


#: BENCHMARKS.md's comparison section (the other scenarios), written by a run with
#: --write-benchmarks-md; sections outside the markers (written by hand) are kept
MAIN_START = "<!-- comparison: written by `python -m gateway bench --write-benchmarks-md` -->"
MAIN_END = "<!-- /comparison -->"


def replace_section(text: str, start: str, end: str, new: str | None, at_top: bool) -> str:
    """``text`` with the part from ``start`` to ``end`` replaced by ``new`` (None: kept).
    Without such a part, ``new`` goes after the title (``at_top``) or at the end."""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if new is None:
        return text
    new = new.rstrip("\n") + "\n"
    if pattern.search(text):
        return pattern.sub(lambda _: new, text, count=1)
    if not at_top:
        return text.rstrip("\n") + "\n\n" + new if text.strip() else new
    title, sep, rest = text.partition("\n")
    if not title.startswith("# "):
        return new + ("\n" + text if text.strip() else "")
    return f"{title}\n\n{new}\n{rest.lstrip(chr(10))}" if sep else f"{title}\n\n{new}"


def write_benchmarks_md(path: Path, report: dict[str, Any], main: str | None,
                        chart: Path | None = None) -> None:
    """Write BENCHMARKS.md: ``main`` (the comparison section, between :data:`MAIN_START`
    and :data:`MAIN_END`; None keeps the file's) and the scale section (this report's,
    else the file's); everything else in the file is kept. A scale ``chart`` is copied
    to :data:`CHART` beside it."""
    if chart is not None:
        target = path.parent / CHART
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(chart.read_bytes())
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    text = replace_section(text, MAIN_START, MAIN_END, main, at_top=True)
    has_scale = any("runs" in s.get("scale", {}) for s in report["results"].values())
    text = replace_section(text, SECTION_START, SECTION_END,
                           section(report) if has_scale else None, at_top=False)
    path.write_text(text)
