"""Child processes in general: starting, waiting for, and stopping them by PID.

Every child logs to a file in a work directory and is stopped by its PID. On
Linux children also get SIGTERM if their parent dies, so a killed launcher leaves
nothing behind.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
INFRA = REPO_ROOT / "infra"


class LaunchError(RuntimeError):
    """A child process could not be started or did not become ready."""


#: where free_ports looks, "LOW-HIGH", instead of asking the kernel for any free port.
#: Parallel test workers each get their own range (tests/conftest.py), below the
#: kernel's ephemeral range, so a port one process picked and closed cannot be picked
#: by another, nor taken as the local port of an outgoing connection meanwhile.
PORT_RANGE_ENV = "GATEWAY_PORT_RANGE"
_next_port: dict[tuple[int, int], int] = {}


def port_range() -> tuple[int, int] | None:
    spec = os.environ.get(PORT_RANGE_ENV, "")
    if not spec:
        return None
    low, _, high = spec.partition("-")
    try:
        span = (int(low), int(high))
    except ValueError:
        span = (0, 0)
    if not 1024 <= span[0] < span[1] <= 65535:
        raise ValueError(f"{PORT_RANGE_ENV} must be LOW-HIGH within 1024-65535, got {spec!r}")
    return span


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago (from ``GATEWAY_PORT_RANGE``
    in turn when it is set, else any the kernel offers)."""
    span = port_range()
    if span is not None:
        return _ports_in(span, count, host)
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


def _ports_in(span: tuple[int, int], count: int, host: str) -> list[int]:
    low, high = span
    size = high - low
    # each process of a worker (the tests, a launcher they start) begins elsewhere
    cursor = _next_port.get(span, low + (os.getpid() * 7919) % size)
    out: list[int] = []
    for _ in range(size):
        port = cursor
        cursor = low + (cursor - low + 1) % size
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))  # no SO_REUSEADDR: a port in TIME_WAIT is skipped too
            except OSError:
                continue
        out.append(port)
        if len(out) == count:
            _next_port[span] = cursor
            return out
    raise OSError(f"no {count} free ports in {PORT_RANGE_ENV}={low}-{high}")


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
    #: what spawn() was given besides argv, so the same process can be started again
    env: dict[str, str] | None = None
    cwd: Path | None = None

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

    def respawn(self) -> Child:
        """Start the same command again (same arguments, environment and log file)."""
        return spawn(self.name, self.argv, self.log_path.parent, env=self.env, cwd=self.cwd)

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
    return Child(name, list(argv), log_path, popen, env=env, cwd=cwd)


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


def wait_settled(what: str, check: Callable[[], object], children: Sequence[Child],
                 timeout: float) -> None:
    """Wait until ``check()`` returns the same snapshot, not None, twice in a row (for
    state that fills up over a few moments, such as NATS route pools)."""
    previous: list[object] = [None]

    def settled() -> bool:
        snapshot = check()
        stable = snapshot is not None and snapshot == previous[0]
        previous[0] = snapshot
        if not stable:
            time.sleep(0.1)
        return stable

    wait_until(settled, timeout, what, children)


def stop_all(children: Sequence[Child | None]) -> None:
    """Stop every child; never raises (teardown path)."""
    for child in children:
        if child is not None:
            with contextlib.suppress(Exception):
                child.stop()


class HasChild(Protocol):
    """A node run as a child process (a broker node or a gateway)."""

    child: Child | None

    @property
    def name(self) -> str: ...

    def ready(self) -> bool:
        """Whether the process serves (answers its health check)."""
        ...


NodeT = TypeVar("NodeT", bound=HasChild)


class LocalCluster(Generic[NodeT]):
    """Broker nodes run as children of this process (subclasses are dataclasses
    that fill :attr:`nodes`)."""

    nodes: list[NodeT]

    def start(self, timeout: float = 30.0) -> None:
        """Start every node and wait until the cluster is formed."""
        raise NotImplementedError

    def start_node(self, index: int) -> None:
        """(Re)start node ``index`` alone, with its original ports and state."""
        raise NotImplementedError

    def gateway_args(self, index: int = 0) -> list[str]:
        """``python -m gateway serve`` flags that point gateway ``index`` at this cluster."""
        raise NotImplementedError

    def gateway_env(self, index: int = 0) -> dict[str, str]:
        """Environment gateway ``index`` needs to log in to this cluster (credentials)."""
        return {}

    def stop(self) -> None:
        """Stop every node by its PID."""
        for node in self.nodes:
            if node.child is not None:
                node.child.stop()

    @property
    def children(self) -> list[Child]:
        return [n.child for n in self.nodes if n.child is not None]
