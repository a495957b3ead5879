"""Chat traffic under faults, measured as a user sees it: what arrived, when, and
what each gateway's /healthz and /metrics said meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.processes import http_json
from tests.helpers import REPO, SioClient, metrics_of

#: where measured runs are written (bench-results/ is not committed)
RESULTS = REPO / "bench-results" / "reliability"


async def wait_for(check: object, timeout: float, what: str) -> float:
    """Wait until ``check()`` (run in a thread) is true; the seconds it took."""
    start = time.monotonic()
    while not await asyncio.to_thread(check):  # type: ignore[arg-type]
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.25)  # poll interval
    return time.monotonic() - start


@dataclass
class Flow:
    """One sender chatting into a room at a fixed rate, one receiver on another gateway."""

    name: str
    sender: SioClient
    receiver: SioClient
    room: str
    #: seq -> time the chat was sent, for chats the gateway acked ok
    sent: dict[int, float] = field(default_factory=dict)
    #: chats refused (ack ok:false) or not acked in time
    refused: int = 0

    def arrivals(self) -> dict[int, float]:
        """seq -> time of first arrival at the receiver."""
        out: dict[int, float] = {}
        for (event, data), at in zip(self.receiver.events, self.receiver.times, strict=True):
            if event == "chat" and isinstance(data, dict) and data.get("room") == self.room:
                text = str(data.get("text", ""))
                name, _, seq = text.partition(" ")
                if name == self.name and seq.isdigit():
                    out.setdefault(int(seq), at)
        return out


@dataclass
class Sample:
    at: float
    gateway: int
    status: int
    broker_connected: bool | None
    server: str | None


class Traffic:
    """Runs every flow at ``rate`` chats per second and samples the gateways' health."""

    def __init__(self, flows: Sequence[Flow], gateway_urls: Sequence[str],
                 rate: float = 20.0) -> None:
        self.flows = list(flows)
        self.urls = list(gateway_urls)
        self.interval = 1.0 / rate
        self.samples: list[Sample] = []
        self.marks: dict[str, float] = {}
        self.metrics_before: list[dict[str, float]] = []
        self.metrics_after: list[dict[str, float]] = []
        self._stop = asyncio.Event()

    def mark(self, name: str) -> float:
        self.marks[name] = time.monotonic()
        return self.marks[name]

    async def _send(self, flow: Flow) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            seq += 1
            at = time.monotonic()
            try:
                ack = await flow.sender.call("chat", {"room": flow.room,
                                                      "text": f"{flow.name} {seq}"}, timeout=2)
            except Exception:  # a timeout or a dropped socket: the user saw no ack
                ack = None
            if isinstance(ack, dict) and ack.get("ok") is True:
                flow.sent[seq] = at
            else:
                flow.refused += 1
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # paces the flow

    async def _sample(self) -> None:
        while not self._stop.is_set():
            for i, url in enumerate(self.urls):
                status, body = await asyncio.to_thread(http_json, f"{url}/healthz", 1.0)
                body = body if isinstance(body, dict) else {}
                broker = body.get("broker")
                broker = broker if isinstance(broker, dict) else {}
                self.samples.append(Sample(time.monotonic(), i, status,
                                           body.get("broker_connected"), broker.get("server")))
            await asyncio.sleep(0.25)  # the sampling period (pacing, not a wait)

    async def _metrics(self) -> list[dict[str, float]]:
        out = []
        for url in self.urls:
            try:
                out.append(await asyncio.to_thread(metrics_of, url))
            except OSError:
                out.append({})
        return out

    def _delivered_after(self, flow: Flow, after: float) -> int:
        arrivals = flow.arrivals()
        return sum(1 for s, t in flow.sent.items() if t >= after and s in arrivals)

    async def delivered(self, count: int = 10, after: float | None = None,
                        timeout: float = 60.0) -> None:
        """Wait until every flow has delivered ``count`` chats sent after ``after`` (a
        ``time.monotonic()``; default now): traffic flows, or flows again after a fault."""
        after = time.monotonic() if after is None else after
        deadline = time.monotonic() + timeout
        while not all(self._delivered_after(f, after) >= count for f in self.flows):
            if time.monotonic() > deadline:
                got = {f.name: self._delivered_after(f, after) for f in self.flows}
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {count} "
                                     f"deliveries per flow; got {got}")
            await asyncio.sleep(0.05)

    def _all_arrived(self) -> bool:
        return all(set(f.sent) <= set(f.arrivals()) for f in self.flows)

    @contextlib.asynccontextmanager
    async def running(self, settle: float = 3.0) -> AsyncIterator[Traffic]:
        """Traffic flows inside; on the way out it stops and waits for stragglers: until
        every acked chat has arrived, at most ``settle`` seconds (the rest are lost)."""
        self.metrics_before = await self._metrics()
        self.mark("start")
        tasks = [asyncio.create_task(self._send(f)) for f in self.flows]
        tasks.append(asyncio.create_task(self._sample()))
        try:
            yield self
        finally:
            self._stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.mark("stop")
            deadline = time.monotonic() + settle
            while not self._all_arrived() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self.metrics_after = await self._metrics()

    # -- what happened -----------------------------------------------------------------

    def flow_report(self, flow: Flow, since: float | None = None) -> dict[str, Any]:
        """Delivery of ``flow`` (only chats sent after ``since``, if given)."""
        arrivals = flow.arrivals()
        sent = {s: t for s, t in flow.sent.items() if since is None or t >= since}
        got = sorted(arrivals[s] for s in sent if s in arrivals)
        lost = [s for s in sent if s not in arrivals]
        latencies = sorted(arrivals[s] - t for s, t in sent.items() if s in arrivals)
        gaps = [b - a for a, b in itertools.pairwise(got)]
        gap, gap_end = 0.0, None
        for a, b in itertools.pairwise(got):
            if b - a > gap:
                gap, gap_end = b - a, b
        start = self.marks.get("fault")
        return {
            "flow": flow.name,
            "sent_acked": len(sent),
            "refused": flow.refused,
            "delivered": len(got),
            "lost": len(lost),
            "max_gap_s": round(max(gaps, default=0.0), 2),
            # when the longest silence ended, from the fault's start
            "gap_ended_after_s": round(gap_end - start, 2) if gap_end and start else None,
            "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies
            else None,
            "latency_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1)
            if latencies else None,
            "latency_max_ms": round(1000 * latencies[-1], 1) if latencies else None,
        }

    def health_report(self, gateway: int) -> dict[str, Any]:
        """What /healthz said on ``gateway`` from the fault's start: how long it answered
        anything but 200, and the broker servers it named in turn."""
        start = self.marks.get("fault", self.marks["start"])
        samples = [s for s in self.samples if s.gateway == gateway and s.at >= start]
        unhealthy = [s for s in samples if s.status != 200]
        servers: list[str] = []
        for s in samples:
            if s.server and (not servers or servers[-1] != s.server):
                servers.append(s.server)
        first_bad = unhealthy[0].at - start if unhealthy else None
        # each sample stands for the time until the next one
        bad = sum(b.at - a.at for a, b in itertools.pairwise(samples)
                  if a.status != 200)
        return {"gateway": gateway + 1,
                "healthz_not_200_s": round(bad, 2),
                "healthz_first_not_200_after_s": round(first_bad, 2)
                if first_bad is not None else None,
                "statuses": sorted({s.status for s in samples}),
                "broker_servers": servers}

    def metric_deltas(self, names: Sequence[str]) -> list[dict[str, float]]:
        return [{n: after.get(n, 0.0) - before.get(n, 0.0) for n in names}
                for before, after in zip(self.metrics_before, self.metrics_after, strict=True)]


def record(scenario: str, result: dict[str, Any]) -> Path:
    """Append one scenario's measurements to bench-results/reliability/results.jsonl
    and rewrite results.md, a table of every run so far."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "results.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"scenario": scenario, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            **result}) + "\n")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    (RESULTS / "results.md").write_text(markdown_table(rows))
    return path


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per scenario and flow: delivery, loss, gap, latency, /healthz."""
    out = ["| when | scenario | flow | acked | lost | longest gap s | p99 ms | max ms "
           "| /healthz not 200 s (gw-1, gw-2) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        health = ", ".join(str(h["healthz_not_200_s"]) for h in row.get("health", []))
        for flow in row.get("flows", []):
            out.append(f"| {row['time']} | {row['scenario']} | {flow['flow']} "
                       f"| {flow['sent_acked']} | {flow['lost']} | {flow['max_gap_s']} "
                       f"| {flow['latency_p99_ms']} | {flow['latency_max_ms']} | {health} |")
    return "\n".join(out) + "\n"
