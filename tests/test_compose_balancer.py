"""docker-compose.yml as a user scales it: ``docker-compose up --scale gateway=4``, the
balancer (HAProxy, round-robin, no affinity) the stack's one published port.

Clients reach the gateways only through the balancer, as users do. With
``transports=["websocket"]`` each client's one connection stays on the gateway the
balancer chose, so no affinity is needed: every chat reaches every other member of
the room exactly once, whichever replicas the sender and the receivers are on.
socket.io-client's default mode (long-polling first) needs every gateway to serve
every session's requests, which gateway/forwarding.py does: the same helper,
:func:`chat_through_the_balancer`, runs both, with the transports as its argument.
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from gateway.processes import http_json
from nats_adapter.naming import ChannelNames
from nats_adapter.sids import sid_owner
from tests.containers import NATS_NODES, ComposeStack, Images, Podman, routes_carry_interest
from tests.helpers import SETTLE, WAIT, SioClient, wait_for_condition
from tests.traffic import wait_for

#: the first test may build the images (a few minutes on a cold cache)
pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]

#: replicas of the gateway service, as ``--scale gateway=4``
SCALE = 4


@pytest.fixture(scope="module")
def scaled_stack(podman: Podman, images: Images) -> Iterator[ComposeStack]:
    """The shipped file, ``docker-compose up --scale gateway=4``: every gateway in the
    balancer's rotation before the tests start."""
    stack = ComposeStack(podman, images, gateways=SCALE)
    try:
        stack.up(timeout=120)
        yield stack
    finally:
        stack.down()


@dataclass
class BalancedChat:
    """What :func:`chat_through_the_balancer` saw."""

    clients: list[SioClient]
    #: the node tag (the gateway) each client's sid names, by client name
    gateway_of: dict[str, str]
    #: (sender's gateway, receiver's gateway) of every delivery between two gateways
    crossings: set[tuple[str, str]]


async def chat_through_the_balancer(stack: ComposeStack, count: int,
                                    transports: list[str] | None) -> BalancedChat:
    """``count`` python-socketio clients connect to the balancer's published port with
    ``transports`` (None: python-socketio's default, long-polling then websocket, as
    socket.io-client does), join one room, and each sends one chat. Asserts that
    every client connected, and that every chat reached every other client exactly
    once and its sender not at all; returns where they were, for the caller's
    assertions about the spread. The clients are closed on the way out."""
    room = f"balanced-{uuid.uuid4().hex[:8]}"
    clients = [SioClient(f"c{i}") for i in range(count)]
    try:
        # at once, as independent clients do: one after the other, each default-mode
        # client's handshake would fall on the same phase of the round-robin
        await asyncio.gather(*(c.sio.connect(stack.public_url, transports=transports,
                                             wait_timeout=WAIT) for c in clients))
        # python-socketio's default mode upgrades to websocket, as socket.io-client does
        await wait_for_condition(lambda: all(c.sio.transport() == "websocket"
                                             for c in clients), "every client on websocket")
        for c in clients:
            await c.join(room)
        subject = ChannelNames().room("/", room)
        await wait_for(lambda: routes_carry_interest(stack, subject), 10,
                       "every NATS node to know of the room's subscribers")
        sent = {c.name: f"from {c.name}" for c in clients}
        for c in clients:
            await c.chat(room, sent[c.name])
        for c in clients:
            expected = sorted(text for name, text in sent.items() if name != c.name)
            await c.wait_for(lambda x, e=expected: sorted(x.texts()) == e, timeout=10,
                             what=f"every other client's chat at {c.name}")
        await asyncio.sleep(SETTLE)  # a window in which no duplicate may arrive
        gateway_of = {c.name: sid_owner(c.sid) for c in clients}
        by_text = {text: name for name, text in sent.items()}
        crossings: set[tuple[str, str]] = set()
        for c in clients:
            texts = c.texts()
            assert len(texts) == len(set(texts)) == count - 1, (c.name, texts)
            assert sent[c.name] not in texts, f"{c.name} got its own chat back"
            for message in c.received():
                sender = by_text[message["text"]]
                assert message["from"] == next(x.sid for x in clients if x.name == sender)
                if gateway_of[sender] != gateway_of[c.name]:
                    crossings.add((gateway_of[sender], gateway_of[c.name]))
        return BalancedChat(clients, gateway_of, crossings)
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


def test_the_balancer_is_the_only_published_port(scaled_stack: ComposeStack) -> None:
    """From the host, only the balancer: no gateway replica, no NATS node has a host
    port; the balancer has exactly its public one."""
    assert list(scaled_stack.published("balancer")) == ["8000/tcp"]
    for name in (*NATS_NODES, *(scaled_stack.replica(i) for i in range(SCALE))):
        assert scaled_stack.published(name) == {}, name


def test_scaled_replicas_have_their_own_node_ids_and_all_take_requests(
        scaled_stack: ComposeStack) -> None:
    """Four replicas of one service, nothing configured per replica: each names itself
    after its host name (the container's, its short id), and the balancer's round-robin sends
    consecutive requests to each in turn: 2 x 4 requests to /healthz through the
    published port see every replica twice."""
    ids = []
    for i in range(SCALE):
        status, body = http_json(f"{scaled_stack.gateway_urls[i]}/healthz")
        assert status == 200, body
        container = scaled_stack.inspect(scaled_stack.replica(i))
        assert body["node_id"] == container["Config"]["Hostname"], (body, container["Id"])
        ids.append(body["node_id"])
    assert len(set(ids)) == SCALE, ids
    seen = []
    for _ in range(2 * SCALE):
        status, body = http_json(f"{scaled_stack.public_url}/healthz")
        assert status == 200, body
        seen.append(body["node_id"])
    assert sorted(seen) == sorted(ids * 2), seen


async def test_websocket_clients_chat_across_replicas_through_the_balancer(
        scaled_stack: ComposeStack) -> None:
    """Eight python-socketio clients on websocket through the one published port,
    spread by the balancer over the replicas: every chat reaches every other client
    exactly once, none echoed, across gateways both ways."""
    seen = await chat_through_the_balancer(scaled_stack, 8, ["websocket"])
    gateways = set(seen.gateway_of.values())
    assert len(gateways) >= 2, seen.gateway_of
    for a, b in seen.crossings:
        assert (b, a) in seen.crossings, f"delivered {a} -> {b} but never {b} -> {a}"
    assert seen.crossings, seen.gateway_of


def forwarded_requests(stack: ComposeStack) -> Counter[str]:
    """``gateway_forwarded_requests_total`` by kind, summed over every replica (their
    operator listeners, on the compose network)."""
    counts: Counter[str] = Counter()
    for i in range(stack.gateways):
        with urllib.request.urlopen(f"{stack.admin_url(i)}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for line in text.splitlines():
            if line.startswith("gateway_forwarded_requests_total{"):
                kind = line.split('kind="', 1)[1].split('"', 1)[0]
                counts[kind] += int(float(line.rsplit(" ", 1)[1]))
    return counts


async def test_default_mode_clients_chat_across_replicas_through_the_balancer(
        scaled_stack: ComposeStack) -> None:
    """The same in python-socketio's default mode (long-polling first, then the
    websocket upgrade, as socket.io-client): the balancer sends each of a session's
    requests to any replica, which serves those of sessions another owns through the
    owner (gateway/forwarding.py), and takes over the session of an upgrade that
    lands on it (nats_adapter/handover.py). Every client connects and upgrades, every
    chat reaches every other client once, and requests crossed replicas (forwarded,
    or upgrades whose sessions moved), none refused."""
    before = await asyncio.to_thread(forwarded_requests, scaled_stack)
    seen = await chat_through_the_balancer(scaled_stack, 8, None)
    after = await asyncio.to_thread(forwarded_requests, scaled_stack)
    crossed = after - before
    assert crossed["polling"] + crossed["websocket"] + crossed["moved"] > 0, \
        (crossed, seen.gateway_of)
    refused = {k: v for k, v in crossed.items() if k not in ("polling", "websocket", "moved")}
    assert not refused, refused
