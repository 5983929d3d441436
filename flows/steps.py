"""The library functions the flows' tasks wrap: each takes and returns plain data, typed
results and file paths (never modules), so a task can run in the flow's process or on a
work pool's worker.
"""
from __future__ import annotations

import time
from pathlib import Path

from export.bundle import export_bundle, load_bundle, read_meta
from export.efficiency import Candidate, bench_side_by_side, efficiency_rows
from export.inputs import calibration_inputs, test_batches
from export.latency import LatencySettings
from export.results import BenchmarkResult, BundleInfo, EfficiencyRow
from flows.config import BackendConfig, PipelineConfig
from pfp.prune import PruneError
from pfp.results import BaseInfo, RoundResult
from pfp.rounds import RoundSpec, run_round
from pfp.setup import cached_setup


def calibrate(cfg: PipelineConfig, *, progress: bool = True) -> BaseInfo:
    """Data, the trained base model (trained, reused or loaded) and the calibration set S."""
    start = time.perf_counter()
    setup = cached_setup(cfg, progress=progress)
    return setup.base_info(seconds=time.perf_counter() - start)


def iterate(cfg: PipelineConfig, index: int, parent: str | None, *, progress: bool = True) -> RoundResult:
    """Cascade round `index`: prune `parent` (None: base), retrain, evaluate (resumable).

    The same `pfp.rounds.run_round` as `pfp.cascade.run_cascade`; a target pruning cannot
    reach (PruneError) comes back as a row with its `error`: the cascade stops there and
    keeps the rounds before it. `progress`: retraining progress bars.
    """
    start = time.perf_counter()
    setup = cached_setup(cfg, progress=progress)
    spec = RoundSpec.cascade(cfg, index, setup.run_dir)
    try:
        row = run_round(setup, spec, parent, progress=progress)
    except PruneError as e:
        row = RoundResult.failed(spec.prune.method, spec.prune.target, spec.keep_ratio, e, round=spec.round)
    return row.model_copy(update={"task_seconds": time.perf_counter() - start})


def latency_cache_dir(cfg: PipelineConfig) -> str | None:
    """The latency table cache the rounds' pruner uses (prune.target latency, rounds run in
    this process); None otherwise: a dispatched round builds its tables on its worker."""
    if cfg.prune.target != "latency" or cfg.dispatch.iteration:
        return None
    from export.latency_table import DEFAULT_CACHE_DIR  # torch and the backends: only for latency targets

    return str(cfg.prune.latency.cache_dir or DEFAULT_CACHE_DIR)


def export_model(cfg: PipelineConfig, model_path: str, out_dir: str) -> BundleInfo:
    """Bundle `model_path` into `out_dir` (ONNX, checks, parity on the test set).

    Resume after a crash is the export task's cache (flows.compress), not a check here.
    """
    start = time.perf_counter()
    setup = cached_setup(cfg, progress=False)
    e = cfg.export
    _, meta = export_bundle(
        model_path, Path(out_dir), test_batches(setup.data), parity_samples=e.parity_samples, opset=e.opset,
        exporter=e.exporter, simplify=e.simplify,
    )
    return BundleInfo.from_meta(str(out_dir), meta, time.perf_counter() - start)


def bench_settings(backend: BackendConfig) -> LatencySettings:
    """How long a backend's bundles are timed (its max_time_s), on its threads."""
    return LatencySettings(threads=backend.threads, max_time_s=backend.max_time_s,
                           min_time_s=min(1.0, backend.max_time_s))


def benchmark(cfg: PipelineConfig, backend: BackendConfig, bundles: dict[str, str], baseline: str, *,
              settings: LatencySettings | None = None, batch_sizes: list[int] | None = None,
              attempt: int = 1) -> BenchmarkResult:
    """Time every bundle on `backend` side by side; latency results and speed-up efficiency.

    `settings`/`batch_sizes` replace the backend's own for a re-measurement (`attempt` 2: the
    gate re-times a check that did not converge, longer). A backend that cannot run here
    (missing, no GPU) comes back with its `error` instead of raising, so the gate can record
    why it was not evaluated.
    """
    from export.backends import BackendError, BackendUnavailable

    start = time.perf_counter()
    settings = settings or bench_settings(backend)
    try:
        candidates = [Candidate(label, load_bundle(path), int(read_meta(path)["flops"])) for label, path in bundles.items()]
        calibration = None
        if backend.precision == "int8":
            calibration = calibration_inputs(cached_setup(cfg, progress=False).data, n=512, seed=cfg.seed)
        results = bench_side_by_side(
            candidates, [backend.backend], [backend.precision], batch_sizes or backend.batch_sizes, settings=settings,
            rounds=2 if len(candidates) > 1 else 1, calibration=calibration,
            workdir=Path(bundles[baseline]).parent / "build" / backend.name,
        )
    except (BackendUnavailable, BackendError) as e:
        return BenchmarkResult(backend=backend.name, error=str(e), seconds=time.perf_counter() - start)
    for r in results:
        r.attempt, r.max_time_s, r.rel_ci_goal = attempt, settings.max_time_s, settings.rel_ci
    flops = {c.label: c.flops for c in candidates}
    return BenchmarkResult(
        backend=backend.name,
        results=list(results),
        efficiency=[EfficiencyRow(**row) for row in efficiency_rows(results, flops, baseline)],
        seconds=time.perf_counter() - start,
    )
