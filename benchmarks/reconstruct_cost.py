"""Reconstruction cost: seconds and peak memory of the ridge refit after pruning, per model.

    .venv/bin/python benchmarks/reconstruct_cost.py [--points 512] [--threads 1]

Each model (random weights; the cost does not depend on them) is pruned to 50% of its FLOPs
with L1 channels, then every consumer whose inputs shrank is refit on `points` images.
Prints the refit's wall time, its own peak-memory estimate (accumulators, solve, largest
tile) and the process's peak RSS growth (psutil) during the refit.
"""
from __future__ import annotations

import argparse
import copy
import time

import psutil
import torch
from torch.utils.data import DataLoader, TensorDataset

from pfp.config import PruneConfig
from pfp.models import build_model
from pfp.prune import prune
from pfp.reconstruct import reconstruct

MODELS = {"lenet5": (1, 28), "resnet20": (1, 28), "vgg_small": (1, 28), "resnet56": (1, 28),
          "tv:mobilenet_v2": (1, 32)}


def _inputs(m: torch.nn.Module) -> int:
    return m.in_channels if isinstance(m, torch.nn.Conv2d) else m.in_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    proc = psutil.Process()
    print(f"{'model':<18}{'layers':>7}{'seconds':>9}{'peak MiB (own)':>16}{'RSS growth MiB':>16}")
    for name in a.models.split(","):
        c, size = MODELS[name]
        torch.manual_seed(0)
        model = build_model(name, 10, c, size).eval()
        x = torch.randn(a.points, c, size, size).clamp(min=-2, max=2)
        loader = DataLoader(TensorDataset(x, torch.zeros(a.points, dtype=torch.long)), batch_size=128)
        cfg = PruneConfig(method="ft", round_to=8, calib_size=32, reconstruct=False, bn_recalibration=False)
        small, _, _ = prune(model, loader, cfg, 0.5, example_input=x[:1])
        before = dict(model.named_modules())
        layers = [n for n, m in small.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                  and _inputs(m) < _inputs(before[n])]
        target = copy.deepcopy(small)
        rss0 = proc.memory_info().rss
        start = time.perf_counter()
        rep = reconstruct(model, target, layers, loader, "cpu")
        seconds = time.perf_counter() - start
        grown = (proc.memory_info().rss - rss0) / 2**20
        print(f"{name:<18}{len(layers):>7}{seconds:>9.2f}{rep.peak_bytes / 2**20:>16.1f}{grown:>16.1f}")


if __name__ == "__main__":
    main()
