"""Fixtures: real broker clusters, gateway nodes, real Socket.IO clients.

Brokers run as child processes from ``infra/`` configs on free 127.0.0.1 ports
and are stopped by PID at teardown. Gateway nodes for the manager contract suite
run in the test's event loop (so tests can call the server API of any node);
suites that need the service as users run it start ``python -m gateway serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401  (see below)
import pytest
from aiohttp import web

from gateway import config as cfg
from gateway.app import CONFIG_KEY, MANAGER_KEY, SIO_KEY, create_app
from gateway.config import SEALED_BACKENDS, GatewayConfig, Secrets
from gateway.processes import (
    RUN_CLUSTER_KEY,
    GatewayNode,
    LocalCluster,
    NatsCluster,
    RedisCluster,
    free_ports,
    start_gateway,
    stop_all,
    wait_gateways,
)
from gateway.processes.children import PORT_RANGE_ENV
from gateway.types import GatewayManager
from tests.containers import NATS_NODES, ComposeStack, Images, Podman, build_images
from tests.helpers import (
    Node,
    NodeClient,
    SioClient,
    metrics_of,
    running,
    wait_for_condition,
    watching_interest,
)

# hypothesis is imported up front: when a session never imported it, its pytest plugin
# imports it at the very end, and on CPython 3.11.7 pytest's assertion rewriting of it
# then failed with "SystemError: AST constructor recursion depth mismatch", turning a
# green run red after the summary.

REPO = Path(__file__).resolve().parent.parent
#: linger used by test gateways: short, so "after the last member leaves" is quick to see
TEST_LINGER = 0.5
#: heartbeats between test gateways: a dead one is no longer waited for after 1.5 s
TEST_HEARTBEAT = 0.5

# Each pytest-xdist worker picks its servers' ports from a range of its own, below
# the kernel's ephemeral ports (gateway.processes.free_ports); the processes the
# tests start inherit it. Without xdist the whole range is this process's.
if not os.environ.get(PORT_RANGE_ENV):
    _worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    _index = int(_worker[2:]) if _worker.startswith("gw") and _worker[2:].isdigit() else -1
    os.environ[PORT_RANGE_ENV] = ("10000-31999" if _index < 0 else
                                  f"{10000 + 2000 * (_index % 11)}-{11999 + 2000 * (_index % 11)}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system: the system layer: compose, browser, "
                            "conformance suites, bench and capacity runs (README \"Tests\")")
    config.addinivalue_line("markers", "browser: needs Chromium and playwright-core")
    config.addinivalue_line("markers", "compose: runs docker-compose.yml on podman "
                            "(tests/containers.py)")
    config.addinivalue_line(
        "markers", "expected_errors(*counters): the test makes these error counters move "
        "(all of them when none is named)")


#: modules of the system layer besides the compose and browser tests: whole programs
#: (the bench, the capacity measurement) and the socket.io maintainers' suites
SYSTEM_MODULES = frozenset({"test_bench.py", "test_bench_recovery.py", "test_bench_scale.py",
                            "test_capacity_measure.py", "test_conformance.py",
                            "test_soak.py"})


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks the system layer (``-m system``; README "Tests").

    With pytest-xdist (scripts/test runs two workers, ``--dist loadgroup``) each
    module runs whole on one worker, so its module-scoped servers start once, and
    every compose test runs on the same worker: one podman service, images built
    once, no two compose stacks at a time."""
    for item in items:
        compose = item.get_closest_marker("compose") is not None
        if compose or item.get_closest_marker("browser") is not None \
                or item.path.name in SYSTEM_MODULES:
            item.add_marker(pytest.mark.system)
        group = "compose" if compose else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


#: manager counters of things that went wrong; a test that does not expect one to move
#: fails when it does (see no_unexpected_errors)
ERROR_COUNTERS = {
    "dropped_failed": "gateway_broker_messages_failed_total",
    "delivery_errors": "gateway_delivery_errors_total",
    "subscription_errors": "gateway_broker_subscription_errors_total",
    "publish_errors": "gateway_broker_publish_errors_total",
    "dropped_malformed": "gateway_broker_messages_malformed_total",
}


def _error_counts(request: pytest.FixtureRequest) -> dict[str, float]:
    counts: dict[str, float] = {}
    if "nodes" in request.fixturenames:
        for node in request.getfixturevalue("nodes"):
            stats = node.manager.stats.as_dict()
            for field in ERROR_COUNTERS:
                counts[f"{node.node_id}.{field}"] = stats[field]
    if "gateway_procs" in request.fixturenames:
        for proc in request.getfixturevalue("gateway_procs"):
            metrics = metrics_of(proc.url)
            for field, metric in ERROR_COUNTERS.items():
                counts[f"{proc.node_id}.{field}"] = metrics.get(metric, 0.0)
    return counts


@pytest.fixture(autouse=True)
def no_unexpected_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that made an error counter move on a gateway it used, unless it is
    marked ``expected_errors`` (naming the counters it expects)."""
    before = _error_counts(request)
    yield
    marker = request.node.get_closest_marker("expected_errors")
    if marker is not None and not marker.args:
        return
    allowed = set(marker.args) if marker is not None else set()
    after = _error_counts(request)
    moved = {key: after[key] - before.get(key, 0.0) for key in after
             if after[key] != before.get(key, 0.0) and key.rsplit(".", 1)[1] not in allowed}
    assert not moved, f"error counters moved: {moved}"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def redis_cluster(workdir: Path) -> Iterator[RedisCluster]:
    with running(RedisCluster(workdir / "redis", size=3)) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def nats_cluster(workdir: Path) -> Iterator[NatsCluster]:
    with running(NatsCluster(workdir / "nats", size=3)) as cluster:
        yield cluster


def broker_args(backend: str, request: pytest.FixtureRequest, index: int = 0) -> list[str]:
    """``serve`` flags that point gateway ``index`` at the session's cluster for ``backend``."""
    fixture = {"nats": "nats_cluster", "redis-sharded": "redis_cluster"}.get(backend)
    if fixture is None:
        return []
    cluster: LocalCluster[Any] = request.getfixturevalue(fixture)
    return cluster.gateway_args(index)


def broker_config(backend: str, request: pytest.FixtureRequest) -> dict[str, object]:
    """The same as GatewayConfig fields, for nodes run in this process."""
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser, only=("nats_urls", "redis_url"))
    conf = cfg.from_args(parser.parse_args(broker_args(backend, request)), env={})
    return {"nats_urls": conf.nats_urls, "redis_url": conf.redis_url}


async def start_node(backend: str, node_id: str, extra: dict[str, object],
                     manager: GatewayManager | None = None) -> Node:
    port = free_ports(1)[0]
    fields: dict[str, object] = {"unsubscribe_linger": TEST_LINGER,
                                 "heartbeat_interval": TEST_HEARTBEAT, **extra}
    if backend in SEALED_BACKENDS and "secrets" not in fields:
        # sealed like the gateway processes the tests start (gateway.processes), which
        # share the session's brokers and channel prefix with these nodes
        fields["secrets"] = Secrets(cluster_key=RUN_CLUSTER_KEY)
    config = GatewayConfig(backend=backend, host="127.0.0.1", port=port, node_id=node_id,
                           **fields)  # type: ignore[arg-type]
    app = create_app(config, manager)
    # a long-poll GET of a polling client that already left holds a graceful shutdown
    # for its whole poll timeout; the service bounds it with run_app(shutdown_timeout=5)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return Node(node_id=node_id, url=f"http://127.0.0.1:{port}", runner=runner,
                sio=app[SIO_KEY], manager=app[MANAGER_KEY], config=app[CONFIG_KEY])


CLUSTER_BACKENDS = ["nats", "redis-sharded"]


@pytest.fixture(scope="session", params=CLUSTER_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
async def nodes(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[list[Node]]:
    """Three gateway nodes on ``backend``, in this event loop."""
    extra = broker_config(backend, request)
    started: list[Node] = []
    try:
        for i in range(3):
            started.append(await start_node(backend, f"{backend}-gw-{i + 1}", extra))

        def all_know_each_other() -> bool:
            # a node's first hello may go out before another node's subscription has
            # reached its NATS server; it is heard at the next heartbeat instead, and
            # until then a cluster call would not wait for that node
            return all({n["name"] for n in node.manager.nodes()}
                       >= {o.node_id for o in started if o is not node} for node in started)

        await wait_for_condition(all_know_each_other, "the three gateways to hear each other")
        yield started
    finally:
        for node in started:
            with contextlib.suppress(Exception):
                await node.runner.cleanup()


@pytest.fixture
async def clients() -> AsyncIterator[list[SioClient]]:
    """A list tests append their clients to; all are disconnected at teardown."""
    made: list[SioClient] = []
    try:
        yield made
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


@pytest.fixture
async def node_clients(node_bin: str) -> AsyncIterator[list[NodeClient]]:
    """A list tests append their Node.js clients to; all are closed at teardown."""
    made: list[NodeClient] = []
    try:
        yield made
    finally:
        await asyncio.gather(*(c.close() for c in made), return_exceptions=True)


@pytest.fixture(scope="session")
def gateway_procs(workdir: Path, request: pytest.FixtureRequest) -> Iterator[list[GatewayNode]]:
    """Two ``python -m gateway serve`` processes on the NATS cluster."""
    args = broker_args("nats", request)
    ports = free_ports(2)
    procs: list[GatewayNode] = []
    try:
        for i, port in enumerate(ports):
            procs.append(start_gateway(workdir / "gateways", f"proc-gw-{i + 1}", port, "nats",
                                       args, extra=["--unsubscribe-linger", str(TEST_LINGER)]))
        wait_gateways(procs)
        yield procs
    finally:
        stop_all([p.child for p in procs])


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """podman's API service for docker-compose, stopped by PID at the end."""
    service = Podman(tmp_path_factory.mktemp("podman"))
    try:
        service.start()
        yield service
    finally:
        service.stop()
        assert service.child is None or not service.child.alive


@pytest.fixture(scope="session")
def images(podman: Podman) -> Images:
    """The compose file's images, built offline (or reused from the cache)."""
    return build_images(podman)


@pytest.fixture(scope="module")
def compose_stack(podman: Podman, images: Images) -> Iterator[ComposeStack]:
    """``docker-compose up`` of the shipped file (3 NATS nodes, 2 gateway replicas, the
    balancer), once per test module; everything it made is removed at the end."""
    yield from stack_up(ComposeStack(podman, images))


def stack_up(stack: ComposeStack, timeout: float = 90) -> Iterator[ComposeStack]:
    """Bring ``stack`` up, yield it while joins wait for the routes' interest, take it
    down (a compose fixture's body)."""

    def monitors() -> list[str]:
        # on the compose network; a node that is down (a fault test) is left out
        urls = []
        for node in NATS_NODES:
            with contextlib.suppress(Exception):
                urls.append(stack.nats_monitor(node))
        return urls

    try:
        stack.up(timeout)
        with watching_interest(monitors):  # joins wait for the routes' interest
            yield stack
    finally:
        stack.down()


@pytest.fixture(scope="session")
def node_bin() -> str:
    node = shutil.which("node")
    if node is None or not (REPO / "node_modules" / "socket.io-client").is_dir():
        pytest.fail("node and `npm ci` are required (scripts/test installs them)")
    return node


@pytest.fixture(scope="session")
def chromium_bin() -> str:
    path = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if not Path(path).exists():
        pytest.fail(f"Chromium not found at {path} (scripts/test installs Debian's chromium)")
    return path
