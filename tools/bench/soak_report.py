"""The soak's verdict, CSV and charts, from its samples and events (pure: no I/O but
the files it is asked to write).

A sample is a flat dict (see :data:`COLUMNS`); per-gateway values are keyed
``{gateway}.{what}`` (``gw-1.rss_mb``, ``gw-1.fds``, ``gw-1.pid``, ``gw-1.sockets``).
An event is ``{"t": seconds, "kind": ..., ...}``.

How a curve is judged flat: a least-squares line through its samples after the
warm-up, and its slope extrapolated to one hour must stay under the curve's
tolerance. A gateway that was restarted is a new process whose memory starts
again: its curve is cut at each restart (the samples of each process, after its own
warm-up, form a segment) and one slope is fitted to all segments together, each
with its own intercept (a within-segment fit: every segment's points are centred on
its own means before the slopes are pooled), so a restart's drop is not read as
memory given back, nor a fresh process's climb as a leak.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: the stream keeps messages at least this long (nats_adapter.brokers.nats_store)
STREAM_RETENTION_S = 600.0

#: the cluster-wide columns of every sample, in CSV order (per-gateway ones follow)
COLUMNS = (
    "t", "clients_connected", "chats_sent", "chats_acked", "chats_refused",
    "deliveries", "latency_p50_ms", "latency_p99_ms", "latency_max_ms", "ack_p99_ms",
    "judged", "lost", "duplicated", "out_of_order", "recovered", "refused_sessions",
    "broker_subscriptions", "subs_room", "subs_sid", "subs_node", "subs_inbox", "subs_other",
    "broker_connections", "js_storage_mb", "js_messages",
    "js_consumers",
)
GATEWAY_COLUMNS = ("pid", "rss_mb", "fds", "sockets")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    value: float | None
    limit: float | None
    how: str


@dataclass(frozen=True)
class Limits:
    """What the verdict allows (per hour: the fitted slope times 3600 s)."""

    #: seconds from the start left out of every fit
    warmup_s: float
    #: seconds after a gateway's restart left out of its own curves
    restart_warmup_s: float
    rss_mb_per_h: float = 5.0
    #: open fds: the larger of this many per hour or ``fds_rel`` of the mean
    fds_per_h: float = 10.0
    fds_rel: float = 0.1
    subscriptions_rel: float = 0.1
    subscriptions_abs: float = 20.0
    #: JetStream storage is judged only after the stream's retention has passed
    #: (before, it fills by design); None: never
    js_after_s: float | None = None
    js_rel: float = 0.25
    #: chat p99, the later half's median against the earlier half's: at most this
    #: many times it, or this many ms above it, whichever is more
    p99_ratio: float = 2.0
    p99_slack_ms: float = 50.0
    sample_every_s: float = 10.0


def fit_slope(segments: Iterable[Sequence[tuple[float, float]]]) -> tuple[float, int] | None:
    """The least-squares slope (per second) shared by ``segments`` of (t, y) points, each
    with its own intercept; and the number of points used. None when the points span
    no time (fewer than two in every segment)."""
    num = den = 0.0
    n = 0
    for seg in segments:
        pts = [(t, y) for t, y in seg if y is not None and not math.isnan(y)]
        if len(pts) < 2:
            continue
        mt = sum(t for t, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        num += sum((t - mt) * (y - my) for t, y in pts)
        den += sum((t - mt) ** 2 for t, _ in pts)
        n += len(pts)
    if den <= 0:
        return None
    return num / den, n


def gateways_of(samples: Sequence[dict[str, Any]]) -> list[str]:
    names = {k.split(".", 1)[0] for s in samples for k in s if k.endswith(".rss_mb")}
    return sorted(names)


def gateway_segments(samples: Sequence[dict[str, Any]], gw: str, key: str, warmup_s: float,
                     restart_warmup_s: float) -> list[list[tuple[float, float]]]:
    """``key`` of gateway ``gw`` after the warm-up, cut where its PID changes, each
    process's first ``restart_warmup_s`` left out (but not the first process's)."""
    segments: list[list[tuple[float, float]]] = []
    pid: Any = None
    born = 0.0
    first = True
    for s in samples:
        value, this_pid = s.get(f"{gw}.{key}"), s.get(f"{gw}.pid")
        if value is None or this_pid is None:
            continue
        if this_pid != pid:
            if pid is not None:
                first = False
            pid, born = this_pid, s["t"]
            segments.append([])
        if s["t"] < warmup_s or (not first and s["t"] < born + restart_warmup_s):
            continue
        segments[-1].append((s["t"], float(value)))
    return [seg for seg in segments if seg]


def _series(samples: Sequence[dict[str, Any]], key: str, after: float
            ) -> list[tuple[float, float]]:
    return [(s["t"], float(s[key])) for s in samples
            if s["t"] >= after and s.get(key) is not None]


def _flat(name: str, segments: list[list[tuple[float, float]]], tolerance: float,
          unit: str, how: str) -> Check:
    fit = fit_slope(segments)
    if fit is None:
        return Check(name, False, None, round(tolerance, 3),
                     f"too few samples after the warm-up to fit a line ({how})")
    per_hour = fit[0] * 3600
    return Check(name, per_hour < tolerance, round(per_hour, 3), round(tolerance, 3),
                 f"{unit} per hour, least-squares slope of {fit[1]} samples {how}")


def _median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if v else 0.0


#: events that disturb latency on purpose
FAULTS = ("storm", "kill-nats", "restart-gateway")


def verdict(samples: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]],
            totals: dict[str, Any], limits: Limits) -> list[Check]:
    """Every check of the run: the curves flat after the warm-up, and nothing acked
    lost, duplicated, out of order or refused a recovery."""
    checks: list[Check] = []
    w = limits.warmup_s
    for gw in gateways_of(samples):
        segs = gateway_segments(samples, gw, "rss_mb", w, limits.restart_warmup_s)
        checks.append(_flat(f"{gw} RSS growth", segs, limits.rss_mb_per_h, "MB",
                            f"after {w:.0f} s (and {limits.restart_warmup_s:.0f} s after each "
                            "restart), one slope over its processes"))
        segs = gateway_segments(samples, gw, "fds", w, limits.restart_warmup_s)
        mean = _median([y for seg in segs for _, y in seg])
        checks.append(_flat(f"{gw} open fds growth", segs,
                            max(limits.fds_per_h, limits.fds_rel * mean), "fds",
                            f"(median {mean:.0f})"))
    # a socket living on a gateway other than the one its sid names (adopted after a
    # reconnect elsewhere, or after its gateway restarted) has a subscription of its
    # own: those follow the sockets and are bounded by them; the rest must stay flat
    fixed = [(s["t"], float(s["broker_subscriptions"]) - float(s.get("subs_sid") or 0))
             for s in samples if s["t"] >= w and s.get("broker_subscriptions") is not None]
    med = _median([y for _, y in fixed])
    checks.append(_flat("broker subscriptions growth (rooms, control, inboxes)", [fixed],
                        max(limits.subscriptions_abs, limits.subscriptions_rel * med),
                        "subscriptions", f"(median {med:.0f}, all NATS nodes' clients)"))
    over = [s["subs_sid"] - s["clients_connected"] - len(gateways_of(samples))
            for s in samples if s["t"] >= w and s.get("subs_sid") is not None
            and s.get("clients_connected") is not None]
    worst = max(over, default=0)
    checks.append(Check("sid subscriptions bounded by sockets", worst <= 0, float(worst), 0.0,
                        "the most per-sid subscriptions above one per connected client (plus "
                        "each gateway's own wildcard) in any sample after the warm-up"))
    js_after = max(w, limits.js_after_s or 0.0)
    js = _series(samples, "js_storage_mb", js_after)
    if limits.js_after_s is not None and len(js) >= 3:
        med = _median([y for _, y in js])
        checks.append(_flat("JetStream storage growth", [js], max(1.0, limits.js_rel * med),
                            "MB", f"after the stream's retention, {limits.js_after_s:.0f} s "
                                  f"(median {med:.1f} MB, the largest node)"))
    else:
        checks.append(Check("JetStream storage growth", True, None, None,
                            "not judged: the run ended before the stream's retention passed "
                            "(it fills by design until then)"))
    # windows a fault began in (or just before) wait out the fault: they are drawn but
    # not judged. A window's p99 is noisy (one slow chat in a hundred), so this curve
    # is judged by halves, whatever the run's length: the median p99 of the later
    # half of the windows against the earlier half's
    faults = [float(e["t"]) for e in events if e.get("kind") in FAULTS]
    p99 = [float(s["latency_p99_ms"]) for s in samples
           if s["t"] >= w and s.get("latency_p99_ms") is not None and not s.get("final")
           and not any(s["t"] - 2 * limits.sample_every_s <= f <= s["t"] for f in faults)]
    if len(p99) < 4:
        checks.append(Check("chat p99 flat", False, None, None,
                            f"too few windows without a fault after the warm-up ({len(p99)})"))
    else:
        early, late = _median(p99[: len(p99) // 2]), _median(p99[len(p99) // 2:])
        limit = max(early * limits.p99_ratio, early + limits.p99_slack_ms)
        checks.append(Check("chat p99 flat", late <= limit, round(late, 2), round(limit, 2),
                            f"ms, the median p99 of the later half of the {len(p99)} windows "
                            f"without a fault in them or the one before (the earlier half: "
                            f"{early:.1f} ms; limit: x{limits.p99_ratio:g} or "
                            f"+{limits.p99_slack_ms:g} ms)"))
    for key, what in (("lost", "acked chats a member that stayed never got"),
                      ("duplicated", "second copies"),
                      ("out_of_order", "chats with an offset below the previous one"),
                      ("refused_sessions", "reconnects whose recovery was refused"),
                      ("unplanned_exits", "processes that died without being killed"),
                      ("task_errors", "the soak's own client tasks that failed")):
        value = float(totals.get(key, 0))
        checks.append(Check(key, value == 0, value, 0.0, what))
    judged = float(totals.get("judged", 0))
    checks.append(Check("chats judged", judged > 0, judged, None,
                        "acked chats whose every recipient was checked"))
    return checks


def write_csv(path: Path, samples: Sequence[dict[str, Any]]) -> None:
    gws = gateways_of(samples)
    header = [*COLUMNS, *(f"{g}.{c}" for g in gws for c in GATEWAY_COLUMNS)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        for s in samples:
            writer.writerow({k: ("" if s.get(k) is None else s.get(k)) for k in header})


def checks_json(checks: Sequence[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]


def summary_lines(checks: Sequence[Check]) -> list[str]:
    out = []
    for c in checks:
        value = "-" if c.value is None else f"{c.value:g}"
        limit = "" if c.limit is None else f" (limit {c.limit:g})"
        out.append(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {value}{limit}  {c.how}")
    return out


_EVENT_COLOURS = {"storm": "tab:orange", "kill-nats": "tab:red", "restart-gateway": "tab:purple"}


def draw(path: Path, samples: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]],
         warmup_s: float, title: str) -> None:
    """One PNG: RSS and fds per gateway, broker subscriptions, JetStream storage, chat
    p99 and the running loss counts, events as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s["t"] / 60 for s in samples]
    fig, axes = plt.subplots(6, 1, figsize=(11, 15), sharex=True)
    gws = gateways_of(samples)

    def line(ax: Any, key: str, label: str) -> None:
        xs = [m for m, s in zip(minutes, samples, strict=True) if s.get(key) is not None]
        ys = [s[key] for s in samples if s.get(key) is not None]
        ax.plot(xs, ys, label=label, linewidth=1.2)

    for gw in gws:
        line(axes[0], f"{gw}.rss_mb", gw)
        line(axes[1], f"{gw}.fds", gw)
    axes[0].set_ylabel("gateway RSS (MB)")
    axes[1].set_ylabel("gateway open fds")
    line(axes[2], "broker_subscriptions", "subscriptions (all nodes' clients)")
    axes[2].set_ylabel("NATS subscriptions")
    line(axes[3], "js_storage_mb", "largest node")
    axes[3].set_ylabel("JetStream storage (MB)")
    line(axes[4], "latency_p99_ms", "p99")
    line(axes[4], "latency_p50_ms", "p50")
    axes[4].set_ylabel("chat latency per 10 s (ms)")
    axes[4].set_yscale("log")
    for key in ("lost", "duplicated", "out_of_order", "refused_sessions"):
        line(axes[5], key, key)
    # chats acked ok:false (truthfully: not stored, the sender knows), per window
    refused = [(m, s["chats_refused"] - p["chats_refused"])
               for m, s, p in zip(minutes[1:], samples[1:], samples, strict=False)
               if s.get("chats_refused") is not None and p.get("chats_refused") is not None]
    if refused:
        axes[5].plot([m for m, _ in refused], [v for _, v in refused], linewidth=1.0,
                     linestyle=":", label="chats acked ok:false in the window")
    axes[5].set_ylabel("count")
    axes[5].set_xlabel("minutes")
    seen: set[str] = set()
    for ax in axes:
        ax.axvspan(0, warmup_s / 60, color="0.9", zorder=0)
        for e in events:
            colour = _EVENT_COLOURS.get(str(e.get("kind")))
            if colour is None:
                continue
            label = None
            if ax is axes[0] and e["kind"] not in seen:
                seen.add(e["kind"])
                label = str(e["kind"])
            ax.axvline(e["t"] / 60, color=colour, alpha=0.35, linewidth=0.8, label=label)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fault_digest(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How many faults of each kind, and how long storms took to come back."""
    storms = [e for e in events if e["kind"] == "storm"]
    back = sorted(float(e["back_s"]) for e in storms)
    return {"storms": len(storms),
            "storm_dropped": sum(int(e["dropped"]) for e in storms),
            "storm_back_s_median": back[len(back) // 2] if back else None,
            "storm_back_s_max": back[-1] if back else None,
            "nats_kills": sum(e["kind"] == "kill-nats" for e in events),
            "gateway_restarts": sum(e["kind"] == "restart-gateway" for e in events),
            "exits": sum(e["kind"] == "exit" for e in events),
            "unplanned_exits": sum(e["kind"] == "exit" and not e.get("planned")
                                   for e in events)}


def limits_of(params: dict[str, Any]) -> Limits:
    """The verdict's limits for a run of ``params`` (summary.json's)."""
    return Limits(warmup_s=float(params["warmup_s"]),
                  restart_warmup_s=float(params["restart_warmup_s"]),
                  rss_mb_per_h=float(params["rss_limit"]), js_after_s=STREAM_RETENTION_S,
                  sample_every_s=float(params["sample_every"]))


def write_report(out: Path, params: dict[str, Any], result: dict[str, Any],
                 say: Callable[[str], None]) -> bool:
    """Judge the run and write summary.json, samples.csv and soak.png into ``out``;
    whether every check passed."""
    checks = verdict(result["samples"], result["events"], result["totals"], limits_of(params))
    ok = all(c.ok for c in checks)
    summary = {"params": params, "ok": ok, "verdict": checks_json(checks),
               "faults": fault_digest(result["events"]), **result}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_csv(out / "samples.csv", result["samples"])
    try:
        draw(out / "soak.png", result["samples"], result["events"], float(params["warmup_s"]),
             f"soak: {params['minutes']:g} min, {params['clients']} clients, "
             f"{params['rooms']} rooms, {params['rate']:g} chats/s: {'PASS' if ok else 'FAIL'}")
    except ImportError as exc:  # matplotlib is in the bench extra
        say(f"no chart: {exc}")
    say(f"faults: {json.dumps(summary['faults'])}; chats acked ok:false: "
        f"{json.dumps(result['totals'].get('refused', {}))}")
    for line in summary_lines(checks):
        say(line)
    say(f"{'PASS' if ok else 'FAIL'}; output in {out}")
    return ok


def main(argv: list[str] | None = None) -> int:
    """``python -m tools.bench.soak_report DIR``: judge a finished soak again (its
    summary.json) with this release's verdict, and redraw its files."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench.soak_report",
                                     description=main.__doc__)
    parser.add_argument("output", type=Path, help="the soak's --output folder")
    parser.add_argument("--rss-limit", type=float, default=None,
                        help="MB per hour a gateway's RSS may grow (default: the run's)")
    args = parser.parse_args(argv)
    path = args.output / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"output: cannot read {path}: {exc}")
    params = summary["params"]
    if args.rss_limit is not None:
        params["rss_limit"] = args.rss_limit
    samples = summary["samples"]
    # runs before the last sample was marked: the one taken after the run's end
    for s in samples:
        if s["t"] > float(params["minutes"]) * 60:
            s["final"] = 1
    result = {"samples": samples, "events": summary["events"], "totals": summary["totals"]}

    def say(line: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)

    return 0 if write_report(args.output, params, result, say) else 1


if __name__ == "__main__":
    sys.exit(main())
