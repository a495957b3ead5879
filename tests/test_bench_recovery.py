"""The benchmark's connection state recovery: ``nats-recovery`` beside ``nats``, and the
``reconnect-storm`` scenario, in a quick run.

It asserts what the benchmark reports (nothing lost, nothing twice, the store's order,
sessions restored with what they missed), never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import REPO
from tools.bench import report as rep
from tools.bench.recovery import COMPARED, StormParams


def test_quick_recovery_bench_restores_every_session_with_what_it_missed(
        tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "--quick", "--backends", "nats,nats-recovery",
         "--scenarios", ",".join([*COMPARED, "reconnect-storm"]), "--output", str(out)],
        capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    for scenario in COMPARED:
        off, on = results["nats"][scenario], results["nats-recovery"][scenario]
        for figures in (off, on):
            assert figures["delivered"] == figures["expected"] > 0, (scenario, figures)
            assert figures["lost"] == figures["duplicated"] == figures["misdelivered"] == 0
            assert figures["out_of_order"] == figures["failures"] == 0
            # the broker's own count of wasted receptions agrees with the gateways'
            check = figures["wasted_cross_check"]
            assert check.get("agree") is True, (scenario, check)
        # the recovery variant really took the stored path: every chat came with its offset
        assert on["with_offsets"] == on["delivered"] and off["with_offsets"] == 0, scenario
    assert "skipped" in results["nats"]["reconnect-storm"]
    storm = results["nats-recovery"]["reconnect-storm"]
    sp = StormParams.of(quick=True)
    assert set(storm) == {"network-drop", "gateway-kill"}
    for phase, sessions in (("network-drop", sp.members), ("gateway-kill", sp.members // 2)):
        f = storm[phase]
        assert f["sessions"] == f["recovered"] == f["server_recovered"] == sessions, (phase, f)
        assert f["refused"] == f["server_refused"] == 0
        assert f["delivered"] == f["expected"] > 0
        assert f["lost"] == f["duplicated"] == f["misdelivered"] == f["out_of_order"] == 0
        assert f["failures"] == 0
        # chat went on while they were away, and each restore replayed all of it
        # before its CONNECT reply
        assert f["sent_while_away"] >= sessions, (phase, f)
        assert f["replayed_while_away"] == f["sent_while_away"]
        assert f["replayed"] >= f["sent_while_away"]
        assert f["recovery_ms"]["n"] == sessions
    md = (out / "results.md").read_text()
    assert "| nats-recovery / nats | fanout |" in md
    assert "| reconnect-storm | nats-recovery / gateway-kill | 50 |" in md


def _storm(**change: Any) -> dict[str, Any]:
    clean = {"lost": 0, "duplicated": 0, "misdelivered": 0, "out_of_order": 0, "failures": 0,
             "refused": 0, "sent_while_away": 40, "replayed_while_away": 40}
    return {"nats-recovery": {"reconnect-storm": {"network-drop": {**clean, **change}}},
            "nats": {"reconnect-storm": {"skipped": "needs connection state recovery"}}}


def test_a_storm_that_refuses_a_session_or_skips_a_replay_fails() -> None:
    assert rep.faults({"results": _storm()}) == []
    assert rep.faults({"results": _storm(refused=2, lost=30)}) == [
        "reconnect-storm/network-drop on nats-recovery: 30 lost, 2 refused"]
    assert rep.faults({"results": _storm(replayed_while_away=39, out_of_order=1)}) == [
        "reconnect-storm/network-drop on nats-recovery: 1 out of order, 1 stored while "
        "away but not replayed"]
    reordered = {"nats-recovery": {"latency": {"lost": 0, "out_of_order": 3}}}
    assert rep.faults({"results": reordered}) == ["latency on nats-recovery: 3 out of order"]
