"""The latency harness: time a runner's inference step until the median is known well.

`measure` warms a step up, then times it iteration by iteration (wall clock around
step + synchronize, or CUDA events on the current stream) and stops once the 95%
confidence interval of the median, taken from order statistics, lies within ±rel_ci of
the median — but never before `min_iters` iterations and `min_time_s` seconds, and never
after `max_iters` or `max_time_s`. `bench_runner` does that for each batch size of a
`Runner` (pinning CPU threads for CPU runners) and `BenchReport` keeps the results with
the machine they were measured on, as JSON and as a rich table.

A measurement that did not converge can be repeated with a longer budget:
`longer_settings` is the policy (3x the time, bounded) and `remeasure_longer` re-times the
batch sizes whose result did not converge, marking the new results as a later attempt, so a
decision taken on them (deploy.gate) can record both. `time_side_by_side` times several
runners in interleaved rounds, so that a ratio of two is not a ratio of two machine loads.

The statistics are small pure functions (`summarize`, `median_ci_ranks`, `median_ci`,
`median_ci_rel`, `quantile_ci`) so they can be checked on their own.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from export.backends.base import Runner
from export.machine import describe_machine, machine_summary, pin_cpu_threads
from pfp.files import write_text_atomic

if TYPE_CHECKING:
    from rich.table import Table

Timer = Literal["wall", "cuda_events"]
REPORT_FORMAT = "pfp-latency-report/1"

# Check the stopping rule about this often: often enough not to overshoot max_time_s by
# much, rarely enough that sorting the samples costs nothing next to the model.
CHECK_EVERY_S = 0.05
# Upper bound on iterations between checks (also the size of the CUDA event pool).
_MAX_CHUNK = 256
# A re-measurement gets this many times the first budget, but never more than the cap: on a
# machine so busy that 3x does not converge, waiting longer still only delays the pipeline,
# and the gate records the check as inconclusive instead.
REMEASURE_FACTOR = 3.0
REMEASURE_MAX_TIME_S = 120.0


class LatencySettings(BaseModel):
    """When to start and stop timing. Iteration and time bounds win over the CI rule."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    warmup: int = Field(10, ge=0, description="untimed iterations before timing")
    warmup_s: float = Field(0.5, ge=0, allow_inf_nan=False,
                            description="keep warming up at least this long (clocks, caches, autotuning)")
    min_iters: int = Field(30, ge=1)
    max_iters: int = Field(2000, ge=1)
    min_time_s: float = Field(1.0, ge=0, allow_inf_nan=False)
    max_time_s: float = Field(20.0, gt=0, allow_inf_nan=False)
    rel_ci: float = Field(0.02, gt=0, lt=1, allow_inf_nan=False,
                          description="stop when the median's CI is within ±rel_ci of the median")
    confidence: float = Field(0.95, gt=0.5, lt=1, allow_inf_nan=False)
    threads: int | None = Field(None, ge=1, description="CPU threads for CPU runners; None leaves them")

    @model_validator(mode="after")
    def _ordered_bounds(self) -> "LatencySettings":
        if self.max_iters < self.min_iters:
            raise ValueError(f"max_iters ({self.max_iters}) is below min_iters ({self.min_iters})")
        if self.max_time_s < self.min_time_s:
            raise ValueError(f"max_time_s ({self.max_time_s}) is below min_time_s ({self.min_time_s})")
        return self


# ----------------------------------------------------------------------------- statistics

def summarize(times_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99, mean, std (sample), min and max of per-iteration times, in ms."""
    a = np.asarray(times_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no timed iterations to summarize")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
        "mean_ms": float(a.mean()), "std_ms": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min_ms": float(a.min()), "max_ms": float(a.max()),
    }


def median_ci_ranks(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based indices (lo, hi) into n sorted samples whose values bound a distribution-free
    `confidence` interval for the median, or None when n is too small to reach it.

    With B ~ Binomial(n, 1/2) the interval [x_(j), x_(n-j+1)] (1-based) covers the median
    with probability 1 - 2 P(B <= j-1); lo = j-1 is the largest index with
    P(B <= lo) <= (1-confidence)/2. The binomial CDF is computed exactly in log space.
    """
    if n < 1:
        return None
    half = n // 2
    k = np.arange(1, half + 1, dtype=np.float64)
    log_comb = np.concatenate([[0.0], np.cumsum(np.log(n - k + 1) - np.log(k))])  # log C(n, i)
    cdf = np.cumsum(np.exp(log_comb - n * math.log(2.0)))
    inside = np.flatnonzero(cdf <= (1.0 - confidence) / 2.0)
    if inside.size == 0:
        return None
    lo = int(inside[-1])
    return lo, n - 1 - lo


def median_ci(times_ms: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """The order-statistic confidence interval of the median, or None for too few samples."""
    ranks = median_ci_ranks(len(times_ms), confidence)
    if ranks is None:
        return None
    a = np.sort(np.asarray(times_ms, dtype=np.float64))
    return float(a[ranks[0]]), float(a[ranks[1]])


def median_ci_rel(times_ms: Sequence[float], confidence: float = 0.95) -> float | None:
    """The CI's larger distance from the median, relative to the median (0.02 = ±2%)."""
    ci = median_ci(times_ms, confidence)
    if ci is None:
        return None
    median = float(np.median(np.asarray(times_ms, dtype=np.float64)))
    if median <= 0:
        return None
    return max(median - ci[0], ci[1] - median) / median


def _log_binom_pmf(n: int, q: float) -> np.ndarray:
    """log P(B = i) for i = 0..n, B ~ Binomial(n, q), 0 < q < 1."""
    i = np.arange(n + 1, dtype=np.float64)
    log_comb = math.lgamma(n + 1) - np.array([math.lgamma(k + 1) + math.lgamma(n - k + 1) for k in range(n + 1)])
    return log_comb + i * math.log(q) + (n - i) * math.log1p(-q)


def quantile_ci_ranks(n: int, q: float, confidence: float = 0.95) -> tuple[int | None, int | None]:
    """0-based indices (lo, hi) into n sorted samples whose values bound a distribution-free
    `confidence` interval for the q-quantile; a side is None when n samples cannot bound it
    (e.g. the upper side of p99 from fewer than a few hundred samples).

    B ~ Binomial(n, q) counts samples below the true quantile; lo is the largest index with
    P(B <= lo) <= alpha/2 and hi the smallest with P(B >= hi + 1) <= alpha/2, each tail summed
    from its own end so that no 1 - (almost 1) cancels. For q = 1/2 this is median_ci_ranks.
    """
    if not 0 < q < 1:
        raise ValueError(f"quantile q must be in (0, 1), got {q!r}")
    if n < 1:
        return None, None
    alpha_2 = (1.0 - confidence) / 2.0
    pmf = np.exp(_log_binom_pmf(n, q))
    cdf = np.cumsum(pmf)                   # cdf[i] = P(B <= i)
    sf = np.cumsum(pmf[::-1])[::-1]        # sf[i] = P(B >= i)
    low = np.flatnonzero(cdf[:n] <= alpha_2)
    high = np.flatnonzero(sf[1:] <= alpha_2)  # sf[k] at k = 1..n; hi = k - 1
    return (int(low[-1]) if low.size else None), (int(high[0]) if high.size else None)


def quantile_ci(times_ms: Sequence[float], q: float, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """The order-statistic confidence interval of the q-quantile; None for an unbounded side."""
    lo, hi = quantile_ci_ranks(len(times_ms), q, confidence)
    a = np.sort(np.asarray(times_ms, dtype=np.float64))
    return (float(a[lo]) if lo is not None else None), (float(a[hi]) if hi is not None else None)


def _ci_met(n: int, ci_rel: float | None, settings: LatencySettings) -> bool:
    return n >= settings.min_iters and ci_rel is not None and ci_rel <= settings.rel_ci


def _chunk_size(done: int, elapsed_s: float, est_iter_s: float | None, settings: LatencySettings) -> int:
    """Iterations to run before the next look at the stopping rule: about CHECK_EVERY_S
    worth, and no more than fit before max_iters or max_time_s."""
    if est_iter_s is None or est_iter_s <= 0:
        return 1
    k = min(CHECK_EVERY_S, settings.max_time_s - elapsed_s) / est_iter_s
    return max(1, min(math.ceil(k), _MAX_CHUNK, settings.max_iters - done))


# ----------------------------------------------------------------------------- timing

def _no_sync() -> None:
    return None


def _time_wall(step: Callable[[], Any], sync: Callable[[], None], k: int) -> list[float]:
    clock = time.perf_counter_ns
    out: list[float] = []
    for _ in range(k):
        t0 = clock()
        step()
        sync()
        t1 = clock()
        out.append((t1 - t0) / 1e6)
    return out


class _CudaEventTimer:
    """Per-iteration CUDA event pairs on the current stream, read once per chunk: the GPU
    time of each step without a host round trip between iterations."""

    def __init__(self, sync: Callable[[], None] | None) -> None:
        import torch  # noqa: PLC0415 - only on the CUDA path

        if not torch.cuda.is_available():
            raise ValueError("timer 'cuda_events' needs CUDA, which is not available here")
        self._torch = torch
        self._starts: list[Any] = []
        self._ends: list[Any] = []
        self._sync = sync

    def _events(self, k: int) -> None:
        Event = self._torch.cuda.Event
        while len(self._starts) < k:
            self._starts.append(Event(enable_timing=True))
            self._ends.append(Event(enable_timing=True))

    def __call__(self, step: Callable[[], Any], k: int) -> list[float]:
        self._events(k)
        stream = self._torch.cuda.current_stream()
        starts, ends = self._starts[:k], self._ends[:k]
        for start, end in zip(starts, ends):
            start.record(stream)
            step()
            end.record(stream)
        if self._sync is not None:
            self._sync()
        ends[-1].synchronize()  # the runner's sync may not cover torch's current stream
        return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _warm_up(step: Callable[[], Any], sync: Callable[[], None], settings: LatencySettings) -> tuple[int, float | None]:
    """Untimed iterations; returns how many ran and the median per-iteration seconds."""
    times: list[float] = []
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if len(times) >= settings.warmup and elapsed >= settings.warmup_s:
            break
        if elapsed >= settings.max_time_s:  # a very slow step must not warm up forever
            break
        times.extend(_time_wall(step, sync, 1))
    return len(times), (float(np.median(times)) / 1e3 if times else None)


@dataclass
class _Measured:
    times_ms: list[float]
    converged: bool
    ci_rel: float | None
    warmup: int


def _measure(
    step: Callable[[], Any],
    timer: Timer,
    synchronize: Callable[[], None] | None,
    settings: LatencySettings,
) -> _Measured:
    if timer not in ("wall", "cuda_events"):
        raise ValueError(f"timer must be 'wall' or 'cuda_events', not {timer!r}")
    events = _CudaEventTimer(synchronize) if timer == "cuda_events" else None
    wall_sync = _wall_sync_for(timer, synchronize)

    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collector pause inside a timed step is the harness's noise, not the model's
    try:
        warmup, est = _warm_up(step, wall_sync, settings)
        times: list[float] = []
        ci_rel: float | None = None
        start = time.perf_counter()
        while True:
            k = _chunk_size(len(times), time.perf_counter() - start, est, settings)
            times.extend(events(step, k) if events is not None else _time_wall(step, wall_sync, k))
            est = float(np.median(times)) / 1e3
            ci_rel = median_ci_rel(times, settings.confidence)
            elapsed = time.perf_counter() - start
            if _ci_met(len(times), ci_rel, settings) and elapsed >= settings.min_time_s:
                break
            if len(times) >= settings.max_iters or elapsed >= settings.max_time_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return _Measured(times, _ci_met(len(times), ci_rel, settings), ci_rel, warmup)


def _wall_sync_for(timer: Timer, synchronize: Callable[[], None] | None) -> Callable[[], None]:
    """What waits for a wall-timed step: the caller's synchronize, and for CUDA-event steps
    (whose warm-up is wall-timed) also torch's current stream, where the events go."""
    sync = synchronize or _no_sync
    if timer != "cuda_events":
        return sync
    import torch  # noqa: PLC0415 - only on the CUDA path

    def both() -> None:
        sync()
        torch.cuda.current_stream().synchronize()

    return both


def measure(
    step: Callable[[], Any],
    *,
    batch: int = 1,
    timer: Timer = "wall",
    synchronize: Callable[[], None] | None = None,
    settings: LatencySettings | None = None,
) -> tuple[list[float], bool, float | None]:
    """Warm `step` up, then time it until the stopping rule holds.

    Returns (per-iteration ms, converged, ci_rel): converged says the median's CI came
    within ±settings.rel_ci after at least min_iters iterations; ci_rel is the achieved
    relative half-width (None when too few iterations ran to have a CI). `batch` is only
    checked here: turning times into throughput is the caller's business.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    m = _measure(step, timer, synchronize, settings or LatencySettings())
    return m.times_ms, m.converged, m.ci_rel


# Each try times both models for about this long in all: enough for a ratio within a few percent.
SIDE_BY_SIDE = LatencySettings(warmup=5, warmup_s=0.1, min_iters=20, max_iters=2000, min_time_s=0.5,
                               max_time_s=3.0, rel_ci=0.02)


def time_side_by_side(runners: Sequence[Runner], batch: int, threads: int | None, settings: LatencySettings,
                      rounds: int) -> list[float]:
    """p50 ms of each runner, measured in `rounds` interleaved rounds (order rotating) and pooled."""
    per_round = settings.model_copy(update={
        "min_iters": max(5, settings.min_iters // rounds), "max_iters": max(5, settings.max_iters // rounds),
        "min_time_s": settings.min_time_s / rounds,
        "max_time_s": max(settings.max_time_s / rounds, settings.min_time_s / rounds),
    })
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for r in range(rounds):
        for i in order[r % len(order):] + order[: r % len(order)]:
            runner = runners[i]
            with pin_cpu_threads(threads if runner.device == "cpu" else None):
                ts, _, _ = measure(runner.timed_step(batch), batch=batch, timer=runner.timer,
                                   synchronize=runner.synchronize, settings=per_round)
            times[i].extend(ts)
    return [float(np.median(t)) for t in times]


# ----------------------------------------------------------------------------- results

@dataclass
class LatencyResult:
    """One (runner, batch size) measurement. Times in ms; throughput_per_s is samples per
    second of back-to-back single-stream inference: batch * iterations / total timed s."""

    backend: str
    device: str
    precision: str
    batch: int
    iterations: int
    warmup: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    throughput_per_s: float
    timer: str
    threads: int | None
    converged: bool
    ci_rel: float | None
    cores: list[int] | None = None
    input_shape: list[int] | None = None
    model: str | None = None          # which model, when several are timed side by side
    # Confidence intervals (at the settings' confidence) of the p50 and the p99, from order
    # statistics; None for a side the samples cannot bound. A decision on a limit reads these.
    p50_ci_low_ms: float | None = None
    p50_ci_high_ms: float | None = None
    p99_ci_low_ms: float | None = None
    p99_ci_high_ms: float | None = None
    rel_ci_goal: float | None = None  # the ±rel_ci the measurement aimed at (converged = reached)
    max_time_s: float | None = None   # the timing budget it ran under
    attempt: int = 1                  # 2 for a re-measurement with a longer budget (remeasure_longer)

    @classmethod
    def from_times(
        cls,
        times_ms: Sequence[float],
        *,
        backend: str,
        device: str,
        precision: str,
        batch: int,
        warmup: int,
        timer: str,
        threads: int | None,
        converged: bool,
        ci_rel: float | None,
        cores: Sequence[int] | None = None,
        input_shape: Sequence[int] | None = None,
        settings: LatencySettings | None = None,
        attempt: int = 1,
    ) -> "LatencyResult":
        """Summarize raw per-iteration times into a result. `settings` (what the times were
        measured with) gives the CIs' confidence and is recorded (goal, time budget)."""
        stats = summarize(times_ms)
        total_s = float(np.sum(times_ms)) / 1e3
        confidence = settings.confidence if settings is not None else LatencySettings().confidence
        p50_ci = median_ci(times_ms, confidence) or (None, None)
        p99_ci = quantile_ci(times_ms, 0.99, confidence)
        return cls(
            backend=backend, device=device, precision=precision, batch=int(batch),
            iterations=len(times_ms), warmup=int(warmup), **stats,
            throughput_per_s=batch * len(times_ms) / total_s if total_s > 0 else math.inf,
            timer=timer, threads=threads, converged=bool(converged), ci_rel=ci_rel,
            cores=list(cores) if cores is not None else None,
            input_shape=list(input_shape) if input_shape is not None else None,
            p50_ci_low_ms=p50_ci[0], p50_ci_high_ms=p50_ci[1], p99_ci_low_ms=p99_ci[0], p99_ci_high_ms=p99_ci[1],
            rel_ci_goal=settings.rel_ci if settings is not None else None,
            max_time_s=settings.max_time_s if settings is not None else None,
            attempt=int(attempt),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LatencyResult":
        """Inverse of dataclasses.asdict; keys from newer writers are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def bench_runner(
    runner: Runner,
    batch_sizes: Sequence[int] = (1, 8, 32),
    *,
    input_shape: Sequence[int] | None = None,
    settings: LatencySettings | None = None,
    progress: Callable[[LatencyResult], None] | None = None,
) -> list[LatencyResult]:
    """Measure `runner` at each batch size; `progress` sees each result as it is done.

    CPU runners run inside pin_cpu_threads(settings.threads); the recorded threads are the
    runner's own (e.g. onnxruntime intra-op threads) when it has them, else torch's.
    `input_shape` is only recorded: the runner's timed_step owns its input.
    """
    settings = settings or LatencySettings()
    if not batch_sizes or any(isinstance(b, bool) or int(b) != b or b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes {list(batch_sizes)} must be positive integers")
    on_cpu = runner.device == "cpu"
    results = []
    for batch in batch_sizes:
        with pin_cpu_threads(settings.threads if on_cpu else None) as pinned:
            step = runner.timed_step(int(batch))
            m = _measure(step, runner.timer, runner.synchronize, settings)
        result = LatencyResult.from_times(
            m.times_ms, backend=runner.backend, device=runner.device, precision=runner.precision,
            batch=int(batch), warmup=m.warmup, timer=runner.timer,
            threads=runner.threads if runner.threads is not None else (pinned["threads"] if on_cpu else None),
            converged=m.converged, ci_rel=m.ci_rel,
            cores=pinned["cores"] if on_cpu else None, input_shape=input_shape, settings=settings,
        )
        results.append(result)
        if progress is not None:
            progress(result)
    return results


def longer_settings(
    settings: LatencySettings,
    *,
    factor: float = REMEASURE_FACTOR,
    max_time_s: float = REMEASURE_MAX_TIME_S,
) -> LatencySettings:
    """The settings of a re-measurement: `factor` times the time budget, at most
    `max_time_s` (but never less than before), and the iteration cap raised alike, since a
    fast step would otherwise stop at max_iters long before the longer budget is used."""
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor!r}")
    budget = max(settings.max_time_s, min(settings.max_time_s * factor, max_time_s))
    scale = budget / settings.max_time_s
    # round() first: 0.1 * 3 / 0.1 is 3.0000000000000004, and ceil would add an iteration.
    return settings.model_copy(update={"max_time_s": budget, "max_iters": math.ceil(round(settings.max_iters * scale, 6))})


def not_converged(results: Iterable[LatencyResult], batches: Iterable[int] | None = None) -> list[int]:
    """The batch sizes (sorted, among `batches` when given) at which the latest attempt of
    some model (several are timed side by side) did not converge."""
    latest: dict[tuple, LatencyResult] = {}
    for r in results:
        key = (r.model, r.backend, r.precision, r.batch)
        if key not in latest or r.attempt > latest[key].attempt:
            latest[key] = r
    wanted = None if batches is None else set(batches)
    return sorted({r.batch for r in latest.values() if not r.converged and (wanted is None or r.batch in wanted)})


def remeasure_longer(
    bench: Callable[[LatencySettings, list[int]], Sequence[LatencyResult]],
    results: Sequence[LatencyResult],
    settings: LatencySettings,
    *,
    batches: Iterable[int] | None = None,
    factor: float = REMEASURE_FACTOR,
    max_time_s: float = REMEASURE_MAX_TIME_S,
) -> list[LatencyResult]:
    """Re-time what did not converge, once, with longer_settings(settings).

    `bench(settings, batch_sizes)` times the same runner(s) again (e.g. bench_runner, or the
    side-by-side benchmark of a candidate and its baseline) and returns their results;
    `results` are the first attempt's, `batches` limits the re-measurement to the batch sizes
    a decision needs. Returns only the new results, each marked one attempt later than the
    latest it repeats and with the longer budget; [] when everything converged. The caller
    keeps both attempts: the later one is the measurement, the earlier one its history.
    """
    redo = not_converged(results, batches)
    if not redo:
        return []
    longer = longer_settings(settings, factor=factor, max_time_s=max_time_s)
    attempt = 1 + max(r.attempt for r in results if r.batch in redo)
    new = list(bench(longer, redo))
    for r in new:
        r.attempt = attempt
        r.max_time_s = longer.max_time_s
        if r.rel_ci_goal is None:
            r.rel_ci_goal = longer.rel_ci
    return new


def _finite_or_none(x: Any) -> Any:
    """Strict JSON has no Infinity/NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_none(v) for v in x]
    return x


@dataclass
class BenchReport:
    """Latency results together with the machine and settings they were measured with."""

    machine: dict[str, Any]
    settings: LatencySettings
    results: list[LatencyResult]
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(
        cls,
        results: list[LatencyResult],
        settings: LatencySettings | None = None,
        extra: dict[str, Any] | None = None,
    ) -> "BenchReport":
        """A report for results measured just now, on this machine."""
        return cls(machine=describe_machine(), settings=settings or LatencySettings(),
                   results=list(results), extra=dict(extra or {}))

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none({
            "format": REPORT_FORMAT,
            "created_at": self.created_at,
            "machine": self.machine,
            "settings": self.settings.model_dump(),
            "results": [dataclasses.asdict(r) for r in self.results],
            "extra": self.extra,
        })

    def to_json(self, path: str | Path) -> Path:
        """Write the report as strict JSON, atomically; returns the path."""
        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=False, default=str) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "BenchReport":
        """Read a report written by to_json; ValueError naming the file if it is not one."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read latency report {path}: {e}") from None
        if not isinstance(d, dict) or d.get("format") != REPORT_FORMAT:
            raise ValueError(f"{path} is not a latency report (format {REPORT_FORMAT!r})")
        return cls(
            machine=d.get("machine") or {},
            settings=LatencySettings(**(d.get("settings") or {})),
            results=[LatencyResult.from_dict(r) for r in d.get("results") or []],
            created_at=d.get("created_at") or "",
            extra=d.get("extra") or {},
        )


def table(report: BenchReport) -> Table:
    """A rich Table of the report's results, titled with the machine summary."""
    from rich.table import Table  # noqa: PLC0415 - only for display

    t = Table(title=f"Latency — {machine_summary(report.machine)}", title_justify="left")
    models = any(r.model for r in report.results)
    if models:
        t.add_column("model")
    for name in ("backend", "device", "precision", "batch"):
        t.add_column(name, justify="right" if name == "batch" else "left")
    for name in ("p50 ms", "p90 ms", "p99 ms", "samples/s", "iters"):
        t.add_column(name, justify="right")
    t.add_column("converged")
    for r in report.results:
        ci = f" ±{100 * r.ci_rel:.1f}%" if r.ci_rel is not None else ""
        t.add_row(
            *([r.model or ""] if models else []), r.backend, r.device, r.precision, str(r.batch),
            f"{r.p50_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.p99_ms:.3f}",
            f"{r.throughput_per_s:,.1f}", str(r.iterations),
            ("yes" if r.converged else "no") + ci,
        )
    return t
