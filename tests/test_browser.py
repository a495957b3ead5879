"""Headless Chromium on the chat page of one gateway, a Node client on another."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from gateway.processes import GatewayNode, NatsCluster
from tests.helpers import REPO, wait_room_interest

pytestmark = pytest.mark.browser


async def test_browser_page_chats_with_node_client_across_gateways(
        gateway_procs: list[GatewayNode], nats_cluster: NatsCluster, node_bin: str,
        chromium_bin: str, tmp_path: Path) -> None:
    room = f"browser-{uuid.uuid4().hex[:6]}"
    shot = tmp_path / "page.png"
    proc = await asyncio.create_subprocess_exec(
        node_bin, str(REPO / "tests" / "js" / "browser_chat.mjs"), gateway_procs[0].url,
        gateway_procs[1].url, room, chromium_bin, cwd=REPO,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "SCREENSHOT": str(shot), "HOME": str(tmp_path)})
    assert proc.stdin is not None and proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        if first.startswith(b'{"joined"'):
            await wait_room_interest([n.monitor_url for n in nats_cluster.nodes], room)
            proc.stdin.write(b"chat\n")
            await proc.stdin.drain()
        rest, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stdout = (first + rest).decode()
    assert proc.returncode == 0, stdout + stderr.decode()
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["errors"] == []
    assert [m["text"] for m in result["page"]] == ["hello browser"]
    assert result["page"][0]["from"] == result["nodeId"]
    assert result["page"][0]["name"] == "bob"
    assert [m["text"] for m in result["node"]] == ["hello node"]
    assert result["node"][0]["from"] == result["pageId"]
    assert result["node"][0]["name"] == "alice"
    assert result["node"][0]["room"] == room
    # what the page shows: its name and gateway, the room with both members (one on
    # each gateway), the chat under the sender's name, its own under "me"
    shown = result["shown"]
    page_node = gateway_procs[0].node_id
    assert shown["status"].startswith(f"connected as alice on gateway {page_node} ("), shown
    assert shown["rooms"] == [[room, "2", "current"]], shown
    assert ["", f"[{room}] bob: hello browser"] in shown["log"], shown["log"]
    assert ["me", f"[{room}] me: hello node"] in shown["log"], shown["log"]
    assert not [text for cls, text in shown["log"] if cls == "err"], shown["log"]
    assert png_size(shot) == (1280, 720)  # a whole page was drawn


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_page_is_served_with_the_npm_client(gateway_procs: list[GatewayNode]) -> None:
    import urllib.request

    with urllib.request.urlopen(gateway_procs[1].url + "/") as resp:
        html = resp.read().decode()
    assert '<script src="/vendor/socket.io.min.js">' in html
    with urllib.request.urlopen(gateway_procs[1].url + "/vendor/socket.io.min.js") as resp:
        body = resp.read()
    installed = (REPO / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js")
    assert body == installed.read_bytes()
