"""A display name given in the CONNECT auth (``{"name": ...}``): shown beside the
socket's chats on every node and told back by ``whoami`` with the gateway it is on; a
name that is not acceptable refuses the connection with the reason. It is what a
client says it is called, never an identity: ``from`` stays the sid."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import SioClient, refusal
from tests.unit.conftest import GatewayApp


async def test_a_name_travels_with_chats_and_whoami_says_the_gateway(
        two_gateways: list[GatewayApp], clients: list[SioClient]) -> None:
    alice, bob = SioClient("alice"), SioClient("bob")
    clients += [alice, bob]
    await alice.connect(two_gateways[0].url, auth={"name": "Alice ☕"})
    await bob.connect(two_gateways[1].url)
    assert await alice.call("whoami") == {"ok": True, "user": None, "data": {},
                                          "name": "Alice ☕", "node": "gw-1"}
    assert await bob.call("whoami") == {"ok": True, "user": None, "data": {},
                                        "name": None, "node": "gw-2"}
    for c in (alice, bob):
        assert (await c.call("join", "lobby"))["ok"]
    await alice.chat("lobby", "hi from gw-1")
    await bob.wait_texts(["hi from gw-1"])
    (got,) = bob.received()
    assert got["name"] == "Alice ☕" and got["from"] == alice.sid
    await bob.chat("lobby", "no name here")
    await alice.wait_texts(["no name here"])
    assert "name" not in alice.received()[0]


@pytest.mark.parametrize(("name", "reason"), [
    (42, "name must be a string, not number"),
    ("", "name must not be empty"),
    ("   ", "name must not be empty"),
    ("x" * 33, "name longer than 32 characters"),
    ("bell\x07", "name must be printable text"),
    ("line\nbreak", "name must be printable text"),
    ("\ud800", "name must be printable text"),
])
async def test_an_unacceptable_name_refuses_the_connection_with_the_reason(
        two_gateways: list[GatewayApp], name: Any, reason: str) -> None:
    assert await refusal(two_gateways[0].url, {"name": name}) == reason
    # the node carries on
    ok = SioClient("after")
    await ok.connect(two_gateways[0].url, auth={"name": "fine"})
    assert (await ok.call("whoami"))["name"] == "fine"
    await ok.close()
