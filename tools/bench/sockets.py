"""Bytes on TCP connections, counted by the kernel: ``ss -tinp`` (iproute2).

The benchmark counts the traffic between gateways and brokers here, on the sockets,
so that every broker is counted the same way: whatever its protocol (NATS ``MSG``
lines, Redis RESP pushes), whatever its client library counts, and without touching
the processes measured (a counting proxy would add a hop and be bypassed by the
servers' own discovery: NATS announces its cluster's URLs, Redis Cluster its masters).

Each socket's ``bytes_received`` / ``bytes_acked`` (``tcp_info``) are cumulative since
the connection opened; a measurement is the difference between two snapshots. A
socket opened in between counts from zero; one closed in between is lost (counted in
:attr:`Traffic.vanished`): the connections measured here live as long as the run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

_PID = re.compile(r"pid=(\d+)")
_RX = re.compile(r"bytes_received:(\d+)")
_TX = re.compile(r"bytes_acked:(\d+)")


@dataclass(frozen=True)
class SocketKey:
    pid: int
    local_port: int
    peer_port: int


@dataclass
class Traffic:
    """Bytes a set of sockets received and sent between two snapshots."""

    received: int = 0
    sent: int = 0
    sockets: int = 0
    #: sockets of the first snapshot missing from the second (their bytes are lost)
    vanished: int = 0


@dataclass
class SocketSnapshot:
    """(received, acked-sent) bytes of every established TCP socket that touches one of
    the given ports, by owning process and ports."""

    counts: dict[SocketKey, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def take(cls, ports: Iterable[int]) -> SocketSnapshot:
        binary = shutil.which("ss")
        if binary is None:
            raise RuntimeError("ss not found (iproute2; scripts/bootstrap installs it)")
        wanted = sorted(set(ports))
        if not wanted:
            return cls()
        expr = " or ".join(f"sport = :{p} or dport = :{p}" for p in wanted)
        proc = subprocess.run([binary, "-Htinp", "state", "established", f"( {expr} )"],
                              capture_output=True, text=True, timeout=30, check=True)
        return cls(parse(proc.stdout))

    def between(self, later: SocketSnapshot, pids: set[int], local: set[int] | None = None,
                peer: set[int] | None = None) -> Traffic:
        """Traffic from this snapshot to ``later`` on sockets owned by ``pids``, with a
        local port in ``local`` and a peer port in ``peer`` (None: any)."""

        def chosen(key: SocketKey) -> bool:
            return key.pid in pids and (local is None or key.local_port in local) and \
                (peer is None or key.peer_port in peer)

        out = Traffic()
        for key, (rx, tx) in later.counts.items():
            if chosen(key):
                rx0, tx0 = self.counts.get(key, (0, 0))
                out.received += rx - rx0
                out.sent += tx - tx0
                out.sockets += 1
        out.vanished = sum(1 for key in self.counts if chosen(key) and key not in later.counts)
        return out


def parse(text: str) -> dict[SocketKey, tuple[int, int]]:
    """``ss -Htinp state established`` output: one line per socket (receive queue, send
    queue, local address, peer address, process), then an indented line of tcp_info."""
    out: dict[SocketKey, tuple[int, int]] = {}
    key: SocketKey | None = None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace():
            parts = line.split()
            pid = _PID.search(line)
            key = None
            if len(parts) >= 4 and pid is not None:
                key = SocketKey(int(pid.group(1)), _port(parts[2]), _port(parts[3]))
            continue
        if key is not None:
            rx, tx = _RX.search(line), _TX.search(line)
            out[key] = (int(rx.group(1)) if rx else 0, int(tx.group(1)) if tx else 0)
            key = None
    return out


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])
