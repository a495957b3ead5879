"""Recovery in the report: each recovery backend beside the same backend without it,
the reconnect storm's table, and what fails a run."""

from __future__ import annotations

from typing import Any

from .backends import RECOVERY
from .recovery import COMPARED, STORM

#: scenarios with a table of their own here (not in the main table)
OWN_TABLES = (STORM,)
#: what a storm phase must have none of
STORM_FAULTS = ("lost", "duplicated", "misdelivered", "out_of_order", "failures", "refused")
#: targets of issue 12: recovery's gateway CPU per delivery against the same backend
#: without it, and its cross-node p99 at the latency scenarios' load
CPU_RATIO_TARGET = 1.25
CROSS_P99_TARGET_MS = 5.0


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ratio(on: float | None, off: float | None) -> float | None:
    return round(on / off, 2) if on and off else None


def comparison(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Recovery on against off, per compared scenario both ran."""
    rows = []
    for on, off in RECOVERY.items():
        for scenario in COMPARED:
            a = results.get(off, {}).get(scenario)
            b = results.get(on, {}).get(scenario)
            if not a or not b or "latency_ms" not in a or "latency_ms" not in b:
                continue
            rows.append({
                "scenario": scenario, "on": on, "off": off,
                "cpu": (a["cpu_s_per_1000_deliveries"], b["cpu_s_per_1000_deliveries"]),
                "cpu_ratio": _ratio(b["cpu_s_per_1000_deliveries"],
                                    a["cpu_s_per_1000_deliveries"]),
                "total": (a.get("total_cpu_s_per_1000_deliveries"),
                          b.get("total_cpu_s_per_1000_deliveries")),
                "total_ratio": _ratio(b.get("total_cpu_s_per_1000_deliveries"),
                                      a.get("total_cpu_s_per_1000_deliveries")),
                "p99": (a["latency_ms"]["all"]["p99"], b["latency_ms"]["all"]["p99"]),
                "cross_p99": (a["latency_ms"]["cross"]["p99"], b["latency_ms"]["cross"]["p99"]),
                "faults": (b["lost"], b["duplicated"], b.get("out_of_order", 0)),
            })
    return rows


def markdown(results: dict[str, dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    rows = comparison(results)
    if rows:
        lines += ["", "| recovery on / off | scenario | gateway CPU-s per 1k deliveries, off / "
                  f"on | on / off (target <= {CPU_RATIO_TARGET}x) | gateway + broker CPU-s per "
                  "1k, off / on | on / off | p99 ms, off / on | cross-node p99 ms, off / on "
                  f"(target < {CROSS_P99_TARGET_MS:g}) | on: lost / dup / out of order |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['on']} / {r['off']} | {r['scenario']} | {_f(r['cpu'][0], 4)} / "
                f"{_f(r['cpu'][1], 4)} | {_f(r['cpu_ratio'])}x | {_f(r['total'][0], 4)} / "
                f"{_f(r['total'][1], 4)} | {_f(r['total_ratio'])}x | {_f(r['p99'][0])} / "
                f"{_f(r['p99'][1])} | {_f(r['cross_p99'][0])} / {_f(r['cross_p99'][1])} | "
                f"{' / '.join(str(v) for v in r['faults'])} |")
    storms = [(b, phase, f) for b, s in results.items()
              for phase, f in s.get(STORM, {}).items() if isinstance(f, dict)]
    if storms:
        lines += ["", f"| {STORM} | backend / phase | sessions | recovered / refused "
                  "(gateways' count) | packets replayed | stored while away: replayed "
                  "before CONNECT | recovery ms p50 / p99 / max (reconnect to caught up) | "
                  "since the drop p50 / p99 ms | storm s (first reconnect to last caught up) "
                  "| CPU-ms per restore: gateways / NATS | chats / deliveries | lost / dup / "
                  "misdelivered / out of order / refused sends |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for backend, phase, f in storms:
            rec, drop = f["recovery_ms"], f["since_drop_ms"]
            lines.append(
                f"| {STORM} | {backend} / {phase} | {_f(f['sessions'])} | "
                f"{_f(f['recovered'])} / {_f(f['refused'])} ({_f(f['server_recovered'])} / "
                f"{_f(f['server_refused'])}) | {_f(f['replayed'])} | "
                f"{_f(f['sent_while_away'])}: {_f(f['replayed_while_away'])} | "
                f"{_f(rec['p50'], 1)} / {_f(rec['p99'], 1)} / {_f(rec['max'], 1)} | "
                f"{_f(drop['p50'], 1)} / {_f(drop['p99'], 1)} | {_f(f['storm_seconds'])} | "
                f"{_f(f['gateway_cpu_ms_per_session'])} / "
                f"{_f(f['broker_cpu_ms_per_session'])} | {_f(f['messages'])} / "
                f"{_f(f['delivered'])} | {f['lost']} / {f['duplicated']} / "
                f"{f['misdelivered']} / {f['out_of_order']} / {f['failures']} |")
    return lines


def faults(report: dict[str, Any]) -> list[str]:
    """Storm phases that lost, duplicated, misdelivered or reordered a chat, refused a
    session, or did not replay what was stored while a socket was away."""
    out = []
    for backend, scenarios in report["results"].items():
        for phase, f in scenarios.get(STORM, {}).items():
            if not isinstance(f, dict):
                continue  # skipped
            bad = [f"{f[k]} {k.replace('_', ' ')}" for k in STORM_FAULTS if f.get(k)]
            if f["replayed_while_away"] != f["sent_while_away"]:
                bad.append(f"{f['sent_while_away'] - f['replayed_while_away']} stored while "
                           "away but not replayed")
            if bad:
                out.append(f"{STORM}/{phase} on {backend}: {', '.join(bad)}")
    return out
