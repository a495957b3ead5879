"""Two minutes of the soak (``python -m tools.bench.soak``, issue 25's "an hour under
fire" at 1/30 scale): README's cluster with recovery, steady chat and churn, a
reconnect storm every 30 s, a NATS node SIGKILLed and a gateway restarted once.

It asserts the soak's own verdict, the checks the hour is judged by (nothing acked
lost or twice or out of order, no recovery refused, no process dying unasked, the
curves flat after the warm-up). It samples every 5 s, not 10: five faults in two
minutes would leave no window without one to judge the latency by. One difference
is said where it is made: the RSS limit. Two minutes cannot resolve 5 MB per hour
(a fresh gateway's first minutes climb by more than that, and 0.1 MB of noise is
4 MB/h at this length); a real leak (memory per chat, per reconnect) shows at this
scale too, so the test allows what two minutes can tell apart and the hour's run
(docs/RELIABILITY.md) judges 5 MB/h.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

#: MB per hour, extrapolated from the 2-minute run (see the module's docstring)
SHORT_RUN_RSS_LIMIT = 60.0


def test_two_minutes_under_fire_lose_nothing_and_stay_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.bench.soak", "--minutes", "2", "--output", str(out),
         "--rss-limit", str(SHORT_RUN_RSS_LIMIT), "--sample-every", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        log, _ = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:  # its cleanup path stops the cluster, by PID
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    summary = json.loads((out / "summary.json").read_text())
    failed = [c for c in summary["verdict"] if not c["ok"]]
    assert proc.returncode == 0 and not failed, (failed, log[-4000:])
    totals = summary["totals"]
    assert totals["judged"] > 1000 and totals["lost"] == totals["duplicated"] == 0
    assert totals["refused_sessions"] == totals["task_errors"] == 0
    events = summary["events"]
    kinds = [e["kind"] for e in events]
    for kind in ("storm", "kill-nats", "restart-gateway"):
        assert kind in kinds, kinds
    # every storm brought back every client it dropped, recovered
    for storm in (e for e in events if e["kind"] == "storm"):
        assert storm["dropped"] > 0 and storm["recovered"] >= storm["dropped"], storm
    # the supervisor restarted what was killed, and nothing else died
    exits = [e for e in events if e["kind"] == "exit"]
    assert len(exits) == 2 and all(e["planned"] for e in exits), exits
    assert sum(e["kind"] == "back" for e in events) == 2, events
    # every gateway was sampled all along (but while one restarted), and the chart drawn
    samples = summary["samples"]
    assert len(samples) >= 24
    assert sum(bool(s["gw-1.rss_mb"] and s["gw-2.rss_mb"]) for s in samples) >= len(samples) - 1
    assert (out / "soak.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "samples.csv").read_text().count("\n") == len(samples) + 1
