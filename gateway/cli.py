"""``python -m gateway {serve,cluster,provision,bench}``."""

from __future__ import annotations

import argparse
import logging
import sys

from . import config as cfg


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
    logging.basicConfig(
        level=conf.log_level,
        format=f"%(asctime)s {conf.node_id} %(levelname)s %(name)s: %(message)s",
    )
    # python-socketio/engineio log every packet at INFO; keep them for DEBUG runs
    for noisy in ("socketio", "engineio", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(conf.log_level),
                                              logging.WARNING))
    from .app import create_app
    from .serving import run

    if conf.insecure_bus and conf.backend in cfg.SEALED_BACKENDS and \
            not conf.secrets.cluster_key:
        logging.getLogger("gateway").warning(
            "--insecure-bus: the bus between gateways is NOT sealed; anyone who can "
            "publish on the broker can forge any gateway's messages (set "
            "GATEWAY_CLUSTER_KEY)")
    app = create_app(conf)
    logging.getLogger("gateway").info("gateway %s (%s) listening on http://%s:%d",
                                      conf.node_id, conf.backend, conf.host, conf.port)
    run(app, host=conf.host, port=conf.port, max_connections=conf.max_connections,
        shutdown_timeout=5.0)
    return 0


def _cluster(args: argparse.Namespace) -> int:
    from .launcher import run

    return run(args)


def _provision(args: argparse.Namespace) -> int:
    from .provision import run

    return run(args)


def _bench(args: argparse.Namespace) -> int:
    from .bench.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
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
    bench = sub.add_parser("bench", help="benchmark the backends side by side")
    from .bench.cli import add_arguments as bench_arguments

    bench_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
