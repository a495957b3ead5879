"""free_ports stays inside GATEWAY_PORT_RANGE (one per test worker) and names a bad one."""

from __future__ import annotations

import socket

import pytest

from gateway.processes.children import PORT_RANGE_ENV, free_ports


def test_ports_come_from_the_range_in_turn_and_skip_a_busy_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        low = port - 2 if port > 1030 else port
        monkeypatch.setenv(PORT_RANGE_ENV, f"{low}-{low + 40}")
        picked = free_ports(3) + free_ports(3)
    assert len(set(picked)) == 6
    assert all(low <= p < low + 40 for p in picked)
    assert port not in picked


@pytest.mark.parametrize("spec", ["80-90", "2000", "3000-2000", "a-b", "1024-70000"])
def test_a_bad_range_is_named(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_RANGE_ENV, spec)
    with pytest.raises(ValueError, match=PORT_RANGE_ENV):
        free_ports(1)
