"""A TCP front: what a load balancer does between clients and gateways.

It forwards every connection to the current target; a test can cut every
connection (the client's network drops), refuse new ones for a while, and send
the next ones to another gateway. Given several targets it takes them in turn, one
new connection each, with no affinity at all (a TCP balancer's round-robin); a
target that refuses the connection (a gateway that died) passes it to the next.

The tests use it in their own event loop; the benchmark's ``no-affinity`` scenario
runs it as a process of its own (``python -m tools.bench.front HOST:PORT ...``:
it prints its URL, then serves until its stdin closes), so that what it costs is
measured apart from the gateways (it stands for an external balancer).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from gateway.processes import free_ports


class Front:
    def __init__(self, target: tuple[str, int], *more: tuple[str, int]) -> None:
        self.target = target
        #: with more targets: each new connection goes to the next (round-robin)
        self.targets = [target, *more]
        self.turn = 0
        #: connections sent to each target, by (host, port)
        self.sent: dict[tuple[str, int], int] = {}
        #: connections a target refused (each then went to the next one)
        self.refused: dict[tuple[str, int], int] = {}
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.refusing = False
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Front:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        order = [self.target]
        if len(self.targets) > 1:
            first = self.turn % len(self.targets)
            self.turn += 1
            order = self.targets[first:] + self.targets[:first]
        for target in order:
            try:
                up_reader, up_writer = await asyncio.open_connection(*target)
                break
            except OSError:
                # a gateway that is gone: the next one takes the connection, as a
                # balancer redispatches one its server refused (HAProxy's `retries`
                # with `option redispatch`, nginx's `proxy_next_upstream error`).
                # Closing it instead fails whichever request the client sent on it:
                # a reconnecting client whose requests came round to the dead
                # gateway in step with the turn failed every attempt (15 s of them).
                self.refused[target] = self.refused.get(target, 0) + 1
        else:
            writer.close()
            return
        self.sent[target] = self.sent.get(target, 0) + 1
        self._writers |= {writer, up_writer}
        pipes = [asyncio.get_running_loop().create_task(self._pipe(reader, up_writer)),
                 asyncio.get_running_loop().create_task(self._pipe(up_reader, writer))]
        self._pipes.update(pipes)
        for task in pipes:
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    def cut(self) -> None:
        """Drop every connection through the front, as a network that goes away."""
        for writer in list(self._writers):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


async def _serve_until_stdin_closes(targets: list[tuple[str, int]]) -> None:
    front = await Front(*targets).start()
    print(front.url, flush=True)
    # stdin is read in a thread: its end (the benchmark closing the pipe) ends the front
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await front.close()


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


class FrontProcess:
    """A :class:`Front` in a process of its own, round-robin over ``targets``."""

    def __init__(self, targets: list[str]) -> None:
        from gateway.processes import REPO_ROOT

        self.proc = subprocess.Popen([sys.executable, "-m", "tools.bench.front", *targets],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=REPO_ROOT)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            raise RuntimeError(f"the front exited with {self.proc.wait()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


HAPROXY = "haproxy"


class HaproxyFront:
    """HAProxy (when installed) as the front: TCP mode, round-robin, each new
    connection to the next target; what a deployment would put there, and cheaper
    than :class:`Front` on a machine the gateways share."""

    def __init__(self, targets: list[str], workdir: Path) -> None:
        from gateway.processes import free_ports

        port = free_ports(1)[0]
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "haproxy.cfg"
        config.write_text("\n".join([
            "global", "    maxconn 8000",
            "defaults", "    mode tcp", "    timeout connect 5s", "    timeout client 1h",
            "    timeout server 1h",
            "frontend front", f"    bind 127.0.0.1:{port}", "    default_backend gateways",
            "backend gateways", "    balance roundrobin",
            *(f"    server gw{k} {t}" for k, t in enumerate(targets)), ""]))
        binary = shutil.which(HAPROXY)
        if binary is None:
            raise RuntimeError("haproxy is not installed")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(config)],
                                     stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while not _accepts(port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("haproxy did not start")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


if __name__ == "__main__":
    asyncio.run(_serve_until_stdin_closes([_target(t) for t in sys.argv[1:]]))
