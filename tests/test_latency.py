"""export.latency: statistics, the stopping rule, bench_runner and the report."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import numpy as np
import pytest
import torch
from rich.console import Console

from export.backends.base import Runner, random_input
from export.latency import (
    CHECK_EVERY_S,
    REMEASURE_MAX_TIME_S,
    BenchReport,
    LatencyResult,
    LatencySettings,
    bench_runner,
    longer_settings,
    measure,
    median_ci,
    median_ci_ranks,
    median_ci_rel,
    not_converged,
    quantile_ci,
    quantile_ci_ranks,
    remeasure_longer,
    summarize,
    table,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def quick(**kw: Any) -> LatencySettings:
    """Settings small enough for unit tests."""
    base = dict(warmup=2, warmup_s=0.0, min_iters=10, max_iters=400, min_time_s=0.05, max_time_s=2.0, rel_ci=0.05)
    base.update(kw)
    return LatencySettings(**base)


def busy_wait(seconds: float) -> None:
    """A steadier step than sleep: no scheduler wake-up latency."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Counter:
    """A step that counts its calls; the first call can be slow (lazy init, autotuning)."""

    def __init__(self, seconds: float = 0.0, first_s: float | None = None) -> None:
        self.calls = 0
        self.stamps: list[float] = []
        self.seconds = seconds
        self.first_s = first_s

    def __call__(self) -> None:
        self.calls += 1
        self.stamps.append(time.perf_counter())
        busy_wait(self.first_s if self.calls == 1 and self.first_s is not None else self.seconds)


def _exact_lower_rank(n: int, confidence: float) -> int | None:
    """Reference: largest m with P(Binomial(n, 1/2) <= m) <= alpha/2, by exact integers."""
    best, total = None, 0
    for m in range(n + 1):
        total += math.comb(n, m)
        if total * 2 / 2**n <= 1 - confidence:
            best = m
        else:
            break
    return best


# ----------------------------------------------------------------------------- statistics

def test_median_ci_ranks_match_published_table_and_exact_binomial():
    # classic 95% ranks (1-based): n=6 -> (1, 6), n=10 -> (2, 9), n=20 -> (6, 15), n=100 -> (40, 61)
    assert median_ci_ranks(6) == (0, 5)
    assert median_ci_ranks(10) == (1, 8)
    assert median_ci_ranks(20) == (5, 14)
    assert median_ci_ranks(100) == (39, 60)
    assert median_ci_ranks(5) is None and median_ci_ranks(0) is None
    for conf in (0.9, 0.95, 0.99):
        for n in list(range(1, 80)) + [257, 1000, 2001]:
            lo = _exact_lower_rank(n, conf)
            assert median_ci_ranks(n, conf) == (None if lo is None else (lo, n - 1 - lo)), (n, conf)


def _exact_quantile_ranks(n: int, q: float, confidence: float) -> tuple[int | None, int | None]:
    """Reference for quantile_ci_ranks by exact rationals (q = k/100)."""
    from fractions import Fraction

    qf = Fraction(q).limit_denominator(1000)
    pmf = [math.comb(n, i) * qf**i * (1 - qf) ** (n - i) for i in range(n + 1)]
    a2 = Fraction(1 - confidence).limit_denominator(1000) / 2
    cdf, total = [], Fraction(0)
    for x in pmf:
        total += x
        cdf.append(total)  # P(B <= i); P(B >= k) = 1 - cdf[k - 1], exact in rationals
    lo = [m for m in range(n) if cdf[m] <= a2]
    hi = [k - 1 for k in range(1, n + 1) if 1 - cdf[k - 1] <= a2]
    return (lo[-1] if lo else None), (hi[0] if hi else None)


def test_quantile_ci_ranks_agree_with_the_median_and_exact_binomials():
    for n in list(range(1, 60)) + [257, 1000, 2001]:
        assert quantile_ci_ranks(n, 0.5) == (median_ci_ranks(n) or (None, None)), n
    for q, conf in ((0.99, 0.95), (0.9, 0.95), (0.99, 0.9), (0.1, 0.99)):
        for n in (1, 5, 30, 100, 299, 300, 500):
            assert quantile_ci_ranks(n, q, conf) == _exact_quantile_ranks(n, q, conf), (n, q, conf)
    # p99 from 299 samples has no upper bound (0.99**299 > 2.5%); from 2000 it has both.
    assert quantile_ci_ranks(299, 0.99)[1] is None
    lo, hi = quantile_ci_ranks(2000, 0.99)
    assert lo is not None and hi is not None and lo < 1980 < hi <= 1999
    with pytest.raises(ValueError, match="quantile"):
        quantile_ci_ranks(10, 1.0)


def test_quantile_ci_covers_the_true_p90_at_least_as_often_as_promised():
    rng = np.random.default_rng(2)
    samples = rng.exponential(1.0, size=(2000, 200))
    true_p90 = -math.log(0.1)
    cis = [quantile_ci(s, 0.9) for s in samples]
    assert all(lo is not None and hi is not None for lo, hi in cis)
    assert sum(lo <= true_p90 <= hi for lo, hi in cis) / len(cis) > 0.94


def test_median_ci_covers_the_true_median_at_least_as_often_as_promised():
    rng = np.random.default_rng(0)
    samples = rng.exponential(1.0, size=(3000, 40))  # skewed, like latencies
    true_median = math.log(2.0)
    covered = sum(lo <= true_median <= hi for lo, hi in (median_ci(s) for s in samples))
    assert covered / len(samples) > 0.94


def test_median_ci_rel_and_summary():
    assert median_ci_rel([5.0] * 50) == 0.0
    assert median_ci_rel([1.0, 2.0, 3.0]) is None
    times = list(np.linspace(1.0, 3.0, 101))
    lo, hi = median_ci(times)
    assert lo < 2.0 < hi
    assert median_ci_rel(times) == pytest.approx(max(2.0 - lo, hi - 2.0) / 2.0)

    s = summarize([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["p50_ms"] == 3.0 and s["min_ms"] == 1.0 and s["max_ms"] == 100.0
    assert s["mean_ms"] == pytest.approx(22.0)
    assert s["std_ms"] == pytest.approx(np.std([1, 2, 3, 4, 100], ddof=1))
    assert s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    with pytest.raises(ValueError):
        summarize([])


def test_settings_validate():
    s = LatencySettings()
    assert (s.warmup, s.min_iters, s.max_iters, s.min_time_s, s.max_time_s, s.rel_ci) == (10, 30, 2000, 1.0, 20.0, 0.02)
    for bad in (dict(min_iters=50, max_iters=10), dict(min_time_s=5, max_time_s=1), dict(threads=0),
                dict(rel_ci=0), dict(max_time_s=float("inf")), dict(warmup=-1), dict(unknown=1)):
        with pytest.raises(ValueError):
            LatencySettings(**bad)


# ----------------------------------------------------------------------------- measure

def test_sleeping_step_gives_a_sensible_median():
    times, converged, ci_rel = measure(lambda: time.sleep(0.002), settings=quick(max_time_s=1.0))
    s = summarize(times)
    assert 1.95 <= s["p50_ms"] <= 6.0  # sleep never returns early; a busy box adds a little
    assert s["min_ms"] <= s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert len(times) >= 10
    assert ci_rel is not None and converged == (ci_rel <= 0.05)


def test_max_iters_bounds_the_run():
    step = Counter()
    times, _, _ = measure(step, settings=quick(min_iters=5, max_iters=40, min_time_s=10.0, max_time_s=10.0))
    assert len(times) == 40
    assert step.calls == 2 + 40


def test_max_time_bounds_the_run():
    step = Counter(0.001)
    settings = quick(warmup=0, min_iters=5, max_iters=100_000, min_time_s=0.3, max_time_s=0.3, rel_ci=1e-6)
    t0 = time.perf_counter()
    times, converged, _ = measure(step, settings=settings)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 0.3
    assert len(times) < 100_000  # it stopped on time, not on the iteration cap (about 100 s of steps)
    # it checks the rule every CHECK_EVERY_S of estimated steps, so it stops within about one such
    # chunk past max_time_s; a loaded box stretches the steps of that chunk, and the bound with them
    # (measured: the slowest step against the median one)
    stretch = max(times) / float(np.median(times))
    assert sum(times) / 1000 - 0.3 <= 2 * CHECK_EVERY_S * stretch + 0.05  # timed steps; set-up is not bounded here
    assert sum(times) / 1000 <= elapsed
    assert step.calls == len(times)


def test_warmup_is_excluded():
    step = Counter(0.0002, first_s=0.03)
    times, _, _ = measure(step, settings=quick(warmup=1, max_iters=50, min_iters=50))
    assert max(times) < 30.0
    assert step.calls == 1 + len(times)

    control = Counter(0.0002, first_s=0.03)
    times, _, _ = measure(control, settings=quick(warmup=0, max_iters=50, min_iters=50))
    assert max(times) >= 30.0  # without warm-up the slow first call is in the sample


def test_warmup_runs_at_least_warmup_s():
    step = Counter(0.002)
    times, _, _ = measure(step, settings=quick(warmup=1, warmup_s=0.1, max_iters=10, min_iters=10))
    warmed = step.calls - len(times)
    assert step.stamps[warmed] - step.stamps[0] >= 0.1  # timing began only after warmup_s
    assert warmed <= 55  # and not much later: steps take at least 2 ms


def test_ci_rule_stops_a_steady_step_early_but_not_before_min_iters():
    settings = quick(warmup=5, min_iters=20, max_iters=5000, min_time_s=0.0, max_time_s=5.0, rel_ci=0.05)
    times, converged, ci_rel = measure(Counter(0.0003), settings=settings)
    assert converged and ci_rel <= 0.05
    assert 20 <= len(times) < 1000

    times, converged, _ = measure(Counter(0.0003), settings=settings.model_copy(update={"min_iters": 300}))
    assert converged and len(times) >= 300


def test_min_time_holds_back_a_converged_run():
    settings = quick(min_iters=10, max_iters=100_000, min_time_s=0.25, max_time_s=5.0, rel_ci=0.5)
    t0 = time.perf_counter()
    times, converged, _ = measure(Counter(0.0005), settings=settings)
    assert converged
    assert time.perf_counter() - t0 >= 0.25
    assert sum(times) / 1e3 >= 0.2


def test_noisy_step_does_not_converge():
    rng = np.random.default_rng(1)
    times, converged, ci_rel = measure(lambda: busy_wait(float(rng.uniform(0.0001, 0.002))),
                                       settings=quick(min_iters=10, max_iters=60, rel_ci=0.001, min_time_s=1.0))
    assert len(times) == 60
    assert not converged and ci_rel > 0.001


def test_synchronize_is_inside_the_timed_region():
    times, _, _ = measure(lambda: None, synchronize=lambda: busy_wait(0.001),
                          settings=quick(max_iters=20, min_iters=20))
    assert min(times) >= 1.0


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch"):
        measure(lambda: None, batch=0, settings=quick())
    with pytest.raises(ValueError, match="timer"):
        measure(lambda: None, timer="stopwatch", settings=quick())  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            measure(lambda: None, timer="cuda_events", settings=quick())


# ----------------------------------------------------------------------------- bench_runner

class MatmulRunner(Runner):
    """A tiny real CPU runner: y = x @ W on numpy, with the affinity seen during each step."""

    backend = "numpy"
    device = "cpu"
    precision = "fp32"
    timer = "wall"

    def __init__(self, features: int = 256) -> None:
        self.w = np.random.default_rng(0).standard_normal((features, features), dtype=np.float32)
        self.features = features
        self.seen_cores: set[int] = set()

    def run(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1) @ self.w

    def timed_step(self, batch: int) -> Callable[[], Any]:
        x = random_input(batch, (self.features,))

        def step() -> None:
            if hasattr(os, "sched_getaffinity"):
                self.seen_cores |= os.sched_getaffinity(0)
            self.run(x)

        return step


def test_bench_runner_measures_each_batch_on_pinned_threads():
    runner = MatmulRunner()
    threads0 = torch.get_num_threads()
    seen: list[LatencyResult] = []
    # max_time is only a cap: on a busy machine 0.5 s gave 9 iterations of batch 64, below min_iters
    settings = quick(threads=1, min_time_s=0.05, max_time_s=10.0, max_iters=200)
    results = bench_runner(runner, (1, 64), input_shape=(256,), settings=settings, progress=seen.append)

    assert [r.batch for r in results] == [1, 64] and seen == results
    for r in results:
        assert (r.backend, r.device, r.precision, r.timer) == ("numpy", "cpu", "fp32", "wall")
        assert r.threads == 1 and r.input_shape == [256]
        assert r.iterations >= 10 and r.warmup >= 2
        assert r.p50_ms <= r.p90_ms <= r.p99_ms <= r.max_ms
        assert r.throughput_per_s == pytest.approx(r.batch * 1000.0 / r.mean_ms)
    assert results[1].p50_ms > results[0].p50_ms  # 64 rows cost more than one
    if hasattr(os, "sched_getaffinity"):
        assert all(len(r.cores) == 1 for r in results)
        assert len(runner.seen_cores) == 1  # every step ran on the one pinned core
    assert torch.get_num_threads() == threads0


def test_bench_runner_rejects_bad_batches():
    with pytest.raises(ValueError, match="batch"):
        bench_runner(MatmulRunner(), (1, 0), settings=quick())


# ----------------------------------------------------------------------------- report

def _result(**kw: Any) -> LatencyResult:
    fields = dict(backend="onnxruntime", device="cpu", precision="fp32", batch=8, warmup=10, timer="wall",
                  threads=2, converged=False, ci_rel=None, cores=[0, 1], input_shape=[3, 32, 32])
    fields.update(kw)
    return LatencyResult.from_times([2.0, 2.1, 2.2, 2.05, 2.3, 2.15, 2.0], **fields)


def test_report_json_round_trip_and_table(tmp_path):
    settings = quick(threads=2)
    report = BenchReport.new([_result(), _result(batch=1, converged=True, ci_rel=0.01)],
                             settings=settings, extra={"model": "resnet20"})
    path = report.to_json(tmp_path / "sub" / "latency.json")
    assert [p.name for p in path.parent.iterdir()] == ["latency.json"]  # no temporary left
    json.loads(path.read_text())  # strict JSON

    back = BenchReport.from_json(path)
    assert back == report
    assert back.results[0].ci_rel is None and back.results[1].ci_rel == 0.01
    assert back.machine["cpu"] == report.machine["cpu"]

    console = Console(record=True, width=220)
    console.print(table(back))
    text = console.export_text()
    for part in ("onnxruntime", "p50 ms", "samples/s", "yes ±1.0%", "2.100"):
        assert part in text


def test_report_rejects_other_files(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a latency report"):
        BenchReport.from_json(other)
    with pytest.raises(ValueError, match="cannot read"):
        BenchReport.from_json(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- CUDA

class TorchCudaRunner(Runner):
    backend = "torch"
    device = "cuda"
    precision = "fp32"
    timer = "cuda_events"

    def __init__(self) -> None:
        self.model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                         torch.nn.Conv2d(64, 64, 3, padding=1)).cuda().eval()

    def run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.from_numpy(x).cuda()).cpu().numpy()

    def timed_step(self, batch: int) -> Callable[[], Any]:
        x = torch.randn(batch, 3, 64, 64, device="cuda")

        def step() -> None:
            with torch.inference_mode():
                self.model(x)

        return step

    def synchronize(self) -> None:
        torch.cuda.synchronize()


@needs_cuda
def test_cuda_events_agree_with_synchronized_wall_clock():
    runner = TorchCudaRunner()
    step = runner.timed_step(32)
    settings = quick(warmup=5, min_iters=30, max_iters=300, max_time_s=2.0)
    ev, _, _ = measure(step, timer="cuda_events", synchronize=runner.synchronize, settings=settings)
    wall, _, _ = measure(step, timer="wall", synchronize=runner.synchronize, settings=settings)
    ev_p50, wall_p50 = float(np.median(ev)), float(np.median(wall))
    assert 0 < ev_p50 <= wall_p50 * 1.2  # events exclude launch and sync overhead
    assert wall_p50 < ev_p50 * 3 + 0.5


@needs_cuda
def test_bench_runner_on_cuda_uses_events_and_does_not_pin():
    results = bench_runner(TorchCudaRunner(), (1, 8), settings=quick(threads=1, max_time_s=1.0))
    assert [r.timer for r in results] == ["cuda_events", "cuda_events"]
    assert all(r.threads is None and r.cores is None for r in results)
    assert results[1].p50_ms >= results[0].p50_ms * 0.8


# ----------------------------------------------------------------------------- re-measuring

def test_results_carry_their_cis_goal_and_budget():
    times = list(np.linspace(1.0, 3.0, 101))
    settings = quick(rel_ci=0.03, max_time_s=1.5, confidence=0.9)
    r = LatencyResult.from_times(times, backend="b", device="cpu", precision="fp32", batch=1, warmup=0, timer="wall",
                                 threads=1, converged=False, ci_rel=median_ci_rel(times, 0.9), settings=settings)
    assert (r.p50_ci_low_ms, r.p50_ci_high_ms) == median_ci(times, 0.9)
    assert r.p50_ci_low_ms < r.p50_ms < r.p50_ci_high_ms
    assert (r.p99_ci_low_ms, r.p99_ci_high_ms) == quantile_ci(times, 0.99, 0.9)
    assert (r.rel_ci_goal, r.max_time_s, r.attempt) == (0.03, 1.5, 1)
    # too few samples: no CI, said as None
    r = LatencyResult.from_times([2.0, 2.1, 2.2, 2.05, 2.3], backend="b", device="cpu", precision="fp32", batch=1,
                                 warmup=0, timer="wall", threads=1, converged=False, ci_rel=None)
    assert r.p50_ci_low_ms is None and r.p99_ci_high_ms is None and r.rel_ci_goal is None


def test_longer_settings_triple_the_budget_within_the_cap():
    s = quick(max_time_s=2.0, max_iters=400)
    longer = longer_settings(s)
    assert (longer.max_time_s, longer.max_iters) == (6.0, 1200)
    assert longer.model_dump(exclude={"max_time_s", "max_iters"}) == s.model_dump(exclude={"max_time_s", "max_iters"})
    capped = longer_settings(quick(max_time_s=60.0))
    assert capped.max_time_s == REMEASURE_MAX_TIME_S
    # a first budget already above the cap is never shortened
    assert longer_settings(quick(max_time_s=200.0, min_time_s=1.0)).max_time_s == 200.0
    with pytest.raises(ValueError, match="factor"):
        longer_settings(s, factor=0.5)


def test_remeasure_skips_what_converged():
    done = [_result(batch=1, converged=True, ci_rel=0.01), _result(batch=8, converged=True, ci_rel=0.01)]
    called = []
    assert remeasure_longer(lambda s, b: called.append(b) or [], done, quick()) == [] and called == []
    other = _result(batch=8, converged=False)
    other.model = "other"  # a second model timed side by side
    mixed = [*done, other]
    assert not_converged(mixed) == [8] and not_converged(mixed, batches=[1]) == []
    # the latest attempt counts: a converged second attempt settles it
    settled = dataclasses.replace(other, converged=True, attempt=2)
    assert not_converged([*mixed, settled]) == []


def test_remeasure_longer_on_a_real_onnxruntime_session(tmp_path):
    """Structure only: which batches are re-timed, with what budget, marked as which attempt,
    and how the gate records both attempts; no absolute times."""
    from deploy.gate import GateConfig, LatencyCheck, evaluate_gate
    from export.backends import BuildSpec, ModelBundle, get_backend
    from export.onnx_export import export_onnx

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    export_onnx(model, tmp_path / "m.onnx", (16,), exporter="torchscript")
    runner = get_backend("ort-cpu").load(ModelBundle(onnx=tmp_path / "m.onnx", checkpoint=None, input_shape=(16,)),
                                         BuildSpec(batch_sizes=(1, 4), threads=1))
    # A goal no timing reaches: neither batch converges.
    first_settings = quick(threads=1, rel_ci=1e-9, min_iters=10, max_iters=40, min_time_s=0.02, max_time_s=0.1)
    first = bench_runner(runner, (1, 4), input_shape=(16,), settings=first_settings)
    assert [r.converged for r in first] == [False, False] and all(r.attempt == 1 for r in first)

    asked: list[tuple[LatencySettings, list[int]]] = []

    def bench(settings: LatencySettings, batches: list[int]) -> list[LatencyResult]:
        asked.append((settings, batches))
        return bench_runner(runner, batches, input_shape=(16,), settings=settings)

    again = remeasure_longer(bench, first, first_settings, batches=[4])
    runner.close()
    (settings, batches), = asked
    assert batches == [4] and settings.max_time_s == pytest.approx(0.3) and settings.max_iters == 120
    (r,) = again
    assert (r.batch, r.attempt, r.max_time_s, r.backend) == (4, 2, pytest.approx(0.3), "ort-cpu")
    assert 10 <= r.iterations <= 120 and r.p50_ci_low_ms <= r.p50_ms <= r.p50_ci_high_ms

    rows = [dataclasses.asdict(x) for x in [*first, *again]]
    check = LatencyCheck(target="cpu", batch=4, max_ms=r.p50_ms)
    d = evaluate_gate(GateConfig(latency=[check]), base_acc=90, acc=90, latency={"cpu": rows}, baseline_latency={})
    c = d.checks[1]
    assert [a.max_time_s for a in c.attempts] == [pytest.approx(0.1), pytest.approx(0.3)]
    assert c.value == r.p50_ms and c.converged is False and c.ci_low <= c.value <= c.ci_high
    assert d.to_remeasure() == {}  # measured twice: a verdict still open stays inconclusive
    assert d.passed == (c.verdict == "passed")
