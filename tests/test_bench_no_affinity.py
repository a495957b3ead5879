"""`python -m gateway bench --quick --scenario no-affinity`: default-mode clients
through a round-robin front lose nothing and get nothing twice.

It asserts what the scenario counts, never how fast anything was.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO
from tools.bench.no_affinity import MODES, PHASES, NoAffinityParams


def test_quick_no_affinity_loses_and_doubles_nothing_through_the_front(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "gateway", "bench", "--quick", "--scenario",
                           "no-affinity", "--backends", "nats", "--runs", "1",
                           "--output", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    configs = report["results"]["nats"]["no-affinity"]["configs"]
    p = NoAffinityParams.of(quick=True)
    assert [c["gateways"] for c in configs] == list(p.gateway_counts)
    for config in configs:
        for mode in MODES:
            run = config[mode]
            assert run["upgraded"] == p.sockets
            assert run["join_failures"] == run["unexpected_closes"] == run["refused"] == 0
            for phase in PHASES:
                f = run[phase]
                assert f["delivered"] == f["expected"] > 0, (config["gateways"], mode, phase)
                assert f["lost"] == f["duplicated"] == f["misdelivered"] == f["failures"] == 0
        # direct: nothing forwarded; through the front: upgrades landed on non-owners,
        # which took their sessions over (--upgrade-move on, the default)
        assert config["direct"]["relayed_websockets"] == config["direct"]["forwarded_polls"] \
            == config["direct"]["moved_websockets"] == 0
        assert config["front"]["moved_websockets"] > 0
        assert config["front"]["forwarded_polls"] > 0
        # (quick runs are too short for the CPU figures: clock ticks of 10 ms)
        assert set(config["ratio"]) == set(PHASES)
    assert "No affinity (nats)" in (out / "results.md").read_text()
