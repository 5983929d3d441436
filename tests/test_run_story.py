"""The parent run's summary and the metric names a compare view reads."""
from __future__ import annotations

from deploy.gate import GateCheck, GateDecision
from flows.run_story import LatencyPoint, latency_metrics, round_metrics, round_params, summary_markdown
from pfp.results import BaseInfo, RoundResult


def _base() -> BaseInfo:
    return BaseInfo(base_path="b.pt", run_dir="r", acc=91.234, loss=0.3, params=1000, flops=5000, trained_now=False,
                    data_hash="d", calib_size=64, holdout_size=64)


def _round(n: int, acc: float, removed: float) -> RoundResult:
    return RoundResult(method="pfp", target="flops", keep_ratio=1 - removed / 100, round=n, acc=acc,
                       acc_change=acc - 91.234, flops_removed_pct=removed, params_removed_pct=removed / 2,
                       flops=int(5000 * (1 - removed / 100)), params=900)


def test_summary_names_the_chosen_round_the_gate_and_the_version():
    rounds = [_round(1, 90.9, 50.0), _round(2, 88.0, 70.0),
              RoundResult.failed("pfp", "flops", 0.15, ValueError("target below the floor"), round=3)]
    latency = {0: [LatencyPoint(target="cpu", batch=32, p50_ms=2.0, speedup=1.0)],
               1: [LatencyPoint(target="cpu", batch=32, p50_ms=1.0, speedup=2.0)]}
    decision = GateDecision(checks=[GateCheck(name="cpu.b32.p50_speedup", verdict="passed", value=2.0, limit=1.5,
                                              ci_low=1.8, ci_high=2.2)])
    md = summary_markdown("quickstart: lenet5", _base(), rounds, latency, 0, decision, "3", True, 1.0)
    assert "| **1** ✓ | 50% | 90.9 | -0.334 | 50.0% | 25.0% | 1 (2.00x) |" in md
    assert "| 0 (unpruned) | 100% | 91.23 |" in md
    assert "error: ValueError: target below the floor" in md
    assert "**Gate: passed** – promoted to champion" in md
    assert "| cpu.b32.p50_speedup | passed | 2 [1.8, 2.2] | 1.5 |" in md
    assert "version **3**" in md


def test_metric_names_carry_units_and_rounded_values():
    m = round_metrics(_round(1, 90.91234, 49.987))
    assert m["acc_pct"] == 90.91 and m["flops_removed_pct"] == 50.0 and m["acc_change_pts"] == -0.32
    lat = latency_metrics([LatencyPoint(target="ort-cpu", batch=32, p50_ms=1.23456, speedup=1.98765)])
    assert lat == {"latency_p50_ms.ort-cpu.b32": 1.235, "latency_p99_ms.ort-cpu.b32": None,
                   "throughput_per_s.ort-cpu.b32": None, "speedup.ort-cpu.b32": 1.988}
    # None means the method's default: the param shows which (pfp: search allocation, reconstruction)
    assert round_params({"method": "pfp", "target": "flops", "bn_recalibration": True, "allocation": None,
                         "reconstruct": None}, 0.5) == {
        "prune.method": "pfp", "prune.target": "flops", "prune.bn_recalibration": "True", "prune.keep_ratio": "0.5",
        "prune.allocation": "search", "prune.reconstruct": "True"}
