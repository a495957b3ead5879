"""``python -m gateway {serve,cluster,provision,bench}``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from . import config as cfg
from .types import GatewayManager


class RareTracebacks(logging.Filter):
    """For python-socketio's and engine.io's loggers, which log a traceback when
    handling what a client sent fails: each kind of traceback (logger and message) is
    kept once per ``interval`` seconds; repeats are dropped, and counted in the next
    one kept. A client repeating a packet the gateway does not foresee then costs
    one traceback a minute, not one per packet."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self.last: dict[str, float] = {}
        self.dropped: Counter[str] = Counter()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            self.dropped[key] += 1
            return False
        self.last[key] = now
        repeats = self.dropped.pop(key, 0)
        if repeats:
            record.msg = f"{record.msg} ({repeats} more like it not logged)"
        return True


def _serve(args: argparse.Namespace) -> int:
    try:
        conf = cfg.from_args(args)
    except cfg.ConfigError as exc:
        print(f"gateway serve: error: {exc}", file=sys.stderr)
        return 2
    unsealed = cfg.unsealed_bus(conf)
    if unsealed is not None:
        print(f"gateway serve: error: {unsealed}", file=sys.stderr)
        return 2
    return serve(conf)


def serve(conf: cfg.GatewayConfig, manager: GatewayManager | None = None) -> int:
    """Run one gateway node with ``conf`` until SIGINT/SIGTERM; ``manager`` replaces the
    one ``conf.backend`` names (the benchmark serves its stock baseline this way)."""
    logging.basicConfig(
        level=conf.log_level,
        format=f"%(asctime)s {conf.node_id} %(levelname)s %(name)s: %(message)s",
    )
    # python-socketio/engineio log every packet at INFO; keep them for DEBUG runs. Their
    # servers' loggers are set too: one left unset gets a handler of its own, and
    # then every line it logs is written twice
    for noisy in ("socketio", "socketio.server", "engineio", "engineio.server",
                  "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(conf.log_level),
                                              logging.WARNING))
    quiet = RareTracebacks()
    for library in ("socketio", "socketio.server", "engineio", "engineio.server"):
        logging.getLogger(library).addFilter(quiet)
    from .app import create_app
    from .serving import run

    if conf.insecure_bus and conf.backend in cfg.SEALED_BACKENDS and \
            not conf.secrets.cluster_key:
        logging.getLogger("gateway").warning(
            "--insecure-bus: the bus between gateways is NOT sealed; anyone who can "
            "publish on the broker can forge any gateway's messages (set "
            "GATEWAY_CLUSTER_KEY)")
    app = create_app(conf, manager)
    logging.getLogger("gateway").info("gateway %s (%s) listening on http://%s:%d",
                                      conf.node_id, conf.backend, conf.host, conf.port)
    run(app, host=conf.host, port=conf.port, max_connections=conf.max_connections,
        shutdown_timeout=5.0,
        admin=(conf.admin_host, conf.admin_port) if conf.admin_port else None)
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from .launcher import run

    return run(args)


def _provision(args: argparse.Namespace) -> int:
    from .provision import run

    return run(args)


#: the benchmark: a tool beside the product, in a source checkout only (not in the wheel
#: nor the image)
BENCH_MISSING = ("the benchmark is not installed here: it runs from a source checkout of "
                 "the repository (tools/bench beside gateway/), not from the package or image")


def bench_tools() -> ModuleType | None:
    """``tools.bench.cli``, imported only when asked for; None when the tools are absent.

    From a source checkout run elsewhere than its root, the checkout's root is put on
    ``sys.path`` first, as ``python -m`` would from there."""
    root = Path(__file__).resolve().parent.parent
    if (root / "tools" / "bench" / "cli.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module("tools.bench.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("tools", "tools.bench", "tools.bench.cli"):
            raise
        return None


def _bench(args: argparse.Namespace) -> int:
    tools = bench_tools()
    if tools is None:
        print(f"gateway bench: error: {BENCH_MISSING}", file=sys.stderr)
        return 2
    result: int = tools.run(args)
    return result


def _wants_bench(argv: Sequence[str] | None) -> bool:
    """Whether the command line is ``bench ...`` (or unknown: building the full parser)."""
    words = list(sys.argv[1:] if argv is None else argv)
    return not words or words[0] == "bench" or words[0].startswith("-")


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway",
                                     description="Socket.IO gateway on NATS or sharded Redis")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{serve,cluster,provision,bench}")
    serve = sub.add_parser("serve", help="run one gateway node")
    cfg.add_arguments(serve)
    serve.set_defaults(func=_serve)
    cluster = sub.add_parser("cluster", help="run a local broker cluster and gateways")
    from .launcher import add_arguments as cluster_arguments

    cluster_arguments(cluster)
    cluster.set_defaults(func=_cluster)
    provision = sub.add_parser("provision", help="create the JetStream stream and session "
                               "bucket the gateways' --recovery uses (as the NATS operator)")
    from .provision import add_arguments as provision_arguments

    provision_arguments(provision)
    provision.set_defaults(func=_provision)
    bench = sub.add_parser("bench", help="benchmark the backends side by side "
                                         "(from a source checkout)")
    # the benchmark's flags only where it is: elsewhere `bench` answers BENCH_MISSING
    tools = bench_tools() if _wants_bench(argv) else None
    if tools is not None:
        tools.add_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["bench"] and bench_tools() is None:
        print(f"gateway bench: error: {BENCH_MISSING}", file=sys.stderr)
        return 2
    args = build_parser(argv).parse_args(argv)
    result: int = args.func(args)
    return result
