"""Child processes for the launcher, the benchmark and the tests: brokers and gateways.

One module per kind of process: ``children`` (starting, waiting for and stopping
any child by PID), ``nats_cluster``, ``redis_cluster`` and ``gateways``. Every
process is started from the configs in ``infra/`` and listens on 127.0.0.1 on a
free port unless told otherwise.
"""

from .children import (
    INFRA,
    REPO_ROOT,
    Child,
    HasChild,
    LaunchError,
    LocalCluster,
    find_binary,
    free_ports,
    http_json,
    port_is_free,
    spawn,
    stop_all,
    wait_until,
)
from .gateways import GatewayNode, gateway_argv, start_gateway, wait_gateways
from .nats_cluster import NATS_CONFIG, NATS_SECURE_CONFIG, NatsCluster, NatsNode
from .redis_cluster import (
    REDIS_CONFIG,
    REDIS_USERS,
    RedisCluster,
    RedisNode,
    RedisServer,
    TlsFiles,
    acl_file_text,
    cluster_ports,
    redis_cli,
)
from .supervisor import Supervisor

__all__ = [
    "INFRA",
    "NATS_CONFIG",
    "NATS_SECURE_CONFIG",
    "REDIS_CONFIG",
    "REDIS_USERS",
    "REPO_ROOT",
    "Child",
    "GatewayNode",
    "HasChild",
    "LaunchError",
    "LocalCluster",
    "NatsCluster",
    "NatsNode",
    "RedisCluster",
    "RedisNode",
    "RedisServer",
    "Supervisor",
    "TlsFiles",
    "acl_file_text",
    "cluster_ports",
    "find_binary",
    "free_ports",
    "gateway_argv",
    "http_json",
    "port_is_free",
    "redis_cli",
    "spawn",
    "start_gateway",
    "stop_all",
    "wait_gateways",
    "wait_until",
]
