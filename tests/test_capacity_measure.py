"""`python -m tools.capacity measure` on real nats-server processes, at a small size.

It checks that the measurement runs and reports every constant the model takes (it
fails unless every server learnt every subject over the routes); the figures
themselves are measured by running it, not asserted by a test.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_measure_reports_every_constant_of_the_model() -> None:
    proc = subprocess.run([sys.executable, "-m", "tools.capacity", "measure", "--subjects",
                           "3000", "--seconds", "0.5", "--messages", "3000"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["subjects"] == 3000
    assert out["churn"]["ops"] > 0 and out["messages"]["count"] == 3000
    # CPU figures are whole clock ticks at this size: present, never negative
    figures = [*out["memory_bytes_per_entry"].values(), *out["cpu_us_per_subscribe"].values(),
               *out["churn"]["cpu_us_per_op"].values(),
               out["messages"]["cpu_us_per_msg_publishing_server"],
               out["messages"]["cpu_us_per_msg_receiving_server"]]
    assert len(figures) == 8 and all(isinstance(f, int | float) for f in figures)
    assert all(f >= 0 for f in figures[2:])
