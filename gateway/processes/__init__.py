"""Child processes for the launcher, the benchmark and the tests: brokers and gateways.

One module per kind of process: ``children`` (starting, waiting for and stopping
any child by PID), ``nats_cluster``, ``nats_topologies`` (a supercluster, leaf
nodes), ``redis_cluster`` and ``gateways``. Every
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
    wait_settled,
    wait_until,
)
from .gateways import (
    RUN_CLUSTER_KEY,
    GatewayNode,
    gateway_argv,
    sealing_env,
    start_gateway,
    wait_gateways,
)
from .nats_cluster import GATEWAY_USER, NATS_CONFIG, NATS_SECURE_CONFIG, NatsCluster, NatsNode
from .nats_topologies import (
    HUB_CONFIG,
    LEAF_CONFIG,
    SUPERCLUSTER_CONFIG,
    TOPOLOGIES,
    NatsLeafTopology,
    NatsSupercluster,
)
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
    "GATEWAY_USER",
    "HUB_CONFIG",
    "INFRA",
    "LEAF_CONFIG",
    "NATS_CONFIG",
    "NATS_SECURE_CONFIG",
    "REDIS_CONFIG",
    "REDIS_USERS",
    "REPO_ROOT",
    "RUN_CLUSTER_KEY",
    "SUPERCLUSTER_CONFIG",
    "TOPOLOGIES",
    "Child",
    "GatewayNode",
    "HasChild",
    "LaunchError",
    "LocalCluster",
    "NatsCluster",
    "NatsLeafTopology",
    "NatsNode",
    "NatsSupercluster",
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
    "sealing_env",
    "spawn",
    "start_gateway",
    "stop_all",
    "wait_gateways",
    "wait_settled",
    "wait_until",
]
