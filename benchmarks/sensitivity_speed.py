"""Scoring speed: PFP's sensitivity pass over S divided by a plain forward pass over S.

Both are timed side by side in this process, on the same batches, after one warm-up.
    .venv/bin/python benchmarks/sensitivity_speed.py [--points 128] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from pfp.groups import PruningGraph
from pfp.importance import pfp_sensitivity
from pfp.models import build_model

CASES = [("resnet20", 3, 32), ("resnet56", 3, 32), ("tv:resnet50", 3, 224)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--models", default=",".join(c[0] for c in CASES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={torch.get_num_threads()} points={args.points} batch={args.batch} torch={torch.__version__}")
    print(f"{'model':<14}{'input':>8}{'forward s':>12}{'sensitivity s':>15}{'ratio':>8}")
    for name, ch, size in CASES:
        if name not in args.models.split(","):
            continue
        points = args.points if size <= 64 else max(args.batch, args.points // 4)
        model = build_model(name, 10, ch, size).eval()
        batches = [(torch.rand(args.batch, ch, size, size), torch.zeros(args.batch, dtype=torch.long))
                   for _ in range(max(1, points // args.batch))]
        graph = PruningGraph(model, batches[0][0][:1])
        with torch.no_grad():
            model(batches[0][0])
            t = time.perf_counter()
            for x, _ in batches:
                model(x)
            fwd = time.perf_counter() - t
        pfp_sensitivity(model, graph.groups, batches[:1], "cpu")  # warm-up
        res = pfp_sensitivity(model, graph.groups, batches, "cpu")
        print(f"{name:<14}{size:>8}{fwd:>12.3f}{res.seconds:>15.3f}{res.seconds / fwd:>8.1f}  ({res.points} points)")


if __name__ == "__main__":
    main()
