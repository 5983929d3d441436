"""A regression network on generated data: predict a blob's centre and radius, judged by MSE.

Use it from a config:
    model: {name: "examples.regression:BlobRegressor"}
    data:  {name: "examples.regression:blobs"}
    task:  "examples.regression:Regression"
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from pfp.tasks import Task


class BlobRegressor(nn.Module):
    """Four conv blocks and a small MLP head giving (x, y, r) in [0, 1]."""

    def __init__(self, in_channels: int = 1, width: int = 16, outputs: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (width, 2 * width, 4 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * 2 * 2, 64), nn.ReLU(), nn.Linear(64, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _blobs(n: int, size: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    targets = torch.rand(n, 3, generator=g) * torch.tensor([0.6, 0.6, 0.15]) + torch.tensor([0.2, 0.2, 0.05])
    cx, cy, r = (targets[:, i, None, None] * size for i in range(3))
    images = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)).unsqueeze(1)
    images += 0.1 * torch.randn(images.shape, generator=g)
    return TensorDataset(images, targets)


def blobs(train: int = 512, test: int = 128, size: int = 32, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets of generated blobs (the config's data.name)."""
    return _blobs(train, size, seed), _blobs(test, size, seed + 1)


class Regression(Task):
    """Mean squared error, lower is better (`mse`, in units of the image side squared x 1e3)."""

    name = "regression"
    metric = "mse"
    higher_is_better = False

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(model(inputs), targets)

    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                total += float(F.mse_loss(model(x), y, reduction="sum"))
                count += y.numel()
        mse = total / max(count, 1)
        return {"mse": 1e3 * mse, "loss": mse}
