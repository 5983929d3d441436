"""Worker for tests/test_train.py::test_ddp_two_processes.

Run as `torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT_DIR`: trains a
tiny CNN on synthetic data with DistributedSampler for 2 epochs and writes, per rank,
OUT_DIR/rank{r}.pt (final state_dict) and OUT_DIR/rank{r}.json (accuracies); rank 0
also writes the training checkpoint OUT_DIR/ckpt.pt.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from pfp.config import TrainConfig
from pfp.distributed import cleanup, init_distributed
from pfp.train import evaluate, seed_everything, train


def quadrant_data(n: int, seed: int) -> TensorDataset:
    # The same data on every rank: it comes from a fixed generator, not the global one.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.6
    y = torch.randint(0, 4, (n,), generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 1.0
    return TensorDataset(x, y)


def main(out: Path) -> None:
    rank, world_size, _ = init_distributed()
    assert world_size == 2, world_size
    # Different seeds per rank: DDP must broadcast rank 0's initial weights.
    seed_everything(rank)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    )
    train_set, test_set = quadrant_data(512, seed=1), quadrant_data(256, seed=2)
    train_loader = DataLoader(train_set, batch_size=32, sampler=DistributedSampler(train_set, shuffle=True, seed=0))
    test_loader = DataLoader(test_set, batch_size=64, sampler=DistributedSampler(test_set, shuffle=False))

    cfg = TrainConfig(epochs=2, lr=0.1, weight_decay=5e-4, schedule="cosine", amp="off", channels_last="off")
    # The untrained models differ per rank; evaluate sums each rank's shard, so "before"
    # is the accuracy of untrained models, which is all the test needs.
    before = evaluate(model, test_loader, "cpu")
    result = train(model, train_loader, test_loader, cfg, "cpu", checkpoint_path=out / "ckpt.pt", progress=False)

    torch.save(model.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({
        "before": before,
        "final": result.final,
        "steps_per_epoch": len(train_loader),
        "history": [h.test_acc for h in result.history],
    }))
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
