"""A chat is acked ``ok`` only when the broker took it (issue 25): a publish the
broker refuses is acked ``ok: false`` and reaches nobody, on this gateway or another."""

from __future__ import annotations

import pytest

from nats_adapter import BrokerError
from tests.helpers import SioClient, connect_all
from tests.unit.conftest import GatewayApp, settle


async def test_a_chat_the_broker_refuses_is_acked_false_and_reaches_nobody(
        two_gateways: list[GatewayApp], clients: list[SioClient],
        monkeypatch: pytest.MonkeyPatch) -> None:
    one, two = two_gateways
    sender, neighbour, remote = await connect_all(
        clients, [("sender", one.url), ("neighbour", one.url), ("remote", two.url)])
    for c in (sender, neighbour, remote):
        await c.join("acks")
    ack = await sender.call("chat", {"room": "acks", "text": "before"})
    assert ack["ok"] is True
    for c in (neighbour, remote):
        await c.wait_for(lambda r: "before" in r.texts(), what="the first chat")

    async def refuse(channel: str, data: bytes) -> None:
        raise BrokerError("the broker is away")

    broker = one.manager.broker
    errors = one.manager.stats.publish_errors
    with monkeypatch.context() as patch:
        patch.setattr(broker, "publish", refuse)
        ack = await sender.call("chat", {"room": "acks", "text": "refused"})
    assert ack == {"ok": False, "error": "not delivered: the broker is away"}
    assert one.manager.stats.publish_errors == errors + 1

    assert (await sender.call("chat", {"room": "acks", "text": "after"}))["ok"] is True
    for c in (neighbour, remote):
        await c.wait_for(lambda r: "after" in r.texts(), what="the chat after")
    await settle(two_gateways, neighbour, remote)
    # not "some got it": neither the sender's own gateway's member nor the other's
    assert neighbour.texts() == remote.texts() == ["before", "after"]
