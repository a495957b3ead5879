"""The path of one chat through our code is short enough to follow by reading.

Two gateway apps (the real ``create_app``, chat handler and guards) on one memory
bus, a client on each. While one chat travels, a profiler takes the call stack at two
points: where the sender's node hands the envelope to its broker, and where the
receiving node first hands a frame to the recipient's connection. The files of ours on
those two stacks are the chain a reader follows from ``on_chat`` to the remote
socket's send (leaf helpers called on the way, such as the channel-name encoder or
the codec, return before the chain goes on and are not on it). README's architecture
section prints the same chain.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import FrameType
from typing import Any

from tests.helpers import REPO, SioClient
from tests.unit.conftest import GatewayApp

OURS = (str(REPO / "nats_adapter"), str(REPO / "gateway"))
MAX_FILES = 8


def our_stack(frame: FrameType | None) -> list[str]:
    """The files of ours on the stack from ``frame`` outwards, outermost first."""
    files: list[str] = []
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(OURS) and (not files or files[-1] != name):
            files.append(name)
        frame = frame.f_back
    return [str(Path(f).relative_to(REPO)) for f in reversed(files)]


async def test_one_chat_crosses_at_most_eight_files_of_ours(
        two_gateways: list[GatewayApp], clients: list[SioClient]) -> None:
    a, b = SioClient("a"), SioClient("b")
    clients += [a, b]
    await a.connect(two_gateways[0].url)
    await b.connect(two_gateways[1].url)
    for c in (a, b):
        assert (await c.call("join", "lobby"))["ok"]
    sent: list[str] = []
    delivered: list[str] = []

    def profile(frame: FrameType, event: str, _arg: Any) -> None:
        if event != "call":
            return
        name = frame.f_code.co_filename
        if not sent and name.endswith("/brokers/memory.py") \
                and frame.f_code.co_name == "publish":
            sent.extend(our_stack(frame))
        elif sent and not delivered and name.endswith("/_engineio/connection.py"):
            stack = our_stack(frame)
            if any(f.endswith("ingest.py") for f in stack):
                delivered.extend(stack)

    sys.setprofile(profile)
    try:
        assert (await a.call("chat", {"room": "lobby", "text": "hi"}))["ok"]
        await b.wait_texts(["hi"])
    finally:
        sys.setprofile(None)
    assert sent[0] == "gateway/chat.py" and sent[-1] == "nats_adapter/brokers/memory.py", sent
    assert delivered[-1] == "nats_adapter/_engineio/connection.py", delivered
    chain = list(dict.fromkeys(sent + delivered))
    assert len(chain) <= MAX_FILES, chain
    readme = (REPO / "README.md").read_text()
    drawn = " → ".join(f"`{Path(f).name}`" for f in chain)
    assert drawn.replace("`memory.py`", "`nats.py`") in readme, drawn
