"""The alert rules and the Grafana dashboard that ship (infra/prometheus, infra/grafana):
valid for Prometheus's own tool, unit-tested, and naming only metrics a gateway
exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.helpers import REPO, SioClient, parse_metrics
from tests.unit.conftest import GatewayApp

RULES = REPO / "infra" / "prometheus"
DASHBOARD = REPO / "infra" / "grafana" / "gateway-dashboard.json"
#: a metric name in PromQL: what precedes a selector, a range or an operator
METRIC = re.compile(r"\b((?:gateway|process)_[a-z_]+|up)\b(?!\s*\()")
#: series Prometheus makes itself, not a gateway
PROMETHEUS_OWN = {"up"}


def promtool(*args: str, cwd: Path = RULES) -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `scripts/bootstrap test` installs Debian's prometheus"
    done = subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def alert_exprs() -> dict[str, str]:
    groups = yaml.safe_load((RULES / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_exprs() -> dict[str, str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {f"{p['title']} ({t['refId']})": t["expr"] for p in panels for t in p["targets"]}


def test_the_alert_rules_are_valid_and_their_unit_tests_pass() -> None:
    assert "SUCCESS: 12 rules found" in promtool("check", "rules", "alerts.yml")
    promtool("test", "rules", "alerts_test.yml")


def test_the_compose_profiles_prometheus_config_is_valid() -> None:
    assert "SUCCESS" in promtool("check", "config", "compose.yml")


def test_every_alert_has_a_unit_test() -> None:
    tests = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]
              if case.get("exp_alerts")}
    assert tested == set(alert_exprs())


def test_the_dashboards_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}", "expr": expr}
        for i, expr in enumerate(dashboard_exprs().values())]}]}
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    promtool("check", "rules", "dashboard.yml", cwd=tmp_path)


async def test_alerts_and_dashboard_name_only_metrics_a_gateway_exports(
        two_gateways: list[GatewayApp]) -> None:
    async with aiohttp.ClientSession() as http, \
            http.get(f"{two_gateways[0].url}/metrics") as answer:
        assert answer.status == 200
        text = await answer.text()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                if line and not line.startswith("#")}
    # a labelled family without samples yet (no loss so far) still has its TYPE line
    exported |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert {"process_open_fds", "process_max_fds"} <= exported
    for where, exprs in (("alerts.yml", alert_exprs()), ("the dashboard", dashboard_exprs())):
        for name, expr in exprs.items():
            unknown = set(METRIC.findall(expr)) - exported - PROMETHEUS_OWN
            assert not unknown, f"{where}, {name}: {sorted(unknown)} not on /metrics"


@pytest.mark.parametrize("broken", ["gateway_broker_conected", "process_open_fd"])
def test_the_metric_check_sees_a_misspelt_name(broken: str) -> None:
    assert broken in METRIC.findall(f"increase({broken}[5m]) > 0 and {broken}{{job=\"x\"}}")


async def test_a_chats_publish_time_is_on_metrics(two_gateways: list[GatewayApp],
                                                  clients: list[SioClient]) -> None:
    """What the p99 alert and panel read: one observation per chat published."""
    gw = two_gateways[0]
    c = SioClient("c")
    clients.append(c)
    await c.connect(gw.url)
    await c.join("timed")
    for n in range(3):
        await c.chat("timed", f"chat {n}")
    async with aiohttp.ClientSession() as http, http.get(f"{gw.url}/metrics") as answer:
        metrics = parse_metrics(await answer.text())
    assert metrics["gateway_chat_publish_seconds_count"] == 3
    assert metrics["gateway_chat_publish_seconds_bucket"] > 0
    assert 0 < metrics["gateway_chat_publish_seconds_sum"] < 3 * 2.5
