"""docker-compose.yml's ``observability`` profile: Prometheus scrapes every gateway
replica (found in compose's DNS) and evaluates infra/prometheus/alerts.yml; when a
NATS node is killed, the gateways that used it reconnect elsewhere and the alert
says so, naming them."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.processes import free_ports, http_json
from tests.containers import ComposeStack, Images, Podman, nats_service_of
from tests.traffic import wait_for

#: the first test may build the images (a few minutes on a cold cache)
pytestmark = [pytest.mark.compose, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def observed_stack(podman: Podman, images: Images) -> Iterator[ComposeStack]:
    stack = ComposeStack(podman, images, profiles=("observability",),
                         variables={"PROMETHEUS_PORT": f"127.0.0.1:{free_ports(1)[0]}"})
    try:
        stack.up(120)
        yield stack
    finally:
        stack.down()


def prometheus(stack: ComposeStack, path: str) -> Any:
    with urllib.request.urlopen(f"{stack.prometheus_url()}{path}", timeout=5) as answer:
        body = json.load(answer)
    assert body["status"] == "success", body
    return body["data"]


def gateway_targets_up(stack: ComposeStack) -> int:
    try:
        targets = prometheus(stack, "/api/v1/targets?state=active")["activeTargets"]
    except OSError:
        return 0  # not listening yet
    return sum(1 for t in targets if t["labels"]["job"] == "gateway" and t["health"] == "up")


def firing(stack: ComposeStack) -> list[dict[str, str]]:
    return [a["labels"] for a in prometheus(stack, "/api/v1/alerts")["alerts"]
            if a["state"] == "firing"]


async def test_prometheus_scrapes_every_replica_and_alerts_when_a_nats_node_dies(
        observed_stack: ComposeStack) -> None:
    stack = observed_stack
    await wait_for(lambda: gateway_targets_up(stack) == stack.gateways, 60,
             "Prometheus to scrape every gateway replica")
    assert prometheus(stack, "/api/v1/rules")["groups"][0]["name"] == "gateway"
    assert firing(stack) == [], "a healthy stack fires nothing"

    node_ids = [http_json(f"{stack.admin_url(i)}/healthz")[1]["node_id"]
                for i in range(stack.gateways)]
    victim = nats_service_of(stack, 0)
    users = [node_ids[i] for i in range(stack.gateways) if nats_service_of(stack, i) == victim]
    await asyncio.to_thread(stack.compose, "kill", victim)

    def reconnect_alerts() -> set[str]:
        return {a["node"] for a in firing(stack) if a["alertname"] == "GatewayBrokerReconnected"}

    await wait_for(lambda: reconnect_alerts() >= set(users), 60,
                   f"GatewayBrokerReconnected for {users} after {victim} was killed")
    assert reconnect_alerts() == set(users), "only the gateways that used the dead node"
    assert all(a["severity"] == "warning" for a in firing(stack)), firing(stack)
