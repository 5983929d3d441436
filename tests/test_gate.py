"""The promotion gate on hand-made measurements: pure Python, no MLflow.

Real timings are noisy on a shared machine, so the verdict logic is tested on results built
by hand (a measured value, its CI, whether it converged); export.latency's tests time a real
ONNX Runtime session for the re-measure path.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
from pydantic import ValidationError

from deploy.gate import GateCheck, GateConfig, GateDecision, LatencyCheck, evaluate_gate


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


def by_name(d: GateDecision) -> dict[str, GateCheck]:
    return {c.name: c for c in d.checks}


def timed(p50: float, low: float | None, high: float | None, *, converged: bool, batch: int = 32,
          ci_rel: float | None = 0.043, attempt: int = 1, max_time_s: float = 4.0, **p99: float | None) -> dict:
    """One result as the gate reads it: a p50 with its CI, converged or not against a ±2% goal."""
    from export.latency import LatencyResult

    r = LatencyResult.from_times([p50] * 5, backend="ort-cpu", device="cpu", precision="fp32", batch=batch, warmup=1,
                                 timer="wall", threads=1, converged=converged, ci_rel=ci_rel, attempt=attempt)
    r.p50_ci_low_ms, r.p50_ci_high_ms, r.rel_ci_goal, r.max_time_s = low, high, 0.02, max_time_s
    for k, v in p99.items():
        setattr(r, k, v)
    return dataclasses.asdict(r)


def one_check(check: dict, cand: list[dict], base: list[dict] | None = None) -> GateDecision:
    return evaluate_gate(GateConfig(max_acc_drop=1.0, latency=[LatencyCheck(**check)]), base_acc=92, acc=92,
                         latency={"cpu": cand}, baseline_latency={"cpu": base or []})


SPEEDUP = {"target": "cpu", "batch": 32, "min_speedup": 1.0}
BUDGET = {"target": "cpu", "batch": 32, "max_ms": 10.0}


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
    assert lines[2] == "| check | result | value | CI | limit | reason |"
    for c in d.checks:
        assert sum(line.startswith(f"| {c['name']} |") for line in lines) == 1
    assert "down \\| unreachable second line" in md  # escaped, one row per check
    assert len([l for l in lines if l.startswith("| ")]) == 1 + len(d.checks)
    assert "\n" not in d.summary()


def test_inconsistent_decision_is_refused():
    with pytest.raises(ValueError):
        GateDecision(passed=True, checks=[{"name": "x", "passed": False, "value": None, "limit": 1, "reason": "r"}])


def test_checks_read_like_the_dicts_they_were():
    d = evaluate_gate(gate(a={"target": "cpu", "batch": 8, "max_ms": 3.0}), base_acc=92, acc=92,
                      latency=FAST, baseline_latency=BASE)
    c = by_name(d)["cpu.b8.p50_ms"]
    assert c["passed"] is False and c["name"] == "cpu.b8.p50_ms" and c.get("value") == pytest.approx(4.0)
    assert c.verdict == "failed" and (c.target, c.batch) == ("cpu", 8) and len(c.attempts) == 1
    # JSON as it crosses a task boundary, and back; decisions recorded before verdicts still load.
    d2 = GateDecision.from_dict(json.loads(json.dumps(d.to_dict())))
    assert d2 == d and d.to_dict()["verdict"] == "failed" and d.to_dict()["checks"][1]["passed"] is False
    old = {"passed": False, "summary": "x", "checks": [{"name": "a", "passed": True, "value": 1.0, "limit": 2.0,
                                                        "reason": "r"}, {"name": "b", "passed": False, "value": None,
                                                                          "limit": 1.0, "reason": "down"}]}
    back = GateDecision.from_dict(old)
    assert [c.verdict for c in back.checks] == ["passed", "failed"] and back.verdict == "failed"
    assert GateDecision(passed=True, checks=[]).verdict == "passed"


def test_unconverged_ci_across_the_limit_is_inconclusive_and_does_not_promote():
    # The quickstart's case: 0.87x measured, but the candidate's CI is ±4.3% against a ±2% goal.
    base = [timed(1.0, 0.99, 1.01, converged=True, ci_rel=0.01)]
    cand = [timed(1.15, 0.95, 1.20, converged=False)]
    d = one_check(SPEEDUP, cand, base)
    c = by_name(d)["cpu.b32.p50_speedup"]
    assert c.verdict == "inconclusive" and not c.passed and c.converged is False
    assert c.value == pytest.approx(1 / 1.15)
    # speed-up CI from the far ends: base low / candidate high .. base high / candidate low
    assert (c.ci_low, c.ci_high) == (pytest.approx(0.99 / 1.20), pytest.approx(1.01 / 0.95))
    assert d.verdict == "inconclusive" and not d.passed
    assert "inconclusive" in c.reason and "straddles 1" in c.reason and "±4.3% vs ±2% goal" in c.reason
    assert d.summary().startswith("inconclusive 1 of 2 checks: cpu.b32.p50_speedup")
    assert d.to_remeasure() == {"cpu": [32]}
    md = d.to_markdown()
    assert md.startswith("**Promotion gate: INCONCLUSIVE**") and "**INCONCLUSIVE**" in md and "[0.825, 1.063]" in md


def test_the_same_value_converged_is_decided():
    base = [timed(1.0, 0.99, 1.01, converged=True, ci_rel=0.01)]
    cand = [timed(1.15, 1.13, 1.17, converged=True, ci_rel=0.017)]
    d = one_check(SPEEDUP, cand, base)
    assert d.verdict == "failed" and by_name(d)["cpu.b32.p50_speedup"].verdict == "failed"
    assert d.to_remeasure() == {}


@pytest.mark.parametrize("low, high, verdict", [(8.0, 9.5, "passed"), (10.5, 13.0, "failed"), (8.0, 12.0, "inconclusive")])
def test_a_ci_wholly_on_one_side_decides_without_convergence(low, high, verdict):
    d = one_check(BUDGET, [timed((low + high) / 2, low, high, converged=False)])
    c = by_name(d)["cpu.b32.p50_ms"]
    assert c.verdict == verdict == d.verdict and (c.ci_low, c.ci_high) == (low, high)
    if verdict != "inconclusive":
        assert "not converged" in c.reason and "whole CI" in c.reason


def test_the_baselines_noise_counts_for_a_speedup():
    base = [timed(1.0, 0.9, 1.1, converged=False, ci_rel=0.1)]
    cand = [timed(0.95, 0.94, 0.96, converged=True, ci_rel=0.01)]
    c = by_name(one_check(SPEEDUP, cand, base))["cpu.b32.p50_speedup"]
    assert c.verdict == "inconclusive" and "±10.0% vs ±2% goal" in c.reason


def test_p99_checks_use_the_p99_ci_and_an_unbounded_side_is_not_a_decision():
    check = {"target": "cpu", "batch": 32, "metric": "p99", "max_ms": 10.0}
    # too few samples to bound the p99 from above: whatever its lower end, it is not known to pass
    above = timed(5.0, 4.9, 5.1, converged=False, p99_ms=11.0, p99_ci_low_ms=10.5, p99_ci_high_ms=None)
    below = timed(5.0, 4.9, 5.1, converged=False, p99_ms=9.0, p99_ci_low_ms=8.0, p99_ci_high_ms=None)
    assert by_name(one_check(check, [above]))["cpu.b32.p99_ms"].verdict == "failed"
    c = by_name(one_check(check, [below]))["cpu.b32.p99_ms"]
    assert c.verdict == "inconclusive" and c.ci_high is None and "CI [8, ?]" in c.reason


def test_a_remeasurement_decides_and_both_attempts_are_recorded():
    base = [timed(1.0, 0.99, 1.01, converged=True, ci_rel=0.01)]
    first = timed(0.95, 0.80, 1.10, converged=False, ci_rel=0.15)
    again = timed(0.90, 0.89, 0.91, converged=True, ci_rel=0.011, attempt=2, max_time_s=12.0)
    d = one_check(SPEEDUP, [first, again], base)
    c = by_name(d)["cpu.b32.p50_speedup"]
    assert d.passed and c.verdict == "passed" and c.value == pytest.approx(1 / 0.90)
    assert [a.verdict for a in c.attempts] == ["inconclusive", "passed"]
    assert [a.max_time_s for a in c.attempts] == [4.0, 12.0]
    assert c.attempts[0].ci_low == pytest.approx(0.99 / 1.10)
    assert c.reason.startswith("attempt 2 (max 12 s): ") and "earlier: attempt 1: inconclusive" in c.reason
    # The order the rows come in does not matter: the later attempt decides.
    assert one_check(SPEEDUP, [again, first], base) == d


def test_still_inconclusive_after_the_remeasurement_is_not_remeasured_again():
    base = [timed(1.0, 0.99, 1.01, converged=True, ci_rel=0.01)]
    cand = [timed(1.0, 0.9, 1.1, converged=False), timed(1.01, 0.95, 1.07, converged=False, attempt=2)]
    d = one_check(SPEEDUP, cand, base)
    assert d.verdict == "inconclusive" and len(by_name(d)["cpu.b32.p50_speedup"].attempts) == 2
    assert d.to_remeasure() == {}
    assert d.to_remeasure(max_attempts=3) == {"cpu": [32]}


def test_only_the_candidate_remeasured_pairs_with_the_baselines_latest():
    base = [timed(1.0, 0.99, 1.01, converged=True, ci_rel=0.01)]
    cand = [timed(0.95, 0.80, 1.10, converged=False), timed(0.5, 0.49, 0.51, converged=True, attempt=2)]
    c = by_name(one_check(SPEEDUP, cand, base))["cpu.b32.p50_speedup"]
    assert c.verdict == "passed" and c.value == pytest.approx(2.0) and len(c.attempts) == 2


def test_a_failed_check_outweighs_an_inconclusive_one():
    g = gate(a=BUDGET, b=SPEEDUP)
    base = {"cpu": [timed(1.0, 0.99, 1.01, converged=True, ci_rel=0.01)]}
    d = evaluate_gate(g, base_acc=92, acc=90, latency={"cpu": [timed(1.0, 0.9, 1.1, converged=False)]},
                      baseline_latency=base)
    assert d.verdict == "failed" and not d.passed
    assert [c.verdict for c in d.checks] == ["failed", "passed", "inconclusive"]
    assert d.summary().startswith("failed 1 of 3 checks: accuracy_drop") and "; inconclusive 1 of 3 checks:" in d.summary()


def test_two_results_of_one_attempt_are_refused():
    d = one_check(BUDGET, [timed(5.0, 4.9, 5.1, converged=True), timed(6.0, 5.9, 6.1, converged=True)])
    c = by_name(d)["cpu.b32.p50_ms"]
    assert c.verdict == "failed" and "expected one per attempt" in c.reason


def test_figures_without_convergence_are_judged_on_the_value_and_say_so():
    # Edge gate devices report p50/p99 only.
    d = one_check(BUDGET, [{"batch": 32, "p50_ms": 9.0, "p99_ms": 12.0}])
    c = by_name(d)["cpu.b32.p50_ms"]
    assert c.verdict == "passed" and c.converged is None and "convergence not reported" in c.reason
    # Older reports: ci_rel without the bounds gives a CI of ±ci_rel around the p50.
    row = {"batch": 32, "p50_ms": 9.0, "p99_ms": 12.0, "converged": False, "ci_rel": 0.2}
    c = by_name(one_check(BUDGET, [row]))["cpu.b32.p50_ms"]
    assert c.verdict == "inconclusive" and (c.ci_low, c.ci_high) == (pytest.approx(7.2), pytest.approx(10.8))
