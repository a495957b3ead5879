"""`python -m gateway cluster` comes up, serves, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.processes import free_ports, http_json, port_is_free
from tests.helpers import REPO, SioClient, first_delivery_after, watching_interest

NATS_LINE = re.compile(r"nats (\S+) nats://127\.0\.0\.1:(\d+) http://127\.0\.0\.1:(\d+)")
REDIS_LINE = re.compile(r"redis (\S+) redis://127\.0\.0\.1:(\d+)")
GATEWAY_LINE = re.compile(r"gateway (\S+) http://127\.0\.0\.1:(\d+)")


@dataclass
class Launcher:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    #: stdout lines after "cluster ready" (the supervisor's reports), read by a thread
    later: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def follow(self) -> None:
        """Keep reading stdout in the background (the launcher blocks if nobody does)."""
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.later.append(line.rstrip("\n"))

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    async def wait_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first later stdout line matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.later:
                if (m := regex.search(line)) is not None:
                    return m
            await asyncio.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} in {self.later!r}")

    def nats_nodes(self) -> dict[str, tuple[int, int]]:
        """name -> (client port, monitoring port) of each NATS node."""
        return {m.group(1): (int(m.group(2)), int(m.group(3))) for line in self.lines
                if (m := NATS_LINE.fullmatch(line))}

    def redis_nodes(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for line in self.lines
                if (m := REDIS_LINE.fullmatch(line))}

    def ports(self) -> list[int]:
        out = []
        for line in self.lines:
            for regex in (NATS_LINE, REDIS_LINE, GATEWAY_LINE):
                m = regex.fullmatch(line)
                if m:
                    out += [int(p) for p in m.groups()[1:]]
        return out

    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{m.group(2)}" for line in self.lines
                if (m := GATEWAY_LINE.fullmatch(line))]


def consecutive_free_ports(count: int) -> int:
    for _ in range(50):
        base = free_ports(1)[0]
        if base + count < 65535 and all(port_is_free(base + i) for i in range(count)):
            return base
    raise AssertionError("no consecutive free ports")


def start_launcher(*args: str, timeout: float = 90.0) -> Launcher:
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "cluster", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    launcher = Launcher(proc)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        launcher.lines.append(line.rstrip("\n"))
        if line.strip() == "cluster ready":
            launcher.follow()
            return launcher
    proc.kill()
    stderr = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"no 'cluster ready': {launcher.lines} {stderr}")


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def child_pids(launcher: Launcher, match: Callable[[bytes, bytes], bool]) -> list[int]:
    """The launcher's children whose (command line, environment) ``match``."""
    out = []
    for pid in sorted(descendants(launcher.proc.pid)):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if match(cmd, env):
            out.append(pid)
    return out


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listening_ports() -> set[int]:
    """Ports some socket on this machine listens on (/proc/net/tcp and tcp6)."""
    out: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    out.add(int(fields[1].rsplit(":", 1)[1], 16))
    return out


def none_listening(ports: list[int]) -> bool:
    """Whether no server listens on any of ``ports`` any more. Not a bind test: once
    freed, a port may at once become the local port of some process's outgoing
    connection (the machine runs other tests), and then a bind fails though nothing
    of the launcher is left."""
    return not set(ports) & listening_ports()


def stop(launcher: Launcher, sig: int = signal.SIGTERM) -> int:
    launcher.proc.send_signal(sig)
    try:
        return launcher.proc.wait(timeout=30)
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
            launcher.proc.wait()
        if launcher.reader is not None:
            launcher.reader.join(timeout=5)  # it reads until the launcher's stdout closes
        for pipe in (launcher.proc.stdout, launcher.proc.stderr):
            if pipe is not None:
                pipe.close()


async def stop_leaving_nothing(launcher: Launcher, sig: int = signal.SIGTERM) -> None:
    """Stop the launcher with ``sig``: it exits 0, every child (restarted ones too) is
    gone and every port it printed is free."""
    kids = descendants(launcher.proc.pid)
    assert stop(launcher, sig) == 0
    deadline = time.monotonic() + 10
    while any(pid_alive(p) for p in kids) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not [p for p in kids if pid_alive(p)], "a child outlived the launcher"
    assert none_listening(launcher.ports()), "a port is still bound"


@contextlib.asynccontextmanager
async def pair(urls: list[str]) -> AsyncIterator[tuple[SioClient, SioClient]]:
    """Two clients in the room "launcher", on the first and the second gateway."""
    a, b = SioClient("a"), SioClient("b")
    try:
        await a.connect(urls[0])
        await b.connect(urls[1])
        await a.join("launcher")
        await b.join("launcher")
        yield a, b
    finally:
        await a.close()
        await b.close()


async def chat_across(launcher: Launcher, reverse: bool = False) -> None:
    """A chat from the first gateway's client to the second's (``reverse``: the other way)."""
    urls = launcher.gateway_urls()
    monitors = [f"http://127.0.0.1:{port}" for _, port in launcher.nats_nodes().values()]
    with watching_interest(lambda: monitors):  # the joins wait for the routes' interest
        async with pair(urls[::-1] if reverse else urls) as (a, b):
            await a.chat("launcher", "through the launcher")
            await b.wait_texts(["through the launcher"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_cluster_serves_and_leaves_nothing_behind(sig: int) -> None:
    first = start_launcher("--port", str(consecutive_free_ports(2)))
    second = None
    try:
        assert sum(bool(NATS_LINE.fullmatch(ln)) for ln in first.lines) == 3, first.lines
        assert sum(bool(GATEWAY_LINE.fullmatch(ln)) for ln in first.lines) == 2, first.lines
        assert first.lines[-1] == "cluster ready"
        for url in first.gateway_urls():
            status, body = http_json(f"{url}/healthz")
            assert status == 200 and body["broker_connected"] is True
        # a second launcher runs beside the first on another --port
        second = start_launcher("--port", str(consecutive_free_ports(2)))
        assert set(second.ports()).isdisjoint(first.ports())
        await chat_across(first)
        await chat_across(second)
        for launcher in (first, second):
            assert len(descendants(launcher.proc.pid)) >= 5, \
                "3 nats-server and 2 gateway processes"
            await stop_leaving_nothing(launcher, sig)
    finally:
        for launcher in (first, second):
            if launcher is not None and launcher.proc.poll() is None:
                launcher.proc.kill()
                launcher.proc.wait()


async def test_a_dying_gateway_is_reported_restarted_and_serves_again() -> None:
    launcher = start_launcher("--port", str(consecutive_free_ports(2)))
    try:
        gateways = child_pids(launcher, lambda cmd, env: b"gateway" in cmd)
        assert len(gateways) == 2
        os.kill(gateways[0], signal.SIGKILL)
        m = await launcher.wait_line(r"(gw-\d) \(pid \d+\) exited with code -9; restarting")
        await launcher.wait_line(rf"{m.group(1)} is back \(pid \d+")
        assert launcher.proc.poll() is None, "the launcher must keep running"
        for url in launcher.gateway_urls():
            assert http_json(f"{url}/healthz")[0] == 200
        await chat_across(launcher)
        await chat_across(launcher, reverse=True)
        kids = descendants(launcher.proc.pid)  # with the restarted gateway
        assert stop(launcher) == 0
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in kids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not [p for p in kids if pid_alive(p)], "a child outlived the launcher"
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
            launcher.proc.wait()


def test_port_in_use_is_named() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "gateway", "cluster", "--port", str(port)],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert f"--port: port {port} is already in use" in proc.stderr


async def test_redis_sharded_cluster_serves_and_leaves_nothing_behind() -> None:
    launcher = start_launcher("--backend", "redis-sharded",
                              "--port", str(consecutive_free_ports(2)))
    try:
        assert sum(bool(REDIS_LINE.fullmatch(ln)) for ln in launcher.lines) == 3, launcher.lines
        assert sum(bool(GATEWAY_LINE.fullmatch(ln)) for ln in launcher.lines) == 2
        assert launcher.lines[-1] == "cluster ready"
        for url in launcher.gateway_urls():
            status, body = http_json(f"{url}/healthz")
            assert status == 200 and body["backend"] == "redis-sharded"
        await chat_across(launcher)
        kids = descendants(launcher.proc.pid)
        assert len(kids) >= 5, "3 redis-server and 2 gateway processes"
        assert stop(launcher) == 0
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in kids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not [p for p in kids if pid_alive(p)], "a child outlived the launcher"
        assert none_listening(launcher.ports())
        assert none_listening([p + 10000 for p in launcher.ports()[:3]]), "cluster bus port"
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
            launcher.proc.wait()


async def deliveries_both_ways(urls: list[str], timeout: float) -> None:
    """A room with a member on each of two gateways carries chats both ways (probing
    until it does: interest crosses between clusters asynchronously)."""
    async with pair(urls) as (a, b):
        await first_delivery_after(a, b, "launcher", timeout)
        await first_delivery_after(b, a, "launcher", timeout)


@pytest.mark.parametrize(("topology", "names", "link"), [
    # two clusters of one node: west-1 carries the link and serves gw-2
    ("supercluster", ["east-1", "west-1"], "west-1"),
    # the hub joins the two leaf servers gw-1 and gw-2 use
    ("leaf", ["hub-1", "leaf-1", "leaf-2"], "hub-1"),
])
async def test_topologies_serve_across_and_a_dead_link_node_is_restarted(
        topology: str, names: list[str], link: str) -> None:
    launcher = start_launcher("--topology", topology, "--nats-nodes", "1",
                              "--port", str(consecutive_free_ports(2)))
    try:
        assert list(launcher.nats_nodes()) == names, launcher.lines
        urls = launcher.gateway_urls()
        servers = {http_json(f"{u}/healthz")[1]["broker"]["server"] for u in urls}
        assert len(servers) == 2, "the two gateways use different clusters / leaf servers"
        await deliveries_both_ways(urls, 10)
        pids = child_pids(launcher, lambda cmd, env: f"NATS_SERVER_NAME={link}\0".encode()
                          in env and b"nats-server" in cmd)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)
        await launcher.wait_line(rf"{link} \(pid {pids[0]}\) exited with code -9; restarting")
        await launcher.wait_line(rf"{link} is back \(pid \d+")
        await deliveries_both_ways(urls, 30)
        await stop_leaving_nothing(launcher)
    finally:
        if launcher.proc.poll() is None:
            launcher.proc.kill()
            launcher.proc.wait()


@pytest.mark.parametrize(("flags", "message"), [
    (["--topology", "leaf", "--backend", "redis-sharded"], "--topology leaf needs --backend nats"),
    (["--topology", "supercluster", "--secure"],
     "--secure runs on --topology mesh only, not supercluster"),
    (["--topology", "leaf", "--recovery"], "--recovery runs on --topology mesh only, not leaf"),
])
def test_topology_refuses_what_it_cannot_run(flags: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "gateway", "cluster", *flags],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    assert message in proc.stderr
