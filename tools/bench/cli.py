"""The ``bench`` subcommand."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.processes import free_ports
from gateway.processes.children import REPO_ROOT, Child, spawn

from . import report as rep
from . import runs, scale_report
from .backends import BENCH_BACKENDS, OPTIONAL_BACKENDS, RECOVERY_BACKENDS
from .floor import loopback_send_us
from .harness import Params, log
from .runner import EXTRA_SCENARIOS, SCENARIOS, describe, run_backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny parameters: a smoke run in under a minute")
    parser.add_argument("--backends", default=",".join(BENCH_BACKENDS),
                        help=f"comma-separated subset of {','.join(BENCH_BACKENDS)} (the "
                             f"default: all of them), or {','.join(OPTIONAL_BACKENDS)} (run "
                             "only when named: Node.js socket.io + @socket.io/redis-adapter "
                             f"sharded), or {','.join(RECOVERY_BACKENDS)} (run only when "
                             "named: gateways with --recovery)")
    parser.add_argument("--scenarios", "--scenario", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (the "
                             f"default: all of them), or {','.join(EXTRA_SCENARIOS)} (run "
                             "only when named)")
    parser.add_argument("--output", default=None,
                        help="output folder (default bench-results/<time>)")
    parser.add_argument("--write-benchmarks-md", action="store_true",
                        help="also write the comparison section of BENCHMARKS.md (the "
                             "tables and the targets' verdicts; other sections are kept) "
                             "and the full JSON to docs/bench.json")
    parser.add_argument("--runs", type=int, default=None, metavar="N",
                        help="run every scenario N times; tables show medians and ranges "
                             "(default 3, --quick 1)")
    parser.add_argument("--seed", type=int, default=7, help="random seed for room layouts")
    parser.add_argument("--upgrade-move", choices=("on", "off"), default="on",
                        help="the no-affinity scenario's gateways: a websocket upgrade that "
                             "lands on a gateway other than its session's moves the session "
                             "there (on), or is spliced to the owner (off)"),
    parser.add_argument("--fanout-window", type=int, default=1, metavar="N",
                        help="chats each fan-out sender keeps in flight (default 1: the "
                             "next after the ack; 4 and 8 are what other harnesses use)")
    parser.add_argument("--client-deflate", action="store_true",
                        help="the delivery scenarios' clients offer permessage-deflate, as "
                             "browsers do (a server that accepts it pays for it; ours and "
                             "the Node peer decline)")
    parser.add_argument("--otel", action="store_true",
                        help="gateways trace chats (GATEWAY_OTEL=on) and export the spans "
                             "to an OTLP receiver the bench runs, which counts and drops "
                             "them (tools/otlp_receiver.py): what tracing costs")
    parser.add_argument("--idle-sockets", type=int, default=None, metavar="N",
                        help="sockets in the idle scenario (default 10000, --quick 300); "
                             "each load generator process holds at most 15000")


def start_span_sink(workdir: Path) -> Child:
    """An OTLP receiver that counts and drops spans, and the environment that makes
    every gateway the bench starts from now on trace into it."""
    port = free_ports(1)[0]
    sink = spawn("otlp-sink", [sys.executable, "-m", "tools.otlp_receiver", "--port",
                               str(port)], workdir, cwd=REPO_ROOT)
    os.environ.update({"GATEWAY_OTEL": "on",
                       "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    log(f"otel: gateways trace into an OTLP sink at http://127.0.0.1:{port}")
    return sink


def _subset(text: str, allowed: tuple[str, ...], flag: str) -> list[str] | str:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        return f"{flag}: unknown {', '.join(bad) or '(empty)'}; choose from {','.join(allowed)}"
    return items


def run(args: argparse.Namespace) -> int:
    backends = _subset(args.backends, BENCH_BACKENDS + OPTIONAL_BACKENDS + RECOVERY_BACKENDS,
                       "--backends")
    scenarios = _subset(args.scenarios, SCENARIOS + EXTRA_SCENARIOS, "--scenarios")
    for value in (backends, scenarios):
        if isinstance(value, str):
            print(f"gateway bench: error: {value}", file=sys.stderr)
            return 2
    assert isinstance(backends, list) and isinstance(scenarios, list)
    if args.idle_sockets is not None and args.idle_sockets < 1:
        print("gateway bench: error: --idle-sockets must be at least 1", file=sys.stderr)
        return 2
    count = args.runs if args.runs is not None else (1 if args.quick else 3)
    if count < 1:
        print("gateway bench: error: --runs must be at least 1", file=sys.stderr)
        return 2
    if args.fanout_window < 1:
        print("gateway bench: error: --fanout-window must be at least 1", file=sys.stderr)
        return 2
    params = Params(quick=args.quick, seed=args.seed, idle_many=args.idle_sockets,
                    upgrade_move=args.upgrade_move == "on", fanout_window=args.fanout_window,
                    client_deflate=args.client_deflate)
    problem = rep.charts_problem()
    if problem is not None:  # said before the run, not after it
        log(f"warning: {problem}")
    folder = Path(args.output or f"bench-results/{time.strftime('%Y%m%d-%H%M%S')}")
    workdir = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    sink = start_span_sink(workdir) if args.otel else None
    started = time.time()
    every: list[dict[str, Any]] = []
    floors: list[float | None] = []
    try:
        for k in range(count):
            # every backend once per run, so that the machine's load drifts over all of
            # them alike; the scale scenario (minutes, brokers of its own) runs once
            results: dict[str, Any] = {}
            mine = scenarios if k == 0 else [s for s in scenarios if s not in EXTRA_SCENARIOS]
            if count > 1:
                log(f"run {k + 1} of {count}")
            try:
                floors.append(loopback_send_us())
            except (OSError, subprocess.SubprocessError) as exc:
                log(f"warning: the loopback send was not measured: {exc!r}")
                floors.append(None)
            for backend in backends:
                results[backend] = run_backend(backend, mine, workdir, params)
            every.append(results)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if sink is not None:
            sink.stop()
            said = sink.log_path.read_text(errors="replace").strip().splitlines()
            log(f"otel: {said[-1] if said else 'the OTLP sink said nothing'}")
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "command": "python -m gateway bench " + shlex.join(sys.argv[2:] if
                                                             sys.argv[1:2] == ["bench"] else []),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.time() - started, 1),
        "quick": args.quick,
        "otel": args.otel,
        "machine": rep.machine(),
        # CPU us per send() of a 100-byte frame on loopback TCP, at the start of each run
        "loopback_send_us": floors,
        "scenarios": {k: v for k, v in describe(params).items() if k in scenarios},
        # the medians over the runs (the tables' figures); every run's own in "runs"
        "results": runs.aggregate(every) if count > 1 else every[0],
    }
    if count > 1:
        report["runs"] = every
    paths = rep.write(report, folder)
    print(rep.full_markdown(report))
    if args.write_benchmarks_md:
        # the scale section survives runs of the other scenarios, and the reverse
        others = [s for s in scenarios if s not in EXTRA_SCENARIOS]
        scale_report.write_benchmarks_md(Path("BENCHMARKS.md"), report,
                                         rep.benchmarks_md(scale_report.without(report))
                                         if others else None, paths.get("scale"))
        if others:
            rep.JSON_BESIDE_BENCHMARKS.parent.mkdir(parents=True, exist_ok=True)
            rep.JSON_BESIDE_BENCHMARKS.write_text(paths["json"].read_text())
        log(f"wrote BENCHMARKS.md{f' and {rep.JSON_BESIDE_BENCHMARKS}' if others else ''}")
    log(f"results in {paths['json'].parent} ({report['seconds']} s)")
    for line in rep.disagreements(report):
        log(f"warning: wasted receptions cross-check: {line}")
    bad = rep.faults(report)
    for fault in bad:
        log(f"FAILED: {fault}")
    return 1 if bad else 0
