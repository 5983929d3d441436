"""The GPU check of latency targets, as one script: tables on torch-cuda (and TensorRT when it
imports), ResNet56 and torchvision's ResNet50 pruned to 50% of their measured latency.

    .venv/bin/python benchmarks/gpu_latency_targets.py                       # on the GPU machine
    .venv/bin/python benchmarks/gpu_latency_targets.py --backends torch-cpu --models resnet20 \\
        --sizes 32 --batch 8 --quick                                         # a CPU rehearsal

For each backend and model: build the table from an empty cache (build time, blocks, KiB), prune
with `pfp` to --target of the measured latency (random calibration images: this checks latency,
not accuracy; weights are untrained), and print target against measured for every try. Each
model is timed with the backend's own runner (CUDA events for the CUDA backends). A backend
that cannot run here is one line and the script goes on. Budget: about 10 minutes on one GPU
with the defaults; --quick shortens every timing and the grid.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from export.latency import LatencySettings
from export.latency_table import GridSettings, LatencyTableError, build_latency_table, cache_size_bytes
from export.latency_target import SIDE_BY_SIDE, prune_to_latency
from pfp.config import LatencyTargetConfig, PruneConfig
from pfp.models import build_model
from pfp.prune import PruneError

QUICK_BLOCK = LatencySettings(warmup=2, warmup_s=0.01, min_iters=5, max_iters=100, min_time_s=0.02, max_time_s=0.2)
QUICK_MODEL = LatencySettings(warmup=3, warmup_s=0.05, min_iters=10, max_iters=300, min_time_s=0.2, max_time_s=1.0)


def one(name: str, size: int, backend: str, args, workdir: Path) -> dict:
    """Table, then prune to the target; the row says what was measured."""
    row: dict = {"model": name, "size": size, "backend": backend, "batch": args.batch, "target": args.target}
    torch.manual_seed(0)
    model = build_model(name, 10 if not name.startswith("tv:") else 1000, 3, size).eval()
    x = torch.rand(args.points, 3, size, size)
    spec = LatencyTargetConfig(backend=backend, batch=args.batch, precision=args.precision, tries=args.tries,
                               threads=args.threads)
    grid = GridSettings(dense_upto=16, coarse_points=8, max_points=14) if args.quick else GridSettings()
    cache = workdir / f"cache-{backend}-{name.replace(':', '_')}"
    t0 = time.perf_counter()
    try:
        table = build_latency_table(model, x[:1], spec, cache_dir=cache, grid=grid,
                                    block_settings=QUICK_BLOCK if args.quick else None,
                                    model_settings=QUICK_MODEL if args.quick else None)
    except LatencyTableError as e:
        return row | {"error": str(e)}
    row.update(table_s=round(time.perf_counter() - t0, 1), blocks=len(table.blocks),
               table_kib=round(cache_size_bytes(cache) / 1024, 1), full_ms=round(table.full_ms, 4))
    cfg = PruneConfig(method="pfp", target="latency", calib_size=args.points, latency=spec)
    side = (QUICK_MODEL if args.quick else SIDE_BY_SIDE).model_copy(update={"threads": args.threads})
    try:
        _, prep, rep = prune_to_latency(model, [(x, torch.zeros(len(x), dtype=torch.long))], cfg, args.target,
                                        example_input=x[:1], table=table, settings=side, rounds=2)
    except (PruneError, LatencyTableError) as e:
        return row | {"error": str(e)}
    row.update(measured=round(rep.best_ratio, 4), met=rep.met, message=rep.message,
               flops_kept=round(prep.flops / prep.original_flops, 4),
               tries=[(t.cost_model, round(t.keep_ratio, 3), t.predicted_ratio and round(t.predicted_ratio, 3),
                       round(t.measured_ratio, 3))
                      for t in rep.tries])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="torch-cuda,tensorrt")
    ap.add_argument("--models", default="resnet56,tv:resnet50")
    ap.add_argument("--sizes", default="32,224", help="input side per model, in --models order")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--tries", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--points", type=int, default=32, help="random calibration images")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    models = args.models.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != len(models):
        raise SystemExit(f"--sizes: {len(sizes)} sizes for {len(models)} models")
    rows = []
    with tempfile.TemporaryDirectory(prefix="pfp-gpu-latency-") as tmp:
        for backend in args.backends.split(","):
            for name, size in zip(models, sizes):
                row = one(name, size, backend, args, Path(tmp))
                rows.append(row)
                print(json.dumps(row), flush=True)
    for r in rows:
        what = r.get("message") or r.get("error")
        table = f"table {r['table_s']} s, {r['blocks']} blocks, {r['table_kib']} KiB; " if "table_s" in r else ""
        print(f"{r['model']} {r['size']}px on {r['backend']} batch {r['batch']}: {table}{what}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
