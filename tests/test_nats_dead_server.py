"""A NATS server that vanishes without closing the connection (a partition, a host
gone) is noticed in seconds: the broker pings every few seconds and bounds how long
sent data may stay unacknowledged (TCP_USER_TIMEOUT), so nats-py's reconnect, which
waits for the old socket to close, cannot hang on a dead link (nats-io/nats.py#671).

The partition itself is tests/test_compose_faults.py; this checks the connection's
settings against a real server, without containers."""

from __future__ import annotations

import socket

import pytest

from gateway.processes import NatsCluster
from nats_adapter.brokers.nats import NatsBroker


class Handler:
    def __init__(self) -> None:
        self.states: list[bool] = []

    async def on_message(self, channel: str, data: bytes) -> None:
        pass

    def on_connection_state(self, connected: bool) -> None:
        self.states.append(connected)


def user_timeout_ms(broker: NatsBroker) -> int:
    nc = broker._nc
    assert nc is not None
    sock = nc._transport._io_writer.get_extra_info("socket")  # type: ignore[union-attr]
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))


async def test_connection_pings_often_and_bounds_unacknowledged_data(
        nats_cluster: NatsCluster) -> None:
    broker = NatsBroker(nats_cluster.urls, ping_interval=3)
    try:
        await broker.start(Handler(), "sio.node.deadtest")
        assert broker._nc is not None
        assert broker._nc.options["ping_interval"] == 3
        assert broker._nc.options["max_outstanding_pings"] == 2
        assert user_timeout_ms(broker) == 6000
    finally:
        await broker.close()


async def test_the_default_notices_a_dead_server_within_fifteen_seconds(
        nats_cluster: NatsCluster) -> None:
    broker = NatsBroker(nats_cluster.urls)
    try:
        await broker.start(Handler(), "sio.node.deadtest2")
        assert broker._nc is not None
        interval = broker._nc.options["ping_interval"]
        assert interval * (broker._nc.options["max_outstanding_pings"] + 1) <= 15
        assert user_timeout_ms(broker) <= 15000
    finally:
        await broker.close()


@pytest.mark.parametrize("bad", [{"ping_interval": 0}, {"max_outstanding_pings": 0}])
def test_bad_ping_settings_are_refused(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="ping_interval"):
        NatsBroker(["nats://127.0.0.1:4222"], **bad)  # type: ignore[arg-type]
