"""export.latency: statistics, the stopping rule, bench_runner and the report."""
from __future__ import annotations

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
    BenchReport,
    LatencyResult,
    LatencySettings,
    bench_runner,
    measure,
    median_ci,
    median_ci_ranks,
    median_ci_rel,
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
    settings = quick(threads=1, min_time_s=0.05, max_time_s=0.5, max_iters=200)
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
