"""The soak's verdict on made-up samples: what counts as flat, how a restarted gateway's
curve is cut, and that its arguments are checked (tools/bench/soak.py,
soak_report.py). The soak itself runs in tests/test_soak.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tools.bench import soak_report as rep
from tools.bench.soak import parse_args

LIMITS = rep.Limits(warmup_s=60, restart_warmup_s=30, js_after_s=600)


def samples(minutes: int = 60, rss: Any = None, pid: Any = None, subs_sid: int = 10,
            p99: Any = None) -> list[dict[str, Any]]:
    out = []
    for k in range(minutes * 6 + 1):
        t = k * 10.0
        out.append({
            "t": t, "clients_connected": 200, "broker_subscriptions": 100 + subs_sid,
            "subs_sid": subs_sid, "js_storage_mb": 5.0 if t > 600 else t / 120,
            "latency_p99_ms": p99(t) if p99 else 50.0,
            "gw-1.pid": pid(t) if pid else 1, "gw-1.rss_mb": rss(t) if rss else 60.0,
            "gw-1.fds": 100,
        })
    return out


def by_name(checks: list[rep.Check]) -> dict[str, rep.Check]:
    return {c.name: c for c in checks}


def test_a_flat_hour_passes_and_a_leak_fails() -> None:
    totals = {"judged": 1000}
    ok = by_name(rep.verdict(samples(), [], totals, LIMITS))
    assert all(c.ok for c in ok.values()), [c for c in ok.values() if not c.ok]
    assert ok["gw-1 RSS growth"].value == 0
    # 6 MB an hour, every sample: over the 5 MB limit
    leak = by_name(rep.verdict(samples(rss=lambda t: 60 + 6 * t / 3600), [], totals, LIMITS))
    assert not leak["gw-1 RSS growth"].ok
    assert leak["gw-1 RSS growth"].value == pytest.approx(6.0)


def test_a_restart_is_a_new_process_not_memory_given_back() -> None:
    # each process climbs 4 MB/h, and a restart at 30 min drops RSS by 50 MB: fitted
    # across the cut, that is a steep fall; per process, the 4 MB/h it is
    def rss(t: float) -> float:
        return (100 + 4 * t / 3600) if t < 1800 else (50 + 4 * (t - 1800) / 3600)

    checks = by_name(rep.verdict(samples(rss=rss, pid=lambda t: 1 if t < 1800 else 2), [],
                                 {"judged": 1}, LIMITS))
    assert checks["gw-1 RSS growth"].value == pytest.approx(4.0)
    assert checks["gw-1 RSS growth"].ok
    segments = rep.gateway_segments(samples(pid=lambda t: 1 if t < 1800 else 2), "gw-1",
                                    "rss_mb", 60, 30)
    assert [seg[0][0] for seg in segments] == [60.0, 1830.0]


def test_losses_refusals_and_unbounded_sid_subscriptions_fail() -> None:
    totals = {"judged": 10, "lost": 1, "duplicated": 0, "refused_sessions": 2}
    checks = by_name(rep.verdict(samples(subs_sid=203), [], totals, LIMITS))
    assert not checks["lost"].ok and checks["duplicated"].ok
    assert not checks["refused_sessions"].ok
    # 200 clients, one gateway: at most 201 per-sid subscriptions
    assert checks["sid subscriptions bounded by sockets"].value == 2
    assert not by_name(rep.verdict(samples(), [], {"judged": 0}, LIMITS))["chats judged"].ok


def test_latency_spikes_of_faults_are_drawn_but_not_fitted() -> None:
    faults = [{"t": float(t), "kind": "kill-nats"} for t in range(600, 3600, 600)]

    def p99(t: float) -> float:  # 10 s in the windows after each fault, late in the run
        return 10000.0 if t > 1800 and any(0 <= t - f["t"] <= 20 for f in faults) else 50.0

    run = samples(p99=p99)
    assert by_name(rep.verdict(run, faults, {"judged": 1}, LIMITS))["chat p99 flat"].ok
    # a p99 that doubles and more for good half way through is not flat
    worse = samples(p99=lambda t: 50.0 if t < 1800 else 160.0)
    check = by_name(rep.verdict(worse, faults, {"judged": 1}, LIMITS))["chat p99 flat"]
    assert not check.ok and check.value == 160.0 and check.limit == 100.0


def test_storage_is_judged_only_after_the_stream_retention() -> None:
    short = samples(minutes=5)
    check = by_name(rep.verdict(short, [], {"judged": 1}, LIMITS))["JetStream storage growth"]
    assert check.ok and check.value is None and "not judged" in check.how
    check = by_name(rep.verdict(samples(), [], {"judged": 1}, LIMITS))["JetStream storage growth"]
    assert check.ok and check.value == 0


def test_csv_and_chart(tmp_path: Path) -> None:
    run = samples(minutes=3)
    rep.write_csv(tmp_path / "s.csv", run)
    header = (tmp_path / "s.csv").read_text().splitlines()[0].split(",")
    assert header[: len(rep.COLUMNS)] == list(rep.COLUMNS)
    assert "gw-1.rss_mb" in header
    rep.draw(tmp_path / "s.png", run, [{"t": 60.0, "kind": "storm"}], 30, "test")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("argv", "flag"), [
    (["--minutes", "0"], "--minutes"),
    (["--minutes", "2", "--gateways", "1"], "--gateways"),
    (["--minutes", "2", "--storm-every", "-5"], "--storm-every"),
    (["--minutes", "2", "--storm-share", "2"], "--storm-share"),
    (["--minutes", "2", "--rooms", "3", "--rooms-per-client", "3"], "--rooms-per-client"),
])
def test_a_bad_flag_is_named(argv: list[str], flag: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args([*argv, "--output", "/nonexistent"])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_intervals_scale_so_a_short_run_sees_every_fault() -> None:
    hour = parse_args(["--minutes", "60", "--output", "x"])
    assert [hour.every(k) for k in ("storm", "kill-nats", "restart-gateway")] == [300, 600, 900]
    short = parse_args(["--minutes", "2", "--output", "x"])
    for kind in ("storm", "kill-nats", "restart-gateway"):
        times = short.times(kind)
        assert times and all(0 < t < 120 for t in times), (kind, times)
    starts = [t for k in ("storm", "kill-nats", "restart-gateway") for t in short.times(k)]
    assert len(set(starts)) == len(starts)  # no two faults begin together


def test_a_finished_run_is_judged_again_from_its_summary(tmp_path: Path) -> None:
    import json

    params = {"minutes": 60, "clients": 200, "rooms": 40, "rate": 40.0, "warmup_s": 600.0,
              "restart_warmup_s": 600.0, "rss_limit": 5.0, "sample_every": 10.0}
    run = samples(rss=lambda t: 60 + 6 * t / 3600)
    (tmp_path / "summary.json").write_text(json.dumps(
        {"params": params, "samples": run, "events": [], "totals": {"judged": 5}}))
    assert rep.main([str(tmp_path)]) == 1  # 6 MB/h
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["faults"]["storms"] == 0
    assert rep.main([str(tmp_path), "--rss-limit", "7"]) == 0
    assert (tmp_path / "soak.png").exists() and (tmp_path / "samples.csv").exists()
