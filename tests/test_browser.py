"""Headless Chromium on the chat page of one gateway, a Node client on another."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from gateway.processes import GatewayNode
from tests.helpers import REPO

pytestmark = pytest.mark.browser


def test_browser_page_chats_with_node_client_across_gateways(
        gateway_procs: list[GatewayNode], node_bin: str, chromium_bin: str,
        tmp_path: Path) -> None:
    room = f"browser-{uuid.uuid4().hex[:6]}"
    shot = tmp_path / "page.png"
    proc = subprocess.run(
        [node_bin, str(REPO / "tests" / "js" / "browser_chat.mjs"), gateway_procs[0].url,
         gateway_procs[1].url, room, chromium_bin],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "SCREENSHOT": str(shot), "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert [m["text"] for m in result["page"]] == ["hello browser"]
    assert result["page"][0]["from"] == result["nodeId"]
    assert [m["text"] for m in result["node"]] == ["hello node"]
    assert result["node"][0]["from"] == result["pageId"]
    assert result["node"][0]["room"] == room
    assert shot.stat().st_size > 0


def test_page_is_served_with_the_npm_client(gateway_procs: list[GatewayNode]) -> None:
    import urllib.request

    with urllib.request.urlopen(gateway_procs[1].url + "/") as resp:
        html = resp.read().decode()
    assert '<script src="/vendor/socket.io.min.js">' in html
    with urllib.request.urlopen(gateway_procs[1].url + "/vendor/socket.io.min.js") as resp:
        body = resp.read()
    installed = (REPO / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js")
    assert body == installed.read_bytes()
