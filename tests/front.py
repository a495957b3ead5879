"""A TCP front for tests: what a load balancer does between clients and gateways.

It forwards every connection to the current target; a test can cut every
connection (the client's network drops), refuse new ones for a while, and send
the next ones to another gateway. Given several targets it takes them in turn, one
new connection each, with no affinity at all (a TCP balancer's round-robin).
"""

from __future__ import annotations

import asyncio
import contextlib

from gateway.processes import free_ports


class Front:
    def __init__(self, target: tuple[str, int], *more: tuple[str, int]) -> None:
        self.target = target
        #: with more targets: each new connection goes to the next (round-robin)
        self.targets = [target, *more]
        self.turn = 0
        #: connections sent to each target, by (host, port)
        self.sent: dict[tuple[str, int], int] = {}
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
        target = self.target
        if len(self.targets) > 1:
            target = self.targets[self.turn % len(self.targets)]
            self.turn += 1
        self.sent[target] = self.sent.get(target, 0) + 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
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
