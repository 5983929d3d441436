"""Tests for pfp.train: learning, schedules, callbacks, checkpoints, resume and DDP."""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pfp.config import TrainConfig
from pfp.serialization import CheckpointError
from pfp.train import (
    EpochStats,
    TrainResult,
    build_optimizer,
    build_scheduler,
    evaluate,
    resolve_device,
    seed_everything,
    train,
)

REPO = Path(__file__).resolve().parents[1]


def quadrant_data(n: int, seed: int, classes: int = 4, size: int = 8) -> TensorDataset:
    """Noisy 1-channel images whose class is the quadrant holding a bright patch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) * 0.6
    y = torch.randint(0, classes, (n,), generator=g)
    h = size // 2
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * h:(r + 1) * h, c * h:(c + 1) * h] += 1.0
    return TensorDataset(x, y)


def tiny_cnn(classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, classes),
    )


def loaders(batch_size: int = 32) -> tuple[DataLoader, DataLoader]:
    train_loader = DataLoader(quadrant_data(512, seed=1), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(quadrant_data(256, seed=2), batch_size=128)
    return train_loader, test_loader


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, lr=0.05, weight_decay=5e-4, schedule="cosine", amp="off", channels_last="off")
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- basics


def test_resolve_device_and_seed():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError):
        resolve_device("not-a-device")
    seed_everything(3)
    a = torch.rand(4)
    seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_training_learns_the_task():
    seed_everything(0)
    model = tiny_cnn()
    train_loader, test_loader = loaders()
    before = evaluate(model, test_loader, "cpu")
    lines: list[EpochStats] = []
    result = train(model, train_loader, test_loader, cfg(epochs=3, label_smoothing=0.1), "cpu",
                   progress=False, on_epoch=lines.append)
    assert isinstance(result, TrainResult)
    assert before["acc"] < 60  # chance is 25%: the test can only pass by learning
    assert [h.epoch for h in result.history] == [0, 1, 2] == [s.epoch for s in lines]
    assert result.final["acc"] >= 95, result.history
    assert result.final == {"acc": result.history[-1].test_acc, "loss": result.history[-1].test_loss}
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(h.seconds > 0 and 0 <= h.train_acc <= 100 for h in result.history)
    # evaluate agrees with the reported final numbers
    again = evaluate(model, test_loader, "cpu")
    assert again["acc"] == pytest.approx(result.final["acc"])
    assert again["loss"] == pytest.approx(result.final["loss"], rel=1e-5)


def test_grad_clip_and_nesterov_and_amp_on_cpu_run():
    seed_everything(0)
    model = tiny_cnn()
    train_loader, test_loader = loaders()
    # amp "on" on CPU autocasts to bfloat16 (no GradScaler); channels_last "on" too.
    result = train(model, train_loader, test_loader,
                   cfg(epochs=1, grad_clip=1.0, nesterov=True, amp="on", channels_last="on"), "cpu",
                   progress=False, on_epoch=lambda s: None)
    assert len(result.history) == 1 and math.isfinite(result.final["loss"])


def test_zero_epochs_only_evaluates():
    seed_everything(0)
    model = tiny_cnn()
    train_loader, test_loader = loaders()
    w = [p.detach().clone() for p in model.parameters()]
    result = train(model, train_loader, test_loader, cfg(epochs=0), "cpu", progress=False)
    assert result.history == []
    assert result.final == evaluate(model, test_loader, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(w, model.parameters()))


def test_logs_one_info_line_per_epoch(caplog):
    seed_everything(0)
    train_loader, test_loader = loaders()
    with caplog.at_level(logging.INFO, logger="pfp.train"):
        train(tiny_cnn(), train_loader, test_loader, cfg(epochs=2), "cpu", progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "pfp.train" and r.levelno == logging.INFO]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2") and lines[1].startswith("epoch 2/2")


# --------------------------------------------------------------------------- optimizer / schedule


def test_no_weight_decay_on_bn_and_bias():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    model.append(frozen)
    opt = build_optimizer(model, cfg(weight_decay=1e-3, nesterov=True))
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_wd[1e-3] == {id(model[0].weight), id(model[3].weight)}
    assert by_wd[0.0] == {id(model[0].bias), id(model[1].weight), id(model[1].bias), id(model[3].bias)}
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in opt.param_groups)


def _lrs(c: TrainConfig, steps_per_epoch: int) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=c.lr)
    sched = build_scheduler(opt, c, steps_per_epoch)
    out = []
    for _ in range(c.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_step_schedule():
    lrs = _lrs(cfg(epochs=4, lr=1.0, warmup_epochs=1, schedule="step", milestones=[0.5, 0.75], gamma=0.1), 10)
    assert lrs[0] == pytest.approx(0.1)      # warm-up: (s+1)/10
    assert lrs[4] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10:20] == pytest.approx([1.0] * 10)
    assert lrs[20:30] == pytest.approx([0.1] * 10)  # milestone 0.5 * 4 epochs = epoch 2
    assert lrs[30:40] == pytest.approx([0.01] * 10)
    # absolute epoch milestones give the same schedule
    assert _lrs(cfg(epochs=4, lr=1.0, warmup_epochs=1, schedule="step", milestones=[2, 3], gamma=0.1), 10) == \
        pytest.approx(lrs)


def test_warmup_then_cosine_and_constant_schedules():
    lrs = _lrs(cfg(epochs=4, lr=2.0, warmup_epochs=0.5, schedule="cosine"), 10)
    assert lrs[0] == pytest.approx(2.0 / 5)
    assert lrs[4] == pytest.approx(2.0)
    assert lrs[5] == pytest.approx(2.0)                          # cosine starts after warm-up
    assert lrs[5 + 35 // 2] == pytest.approx(1.0 + math.cos(math.pi * 17 / 35))
    assert lrs[39] == pytest.approx(1.0 * (1 + math.cos(math.pi * 34 / 35)))
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    no_warmup = _lrs(cfg(epochs=2, lr=1.0, schedule="cosine"), 5)
    assert no_warmup[0] == pytest.approx(1.0) and no_warmup[5] == pytest.approx(0.5)
    const = _lrs(cfg(epochs=2, lr=0.3, warmup_epochs=1, schedule="constant"), 4)
    assert const == pytest.approx([0.075, 0.15, 0.225, 0.3, 0.3, 0.3, 0.3, 0.3])


# --------------------------------------------------------------------------- callbacks


class RecordingLoader:
    """Wraps a loader and records every pass over it."""

    def __init__(self, loader, events: list, name: str):
        self.loader, self.events, self.name = loader, events, name

    def __iter__(self):
        self.events.append(self.name)
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


def test_epoch_callbacks_run_once_per_epoch_before_evaluation():
    seed_everything(0)
    model = tiny_cnn()
    train_loader, test_loader = loaders()
    events: list = []

    def callback(epoch: int, m: nn.Module) -> None:
        assert m is model
        events.append(f"cb{epoch}")
        with torch.no_grad():  # what SFP does: zero a filter; evaluation must see it
            m[0].weight[0].zero_()

    train(model, RecordingLoader(train_loader, events, "train"), RecordingLoader(test_loader, events, "eval"),
          cfg(epochs=2), "cpu", epoch_callbacks=[callback], progress=False, on_epoch=lambda s: None)
    assert events == ["train", "cb0", "eval", "train", "cb1", "eval"]
    assert model[0].weight[0].abs().sum() == 0


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_written_every_epoch_and_readable_weights_only(tmp_path):
    seed_everything(0)
    train_loader, test_loader = loaders()
    path = tmp_path / "ckpt.pt"
    seen = []
    train(tiny_cnn(), train_loader, test_loader, cfg(epochs=2), "cpu", checkpoint_path=path, progress=False,
          on_epoch=lambda s: seen.append(torch.load(path, weights_only=True)["epoch"]))
    assert seen == [0, 1]
    ckpt = torch.load(path, weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "history", "rng"} <= set(ckpt)
    assert [h["epoch"] for h in ckpt["history"]] == [0, 1]
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_failed_checkpoint_write_keeps_old_file(tmp_path, monkeypatch):
    seed_everything(0)
    train_loader, test_loader = loaders()
    path = tmp_path / "ckpt.pt"
    train(tiny_cnn(), train_loader, test_loader, cfg(epochs=1), "cpu", checkpoint_path=path, progress=False,
          on_epoch=lambda s: None)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        train(tiny_cnn(), train_loader, test_loader, cfg(epochs=2), "cpu", checkpoint_path=path, progress=False,
              on_epoch=lambda s: None)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind
    assert torch.load(path, weights_only=True)["epoch"] == 0


class Interrupt(Exception):
    pass


def test_resume_matches_uninterrupted_run(tmp_path):
    c = cfg(epochs=4, warmup_epochs=0.5, schedule="cosine")

    def run(path, callbacks=(), resume=False, init_seed=0):
        seed_everything(init_seed)
        model = tiny_cnn()
        seed_everything(0)
        train_loader, test_loader = loaders()  # shuffle=True: draws from torch's global generator
        result = train(model, train_loader, test_loader, c, "cpu", checkpoint_path=path, resume=resume,
                       epoch_callbacks=callbacks, progress=False, on_epoch=lambda s: None)
        return model, result

    full_model, full = run(tmp_path / "full.pt")

    def crash(epoch, model):
        if epoch == 2:  # dies during epoch 2: the checkpoint holds epochs 0 and 1
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "part.pt", callbacks=[crash])
    assert torch.load(tmp_path / "part.pt", weights_only=True)["epoch"] == 1
    # a different initialisation proves the weights come from the checkpoint
    resumed_model, resumed = run(tmp_path / "part.pt", resume=True, init_seed=123)

    assert [h.epoch for h in resumed.history] == [0, 1, 2, 3]
    for a, b in zip(full.history, resumed.history):
        assert (a.train_loss, a.test_acc, a.lr) == pytest.approx((b.train_loss, b.test_acc, b.lr))
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    for key in full_state:
        assert torch.equal(full_state[key], resumed_state[key]), key
    assert resumed.final == pytest.approx(full.final)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    seed_everything(0)
    train_loader, test_loader = loaders()
    result = train(tiny_cnn(), train_loader, test_loader, cfg(epochs=1), "cpu",
                   checkpoint_path=tmp_path / "none.pt", resume=True, progress=False, on_epoch=lambda s: None)
    assert [h.epoch for h in result.history] == [0]


def test_corrupt_checkpoint_raises_clear_error(tmp_path):
    seed_everything(0)
    train_loader, test_loader = loaders()
    path = tmp_path / "ckpt.pt"
    train(tiny_cnn(), train_loader, test_loader, cfg(epochs=1), "cpu", checkpoint_path=path, progress=False,
          on_epoch=lambda s: None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        train(tiny_cnn(), train_loader, test_loader, cfg(epochs=2), "cpu", checkpoint_path=path, resume=True,
              progress=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value)

    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="ckpt.pt"):
        train(tiny_cnn(), train_loader, test_loader, cfg(epochs=2), "cpu", checkpoint_path=path, resume=True,
              progress=False)


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    seed_everything(0)
    train_loader, test_loader = loaders()
    path = tmp_path / "ckpt.pt"
    train(tiny_cnn(), train_loader, test_loader, cfg(epochs=1), "cpu", checkpoint_path=path, progress=False,
          on_epoch=lambda s: None)
    wider = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4))
    with pytest.raises(CheckpointError, match=r"ckpt\.pt.*'0\.weight'"):
        train(wider, train_loader, test_loader, cfg(epochs=2), "cpu", checkpoint_path=path, resume=True,
              progress=False)


# --------------------------------------------------------------------------- DDP


def test_ddp_two_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = ([str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"])
    cmd += ["--standalone", "--nproc_per_node=2", str(REPO / "tests" / "ddp_worker.py"), str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # evaluate all-reduces over ranks, so both ranks report the same numbers
    assert reports[0]["final"] == pytest.approx(reports[1]["final"])
    assert reports[0]["final"]["acc"] > reports[0]["before"]["acc"] + 30
    assert reports[0]["final"]["acc"] >= 90
    # each rank trains on its half of the data: 512 samples / (2 ranks * 32) = 8 steps
    assert reports[0]["steps_per_epoch"] == reports[1]["steps_per_epoch"] == 8

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    for key, value in ckpt["model"].items():
        assert torch.equal(value, states[0][key]), key
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
