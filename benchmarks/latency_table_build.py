"""Build time and size on disk of a latency table, from an empty cache, for any model.

    .venv/bin/python benchmarks/latency_table_build.py --model tv:resnet50 --size 224 --batch 1
    .venv/bin/python benchmarks/latency_table_build.py --model resnet20 --size 28 --channels 1 --batch 32

Prints the number of blocks, measurements, seconds and KiB, and how often the table's
prediction for the full model matches (it is the reference) plus the spread of block ranges.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from export.latency_table import GridSettings, build_latency_table, cache_size_bytes
from pfp.config import LatencyTargetConfig
from pfp.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tv:resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="ort-cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(args.model, args.classes, args.channels, args.size).eval()
    x = torch.rand(1, args.channels, args.size, args.size)
    spec = LatencyTargetConfig(backend=args.backend, batch=args.batch, threads=args.threads)
    with tempfile.TemporaryDirectory(prefix="pfp-table-bench-") as cache:
        start = time.perf_counter()
        table = build_latency_table(model, x, spec, cache_dir=cache, grid=GridSettings(),
                                    progress=lambda line: print(f"  {line}", flush=True))
        seconds = time.perf_counter() - start
        size = cache_size_bytes(cache)
        files = len(list(Path(cache).glob("*.json")))
    points = sum(len(b.counts) for b in table.blocks.values())
    ranges = sorted((b.at(b.size) - b.at(1)) / table.full_ms for b in table.blocks.values())
    print(f"{args.model} at {args.size} px, {args.backend} batch {args.batch}, {args.threads} thread(s): "
          f"{len(table.blocks)} blocks ({files} distinct shapes, {table.cached_blocks} reused), {points} timed counts, "
          f"{len(table.pairs)} shared layers; built in {seconds:.1f} s, {size / 1024:.1f} KiB on disk; "
          f"full model {table.full_ms:.3f} ms; block ranges {ranges[0]:.1%} .. {ranges[-1]:.1%} of it")


if __name__ == "__main__":
    main()
