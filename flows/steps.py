"""The library functions the flows' tasks wrap: each takes and returns plain data and file
paths (never modules), so a task can run in the flow's process or on a work pool's worker.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from export.bundle import export_bundle, load_bundle, read_meta
from export.efficiency import Candidate, bench_side_by_side, efficiency_rows
from export.inputs import calibration_inputs, test_batches
from export.latency import LatencySettings
from export.results import BenchmarkResult, BundleInfo, EfficiencyRow, LatencyRow
from flows.config import BackendConfig, PipelineConfig
from pfp.pipeline import _error_row, cached_setup, calibration_fingerprint, run_iteration
from pfp.prune import PruneError


def calibrate(cfg: PipelineConfig, *, console: Console | None = None, progress: bool = True) -> dict:
    """Data, the trained base model (trained, reused or loaded) and the calibration set S."""
    start = time.perf_counter()
    setup = cached_setup(cfg, console=console, progress=progress)
    return {
        "base_path": str(setup.base_path), "run_dir": str(setup.run_dir),
        "acc": setup.acc, "loss": setup.loss, "params": setup.params, "flops": setup.flops,
        "trained_now": setup.trained_now, **calibration_fingerprint(setup),
        "seconds": time.perf_counter() - start,
    }


def iterate(cfg: PipelineConfig, index: int, parent: str | None, *, console: Console | None = None,
            progress: bool = True) -> dict:
    """Cascade round `index`: prune `parent` (None: base), retrain, evaluate (resumable).

    A target pruning cannot reach (PruneError) comes back as a row with its `error`, as in
    `pfp.pipeline.run_cascade`: the cascade stops there and keeps the rounds before it.
    """
    start = time.perf_counter()
    try:
        row = run_iteration(cfg, index, parent, console=console, progress=progress)
    except PruneError as e:
        pc = cfg.prune
        return _error_row(pc.method, pc.target, pc.keep_ratios[index], e) | {
            "round": index + 1, "task_seconds": time.perf_counter() - start}
    report = json.loads(Path(row["report_path"]).read_text()) if Path(row["report_path"]).is_file() else {}
    # measured first: the worst consumer's relative pre-activation error on held-out points
    measured = report.get("guarantee") or []
    row["preact_err_p95_max"] = max((m["rel_p95"] for m in measured), default=None)
    row["preact_eps99_max"] = max((m["eps99"] for m in measured), default=None)
    coverage = [layer["coverage"] for layer in report.get("layers", []) if layer.get("coverage") is not None]
    row["coverage_min"] = min(coverage) if coverage else None
    row["coverage_mean"] = sum(coverage) / len(coverage) if coverage else None
    row["task_seconds"] = time.perf_counter() - start
    return row


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


def benchmark(cfg: PipelineConfig, backend: BackendConfig, bundles: dict[str, str], baseline: str) -> BenchmarkResult:
    """Time every bundle on `backend` side by side; latency results and speed-up efficiency.

    A backend that cannot run here (missing, no GPU) comes back with its `error` instead of
    raising, so the gate can record why it was not evaluated.
    """
    from export.backends import BackendError, BackendUnavailable

    start = time.perf_counter()
    settings = LatencySettings(threads=backend.threads, max_time_s=backend.max_time_s,
                               min_time_s=min(1.0, backend.max_time_s))
    try:
        candidates = [Candidate(label, load_bundle(path), int(read_meta(path)["flops"])) for label, path in bundles.items()]
        calibration = None
        if backend.precision == "int8":
            calibration = calibration_inputs(cached_setup(cfg, progress=False).data, n=512, seed=cfg.seed)
        results = bench_side_by_side(
            candidates, [backend.backend], [backend.precision], backend.batch_sizes, settings=settings,
            rounds=2 if len(candidates) > 1 else 1, calibration=calibration,
            workdir=Path(bundles[baseline]).parent / "build" / backend.name,
        )
    except (BackendUnavailable, BackendError) as e:
        return BenchmarkResult(backend=backend.name, error=str(e), seconds=time.perf_counter() - start)
    flops = {c.label: c.flops for c in candidates}
    return BenchmarkResult(
        backend=backend.name,
        results=[LatencyRow.from_result(r) for r in results],
        efficiency=[EfficiencyRow(**row) for row in efficiency_rows(results, flops, baseline)],
        seconds=time.perf_counter() - start,
    )
