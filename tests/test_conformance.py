"""The socket.io maintainers' protocol test suites, on our path and on stock.

The suites (``docs/socket.io-protocol/v5-test-suite`` and
``docs/engine.io-protocol/v4-test-suite`` of the socket.io repository) are not
copied into this repository: they are read from the folder named by
``SOCKETIO_CONFORMANCE_DIR``, by default ``shared/conformance`` beside the
repository (``sio/`` and ``eio/``, as the team keeps them). Their npm dependencies
(mocha, chai, ws ...) come from ``tests/conformance/package-lock.json``, installed
by ``scripts/bootstrap test``. Each run copies a suite to a temporary folder,
points it at a server on a free port (the suites hard-code ``localhost:3000``), and
runs it with mocha against ``tests/conformance/server.py``.

Our path must pass every test of both suites, as Node's socket.io does; stock
python-socketio / python-engineio runs in the same test, side by side, for
comparison.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.processes import free_ports, spawn, stop_all
from tests.helpers import REPO

CONFORMANCE = Path(os.environ.get("SOCKETIO_CONFORMANCE_DIR")
                   or REPO.parent / "shared" / "conformance")
DEPENDENCIES = REPO / "tests" / "conformance" / "node_modules"

#: the suites' sizes: our path passes every test of both, as Node's socket.io 4.8
#: does (stock python-socketio 5.18 / python-engineio 4.15 passes 24 and 11, run
#: beside ours for comparison)
SUITE_SIZES = {"eio": 25, "sio": 32}


#: (suite, kind) -> {failed test: mocha's message}, for the assertion messages
FAILURES: dict[tuple[str, str], dict[str, str]] = {}


def run_suite(suite: str, kind: str, workdir: Path, node_bin: str, grep: tuple[str, ...] = ()
              ) -> dict[str, bool]:
    """{test title: passed} for ``suite`` (sio/eio) against a ``kind`` (ours/stock) server."""
    source = CONFORMANCE / suite
    if not (source / "test-suite.js").is_file():
        pytest.fail(f"the protocol test suites are not in {CONFORMANCE} (set "
                    "SOCKETIO_CONFORMANCE_DIR to the folder holding sio/ and eio/)")
    if not (DEPENDENCIES / "mocha").is_dir():
        pytest.fail("tests/conformance/node_modules is missing: run scripts/bootstrap test")
    port = free_ports(1)[0]
    folder = workdir / f"{suite}-{kind}"
    folder.mkdir()
    for name in ("test-suite.js", "node-imports.js"):
        text = (source / name).read_text()
        (folder / name).write_text(text.replace("localhost:3000", f"127.0.0.1:{port}"))
    (folder / "package.json").write_text('{"type": "module"}')
    (folder / "node_modules").symlink_to(DEPENDENCIES)
    server = spawn(f"{suite}-{kind}-server", [sys.executable, str(REPO / "tests" / "conformance"
                                                                   / "server.py"),
                                              suite, kind, str(port)], workdir, cwd=REPO)
    try:
        deadline = time.monotonic() + 20
        while "Running on" not in server.log_path.read_text():
            assert server.alive, server.log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "the conformance server did not start"
            time.sleep(0.05)
        proc = subprocess.run(
            [node_bin, str(DEPENDENCIES / "mocha" / "bin" / "mocha"), "--reporter", "json",
             "--timeout", "3000", "--exit", *grep, "test-suite.js"],
            cwd=folder, capture_output=True, text=True, timeout=240,
            env={**os.environ, "NODE_OPTIONS": "--dns-result-order=ipv4first"})
    finally:
        stop_all([server])
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    results = {t["fullTitle"]: True for t in report["passes"]}
    results.update({t["fullTitle"]: False for t in report["failures"]})
    FAILURES[(suite, kind)] = {t["fullTitle"]: t.get("err", {}).get("message", "")
                               for t in report["failures"]}
    return results


@pytest.mark.parametrize("suite", ["eio", "sio"])
def test_protocol_suite_passes_every_test_on_our_path(suite: str, tmp_path: Path,
                                                      node_bin: str) -> None:
    stock = run_suite(suite, "stock", tmp_path, node_bin)
    ours = run_suite(suite, "ours", tmp_path, node_bin)
    assert ours.keys() == stock.keys() and len(ours) == SUITE_SIZES[suite]
    failures = FAILURES[(suite, "ours")]
    failed = {t: failures[t] for t, ok in ours.items() if not ok}
    if failed:
        # the heartbeat and polling tests wait a few hundred ms: on a loaded machine
        # (two test workers on two cores) one can miss by a tick. Those run again,
        # alone; a real failure fails both times.
        again_dir = tmp_path / "again"
        again_dir.mkdir()
        again = run_suite(suite, "ours", again_dir, node_bin,
                          ("--grep", "|".join(re.escape(t) for t in failed)))
        print(f"{suite}: ran again {sorted(failed)}: {again}")
        failed = {t: m for t, m in failed.items() if not again.get(t)}
    assert not failed, f"fails on our path: {failed}"
    print(f"{suite}: ours {sum(ours.values())}/{len(ours)}, "
          f"stock {sum(stock.values())}/{len(stock)}")


def test_the_suites_dependencies_are_locked() -> None:
    lock = json.loads((REPO / "tests" / "conformance" / "package-lock.json").read_text())
    wanted = json.loads((REPO / "tests" / "conformance" / "package.json").read_text())
    for name in wanted["devDependencies"]:
        assert lock["packages"][f"node_modules/{name}"]["version"] == \
            wanted["devDependencies"][name]
    assert shutil.which("node") is not None
