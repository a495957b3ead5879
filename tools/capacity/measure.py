"""The model's NATS constants, measured on real servers (``python -m tools.capacity
measure``): what an interest entry costs in memory, and what an interest change costs
in CPU, on the server a gateway subscribes on and on the other servers of the mesh.

A 3-node mesh from ``infra/nats/node.conf``; one nats-py client on the first node
subscribes to ``subjects`` room subjects (shaped like the gateway's), and the other
nodes learn them over their routes. Then the client churns: it unsubscribes one
subject and subscribes a new one, as fast as it can, for ``seconds``. Last, what a
message costs a server: published on the first, received on the first and the second.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats

from gateway.processes import NatsCluster, NatsNode, wait_until
from tools.bench.harness import cpu_seconds


def _cpu(node: NatsNode) -> float:
    assert node.child is not None
    return cpu_seconds(node.child.pid)


#: seconds a /varz reading may take
VARZ_TIMEOUT = 30.0


def _varz(node: NatsNode) -> dict[str, Any]:
    # a server busy with thousands of subscriptions (and a loaded machine) can take
    # seconds to answer its monitoring port: wait for it rather than fail the reading
    body = node.varz("varz", timeout=VARZ_TIMEOUT)
    assert isinstance(body, dict), f"{node.name}: no /varz within {VARZ_TIMEOUT:g} s"
    return body


def _subject(i: int) -> str:
    return f"sio.room._2F.room-{i:07d}"


async def _measure(cluster: NatsCluster, subjects: int, seconds: float, messages: int
                   ) -> dict[str, Any]:
    origin, *others = cluster.nodes
    nc = await nats.connect(origin.url, no_echo=True)
    try:
        # let the servers settle their own start-up garbage (a measurement boundary)
        await asyncio.sleep(1.0)
        base = {n.name: _varz(n) for n in cluster.nodes}
        cpu0 = {n.name: _cpu(n) for n in cluster.nodes}
        started = time.monotonic()
        subs = []
        for i in range(subjects):
            subs.append(await nc.subscribe(_subject(i)))
        await nc.flush(timeout=60)
        target = {n.name: base[n.name]["subscriptions"] + subjects for n in cluster.nodes}

        def learnt() -> bool:
            return all(_varz(n)["subscriptions"] >= target[n.name] for n in cluster.nodes)

        await asyncio.to_thread(wait_until, learnt, 60, "the routes to carry the interest")
        took = time.monotonic() - started
        await asyncio.sleep(1.0)  # settles before the next reading (a measurement boundary)
        full = {n.name: _varz(n) for n in cluster.nodes}
        cpu1 = {n.name: _cpu(n) for n in cluster.nodes}

        # churn: one unsubscribe and one subscribe per step, the set's size unchanged
        ops = 0
        next_id = subjects
        churn_start = time.monotonic()
        while time.monotonic() - churn_start < seconds:
            for _ in range(200):
                await subs[ops % subjects].unsubscribe()
                subs[ops % subjects] = await nc.subscribe(_subject(next_id))
                next_id += 1
                ops += 2
            await nc.flush(timeout=30)
        churn_seconds = time.monotonic() - churn_start
        await asyncio.to_thread(wait_until, learnt, 60, "the routes to catch up")
        cpu2 = {n.name: _cpu(n) for n in cluster.nodes}
        for sub in subs:
            await sub.unsubscribe()
        await nc.flush(timeout=60)
        message_costs = await _messages(cluster, nc, messages)
    finally:
        await nc.close()

    def mem_per_entry(node: NatsNode) -> float:
        return float(full[node.name]["mem"] - base[node.name]["mem"]) / subjects

    remote_mem = sum(mem_per_entry(n) for n in others) / len(others)
    remote_sub_cpu = sum(cpu1[n.name] - cpu0[n.name] for n in others) / len(others)
    remote_churn_cpu = sum(cpu2[n.name] - cpu1[n.name] for n in others) / len(others)
    return {
        "nats_server": _varz(origin).get("version"),
        "messages": message_costs,
        "subjects": subjects,
        "subscribe_seconds": round(took, 2),
        "memory_bytes_per_entry": {"origin": round(mem_per_entry(origin)),
                                   "remote": round(remote_mem)},
        "cpu_us_per_subscribe": {
            "origin": round(1e6 * (cpu1[origin.name] - cpu0[origin.name]) / subjects, 2),
            "remote": round(1e6 * remote_sub_cpu / subjects, 2)},
        "churn": {
            "ops": ops, "seconds": round(churn_seconds, 2),
            "ops_per_s": round(ops / churn_seconds),
            "cpu_us_per_op": {
                "origin": round(1e6 * (cpu2[origin.name] - cpu1[origin.name]) / ops, 2),
                "remote": round(1e6 * remote_churn_cpu / ops, 2)},
        },
    }


#: messages of the message-cost measurement, and their payload (a short chat envelope)
MESSAGES = 100_000
PAYLOAD = b"x" * 168


async def _messages(cluster: NatsCluster, publisher: Any, count: int) -> dict[str, Any]:
    """CPU per message: published on the first server, received by one subscriber there
    and one on the second server (so it crosses one route); the third server idles."""
    origin, remote, idle = cluster.nodes
    got = {"local": 0, "remote": 0}
    done = asyncio.Event()

    def counter(which: str) -> Any:
        async def cb(msg: Any) -> None:
            got[which] += 1
            if got["local"] >= count and got["remote"] >= count:
                done.set()
        return cb

    local = await nats.connect(origin.url)
    far = await nats.connect(remote.url)
    try:
        for client, which in ((local, "local"), (far, "remote")):
            await client.subscribe("bench.msgs", cb=counter(which),
                                   pending_msgs_limit=count + 1, pending_bytes_limit=1 << 30)
        await local.flush()
        await far.flush()
        def routed() -> bool:  # the route carries the remote interest to the origin
            routes = (origin.varz("routez?subs=1") or {}).get("routes") or []
            return any("bench.msgs" in (r.get("subscriptions_list") or []) for r in routes)

        await asyncio.to_thread(wait_until, routed, 30, "the route to carry the interest")
        cpu0 = {n.name: _cpu(n) for n in cluster.nodes}
        for k in range(count):
            await publisher.publish("bench.msgs", PAYLOAD)
            if k % 1000 == 999:
                await publisher.flush()
        await asyncio.wait_for(done.wait(), 120)
        cpu1 = {n.name: _cpu(n) for n in cluster.nodes}
    finally:
        await local.close()
        await far.close()

    def us(node: NatsNode) -> float:
        return round(1e6 * (cpu1[node.name] - cpu0[node.name]) / count, 2)

    return {"count": count, "payload_bytes": len(PAYLOAD),
            # in from a client, out to a client and to a route
            "cpu_us_per_msg_publishing_server": us(origin),
            # in from a route, out to a client
            "cpu_us_per_msg_receiving_server": us(remote),
            "cpu_us_idle_server": us(idle)}


def measure(workdir: Path, subjects: int = 100_000, seconds: float = 5.0,
            messages: int = MESSAGES) -> dict[str, Any]:
    """Start a 3-node mesh in ``workdir``, measure, stop it."""
    cluster = NatsCluster(workdir / "nats", size=3)
    try:
        cluster.start()
        return asyncio.run(_measure(cluster, subjects, seconds, messages))
    finally:
        cluster.stop()
