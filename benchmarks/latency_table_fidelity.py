"""How faithful is a latency table? Its prediction against the measured ratio, for real allocations.

Builds (or reads from --cache-dir) the table of --model on ONNX Runtime CPU at --batch, prunes
to each ask with `prune.target: latency` and each method (the allocation the table drives),
and times every pruned model against the unpruned one side by side, --repeat times. Two
repeats that agree and a prediction that does not say the table, not the timing, is off.

    .venv/bin/python benchmarks/latency_table_fidelity.py --model resnet20 --batch 1
    .venv/bin/python benchmarks/latency_table_fidelity.py --model resnet56 --batch 32 --asks 0.5,0.3 --methods pfp
    .venv/bin/python benchmarks/latency_table_fidelity.py --context-s 0 --calibration ''   # the blocks alone

Weights are random and calibration images are noise: latency does not depend on either.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from export.latency_table import build_latency_table, check_target, load_runner
from export.latency_target import SIDE_BY_SIDE, time_side_by_side
from pfp.config import LatencyTargetConfig, PruneConfig
from pfp.models import build_model
from pfp.prune import PruneError, prune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--size", type=int, default=28, help="input side (1-channel images, as the quality benchmark)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--asks", default="0.8,0.6,0.45,0.3", help="latency keep ratios asked of the allocator")
    ap.add_argument("--methods", default="ft,pfp", help="ft: uniform allocation; pfp: its measured-divergence search")
    ap.add_argument("--repeat", type=int, default=2, help="side-by-side timings per pruned model")
    ap.add_argument("--cache-dir", type=Path, default=None, help="table cache (default: a fresh one, a real build)")
    ap.add_argument("--context-s", type=float, default=LatencyTargetConfig().context_s,
                    help="seconds for timing groups' staircase tops in the whole model (0: none)")
    ap.add_argument("--calibration", default=",".join(str(w) for w in LatencyTargetConfig().calibration),
                    help="uniform widths that set the realized share ('': none, the blocks' sum as it is)")
    args = ap.parse_args()
    console = Console(width=140)

    torch.manual_seed(0)
    model = build_model(args.model, 10, 1, args.size).eval()
    calib = [(torch.randn(64, 1, args.size, args.size), torch.zeros(64, dtype=torch.long))]
    x = calib[0][0][:1]
    spec = LatencyTargetConfig(backend="ort-cpu", batch=args.batch, threads=args.threads, context_s=args.context_s,
                               calibration=[float(w) for w in args.calibration.split(",") if w])
    backend = check_target(spec)
    with tempfile.TemporaryDirectory(prefix="pfp-fidelity-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        table = build_latency_table(model, x, spec, cache_dir=args.cache_dir or work / "cache")
        console.print(f"{args.model} table at batch {args.batch}: {len(table.blocks)} blocks in "
                      f"{time.perf_counter() - t:.1f} s ({len(table.in_context)} groups timed in context); full model {table.full_ms:.3f} ms; {table.realized:.0%} of the "
                      f"blocks' savings realized (" + ", ".join(f"uniform {c.width:.0%}: blocks {c.predicted_ratio:.3f}, "
                                                                 f"measured {c.measured_ratio:.3f}" for c in table.calibration) + ")")
        unpruned = load_runner(backend, copy.deepcopy(model), list(x.shape[1:]), spec, work, "unpruned")
        out = Table("method", "ask", "predicted", "measured", "measured / predicted", "FLOPs kept")
        try:
            for method in args.methods.split(","):
                for ask in [float(a) for a in args.asks.split(",")]:
                    cfg = PruneConfig(method=method, target="latency", latency=spec.model_dump())
                    try:
                        pruned, rep, _ = prune(model, calib, cfg, ask, example_input=x, postprocess_loader=calib,
                                               latency_model=table)
                    except PruneError as e:
                        out.add_row(method, f"{ask:.2f}", "-", f"not pruned: {e}", "-", "-")
                        continue
                    runner = load_runner(backend, copy.deepcopy(pruned), list(x.shape[1:]), spec, work,
                                         f"{method}_{ask}")
                    try:
                        measured = []
                        for _ in range(args.repeat):
                            p_ms, u_ms = time_side_by_side([runner, unpruned], args.batch, args.threads,
                                                           SIDE_BY_SIDE, 3)
                            measured.append(p_ms / u_ms)
                    finally:
                        runner.close()
                    predicted = rep.latency_ms / table.full_ms
                    mean = sum(measured) / len(measured)
                    out.add_row(method, f"{ask:.2f}", f"{predicted:.3f}", " / ".join(f"{m:.3f}" for m in measured),
                                f"{mean / predicted:.2f}", f"{rep.flops / rep.original_flops:.3f}")
                    console.print(f"{method} ask {ask}: predicted {predicted:.3f}, measured "
                                  + ", ".join(f"{m:.3f}" for m in measured))
        finally:
            unpruned.close()
        console.print(out)


if __name__ == "__main__":
    main()
