"""Real inputs for export checks: test-set batches for parity, training images for INT8.

Both come from the run config's data set (pfp.data), so parity is measured on the same
images the model was evaluated on and INT8 ranges come from the calibration distribution.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Subset

from pfp.data import DataBundle, make_loader
from pfp.setup import eval_view
from pfp.serialization import CheckpointError


def check_fits(spec: dict, data: DataBundle, source: str) -> None:
    """CheckpointError naming `source` when a model spec does not fit the data set."""
    want = {"num_classes": data.num_classes, "in_channels": data.in_channels, "input_size": data.input_size}
    for key, value in want.items():
        if key in spec and int(spec[key]) != value:
            raise CheckpointError(f"{source}: the model has {key}={spec[key]} but data set {data.name} has {value}")


def test_batches(data: DataBundle, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """Test-set images in a fixed order, without labels."""
    for x, _ in make_loader(data.test, batch_size, shuffle=False):
        yield x


def calibration_inputs(data: DataBundle, n: int = 512, seed: int = 0) -> np.ndarray:
    """`n` training images (no augmentation), a fixed random draw, as float32 (n, C, H, W)."""
    view = eval_view(data.train, data.test)
    n = min(n, len(view))
    idx = torch.randperm(len(view), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    xs = [x for x, _ in make_loader(Subset(view, idx), 256, shuffle=False)]
    return torch.cat(xs).numpy().astype(np.float32)
