"""`python -m gateway bench --quick`: every backend and scenario, nothing lost.

A smoke run on tiny parameters. It asserts what the benchmark reports, never how
fast anything was: speed is measured by the benchmark itself, not by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO
from tools.bench.backends import BENCH_BACKENDS
from tools.bench.runner import SCENARIOS


def test_quick_bench_covers_everything_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "gateway", "bench", "--quick", "--output",
                           str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stock-redis: reference on 3 gateways" in proc.stderr, "progress is shown"
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == set(BENCH_BACKENDS)
    (send_us,) = report["loopback_send_us"]  # one run
    assert 0 < send_us < 1000
    for backend, scenarios in report["results"].items():
        expected = set(SCENARIOS) - ({"memory", "idle"} if backend == "redis-cluster-classic"
                                     else set())
        assert set(scenarios) == expected, backend
        phases = [*scenarios["reference"].values()]
        phases += [scenarios[s] for s in ("fanout", "fanout-upgrade", "many-rooms", "latency",
                                          "latency-upgrade", "churn")]
        for figures in phases:
            assert figures["delivered"] == figures["expected"] > 0, (backend, figures)
            assert figures["lost"] == figures["duplicated"] == figures["misdelivered"] == 0
            assert figures["failures"] == 0
            assert figures["cpu_s_per_1000_deliveries"] is not None
            assert figures["total_cpu_s_per_1000_deliveries"] >= \
                figures["cpu_s_per_1000_deliveries"]
            assert figures["latency_ms"]["all"]["p99"] is not None
            # latency ends when a chat reached its client's socket (the kernel's time),
            # before this one load generator process got round to it
            arrived, handled = figures["latency_ms"]["all"], figures["latency_handled_ms"]["all"]
            assert handled["n"] > 0
            assert arrived["p50"] < handled["p50"], (backend, arrived, handled)
            # bytes on the sockets, the same way for every broker
            assert figures["broker_bytes_counted"] == "on the sockets (ss -tin)"
            assert figures["broker_bytes_total"] > 0 and figures["broker_node_bytes_total"] > 0
            assert figures["broker_sockets_vanished"] == 0
            # the broker's own count of wasted receptions matches the gateways'
            check = figures["wasted_cross_check"]
            assert check["agree"] in (True, None), (backend, check)
        api = scenarios["cluster-api"]
        if backend in ("nats", "redis-sharded"):
            assert set(api) == {"all_alive_ms", "one_stopped_ms", "after_heartbeats_missed_ms"}
        else:
            assert "skipped" in api
        if "memory" in scenarios:
            assert scenarios["memory"]["plain"]["deflate_negotiated"] == 0
            assert scenarios["memory"]["plain"]["rss_bytes_per_socket"] > 0
            assert scenarios["memory"]["upgraded"]["upgraded"] > 0
            assert scenarios["memory"]["plain"]["join_failures"] == 0
        if "idle" in scenarios:
            idle = scenarios["idle"]
            assert idle["alive_at_end"] == idle["sockets"] and idle["unexpected_closes"] == 0
            assert idle["cpu_ms_per_s_per_1k"] is not None
    # the problem we solve, visible in the report: rooms that live on one gateway cost
    # the other gateways nothing with per-room channels, and everything with one channel
    local = {b: s["reference"]["ten-local-rooms"] for b, s in report["results"].items()}
    assert local["nats"]["wasted_receptions"] == 0
    assert local["redis-sharded"]["wasted_receptions"] == 0
    assert local["stock-redis"]["wasted_receptions"] > 0
    assert local["redis-cluster-classic"]["wasted_receptions"] > 0
    for backend in ("nats", "stock-redis"):  # counted by the broker too
        check = local[backend]["wasted_cross_check"]
        assert check["agree"] is True
        assert check["wasted_by_broker"] == local[backend]["wasted_receptions"]
    assert set(local["nats"]["wasted_cross_check"]["per_gateway"]) == {
        f"nats-gw3-{i}" for i in (1, 2, 3)}
    # classic PUBLISH on a Redis Cluster copies every message to every node over the
    # cluster bus: counted in all broker-node bytes, as NATS routes are
    classic = local["redis-cluster-classic"]
    assert classic["broker_inter_node_bytes_total"] > classic["broker_bytes_total"]
    assert local["stock-redis"]["broker_inter_node_bytes_total"] == 0, "one server, no bus"
    md = (out / "results.md").read_text()
    for backend in BENCH_BACKENDS:
        assert f"| {backend} |" in md
    assert (out / "cpu.png").stat().st_size > 0 and (out / "broker-bytes.png").stat().st_size > 0


def test_quick_bench_runs_the_node_peer_and_it_loses_nothing(tmp_path: Path) -> None:
    """The optional Node socket.io peer (server.mjs on a Redis Cluster) answers the load
    generator's chat protocol: every delivery arrives once, nothing is refused."""
    from tools.bench import node_peer

    assert node_peer.problem() is None, node_peer.problem()
    out = tmp_path / "bench"
    scenarios = ["fanout", "fanout-upgrade", "latency", "latency-upgrade", "memory", "idle",
                 "cluster-api"]
    proc = subprocess.run([sys.executable, "-m", "gateway", "bench", "--quick", "--backends",
                           "node-peer", "--scenarios", ",".join(scenarios), "--output",
                           str(out)], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"node-peer"}
    peer = results["node-peer"]
    assert set(peer) == set(scenarios)
    for scenario in ("fanout", "fanout-upgrade", "latency", "latency-upgrade"):
        figures = peer[scenario]
        assert figures["delivered"] == figures["expected"] > 0, (scenario, figures)
        assert figures["lost"] == figures["duplicated"] == figures["misdelivered"] == 0
        assert figures["failures"] == 0
        assert figures["cpu_s_per_1000_deliveries"] is not None
        assert figures["latency_ms"]["cross"]["n"] > 0, "members on both peers"
        assert figures["wasted_receptions"] == 0, "per-room shard channels"
        assert figures["wasted_cross_check"]["agree"] is True
    assert peer["memory"]["upgraded"]["upgraded"] > 0
    assert peer["memory"]["plain"]["join_failures"] == 0
    assert peer["idle"]["alive_at_end"] == peer["idle"]["sockets"]
    assert "skipped" in peer["cluster-api"]
    assert "| node-peer |" in (out / "results.md").read_text()


def test_the_fanout_window_keeps_that_many_chats_of_a_sender_in_flight(
        tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "gateway", "bench", "--quick", "--backends",
                           "nats", "--scenarios", "fanout", "--fanout-window", "4",
                           "--output", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["scenarios"]["fanout"]["window"] == 4
    figures = report["results"]["nats"]["fanout"]
    assert figures["delivered"] == figures["expected"] > 0
    assert figures["lost"] == figures["duplicated"] == figures["failures"] == 0
    assert figures["joins_refused"] == 0


def test_clients_that_offer_deflate_are_served_by_every_backend(tmp_path: Path) -> None:
    """``--client-deflate``: the clients offer permessage-deflate as browsers do;
    stock accepts it (and pays for it), ours declines; nothing is lost either way."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "gateway", "bench", "--quick", "--backends",
                           "nats,stock-redis", "--scenarios", "fanout", "--client-deflate",
                           "--output", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert "offered" in report["scenarios"]["fanout"]["client_deflate"]
    for backend in ("nats", "stock-redis"):
        figures = report["results"][backend]["fanout"]
        assert figures["delivered"] == figures["expected"] > 0, backend
        assert figures["lost"] == figures["duplicated"] == figures["failures"] == 0


def test_without_matplotlib_the_report_is_written_without_charts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tools.bench import report as rep

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the bench extra is missing
    assert "pip install" in (rep.charts_problem() or "")
    report = {"results": {"nats": {}}, "machine": rep.machine(), "scenarios": {}}
    paths = rep.write(report, tmp_path)
    assert set(paths) == {"json", "markdown"}
    assert json.loads(paths["json"].read_text())["results"] == {"nats": {}}
    assert not list(tmp_path.glob("*.png"))


def test_a_run_that_misdelivers_or_refuses_fails() -> None:
    from tools.bench import report as rep

    clean = {"lost": 0, "duplicated": 0, "misdelivered": 0, "failures": 0}
    results = {"nats": {"fanout": dict(clean), "latency": {**clean, "misdelivered": 2},
                        "churn": {**clean, "failures": 3}},
               "stock-redis": {"fanout": dict(clean)}}
    assert rep.faults({"results": results}) == ["latency on nats: 2 misdelivered",
                                                "churn on nats: 3 refused"]
    assert rep.faults({"results": {"nats": {"fanout": clean}}}) == []


def test_a_refused_join_in_any_scenario_fails_the_run_and_is_reported() -> None:
    """A join the gateways refused (set-up or churn) leaves the scenario measuring
    rooms other than it set up: the run fails, and the report says where."""
    from tools.bench import report as rep

    clean = {"lost": 0, "duplicated": 0, "misdelivered": 0, "failures": 0}
    results = {"nats": {"many-rooms": {**clean, "joins_refused": 4},
                        "churn": {**clean, "joins_refused": 0}},
               "node-peer": {"many-rooms": {**clean, "joins_refused": 1}}}
    assert rep.faults({"results": results}) == [
        "many-rooms on nats: 4 joins or leaves refused",
        "many-rooms on node-peer: 1 joins or leaves refused"]
    for backend in results.values():
        for scenario in backend.values():
            scenario["wasted_receptions"] = 0
    text = rep.markdown({"results": results})
    assert "churn (nats) 0; many-rooms (nats) 4; many-rooms (node-peer) 1." in text


def test_the_load_generator_counts_refused_joins_and_leaves() -> None:
    from tools.bench.harness import LoadGenProcess

    replies = iter([{"failures": 2}, {"failures": 3}, {"failures": 0, "churn": {"failures": 1}},
                    {"failures": 1}])
    lg = LoadGenProcess.__new__(LoadGenProcess)  # no process: its replies are given
    lg.joins_refused = 0
    lg.send = lambda **cmd: None  # type: ignore[method-assign]
    lg.reply = lambda: next(replies)  # type: ignore[method-assign]
    lg.call(op="join", pairs=[])
    lg.call(op="join", pairs=[], leave=True)
    lg.call(op="churn")
    lg.call(op="paced", plan=[])  # a chat refused is not a join refused
    assert lg.joins_refused == 6


def test_a_wasted_count_the_broker_disputes_is_flagged() -> None:
    from tools.bench import report as rep

    clean = {"lost": 0, "duplicated": 0, "misdelivered": 0, "failures": 0}
    agreed = {**clean, "wasted_receptions": 5,
              "wasted_cross_check": {"wasted_by_broker": 5, "agree": True}}
    disputed = {**clean, "wasted_receptions": 0,
                "wasted_cross_check": {"wasted_by_broker": 7, "agree": False}}
    assert rep.wasted_cell(agreed) == "5 (5)"
    assert "disagrees" in rep.wasted_cell(disputed)
    report = {"results": {"nats": {"fanout": agreed, "latency": disputed}}}
    assert rep.disagreements(report) == [
        "latency on nats: gateways counted 0 wasted receptions, the broker 7"]


def _figures(cpu: float, lost: int = 0) -> dict[str, Any]:
    return {"cpu_s_per_1000_deliveries": cpu, "lost": lost, "duplicated": 0,
            "misdelivered": 0, "failures": 0, "wasted_receptions": 0,
            "latency_ms": {"all": {"p50": 1.0, "p99": 2.0, "p999": 3.0},
                           "cross": {"p99": 2.5}}}


def _three_runs(nats_cpu: float) -> dict[str, Any]:
    """A report of three runs of fanout-upgrade (as the bench writes its JSON)."""
    from tools.bench import runs

    every = [{"nats": {"fanout-upgrade": _figures(nats_cpu * k)},
              "stock-redis": {"fanout-upgrade": _figures(0.040 * k)},
              "node-peer": {"fanout-upgrade": _figures(0.006 * k)}} for k in (1.0, 1.1, 0.9)]
    return {"results": runs.aggregate(every), "runs": every, "scenarios": {},
            "machine": {"cpu": "x", "cores": "2", "python": "3", "kernel": "k"},
            "finished": "now", "command": "python -m gateway bench --runs 3",
            "seconds": 1.0}


def _row(section: str, start: str) -> str:
    return next(line for line in section.splitlines() if line.startswith(f"| {start}"))


def test_the_targets_section_is_derived_from_the_json() -> None:
    from tools.bench import targets

    stock_upgrade = "fan-out CPU per delivery, polling-then-upgrade clients"
    fast = targets.markdown(_three_runs(nats_cpu=0.005))  # 8x stock, ahead of Node
    assert "**met**: 8.00x [8.00-8.00]" in _row(fast, stock_upgrade)
    assert "**met**: 1.20x" in _row(fast, "... and at or below the Node peer's")
    assert "**met**" in _row(fast, "0 lost")
    slow = targets.markdown(_three_runs(nats_cpu=0.008))  # the same run, ours slower
    assert "not met: 5.00x" in _row(slow, stock_upgrade)
    assert "not met: 0.75x" in _row(slow, "... and at or below the Node peer's")
    assert "not measured" in _row(slow, "idle sockets: <= 7.5 KB"), "no idle scenario ran"
    # one loss in one run fails the target, though the median of the runs is 0
    report = _three_runs(nats_cpu=0.005)
    report["runs"][1]["nats"]["fanout-upgrade"]["lost"] = 1
    assert "not met: 1 / 0 / 0 / 0" in _row(targets.markdown(report), "0 lost")
    # with the cost of one loopback send measured in each run, the row says how far
    # ahead of stock one send per delivery allows: stock's 40, 44, 36 us over 5, 4, 4
    report = _three_runs(nats_cpu=0.008)
    report["loopback_send_us"] = [5.0, 4.0, 4.0]
    assert "one loopback send costs 4.00 [4.00-5.00] us here, so one send per delivery " \
           "caps this ratio at 9.00x [8.00-11.00]" in _row(targets.markdown(report),
                                                          stock_upgrade)
    assert "caps" not in _row(targets.markdown(report), "... and at or below the Node")
    report["loopback_send_us"] = [5.0, None, 4.0]  # not measured in the second run
    assert "costs 4.50 [4.00-5.00] us here, so one send per delivery caps this ratio at " \
           "8.50x [8.00-9.00]" in _row(targets.markdown(report), stock_upgrade)


def test_several_runs_show_medians_and_ranges_and_any_runs_faults() -> None:
    from tools.bench import report as rep

    report = _three_runs(nats_cpu=0.005)
    report["runs"][2]["nats"]["fanout-upgrade"]["lost"] = 2
    assert report["results"]["nats"]["fanout-upgrade"]["lost"] == 0, "the median hides it"
    table = rep.markdown(report)
    row = _row(table, "fanout-upgrade | nats")
    assert "0.0050 [0.0045-0.0055] (8.00x [8.00-8.00])" in row
    assert row.endswith("| 2 / 0 / 0 / 0 |"), "losses are added up over the runs"
    assert rep.faults(report) == ["run 3: fanout-upgrade on nats: 2 lost"]


def test_benchmarks_md_keeps_hand_written_sections(tmp_path: Path) -> None:
    from tools.bench import report as rep
    from tools.bench import scale_report

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Measured by hand\n\nkept\n")
    report = _three_runs(nats_cpu=0.005)
    scale_report.write_benchmarks_md(path, report, rep.benchmarks_md(report))
    first = path.read_text()
    assert first.index("## Latest comparison") < first.index("## Measured by hand")
    assert "8.00x [8.00-8.00]" in first and "kept" in first
    report = _three_runs(nats_cpu=0.008)  # the next run replaces its own section only
    scale_report.write_benchmarks_md(path, report, rep.benchmarks_md(report))
    second = path.read_text()
    assert second.count(scale_report.MAIN_START) == 1 and "kept" in second
    assert "not met: 5.00x" in second and "8.00x [8.00-8.00]" not in second
