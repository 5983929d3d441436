"""Speed-up efficiency: measured speed-up over the unpruned model / ideal (FLOPs) speed-up.

    .venv/bin/python benchmarks/speedup_efficiency.py [--models resnet20,resnet56] \
        [--removed 0.5,0.7,0.85] [--round-to 1,8] [--backends ort-cpu] [--batch 1,32] \
        [--threads 2] [--max-time 12] [--json out.json] [--plot out.png]

Models are CIFAR-shaped (3x32x32), pruned by PFP in one shot with calibration on random
images: latency depends on the architecture that pruning leaves, not on the weights, so no
training is needed. Every pruned model is timed side by side with its unpruned model
(interleaved rounds, see export.efficiency). `--round-to 1,8` also shows what rounding kept
channels to multiples of 8 does to latency.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from rich.console import Console

from export.bundle import export_bundle
from export.efficiency import Candidate, bench_side_by_side, efficiency_rows, efficiency_table, plot_efficiency
from export.latency import BenchReport, LatencySettings
from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.prune import prune
from pfp.serialization import save_model


def make_models(name: str, removed: list[float], round_to: list[int], folder: Path) -> list[tuple[str, Path]]:
    """(label, model file) for the unpruned model and each (FLOPs removed, rounding)."""
    torch.manual_seed(0)
    spec = {"name": name, "num_classes": 10, "in_channels": 3, "input_size": 32}
    base = build_model(**spec).eval()
    files = [(f"{name}", folder / f"{name}.pt")]
    save_model(files[0][1], base, spec)
    x = torch.rand(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calib = [(x, torch.zeros(len(x), dtype=torch.long))]
    for r in removed:
        for rt in round_to:
            cfg = PruneConfig(method="pfp", calib_size=128, round_to=rt)
            pruned, _, _ = prune(copy.deepcopy(base), calib, cfg, 1 - r, example_input=x[:1])
            label = f"{name}-{int(round(100 * r))}%-r{rt}"
            path = folder / f"{label}.pt"
            save_model(path, pruned, spec)
            files.append((label, path))
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet20,resnet56")
    ap.add_argument("--removed", default="0.5,0.7,0.85")
    ap.add_argument("--round-to", default="1,8")
    ap.add_argument("--backends", default="ort-cpu")
    ap.add_argument("--batch", default="1,32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-time", type=float, default=12.0, help="seconds per model, backend and batch (all rounds)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    console = Console(width=150)
    settings = LatencySettings(threads=args.threads, max_time_s=args.max_time, min_time_s=min(3.0, args.max_time))
    removed = [float(v) for v in args.removed.split(",")]
    round_to = [int(v) for v in args.round_to.split(",")]
    all_rows, all_results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models.split(","):
            candidates = []
            for label, path in make_models(name, removed, round_to, folder):
                x = torch.rand(64, 3, 32, 32)
                bundle, meta = export_bundle(path, folder / label, [x], parity_samples=64)
                candidates.append(Candidate(label, bundle, int(meta["flops"])))
            results = bench_side_by_side(
                candidates, args.backends.split(","), ("fp32",), [int(b) for b in args.batch.split(",")],
                settings=settings, rounds=args.rounds,
            )
            rows = [r | {"family": name} for r in
                    efficiency_rows(results, {c.label: c.flops for c in candidates}, candidates[0].label)]
            console.print(efficiency_table(rows, title=f"{name}: speed-up efficiency (measured / ideal)"))
            all_rows += rows
            all_results += results
    report = BenchReport.new(all_results, settings, extra={"efficiency": all_rows})
    if args.json:
        report.to_json(args.json)
    if args.plot:
        plot_efficiency([r for r in all_rows if r["model"].endswith("-r8")] or all_rows, args.plot)


if __name__ == "__main__":
    main()
