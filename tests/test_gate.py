"""The promotion gate on hand-made measurements: pure Python, no MLflow."""
from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from deploy.gate import GateConfig, GateDecision, LatencyCheck, evaluate_gate


def rows(**p50_by_batch: float) -> list[dict]:
    """Latency results as dataclasses.asdict(LatencyResult) gives them (the fields the gate reads)."""
    from export.latency import LatencyResult

    out = []
    for key, p50 in p50_by_batch.items():
        r = LatencyResult.from_times([p50] * 9 + [p50 * 1.5], backend="ort-cpu", device="cpu", precision="fp32",
                                     batch=int(key[1:]), warmup=1, timer="wall", threads=1, converged=True,
                                     ci_rel=0.01)
        out.append(dataclasses.asdict(r))
    return out


def gate(**checks) -> GateConfig:
    return GateConfig(max_acc_drop=1.0, latency=[LatencyCheck(**c) for c in checks.values()])


BASE = {"cpu": rows(b1=2.0, b8=10.0)}
FAST = {"cpu": rows(b1=1.0, b8=4.0)}


def by_name(d: GateDecision) -> dict[str, dict]:
    return {c["name"]: c for c in d.checks}


def test_passes_when_every_check_passes():
    g = gate(a={"target": "cpu", "batch": 8, "max_ms": 5.0, "min_speedup": 2.0},
             b={"target": "cpu", "batch": 1, "metric": "p99", "max_ms": 3.0})
    d = evaluate_gate(g, base_acc=92.0, acc=91.5, latency=FAST, baseline_latency=BASE)
    assert d.passed, d.summary()
    checks = by_name(d)
    assert set(checks) == {"accuracy_drop", "cpu.b8.p50_ms", "cpu.b8.p50_speedup", "cpu.b1.p99_ms"}
    assert checks["accuracy_drop"]["value"] == pytest.approx(0.5)
    assert checks["cpu.b8.p50_speedup"]["value"] == pytest.approx(2.5)
    assert d.summary().startswith("passed: all 4 checks")
    assert GateDecision.from_dict(d.to_dict()) == d


def test_accuracy_drop_too_large():
    d = evaluate_gate(GateConfig(max_acc_drop=1.0), base_acc=92.0, acc=90.5, latency={}, baseline_latency={})
    assert not d.passed
    (c,) = d.checks
    assert c["name"] == "accuracy_drop" and c["value"] == pytest.approx(1.5) and c["limit"] == 1.0
    assert "drop 1.50 points > 1" in c["reason"] and "accuracy_drop" in d.summary()


def test_p50_budget_exceeded():
    d = evaluate_gate(gate(a={"target": "cpu", "batch": 8, "max_ms": 3.0}), base_acc=92, acc=92,
                      latency=FAST, baseline_latency=BASE)
    c = by_name(d)["cpu.b8.p50_ms"]
    assert not d.passed and not c["passed"] and c["value"] == pytest.approx(4.0) and c["limit"] == 3.0
    assert by_name(d)["accuracy_drop"]["passed"]
    assert d.summary().startswith("failed 1 of 2 checks: cpu.b8.p50_ms")


def test_min_speedup_not_reached():
    d = evaluate_gate(gate(a={"target": "cpu", "batch": 1, "min_speedup": 3.0}), base_acc=92, acc=92,
                      latency=FAST, baseline_latency=BASE)
    c = by_name(d)["cpu.b1.p50_speedup"]
    assert not d.passed and c["value"] == pytest.approx(2.0) and "2.00x < 3x" in c["reason"]


def test_errored_target_does_not_pass_and_says_why():
    g = gate(a={"target": "cpu", "batch": 8, "max_ms": 5.0},
             b={"target": "gpu", "batch": 8, "metric": "p99", "max_ms": 50.0, "min_speedup": 1.5})
    d = evaluate_gate(g, base_acc=92, acc=92, latency=FAST, baseline_latency=BASE,
                      errors={"gpu": "backend torch-cuda unavailable: no CUDA GPU"})
    checks = by_name(d)
    assert checks["cpu.b8.p50_ms"]["passed"] and not d.passed
    for name in ("gpu.b8.p99_ms", "gpu.b8.p99_speedup"):
        assert not checks[name]["passed"] and checks[name]["value"] is None
        assert "not measured: backend torch-cuda unavailable: no CUDA GPU" in checks[name]["reason"]
    # A target that is simply absent (never benchmarked) fails the same way.
    d = evaluate_gate(g, base_acc=92, acc=92, latency=FAST, baseline_latency=BASE)
    assert "no candidate results on target 'gpu'" in by_name(d)["gpu.b8.p99_ms"]["reason"]


def test_missing_batch_does_not_pass():
    d = evaluate_gate(gate(a={"target": "cpu", "batch": 32, "max_ms": 100.0}), base_acc=92, acc=92,
                      latency=FAST, baseline_latency=BASE)
    c = by_name(d)["cpu.b32.p50_ms"]
    assert not d.passed and "no candidate result at batch 32" in c["reason"] and "[1, 8]" in c["reason"]
    # The baseline missing the batch fails only the speed-up check.
    d = evaluate_gate(gate(a={"target": "cpu", "batch": 8, "max_ms": 5.0, "min_speedup": 1.1}), base_acc=92, acc=92,
                      latency=FAST, baseline_latency={"cpu": rows(b1=2.0)})
    assert by_name(d)["cpu.b8.p50_ms"]["passed"]
    assert "no baseline result at batch 8" in by_name(d)["cpu.b8.p50_speedup"]["reason"]


def test_check_needs_a_limit():
    with pytest.raises(ValidationError) as e:
        LatencyCheck(target="cpu", batch=8)
    assert "max_ms" in str(e.value) and "min_speedup" in str(e.value)
    with pytest.raises(ValidationError, match="extra"):
        GateConfig(max_acc_drop=1.0, latency=[], typo=1)
    with pytest.raises(ValidationError, match="max_acc_drop"):
        GateConfig(max_acc_drop=-1)


def test_markdown_lists_every_check():
    g = gate(a={"target": "cpu", "batch": 8, "max_ms": 3.0, "min_speedup": 2.0},
             b={"target": "gpu", "batch": 8, "max_ms": 3.0})
    d = evaluate_gate(g, base_acc=92, acc=91, latency=FAST, baseline_latency=BASE,
                      errors={"gpu": "down | unreachable\nsecond line"})
    md = d.to_markdown()
    assert md.startswith("**Promotion gate: FAILED**")
    lines = md.splitlines()
    assert lines[2] == "| check | result | value | limit | reason |"
    for c in d.checks:
        assert sum(line.startswith(f"| {c['name']} |") for line in lines) == 1
    assert "down \\| unreachable second line" in md  # escaped, one row per check
    assert len([l for l in lines if l.startswith("| ")]) == 1 + len(d.checks)
    assert "\n" not in d.summary()


def test_inconsistent_decision_is_refused():
    with pytest.raises(ValueError):
        GateDecision(passed=True, checks=[{"name": "x", "passed": False, "value": None, "limit": 1, "reason": "r"}])
