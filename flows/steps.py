"""The library functions the flows' tasks wrap: each takes and returns plain data, typed
results and file paths (never modules), so a task can run in the flow's process or on a
work pool's worker.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from export.bundle import export_bundle, read_meta
from export.efficiency import Candidate, bench_side_by_side, efficiency_rows
from export.bundle import load_bundle
from export.inputs import calibration_inputs, test_batches
from export.latency import LatencySettings
from export.onnx_export import sha256_file
from flows.config import PipelineConfig, TargetConfig
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


def export_model(cfg: PipelineConfig, model_path: str, out_dir: str) -> dict:
    """Bundle `model_path` into `out_dir` (ONNX, checks, parity on the test set).

    An existing bundle made from the same model file is reused (resume after a crash).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    if (out / "export.json").is_file():
        try:
            meta = read_meta(out)
            if meta["model"]["sha256"] == sha256_file(model_path):
                load_bundle(out)  # verifies both files' hashes
                return {"bundle": str(out), "meta": meta, "reused": True, "seconds": time.perf_counter() - start}
        except (OSError, ValueError, KeyError):
            pass  # not a usable bundle: export again
    setup = cached_setup(cfg, progress=False)
    e = cfg.export
    _, meta = export_bundle(
        model_path, out, test_batches(setup.data), parity_samples=e.parity_samples, opset=e.opset,
        exporter=e.exporter, simplify=e.simplify,
    )
    return {"bundle": str(out), "meta": meta, "reused": False, "seconds": time.perf_counter() - start}


def benchmark(cfg: PipelineConfig, target: TargetConfig, bundles: dict[str, str], baseline: str) -> dict:
    """Time every bundle on `target` side by side; latency results and speed-up efficiency.

    Returns {"results": [...], "efficiency": [...], "error": None}; a target that cannot
    run here (backend missing, no GPU) gives {"error": reason} instead of raising, so the
    gate can record why it was not evaluated.
    """
    from export.backends import BackendError, BackendUnavailable

    start = time.perf_counter()
    settings = LatencySettings(threads=target.threads, max_time_s=target.max_time_s,
                               min_time_s=min(1.0, target.max_time_s))
    try:
        candidates = [Candidate(label, load_bundle(path), int(read_meta(path)["flops"])) for label, path in bundles.items()]
        calibration = None
        if target.precision == "int8":
            calibration = calibration_inputs(cached_setup(cfg, progress=False).data, n=512, seed=cfg.seed)
        results = bench_side_by_side(
            candidates, [target.backend], [target.precision], target.batch_sizes, settings=settings,
            rounds=2 if len(candidates) > 1 else 1, calibration=calibration,
            workdir=Path(bundles[baseline]).parent / "build" / target.name,
        )
    except (BackendUnavailable, BackendError) as e:
        return {"target": target.name, "results": [], "efficiency": [], "error": str(e),
                "seconds": time.perf_counter() - start}
    flops = {c.label: c.flops for c in candidates}
    return {
        "target": target.name,
        "results": [dataclasses.asdict(r) for r in results],
        "efficiency": efficiency_rows(results, flops, baseline),
        "error": None,
        "seconds": time.perf_counter() - start,
    }
