"""``python -m tools.capacity``: predict, measure the constants, check against a run.

    python -m tools.capacity                     # 1M rooms of 2-20, 3 -> 300 gateways
    python -m tools.capacity --mega 10:200000    # plus 10 rooms of 200,000 members
    python -m tools.capacity measure             # NATS interest memory and churn CPU
    python -m tools.capacity validate bench-results/<time>/results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import model


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: "
                                         f"{text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"needs positive integers: {text!r}")
    return values


def _sizes(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        pair = (int(low), int(high or low))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"sizes are LOW-HIGH, e.g. 2-20: {text!r}") from exc
    if pair[0] < 1 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"sizes are LOW-HIGH with 1 <= LOW <= HIGH: {text!r}")
    return pair


def _mega(text: str) -> tuple[int, int, float | None]:
    parts = text.split(":")
    try:
        count, size = int(parts[0]), int(parts[1])
        rate = float(parts[2]) if len(parts) > 2 else None
    except (ValueError, IndexError) as exc:
        raise argparse.ArgumentTypeError(f"--mega is COUNT:SIZE[:RATE per room]: "
                                         f"{text!r}") from exc
    return count, size, rate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.capacity",
                                description="What rooms, rates and gateways cost the brokers "
                                            "(see docs/SCALING.md).")
    p.add_argument("--rooms", type=int, default=1_000_000, help="rooms (default 1,000,000)")
    p.add_argument("--sizes", type=_sizes, default=(2, 20),
                   help="room sizes, uniformly spread: LOW-HIGH members (default 2-20)")
    p.add_argument("--room-rate", type=float, default=0.05,
                   help="messages per second per room, on average (default 0.05)")
    p.add_argument("--mega", type=_mega, action="append", default=[],
                   help="COUNT:SIZE[:RATE]: also COUNT rooms of SIZE members, each with RATE "
                        "messages per second (default --room-rate); repeatable")
    p.add_argument("--sockets", type=int, default=2_000_000,
                   help="connected sockets over the whole cluster (default 2,000,000)")
    p.add_argument("--gateways", type=_ints, default=[3, 10, 30, 100, 300],
                   help="gateway counts to predict (default 3,10,30,100,300)")
    p.add_argument("--nats-nodes", type=_ints, default=[3],
                   help="NATS nodes in the mesh (comma list; default 3)")
    p.add_argument("--joins-per-s", type=float, default=0.0,
                   help="room joins per second over the cluster (as many leaves)")
    p.add_argument("--payload-bytes", type=float, default=124.0,
                   help="envelope bytes of one room message on NATS (ours; default 124, "
                        "a short chat as the benchmark sends; on Redis the envelope also "
                        "names its origin: 9 bytes more)")
    p.add_argument("--stock-payload-bytes", type=float, default=319.0,
                   help="the same message as python-socketio's AsyncRedisManager pickles it "
                        "(default 319)")
    p.add_argument("--sites", type=int, default=2,
                   help="sites (NATS clusters of a supercluster, or leaf servers) for the "
                        "link traffic line (default 2)")
    p.add_argument("--site-local-share", type=float, default=0.9,
                   help="share of the traffic in rooms whose members all sit on one site, "
                        "for the link traffic line (default 0.9)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = p.add_subparsers(dest="command")
    m = sub.add_parser("measure", help="measure NATS interest memory and churn CPU")
    m.add_argument("--subjects", type=int, default=100_000)
    m.add_argument("--seconds", type=float, default=5.0)
    m.add_argument("--messages", type=int, default=100_000)
    v = sub.add_parser("validate", help="the model against a benchmark run's scale scenario")
    v.add_argument("results", type=Path, help="results.json of `bench --scenario scale`")
    return p


def workloads(args: argparse.Namespace) -> list[model.Workload]:
    low, high = args.sizes
    classes = list(model.uniform_sizes(low, high, args.rooms, args.rooms * args.room_rate))
    for count, size, rate in args.mega:
        classes.append(model.RoomClass(size, count, count * (rate if rate is not None
                                                             else args.room_rate)))
    wire = model.Wire(payload={"nats": args.payload_bytes,
                               "redis-sharded": args.payload_bytes + model.ORIGIN_BYTES,
                               "stock-redis": args.stock_payload_bytes})
    return [model.Workload(tuple(classes), sockets=args.sockets, gateways=g, nats_nodes=n,
                           joins_per_s=args.joins_per_s, wire=wire)
            for n in args.nats_nodes for g in args.gateways]


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def table(predictions: list[model.Prediction]) -> str:
    lines = [
        "| gateways | NATS nodes | gateways per message | msgs/s in per gateway: nats / "
        "redis-sharded / stock | of which wasted (stock) | heartbeats/s per gateway | "
        "bytes/s in per gateway: nats / stock | NATS interest entries per server (memory) | "
        "NATS route msgs/s out per server | NATS msgs/s to gateways per server | "
        "subscription ops/s per server | interest updates/s in per server | NATS CPU per "
        "server, cores: messages / churn |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in predictions:
        w, gw, nats = p.workload, p.gateway, p.nats
        lines.append(
            f"| {w.gateways} | {w.nats_nodes} | {p.span:.1f} | "
            f"{_si(gw['nats'].room_msgs)} / {_si(gw['redis-sharded'].room_msgs)} / "
            f"{_si(gw['stock-redis'].room_msgs)} | {_si(gw['stock-redis'].wasted_msgs)} | "
            f"{gw['nats'].heartbeat_msgs:.1f} | {_si(gw['nats'].bytes)} / "
            f"{_si(gw['stock-redis'].bytes)} | {_si(nats.interest_entries)} "
            f"({nats.interest_bytes / 2**20:,.0f} MiB) | {_si(nats.route_msgs_out)} | "
            f"{_si(nats.client_msgs_out)} | {_si(nats.subscription_ops)} | "
            f"{_si(nats.interest_updates_in)} | {nats.message_cpu:.2f} / "
            f"{nats.churn_cpu:.2f} |")
    return "\n".join(lines)


def mega_lines(args: argparse.Namespace) -> str:
    out = ["", "Mega-rooms (members drawn uniformly from all sockets): a room reaches 95% of "
           "the gateways, where a per-room subject saves nothing over one channel, from"]
    for g in args.gateways:
        out.append(f"- {g} gateways: {model.mega_room_size(g, args.sockets):,} members")
    return "\n".join(out)


def validate(path: Path) -> str:
    from tools.bench import scale, scale_report

    report = json.loads(path.read_text())
    runs = scale_report.runs_of(report["results"])
    if not runs:
        raise SystemExit(f"{path}: no scale scenario in this run")
    # with this checkout's model, from the workload each run recorded
    checked = []
    for run in runs:
        run = {**run, "model": model.predict(scale.workload_from_dict(run["workload"]))
               .as_dict()}
        checked.append({**run, "validation": scale.validate(run)})
    lines = ["| system | gateways | figure | measured | model | error |",
             "|---|---|---|---|---|---|"]
    for run in checked:
        for v in run["validation"]:
            err = "n/a" if v["error_pct"] is None else f"{v['error_pct']:+.1f}%"
            lines.append(f"| {run['system']} | {run['gateways']} | {v['what']} | "
                         f"{v['measured']:,.2f} | {v['predicted']:,.2f} | {err} |")
    return "\n".join(lines) + "\n\n" + scale_report.validation_summary(checked)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "measure":
        from .measure import measure

        workdir = Path(tempfile.mkdtemp(prefix="gateway-capacity-"))
        try:
            print(json.dumps(measure(workdir, args.subjects, args.seconds,
                                        args.messages), indent=2))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0
    if args.command == "validate":
        print(validate(args.results))
        return 0
    predictions = [model.predict(w) for w in workloads(args)]
    if args.json:
        out: list[dict[str, Any]] = [p.as_dict() for p in predictions]
        print(json.dumps(out, indent=2))
        return 0
    mega = "".join(f", {c} rooms of {s:,}" for c, s, _ in args.mega)
    print(f"{args.rooms:,} rooms of {args.sizes[0]}-{args.sizes[1]} members{mega}, "
          f"{args.sockets:,} sockets, {args.room_rate} msgs/s per room "
          f"({predictions[0].workload.rate:,.0f} msgs/s), joins {args.joins_per_s:,.0f}/s\n")
    print(table(predictions))
    print(mega_lines(args))
    print(f"\nNATS interest per server (entries, memory) by layout, {args.sites} sites: "
          "mesh of N | supercluster of sites x N | leaf: a leaf server, a hub server")
    for p in predictions:
        parts = model.topology_interest(p.workload, args.sites)
        print(f"- {p.workload.gateways} gateways, N={p.workload.nats_nodes}: " + " | ".join(
            f"{t.topology} {_si(t.entries)} ({t.memory_bytes / 2**30:.1f} GiB)"
            for t in parts))
    w = predictions[0].workload
    print(f"\nBetween {args.sites} sites (supercluster clusters, or leaf servers), messages "
          f"per second over all links: {_si(model.link_msgs(w, args.sites))} with members "
          f"anywhere; {_si(model.link_msgs(w, args.sites, args.site_local_share))} when "
          f"{args.site_local_share:.0%} of the traffic is in rooms living on one site.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
