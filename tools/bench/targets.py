"""BENCHMARKS.md's "Against the targets" section, derived from a run's figures.

Every verdict is computed here from the report (medians over the runs; ratios taken
within each run, then their median), never written by hand: change a figure in the
JSON and the verdict follows. The targets are those of issues 11 and 16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import runs
from .phases import BASELINE, all_runs, measured, phase_rows

#: our backends, one column each (those the run measured)
OURS = ("nats", "redis-sharded")
NODE = "node-peer"
#: the load the latency target is stated for (issue 11)
LATENCY_RATE, LATENCY_MEMBERS = 200.0, 100
#: phases with 3 gateways (the broker-bytes target is stated at 3 gateways)
THREE_GATEWAY_PHASES = (("reference", "one-room"), ("reference", "ten-local-rooms"),
                        ("many-rooms",))


@dataclass(frozen=True)
class Verdict:
    """``met`` is None when the run did not measure what the target needs."""

    met: bool | None
    figure: str

    def cell(self) -> str:
        word = {True: "**met**", False: "not met", None: "not measured"}[self.met]
        return f"{word}: {self.figure}"


@dataclass(frozen=True)
class Target:
    text: str
    issue: str
    #: (every run's results, the report, our backend) -> its verdict
    judge: Callable[[list[dict[str, Any]], dict[str, Any], str], Verdict]


def _med(xs: Sequence[float]) -> float:
    m = runs.median(xs)
    assert m is not None
    return m


def _missing(what: str) -> Verdict:
    return Verdict(None, f"needs {what} in the same run")


def _cpu_ratio(scenario: str, against: str, at_least: float, strictly: bool = False
               ) -> Callable[[list[dict[str, Any]], dict[str, Any], str], Verdict]:
    """Gateway CPU per delivery of ``against`` divided by ours, per run."""

    def judge(rs: list[dict[str, Any]], report: dict[str, Any], ours: str) -> Verdict:
        key = (scenario, "cpu_s_per_1000_deliveries")
        found = runs.ratios(rs, (ours, *key), (against, *key), higher_is_better=False)
        if not found:
            return _missing(f"`{scenario}` on `{ours}` and `{against}`")
        ratio = _med(found)
        mine, theirs = _med(runs.values(rs, (ours, *key))), _med(runs.values(rs, (against, *key)))
        met = ratio > at_least if strictly else ratio >= at_least
        return Verdict(met, f"{runs.stat(found, 2, 'x')} ({mine:.4f} vs {theirs:.4f} "
                            f"CPU-s per 1k deliveries{_send_cap(rs, report, key, against)})")

    return judge


def _send_cap(rs: list[dict[str, Any]], report: dict[str, Any], key: tuple[str, ...],
              against: str) -> str:
    """How far ahead of ``against`` a server that sends once per delivery can be here:
    its CPU per delivery over the cost of one loopback send (:mod:`.floor`), per run."""
    floors = report.get("loopback_send_us") or []
    if against != BASELINE or len(floors) != len(rs):
        return ""
    caps = [1000 * v / f for run, f in zip(rs, floors, strict=True)
            if f and isinstance(v := runs.get(run, (against, *key)), int | float)]
    if not caps:
        return ""
    return (f"; one loopback send costs {runs.stat(measured(floors), 2)} us here, so one "
            f"send per delivery caps this ratio at {runs.stat(caps, 2, 'x')}")


def _cross_p99(scenario: str) -> Callable[[list[dict[str, Any]], dict[str, Any], str], Verdict]:
    def judge(rs: list[dict[str, Any]], report: dict[str, Any], ours: str) -> Verdict:
        found = runs.values(rs, (ours, scenario, "latency_ms", "cross", "p99"))
        if not found:
            return _missing(f"`{scenario}` on `{ours}`")
        params = (report.get("scenarios") or {}).get("latency", {})
        handled = runs.values(rs, (ours, scenario, "latency_handled_ms", "cross", "p99"))
        figure = f"{runs.stat(found, 2)} ms to the socket" + (
            f" ({runs.stat(handled, 2)} ms when the load generator had handled it)"
            if handled else "")
        if params.get("rate_msgs_per_s") != LATENCY_RATE or \
                params.get("members") != LATENCY_MEMBERS:
            return Verdict(None, f"{figure} at {params.get('rate_msgs_per_s')} msg/s x "
                                 f"{params.get('members')} members, not the target's load")
        return Verdict(_med(found) < 5.0, figure)

    return judge


def _memory(rs: list[dict[str, Any]], report: dict[str, Any], ours: str) -> Verdict:
    parts, met = [], True
    for variant, label in (("plain", "websocket"), ("upgraded", "upgraded")):
        found = runs.values(rs, (ours, "memory", variant, "kb_per_socket"))
        if not found:
            return _missing(f"`memory` on `{ours}`")
        met &= _med(found) <= 20.0
        parts.append(f"{runs.stat(found)} KB ({label})")
    return Verdict(met, ", ".join(parts))


def _per_room(rs: list[dict[str, Any]], report: dict[str, Any], ours: str) -> Verdict:
    keys = (("kb_per_own_room", "first room of its own"),
            ("kb_per_second_own_room", "another of its own"),
            ("kb_per_shared_room_membership", "a shared room"))
    parts, worst = [], 0.0
    for variant in ("plain", "upgraded"):
        for key, label in keys:
            found = runs.values(rs, (ours, "memory", variant, key))
            if not found:
                return _missing(f"`memory` on `{ours}`")
            worst = max(worst, _med(found))
            parts.append(f"{label} +{runs.stat(found, 2)}")
    return Verdict(worst <= 1.5, f"largest +{worst:.2f} KB (websocket: {', '.join(parts[:3])}; "
                                 f"upgraded: {', '.join(parts[3:])})")


def _idle(key: str, limit: float, unit: str
          ) -> Callable[[list[dict[str, Any]], dict[str, Any], str], Verdict]:
    def judge(rs: list[dict[str, Any]], report: dict[str, Any], ours: str) -> Verdict:
        found = runs.values(rs, (ours, "idle", key))
        if not found:
            return _missing(f"`idle` on `{ours}`")
        sockets = int(_med(runs.values(rs, (ours, "idle", "sockets"))))
        node = runs.values(rs, (NODE, "idle", key))
        beside = f"; Node peer {runs.stat(node, 2)} {unit}" if node else ""
        return Verdict(_med(found) <= limit,
                       f"{runs.stat(found, 2)} {unit} at {sockets:,} sockets{beside}")

    return judge


def _idle_vs_node(rs: list[dict[str, Any]], report: dict[str, Any], ours: str) -> Verdict:
    parts, met = [], True
    for key, unit in (("kb_per_socket", "KB"), ("cpu_ms_per_s_per_1k", "CPU-ms/s per 1k")):
        mine, node = (runs.values(rs, (b, "idle", key)) for b in (ours, NODE))
        if not mine or not node:
            return _missing(f"`idle` on `{ours}` and `{NODE}`")
        met &= _med(mine) <= _med(node)
        parts.append(f"{runs.stat(mine, 2)} vs {runs.stat(node, 2)} {unit}")
    return Verdict(met, "; ".join(parts))


def _broker_bytes(rs: list[dict[str, Any]], report: dict[str, Any], ours: str) -> Verdict:
    parts, met, seen = [], True, False
    for phase in THREE_GATEWAY_PHASES:
        key = (*phase, "broker_bytes_per_delivery")
        found = runs.ratios(rs, (ours, *key), (BASELINE, *key), higher_is_better=False)
        if not found:
            continue
        seen = True
        met &= _med(found) >= 3.0
        parts.append(f"{'/'.join(phase)} {runs.stat(found, 2, 'x')} "
                     f"({_med(runs.values(rs, (ours, *key))):.1f} vs "
                     f"{_med(runs.values(rs, (BASELINE, *key))):.1f} B)")
    if not seen:
        return _missing(f"`reference` or `many-rooms` on `{ours}` and `{BASELINE}`")
    return Verdict(met, "; ".join(parts) + ", on the sockets")


def _clean(rs: list[dict[str, Any]], report: dict[str, Any], ours: str) -> Verdict:
    totals = dict.fromkeys(("lost", "duplicated", "refused", "misdelivered"), 0)
    phases = 0
    for results in rs:
        for _, backend, f in phase_rows(results):
            if backend == ours:
                phases += 1
                for k in totals:
                    totals[k] += int(f.get("failures" if k == "refused" else k, 0))
    if not phases:
        return _missing(f"a delivery scenario on `{ours}`")
    return Verdict(not any(totals.values()),
                   " / ".join(str(v) for v in totals.values()) + f" in {phases} phases")


TARGETS = (
    Target("fan-out CPU per delivery, polling-then-upgrade clients (`fanout-upgrade`): "
           ">= 6x stock", "11", _cpu_ratio("fanout-upgrade", BASELINE, 6.0)),
    Target("... and at or below the Node peer's", "11",
           _cpu_ratio("fanout-upgrade", NODE, 1.0)),
    Target("fan-out CPU per delivery, websocket-first clients (`fanout`): >= 8x stock", "11",
           _cpu_ratio("fanout", BASELINE, 8.0)),
    Target("... and ahead of the Node peer", "11", _cpu_ratio("fanout", NODE, 1.0, True)),
    Target("cross-node p99 < 5 ms at 200 msg/s x 100 members, websocket-first (`latency`)",
           "11", _cross_p99("latency")),
    Target("... polling-then-upgrade (`latency-upgrade`)", "11", _cross_p99("latency-upgrade")),
    Target("idle memory <= 20 KB per socket (`memory`)", "11", _memory),
    Target("+1.5 KB per room membership at most (`memory`)", "11", _per_room),
    Target("idle sockets: <= 7.5 KB per socket (`idle`)", "16",
           _idle("kb_per_socket", 7.5, "KB")),
    Target("idle sockets: <= 3.5 CPU-ms/s per 1k sockets (`idle`)", "16",
           _idle("cpu_ms_per_s_per_1k", 3.5, "CPU-ms/s per 1k")),
    Target("idle sockets: at or below the Node peer's KB and CPU in the same run", "16",
           _idle_vs_node),
    Target("gateway-broker bytes per delivery >= 3x lower than stock at 3 gateways", "11",
           _broker_bytes),
    Target("0 lost / duplicated / refused / misdelivered, every run", "11", _clean),
)


def evaluate(report: dict[str, Any]) -> list[tuple[Target, dict[str, Verdict]]]:
    """Each target's verdict per backend of ours that the run measured."""
    rs = all_runs(report)
    ours = [b for b in OURS if b in report["results"]]
    return [(t, {b: t.judge(rs, report, b) for b in ours}) for t in TARGETS]


def markdown(report: dict[str, Any]) -> str:
    """The section, or "" when none of our backends ran."""
    verdicts = evaluate(report)
    ours = list(verdicts[0][1]) if verdicts else []
    if not ours:
        return ""
    count = len(all_runs(report))
    lines = [
        "## Against the targets (issues 11 and 16), this run", "",
        f"Generated from the figures above ({count} run{'s' if count != 1 else ''}: "
        "medians, range in brackets; a ratio is taken within each run, then summarised). "
        "Ratios compare gateway CPU seconds per 1,000 deliveries; bytes are counted on "
        "the sockets.", "",
        "| target | issue | " + " | ".join(f"`{b}`" for b in ours) + " |",
        "|---|---|" + "---|" * len(ours),
    ]
    for target, by in verdicts:
        lines.append(f"| {target.text} | {target.issue} | "
                     + " | ".join(by[b].cell() for b in ours) + " |")
    met = sum(1 for _, by in verdicts for v in by.values() if v.met)
    judged = sum(1 for _, by in verdicts for v in by.values() if v.met is not None)
    lines += ["", f"Met: {met} of {judged} judged ({len(verdicts) * len(ours) - judged} not "
                  "measured in this run)."]
    return "\n".join(lines) + "\n"
