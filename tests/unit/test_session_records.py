"""Session records as the recovery layer writes and restores them, on an in-memory
message store: sealed for their pid with a cluster key, carrying the connection's
identity with or without one, and left in place when a restore is refused."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import socketio

from nats_adapter import MemoryManager
from nats_adapter.brokers.base import MessageStore
from nats_adapter.brokers.memory import MemoryBus
from nats_adapter.recovery import Recovery, RecoveryOptions
from nats_adapter.sids import new_node_tag, new_sid

KEY = b"s" * 32


class DictStore(MessageStore):
    """Sessions in a dict; a stream of ten messages that nobody reads here."""

    retention = 600.0

    def __init__(self) -> None:
        self.sessions: dict[str, bytes] = {}

    async def setup(self, timeout: float = 20.0) -> None:
        pass

    async def publish(self, subject: str, data: bytes) -> int:
        raise NotImplementedError

    async def bounds(self) -> tuple[int, int]:
        return 1, 10

    async def replay(self, subjects: list[str], after: int, until: int,
                     since: float | None = None) -> list[tuple[int, str, bytes]]:
        return []

    async def history(self, subject: str, limit: int,
                      accept: Callable[[bytes], bool] | None = None
                      ) -> list[tuple[int, bytes]]:
        return []

    async def put_session(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.sessions[key] = value

    async def take_session(self, key: str, accept: Callable[[bytes], bool] | None = None
                           ) -> bytes | None:
        blob = self.sessions.get(key)
        if blob is None or (accept is not None and not accept(blob)):
            return None
        return self.sessions.pop(key)

    async def delete_session(self, key: str) -> None:
        self.sessions.pop(key, None)


def recovery(cluster_key: bytes | None) -> tuple[Recovery, DictStore]:
    """A node's recovery layer whose connections say who they are in ``auth["user"]``."""
    options = RecoveryOptions(identity=lambda auth, environ: auth.get("user"))
    manager = MemoryManager(MemoryBus(), cluster_key=cluster_key, recovery=options)
    socketio.AsyncServer(async_mode="aiohttp", client_manager=manager)
    assert manager.recovery is not None
    store = DictStore()
    manager.recovery.store = store
    return manager.recovery, store


async def write(rec: Recovery, store: DictStore, pid: str, record: dict[str, Any]) -> None:
    """What the node writes for ``pid`` at connect and on room changes."""
    await store.put_session(rec.record_name(pid), rec.seal_record(pid, record))


def session(sid: str, identity: str | None) -> dict[str, Any]:
    return {"sid": sid, "ns": "/", "rooms": ["r"], "data": {}, "node": sid.split(":")[0],
            "connected": False, "at": time.time(), "id": identity}


async def restores(rec: Recovery, pid: str, user: str | None) -> str | None:
    """The sid a CONNECT with ``{pid, offset}`` from ``user`` would get back, if any."""
    eio_sid = new_sid(new_node_tag())
    await rec.before_connect(eio_sid, "/", {"pid": pid, "offset": "5", "user": user})
    try:
        return rec.restored_sid(eio_sid, "/")
    finally:
        rec.after_connect(eio_sid, "/")


@pytest.mark.parametrize("cluster_key", [KEY, None], ids=["sealed", "open bus"])
async def test_a_restore_by_another_identity_is_refused_and_the_record_stays(
        cluster_key: bytes | None) -> None:
    rec, store = recovery(cluster_key)
    sid = new_sid(new_node_tag())
    await write(rec, store, "pid-1", session(sid, "alice"))
    assert await restores(rec, "pid-1", "bob") is None
    assert await restores(rec, "pid-1", None) is None
    assert len(store.sessions) == 1
    assert await restores(rec, "pid-1", "alice") == sid
    assert store.sessions == {}  # taken: single use


async def test_sealed_records_open_only_under_their_own_pid() -> None:
    rec, store = recovery(KEY)
    victim = new_sid(new_node_tag())
    await write(rec, store, "victim-pid", session(victim, None))
    assert list(store.sessions) == [rec.record_name("victim-pid")] != ["victim-pid"]
    # a record written by whoever can write the bucket: unsealed, or another pid's
    forged = msgpack.packb(session(victim, None), use_bin_type=True)
    store.sessions[rec.record_name("forged-pid")] = forged
    store.sessions[rec.record_name("moved-pid")] = store.sessions[rec.record_name("victim-pid")]
    assert await restores(rec, "forged-pid", None) is None
    assert await restores(rec, "moved-pid", None) is None
    assert rec.record_name("forged-pid") in store.sessions  # refused, not taken
    assert await restores(rec, "victim-pid", None) == victim


async def test_on_an_open_bus_records_stay_plain_under_their_pid() -> None:
    rec, store = recovery(None)
    sid = new_sid(new_node_tag())
    await write(rec, store, "pid-1", session(sid, "alice"))
    assert msgpack.unpackb(store.sessions["pid-1"])["id"] == "alice"


async def test_a_storm_of_restores_waits_once_for_a_gateway_that_does_not_answer() -> None:
    """Sessions of a killed gateway, restored elsewhere, each asked it to let go and
    waited out the 1 s timeout: 500 restores, 500 s of waiting in all. Once it has
    not answered (and has not been heard from since), the next restores don't ask."""
    from types import SimpleNamespace

    from nats_adapter.recovery import Recovery
    from nats_adapter.rpc import Peers
    from nats_adapter.sids import new_node_tag, new_sid

    dead, here = new_node_tag(), new_node_tag()
    asked: list[str] = []

    async def ask(node: str, body: Any, timeout: float) -> Any:
        asked.append(node)
        raise TimeoutError

    peers = Peers(timeout=60)
    peers.saw(dead)
    rpc = SimpleNamespace(register=lambda *a, **k: None, on_hello=[], peers=peers, ask=ask)
    node = SimpleNamespace(node_tag=here)
    recovery = Recovery(node, SimpleNamespace(), rpc, SimpleNamespace())  # type: ignore[arg-type]
    for _ in range(3):
        session = {"sid": new_sid(dead), "node": dead, "ns": "/"}
        assert await recovery._release_elsewhere(session) is True
    assert asked == [dead], "asked once, not once per session"
    peers.saw(dead)  # heard from again (a heartbeat): asked again
    assert await recovery._release_elsewhere({"sid": new_sid(dead), "node": dead, "ns": "/"})
    assert asked == [dead, dead]
