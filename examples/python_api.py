"""Prune your own model from Python in a few lines: the example a new user runs first.

    python examples/python_api.py

It builds the regression example's network, trains it briefly on generated data, prunes
half of its FLOPs with PFP, and prints the metric before and after.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import pfp  # noqa: E402
from examples.regression import BlobRegressor, Regression, blobs  # noqa: E402


def main(epochs: int = 3) -> dict[str, float]:
    torch.manual_seed(0)
    train_set, test_set = blobs(train=1024, test=256)
    model, task = BlobRegressor(), Regression()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for x, y in DataLoader(train_set, batch_size=64, shuffle=True):
            opt.zero_grad()
            task.loss(model, x, y).backward()
            opt.step()
    model.eval()
    test = DataLoader(test_set, batch_size=256)
    before = task.evaluate(model, test, torch.device("cpu"))[task.metric]

    calib = DataLoader(train_set, batch_size=64)
    # Only the inputs score filters; the task gives the output divergence the measuring allocations use.
    small, report = pfp.prune(model, calib, target="flops", keep=0.5, example_input=train_set[:1][0], task=task)
    after = task.evaluate(small.eval(), test, torch.device("cpu"))[task.metric]
    print(f"{task.metric} before {before:.3f}, after pruning {after:.3f} "
          f"(FLOPs {report.flops:,} of {report.original_flops:,}, {1 - report.flops / report.original_flops:.0%} removed)")
    return {"before": before, "after": after, "flops_removed": 1 - report.flops / report.original_flops}


if __name__ == "__main__":
    main()
