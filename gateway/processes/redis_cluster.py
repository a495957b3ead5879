"""A local Redis Cluster (or one plain Redis server) from ``infra/redis/``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .children import (
    INFRA,
    Child,
    LaunchError,
    LocalCluster,
    find_binary,
    free_ports,
    port_is_free,
    spawn,
    wait_until,
)

REDIS_CONFIG = INFRA / "redis" / "node.conf"
#: the cluster's ACL users without passwords, shared with docker-compose (start-node.sh)
REDIS_USERS = INFRA / "redis" / "users.acl"
#: the ACL user that forms the cluster and answers operators (and these helpers)
REDIS_ADMIN = "admin"
#: the ACL user gateways log in as: the shard channels and commands they use, no more
REDIS_GATEWAY_USER = "gateway"


def acl_file_text(passwords: Mapping[str, str]) -> str:
    """``users.acl`` with each user's password added, as ``start-node.sh`` writes it."""
    lines = []
    for line in REDIS_USERS.read_text().splitlines():
        word, _, rest = line.partition(" ")
        if word != "user":
            continue
        name, _, rules = rest.partition(" ")
        password = passwords.get(name, "")
        if name != "default" and not password:
            raise LaunchError(f"no password given for Redis user {name!r}")
        if any(c.isspace() for c in password):
            raise LaunchError(f"the password of Redis user {name!r} contains whitespace")
        lines.append(f"user {name} {'>' + password + ' ' if password else ''}{rules}")
    return "\n".join(lines) + "\n"


def redis_cli(port: int, *args: str, host: str = "127.0.0.1", timeout: float = 10.0,
              password: str | None = None, tls_ca: str | None = None
              ) -> subprocess.CompletedProcess[str]:
    binary = find_binary("redis-cli", "apt-get install redis-tools")
    env = dict(os.environ)
    user: list[str] = []
    if password:
        env["REDISCLI_AUTH"] = password  # not -a: arguments show in ps
        user = ["--user", REDIS_ADMIN]
    tls = ["--tls", "--cacert", tls_ca] if tls_ca else []
    return subprocess.run([binary, *user, "-h", host, "-p", str(port), *tls, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener: this node's certificate and key, and the CA."""

    cert: str
    key: str
    ca: str


def cluster_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` free ports a Redis Cluster node can use: it also listens on port + 10000
    (the cluster bus), so the port must be at most 55535 and port + 10000 free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        for port in free_ports(count * 2, host):
            if port < 55535 and port not in chosen and port_is_free(port + 10000, host):
                chosen.append(port)
                if len(chosen) == count:
                    break
    return chosen


@dataclass
class RedisNode:
    name: str
    host: str
    port: int
    child: Child | None = None
    password: str | None = field(default=None, repr=False)
    #: a Redis Cluster node (False: a plain server)
    clustered: bool = True
    #: the CA to check the node's certificate with, when it listens with TLS only
    tls_ca: str | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls_ca else 'redis'}://{self.host}:{self.port}"

    def ready(self) -> bool:
        if not self.clustered:
            return self.cli("PING").strip() == "PONG"
        return "cluster_state:ok" in self.cli("CLUSTER", "INFO")

    def cli(self, *args: str) -> str:
        proc = redis_cli(self.port, *args, host=self.host, password=self.password,
                         tls_ca=self.tls_ca)
        return proc.stdout if proc.returncode == 0 else ""

    def info(self, section: str = "stats") -> dict[str, str]:
        out = {}
        for line in self.cli("INFO", section).splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key] = value.strip()
        return out


@dataclass
class RedisCluster(LocalCluster[RedisNode]):
    """A local Redis Cluster of ``size`` masters from ``infra/redis/node.conf``."""

    workdir: Path
    size: int = 3
    host: str = "127.0.0.1"
    ports: list[int] | None = None
    config: Path = REDIS_CONFIG
    #: when set, clients must log in: the admin user's password, and the gateway
    #: user's unless ``gateway_password`` is given (users.acl via --aclfile)
    password: str | None = field(default=None, repr=False)
    gateway_password: str | None = field(default=None, repr=False)
    #: when set, every node (clients and the cluster bus) speaks TLS only
    tls: TlsFiles | None = None
    nodes: list[RedisNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {self.size}")
        if self.ports is not None and len(self.ports) != self.size:
            raise ValueError("ports must name one port per node")
        ports = self.ports or cluster_ports(self.size, self.host)
        self.nodes = [RedisNode(f"redis-{i + 1}", self.host, ports[i], password=self.password,
                                tls_ca=self.tls.ca if self.tls else None)
                      for i in range(self.size)]

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        binary = find_binary("redis-server", "apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [binary, str(self.config), "--port", str(node.port), "--bind", self.host,
                "--cluster-config-file", f"nodes-{node.port}.conf", "--dir", str(self.workdir),
                "--logfile", ""]
        if self.tls:
            argv[2:4] = ["--port", "0", "--tls-port", str(node.port)]
            argv += ["--tls-cert-file", self.tls.cert, "--tls-key-file", self.tls.key,
                     "--tls-ca-cert-file", self.tls.ca, "--tls-cluster", "yes",
                     "--tls-auth-clients", "no"]
        if self.password:
            # an ACL file, not --requirepass: arguments are visible to every user in ps;
            # created unreadable to others from the start, not chmod-ed after writing
            acl = self.workdir / "users.acl"
            text = acl_file_text({REDIS_ADMIN: self.password,
                                  REDIS_GATEWAY_USER: self.gateway_password or self.password})
            # created readable by its owner only: it holds the passwords
            fd = os.open(acl, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            argv += ["--aclfile", str(acl)]
        node.child = spawn(node.name, argv, self.workdir)
        wait_until(lambda: node.cli("PING").strip() == "PONG", 10, f"{node.name} to answer",
                   [node.child])

    def start(self, timeout: float = 30.0) -> None:
        for i in range(self.size):
            self.start_node(i)
        proc = redis_cli(self.nodes[0].port, "--cluster", "create",
                         *[f"{n.host}:{n.port}" for n in self.nodes],
                         "--cluster-replicas", "0", "--cluster-yes", host=self.host, timeout=60,
                         password=self.password, tls_ca=self.tls.ca if self.tls else None)
        if proc.returncode != 0:
            raise LaunchError(f"redis-cli --cluster create failed: {proc.stdout}{proc.stderr}")
        self.wait_ready(timeout)

    def cluster_ok(self, node: RedisNode) -> bool:
        info = node.cli("CLUSTER", "INFO")
        return "cluster_state:ok" in info and f"cluster_known_nodes:{self.size}" in info

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: all(self.cluster_ok(n) for n in self.nodes), timeout,
                   "cluster_state:ok on every Redis node", self.children)

    def gateway_env(self, index: int = 0) -> dict[str, str]:
        if not self.password:
            return {}
        return {"REDIS_USERNAME": REDIS_GATEWAY_USER,
                "REDIS_PASSWORD": self.gateway_password or self.password}

    def gateway_args(self, index: int = 0) -> list[str]:
        # gateways take different seed nodes, so one master down does not stop them all
        return ["--redis-url", self.nodes[index % len(self.nodes)].url]


@dataclass
class RedisServer(LocalCluster[RedisNode]):
    """One plain Redis server (no cluster mode): the stock baseline's broker."""

    workdir: Path
    host: str = "127.0.0.1"
    nodes: list[RedisNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = [RedisNode("redis-single", self.host, free_ports(1, self.host)[0],
                                clustered=False)]

    def start(self, timeout: float = 10.0) -> None:
        self.start_node(0)

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        binary = find_binary("redis-server", "apt-get install redis-server")
        node.child = spawn(node.name, [
            binary, "--port", str(node.port), "--bind", self.host, "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir)], self.workdir)
        wait_until(lambda: node.cli("PING").strip() == "PONG", 10, f"{node.name} to answer",
                   [node.child])

    def gateway_args(self, index: int = 0) -> list[str]:
        return ["--redis-url", self.nodes[0].url]
