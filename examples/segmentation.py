"""A segmentation-style network on generated data: per-pixel classes, mIoU and pixel accuracy.

Use it from a config:
    model: {name: "examples.segmentation:TinySegNet", kwargs: {classes: 3}}
    data:  {name: "examples.segmentation:shapes"}
    task:  "examples.segmentation:Segmentation"
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from pfp.tasks import Task


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class TinySegNet(nn.Module):
    """Encoder-decoder without skips: 3 conv blocks down to 1/2, 2 back up, a 1x1 classifier."""

    def __init__(self, classes: int = 3, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(*_block(in_channels, width), *_block(width, 2 * width), nn.MaxPool2d(2),
                                     *_block(2 * width, 2 * width))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.decoder = nn.Sequential(*_block(2 * width, width), *_block(width, width))
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.up(self.encoder(x))))


def _shapes(n: int, size: int, seed: int) -> TensorDataset:
    """Noisy images with one bright square (class 1) and one dim disc (class 2) on background 0."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.zeros(n, 1, size, size)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        s = int(torch.randint(4, size // 3, (1,), generator=g))
        x0, y0 = (int(v) for v in torch.randint(0, size - s, (2,), generator=g))
        r = float(torch.randint(3, size // 5, (1,), generator=g))
        cx, cy = (float(v) for v in torch.randint(int(r), size - int(r), (2,), generator=g))
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        square = (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
        masks[i][disc] = 2
        masks[i][square] = 1
        images[i, 0] = 0.5 * disc.float() + 1.0 * square.float()
    images += 0.3 * torch.randn(images.shape, generator=g)
    return TensorDataset(images, masks)


def shapes(train: int = 512, test: int = 128, size: int = 32, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Train and test sets of generated shapes (the config's data.name)."""
    return _shapes(train, size, seed), _shapes(test, size, seed + 1)


class Segmentation(Task):
    """Per-pixel cross-entropy; mean IoU over classes (`miou`, percent) and pixel accuracy."""

    name = "segmentation"
    metric = "miou"
    higher_is_better = True

    def __init__(self, classes: int = 3) -> None:
        self.classes = classes

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(inputs), targets)

    def evaluate(self, model: nn.Module, loader, device: torch.device) -> dict[str, float]:
        k = self.classes
        confusion = torch.zeros(k, k, dtype=torch.float64, device=device)
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                logits = model(x)
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                count += y.numel()
                idx = y.flatten() * k + logits.argmax(1).flatten()
                confusion += torch.bincount(idx, minlength=k * k).reshape(k, k).double()
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp
        iou = tp[union > 0] / union[union > 0]
        return {"miou": 100.0 * float(iou.mean()), "pixel_acc": 100.0 * float(tp.sum() / confusion.sum()),
                "loss": loss_sum / max(count, 1)}
