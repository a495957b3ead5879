"""The upstream privates (nats_adapter.compat): every probe passes on the pinned
versions; one whose private is taken away fails, naming it, and its feature falls
back to the stock path, which the fast-path report (/healthz) says."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import engineio
import pytest

from nats_adapter import compat
from nats_adapter._engineio import fast_paths, install


@pytest.fixture(autouse=True)
def probes() -> Iterator[None]:
    compat.reset()
    yield
    compat.reset()


@pytest.mark.parametrize("name", sorted(compat.PRIVATES))
def test_each_probe_passes_on_the_pinned_versions(name: str) -> None:
    assert compat.problem(name) is None
    private = compat.PRIVATES[name]
    assert private.uses and private.fallback and private.library


def test_the_report_lists_every_private_active() -> None:
    report = compat.report()
    assert set(report) == set(compat.PRIVATES)
    assert all(entry["active"] for entry in report.values())


def test_no_probe_reads_source_text() -> None:
    from pathlib import Path

    import nats_adapter

    for path in Path(nats_adapter.__file__).parent.rglob("*.py"):
        assert "getsource" not in path.read_text(), path


def take_away(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Remove the upstream private that ``name``'s probe checks first."""
    if name == "nats.shared_inbox":
        from nats.aio.subscription import Subscription

        monkeypatch.delattr(Subscription, "_drain")
    elif name == "nats.socket":
        from nats.aio.transport import TcpTransport

        original = TcpTransport.__init__

        def init(self: TcpTransport) -> None:
            original(self)
            del self._io_writer

        monkeypatch.setattr(TcpTransport, "__init__", init)
    elif name == "nats.server_info":
        from nats.aio.client import Client

        original_init = Client.__init__

        def client_init(self: Client) -> None:
            original_init(self)
            del self._server_info

        monkeypatch.setattr(Client, "__init__", client_init)
    elif name == "redis.resubscribe_per_slot":
        from redis.asyncio.cluster import ClusterPubSub

        monkeypatch.delattr(ClusterPubSub, "_resubscribe_shard_channels")
    elif name == "socketio.recovery_hooks":
        import socketio

        async def _send_packet(self: object, packet: object) -> None: ...

        monkeypatch.setattr(socketio.AsyncServer, "_send_packet", _send_packet)
    elif name == "socketio.namespace_error":
        import socketio

        async def _handle_connect(self: object, sid: str, namespace: str) -> None: ...

        monkeypatch.setattr(socketio.AsyncServer, "_handle_connect", _handle_connect)
    elif name == "socketio.environ":
        import socketio

        original_init = socketio.AsyncServer.__init__

        def init_without_environ(self: socketio.AsyncServer, *a: object, **kw: object) -> None:
            original_init(self, *a, **kw)
            del self.environ

        monkeypatch.setattr(socketio.AsyncServer, "__init__", init_without_environ)
    elif name == "socketio.admin":
        from socketio.async_admin import InstrumentedAsyncServer

        async def admin_connect(self: object, sid: str, environ: object) -> None: ...

        monkeypatch.setattr(InstrumentedAsyncServer, "admin_connect", admin_connect)
    elif name == "engineio.server":
        monkeypatch.delattr(engineio.exceptions, "UnknownPacketError")
    elif name == "engineio.handover":
        from engineio.async_socket import AsyncSocket

        monkeypatch.delattr(AsyncSocket, "schedule_ping")
    elif name == "engineio.generate_id":
        from engineio import base_server

        monkeypatch.delattr(base_server.BaseServer, "generate_id")
    elif name == "engineio.ping_timer":
        from engineio.async_socket import AsyncSocket

        async def _send_ping(self: object, interval: float) -> None: ...

        monkeypatch.setattr(AsyncSocket, "_send_ping", _send_ping)
    elif name == "engineio.polling":
        from engineio.async_drivers import aiohttp as aiohttp_driver

        def translate_request(request: object, extra: object) -> dict[str, object]:
            return {}

        monkeypatch.setitem(aiohttp_driver._async, "translate_request", translate_request)
    elif name == "aiohttp.take_over":
        monkeypatch.delattr(asyncio.BaseTransport, "set_protocol")
    elif name == "aiohttp.websocket_options":
        from aiohttp import web

        class Response:
            def __init__(self, max_msg_size: int) -> None: ...

        monkeypatch.setattr(web, "WebSocketResponse", Response)
    elif name == "asyncio.raw_socket":
        from asyncio import selector_events

        monkeypatch.delattr(selector_events, "_SelectorTransport")
    elif name == "wsproto.idle_parser":
        from wsproto.connection import Connection

        monkeypatch.delattr(Connection, "__init__")
    else:
        raise AssertionError(f"no way to take {name} away: add one")


@pytest.mark.parametrize("name", sorted(compat.PRIVATES))
def test_a_probe_whose_private_is_gone_fails_and_is_reported(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, name)
    reason = compat.problem(name)
    assert reason is not None and reason.startswith("missing: ")
    entry = compat.report()[name]
    assert entry["active"] is False and entry["reason"] == reason
    assert entry["fallback"] == compat.PRIVATES[name].fallback
    others = {n for n, e in compat.report().items() if not e["active"]}
    assert name in others


def test_without_lean_connections_websockets_stay_on_engineio() -> None:
    eio = engineio.AsyncServer(async_mode="aiohttp")
    base = eio._async["websocket"]
    fastpath = install(eio)
    assert fastpath is not None and fastpath.enabled
    assert eio._async["websocket"] is not base


def test_a_failing_lean_probe_installs_no_lean_path(monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "aiohttp.take_over")
    eio = engineio.AsyncServer(async_mode="aiohttp")
    fastpath = install(eio)
    assert fastpath is not None
    assert not fastpath.enabled and fastpath.heartbeat is None
    report = fast_paths(fastpath)["aiohttp.take_over"]
    assert report["active"] is False and "set_protocol" in report["reason"]
    assert eio.start_service_task, "engine.io's service task still checks timeouts"


def test_compression_rules_lean_connections_out_and_says_so() -> None:
    fastpath = install(engineio.AsyncServer(async_mode="aiohttp"), compression=True)
    assert fastpath is not None and not fastpath.enabled
    assert "compression" in fast_paths(fastpath)["aiohttp.take_over"]["reason"]


def test_a_failing_engineio_probe_installs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    take_away(monkeypatch, "engineio.server")
    eio = engineio.AsyncServer(async_mode="aiohttp")
    create_queue = eio.create_queue
    assert install(eio) is None
    assert eio.create_queue == create_queue, "stock engine.io is left untouched"
    report = fast_paths(None)["engineio.server"]
    assert report["active"] is False and "UnknownPacketError" in report["reason"]


def test_a_failing_ping_timer_probe_keeps_engineio_ping_tasks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    eio = engineio.AsyncServer(async_mode="aiohttp")
    start = eio.start_background_task
    take_away(monkeypatch, "engineio.ping_timer")
    assert install(eio) is not None
    assert eio.start_background_task == start


def test_redis_keeps_its_own_resubscribe_without_the_private(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nats_adapter.brokers.redis_sharded import _NodeSubscriber

    with_private = _NodeSubscriber("n", "127.0.0.1", 1, {})
    assert "_resubscribe_shard_channels" in vars(with_private.pubsub)
    compat.reset()
    take_away(monkeypatch, "redis.resubscribe_per_slot")
    without = _NodeSubscriber("n", "127.0.0.1", 1, {})
    assert "_resubscribe_shard_channels" not in vars(without.pubsub)


def test_nats_falls_back_to_subscriptions_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from nats_adapter.brokers.nats import NatsBroker, shared_inbox_problem

    assert NatsBroker(["nats://127.0.0.1:1"])._inbox_ok
    compat.reset()
    take_away(monkeypatch, "nats.shared_inbox")
    assert "_drain" in (shared_inbox_problem() or "")
    assert not NatsBroker(["nats://127.0.0.1:1"])._inbox_ok


def test_recovery_hooks_refuse_to_install_without_the_private(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socketio

    from nats_adapter import _socketio_hooks

    take_away(monkeypatch, "socketio.recovery_hooks")
    with pytest.raises(RuntimeError, match="_send_packet"):
        _socketio_hooks.install(socketio.AsyncServer(), None)  # type: ignore[arg-type]
