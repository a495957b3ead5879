"""What every part of the benchmark shares: the gateways' flags, the load generator
process, the scenario sizes, and reading CPU, memory and /metrics of a process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.processes import REPO_ROOT

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

#: every bench gateway's flags: quiet, and rate limits far above any load the bench
#: makes, so that they never refuse a send (a refused send would be counted, not
#: hidden) nor stand in the way of the census
GATEWAY_FLAGS = ["--log-level", "WARNING", "--chat-rate", "1000000", "--chat-burst", "1000000",
                 "--join-rate", "1000000", "--join-burst", "1000000",
                 "--api-rate", "100000", "--api-burst", "100000"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def metrics(url: str) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            name = key.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


# -- the load generator ------------------------------------------------------------


class LoadGenProcess:
    def __init__(self, deflate: bool = False) -> None:
        #: whether its sockets offer permessage-deflate unless a connect says otherwise
        self.deflate = deflate
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tools.bench.loadgen"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1, cwd=REPO_ROOT,
        )
        #: joins (and leaves) the gateways refused, in any command since the start:
        #: a scenario with one measures rooms that are not what it set up
        self.joins_refused = 0

    def call(self, **cmd: Any) -> dict[str, Any]:
        if cmd.get("op") == "connect":
            cmd.setdefault("deflate", self.deflate)
        self.send(**cmd)
        reply = self.reply()
        if cmd.get("op") == "join":
            self.joins_refused += int(reply.get("failures", 0))
        elif cmd.get("op") == "churn":
            self.joins_refused += int(reply.get("churn", {}).get("failures", 0))
        return reply

    def send(self, **cmd: Any) -> None:
        """Send a command; :meth:`reply` reads its answer (other generators may run
        their commands meanwhile)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited with {self.proc.wait()}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load generator: {reply['error']}")
        return reply

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            self.call(op="quit")
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- scenario sizes ------------------------------------------------------------------


@dataclass
@dataclass
class Params:
    quick: bool
    seed: int = 7

    @property
    def reference_users(self) -> int:
        return 30 if self.quick else 150

    @property
    def fanout_members(self) -> int:
        return 60 if self.quick else 500

    @property
    def fanout_senders(self) -> int:
        return 4

    @property
    def fanout_messages(self) -> int:  # per sender
        return 5 if self.quick else 100

    #: chats of each fan-out sender in flight at once (1: the next after the ack)
    fanout_window: int = 1
    #: the delivery scenarios' clients offer permessage-deflate, as browsers do
    client_deflate: bool = False

    @property
    def rooms(self) -> int:
        return 40 if self.quick else 1000

    @property
    def room_sockets(self) -> int:
        return 60 if self.quick else 2000

    @property
    def room_messages(self) -> int:
        return 80 if self.quick else 4000

    @property
    def latency_members(self) -> int:
        return 20 if self.quick else 100

    @property
    def latency_rate(self) -> float:
        return 50.0 if self.quick else 200.0

    @property
    def latency_seconds(self) -> float:
        return 1.0 if self.quick else 10.0

    @property
    def churn_sockets(self) -> int:
        return 20 if self.quick else 200

    @property
    def churn_ops_per_s(self) -> float:
        return 100.0 if self.quick else 500.0

    @property
    def idle_sockets(self) -> int:
        return 100 if self.quick else 2000

    #: the idle scenario's sockets; None: 300 quick, 10,000 full
    idle_many: int | None = None
    #: the no-affinity scenario's gateways move a session on upgrade (else splice)
    upgrade_move: bool = True

    @property
    def idle_count(self) -> int:
        return self.idle_many or (300 if self.quick else 10_000)

    @property
    def idle_seconds(self) -> float:
        return 3.0 if self.quick else 60.0
