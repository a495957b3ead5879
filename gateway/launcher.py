"""``python -m gateway cluster``: a local broker cluster plus gateways, in the foreground.

Once everything answers its health check, the launcher supervises: a broker node or
gateway that dies is reported and restarted (with a backoff while it keeps dying),
and the rest keeps serving. Only SIGINT/SIGTERM stop the cluster, every child by
its PID, and remove its temporary state.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

from .config import BACKENDS
from .processes import (
    NATS_SECURE_CONFIG,
    TOPOLOGIES,
    GatewayNode,
    HasChild,
    LaunchError,
    LocalCluster,
    NatsCluster,
    NatsLeafTopology,
    NatsNode,
    NatsSupercluster,
    RedisCluster,
    Supervisor,
    port_is_free,
    start_gateway,
    stop_all,
    wait_gateways,
)


class _Shutdown(Exception):
    """Raised by the SIGTERM handler to unwind through the cleanup path."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Shutdown()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="nats",
                        help="broker backend (default nats)")
    parser.add_argument("--gateways", type=int, default=2, help="gateway nodes (default 2)")
    parser.add_argument("--port", type=int, default=8001,
                        help="first gateway port; the others follow (default 8001)")
    parser.add_argument("--host", default="127.0.0.1", help="address everything listens on")
    parser.add_argument("--nats-nodes", type=int, default=3,
                        help="NATS nodes (default 3); with --topology supercluster, per "
                             "cluster; with --topology leaf, in the hub")
    parser.add_argument("--topology", choices=TOPOLOGIES, default="mesh",
                        help="NATS layout: mesh (one full mesh, the default), supercluster "
                             "(two meshes joined by NATS gateways; gateways alternate between "
                             "them) or leaf (a hub mesh and leaf servers the gateways connect "
                             "to, alternately)")
    parser.add_argument("--leaf-nodes", type=int, default=2,
                        help="leaf servers with --topology leaf (default 2)")
    parser.add_argument("--nats-port", type=int, default=None,
                        help="first NATS client port; the others follow (default: free ports)")
    parser.add_argument("--redis-nodes", type=int, default=3,
                        help="Redis Cluster masters (default 3)")
    parser.add_argument("--redis-port", type=int, default=None,
                        help="first Redis port; the others follow (default: free ports)")
    parser.add_argument("--unsubscribe-linger", default=None,
                        help="passed to every gateway")
    parser.add_argument("--log-level", default=None, help="passed to every gateway")
    parser.add_argument("--recovery", action="store_true",
                        help="Socket.IO connection state recovery across the gateways "
                             "(NATS JetStream; env GATEWAY_RECOVERY=1)")
    parser.add_argument("--recovery-window", default=None,
                        help="seconds a disconnected session stays recoverable (default 120)")
    parser.add_argument("--secure", action="store_true",
                        help="run the brokers as docker-compose.yml does: NATS with "
                             "node-secure.conf (the gateways' one NATS user, "
                             "allowed only their subjects), Redis with the ACL users of users.acl; "
                             "passwords are made up for the run")


def _recovery(args: argparse.Namespace) -> bool:
    return bool(args.recovery) or os.environ.get("GATEWAY_RECOVERY", "").lower() in (
        "1", "on", "true", "yes")


def _check(args: argparse.Namespace) -> str | None:
    if args.gateways < 1:
        return "--gateways must be at least 1"
    if args.nats_nodes < 1:
        return "--nats-nodes must be at least 1"
    recovery = _recovery(args)
    if recovery and args.backend != "nats":
        return "--recovery needs --backend nats (JetStream keeps sessions and missed messages)"
    if args.topology != "mesh" and args.backend != "nats":
        return f"--topology {args.topology} needs --backend nats"
    if args.leaf_nodes < 1:
        return "--leaf-nodes must be at least 1"
    if args.topology != "mesh" and (args.secure or recovery):
        flag = "--secure" if args.secure else "--recovery"
        return f"{flag} runs on --topology mesh only, not {args.topology}"
    if args.redis_nodes < 3 and args.backend == "redis-sharded":
        return "--redis-nodes must be at least 3 (a Redis Cluster needs 3 masters)"
    if not 1 <= args.port <= 65535 - args.gateways:
        return f"--port {args.port} is not a usable port"
    for i in range(args.gateways):
        if not port_is_free(args.port + i, args.host):
            return f"--port: port {args.port + i} is already in use"
    return None


def _say(line: str) -> None:
    print(line, flush=True)


def run(args: argparse.Namespace) -> int:
    problem = _check(args)
    if problem is not None:
        print(f"gateway cluster: error: {problem}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="gateway-cluster-"))
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    gateways: list[GatewayNode] = []
    brokers = _brokers(args, workdir)
    try:
        broker_args: list[str] = []
        if brokers is not None:
            brokers.start()
            for node in brokers.nodes:
                _say(_broker_line(node))
            if isinstance(brokers, NatsCluster) and _recovery(args):
                # the operator provisions JetStream; gateway users may only use it
                brokers.provision(window=args.recovery_window)
        # the gateways seal what they send each other with a key only they know (one
        # generated per cluster unless GATEWAY_CLUSTER_KEY is set; they inherit it)
        sealing = {} if os.environ.get("GATEWAY_CLUSTER_KEY") or \
            os.environ.get("GATEWAY_CLUSTER_KEY_FILE") \
            else {"GATEWAY_CLUSTER_KEY": secrets.token_urlsafe(32)}
        extra: list[str] = []
        if args.unsubscribe_linger is not None:
            extra += ["--unsubscribe-linger", str(args.unsubscribe_linger)]
        if args.log_level is not None:
            extra += ["--log-level", args.log_level]
        if args.recovery:
            extra += ["--recovery", "on"]
        if args.recovery_window is not None:
            extra += ["--recovery-window", str(args.recovery_window)]
        for i in range(args.gateways):
            env = dict(sealing)
            if brokers is not None:
                broker_args = brokers.gateway_args(i)
                env.update(brokers.gateway_env(i))
            gw = start_gateway(workdir, f"gw-{i + 1}", args.port + i, args.backend, broker_args,
                               host=args.host, extra=extra, env=env)
            gateways.append(gw)
        wait_gateways(gateways)
        for gw in gateways:
            _say(f"gateway {gw.node_id} {gw.url}")
        _say("cluster ready")
        # from here on a process that dies is restarted; only a signal stops the cluster
        nodes: list[HasChild] = [*(brokers.nodes if brokers is not None else []), *gateways]
        Supervisor(nodes, say=lambda line: _say(f"gateway cluster: {line}")).run()
        return 0
    except LaunchError as exc:
        print(f"gateway cluster: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Shutdown):
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_all([gw.child for gw in gateways])  # the current child of each, restarted or not
        if brokers is not None:
            brokers.stop()  # also the nodes of a start that failed half-way
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _brokers(args: argparse.Namespace, workdir: Path) -> LocalCluster[Any] | None:
    """The local broker cluster ``args`` ask for (not started); None for ``memory``."""
    if args.backend == "memory":
        return None
    if args.backend == "redis-sharded":
        redis_ports = None
        if args.redis_port is not None:
            redis_ports = [args.redis_port + i for i in range(args.redis_nodes)]
        # with REDIS_PASSWORD set, the cluster requires it (users.acl: admin and
        # gateway) and the gateways log in with it as the limited user `gateway`
        password = os.environ.get("REDIS_PASSWORD") or None
        if args.secure and password is None:
            password = secrets.token_hex(16)
        return RedisCluster(workdir / "redis", size=args.redis_nodes, host=args.host,
                            ports=redis_ports, password=password,
                            gateway_password=secrets.token_hex(16) if args.secure else None)
    count = {"mesh": args.nats_nodes, "supercluster": 2 * args.nats_nodes,
             "leaf": args.nats_nodes + args.leaf_nodes}[args.topology]
    client_ports = None
    if args.nats_port is not None:
        client_ports = [args.nats_port + i for i in range(count)]
    if args.secure:
        return NatsCluster(workdir / "nats", size=args.nats_nodes, host=args.host,
                           client_ports=client_ports, config=NATS_SECURE_CONFIG,
                           route_auth=("route", secrets.token_hex(16)),
                           gateway_password=secrets.token_hex(16))
    if args.topology == "supercluster":
        return NatsSupercluster(workdir / "nats", size=args.nats_nodes, host=args.host,
                                client_ports=client_ports)
    if args.topology == "leaf":
        return NatsLeafTopology(workdir / "nats", hub_size=args.nats_nodes,
                                leaves=args.leaf_nodes, host=args.host,
                                client_ports=client_ports)
    return NatsCluster(workdir / "nats", size=args.nats_nodes, host=args.host,
                       client_ports=client_ports)


def _broker_line(node: Any) -> str:
    if isinstance(node, NatsNode):
        return f"nats {node.name} {node.url} {node.monitor_url}"
    return f"redis {node.name} {node.url}"


