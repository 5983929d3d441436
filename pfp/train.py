"""Training and evaluation, in the style of torchvision's references/classification/train.py.

One `train` call runs the whole schedule: SGD with momentum, cross-entropy with label
smoothing, a per-step learning-rate schedule with linear warm-up, optional mixed precision,
channels_last and gradient clipping, per-epoch callbacks (Soft Filter Pruning zeroes
filters there), crash-safe checkpoints that can be resumed, and DistributedDataParallel
when the process was started by torchrun.
"""
from __future__ import annotations

import bisect
import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from pfp.config import ConfigError, TrainConfig
from pfp.distributed import barrier, is_distributed, is_main_process
from pfp.files import read_json, write_json
from pfp.serialization import CheckpointError, atomic_torch_save, describe_load_error, unwrap_model
from pfp.tasks import Classification, Task, check_metrics, is_classification

CHECKPOINT_FORMAT = "pfp-train/1"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:N" into a torch.device.

    "auto" picks CUDA when available. A CUDA device without an index gets the current
    one, which init_distributed sets to this process's LOCAL_RANK.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def switch_enabled(flag: str, device: torch.device) -> bool:
    """Resolve an "auto"/"on"/"off" switch: "auto" means on for CUDA only."""
    return flag == "on" or (flag == "auto" and device.type == "cuda")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum; weight decay on weights only, not on BN/norm scales or biases.

    Every 1-d parameter is a bias or a normalisation scale/shift: decaying those only
    fights the normalisation and is known to cost accuracy.
    """
    decay, no_decay = [], []
    for p in unwrap_model(model).parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,  # torch rejects nesterov without momentum
    )


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """A per-optimizer-step LR schedule: linear warm-up, then step, cosine or constant.

    Warm-up multiplies the LR by (s+1)/W for the first W = warmup_epochs*steps_per_epoch
    steps. "step" multiplies by gamma at each milestone (a milestone < 1 is a fraction of
    cfg.epochs, otherwise an epoch number); "cosine" anneals from the end of warm-up to 0
    at the last step. Call scheduler.step() after every optimizer step.
    """
    steps_per_epoch = max(1, steps_per_epoch)
    # Copy what the closure needs: cfg validates assignments, but may still be changed later.
    kind, gamma = cfg.schedule, cfg.gamma
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    milestones = sorted(int(round((m * cfg.epochs if m < 1 else m) * steps_per_epoch)) for m in cfg.milestones)

    # A plain function (not a callable object) so LambdaLR.state_dict does not store it:
    # a resumed run always uses the schedule of the config it was started with.
    def factor(step: int) -> float:
        scale = (step + 1) / warmup if step < warmup else 1.0
        if kind == "step":
            scale *= gamma ** bisect.bisect_right(milestones, step)
        elif kind == "cosine":
            t = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
            scale *= 0.5 * (1.0 + math.cos(math.pi * t))
        return scale

    return LambdaLR(opt, factor)


# --------------------------------------------------------------------------- results


@dataclass
class EpochStats:
    """What one epoch produced. Accuracies are percentages; lr is the last step's.

    For a task other than classification the accuracies are NaN, test_loss is its
    evaluation's "loss" (NaN when it has none), and `metric`/`test_metrics` hold its own.
    """

    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    seconds: float
    metric: str = "acc"
    test_metrics: dict = field(default_factory=dict)

    def summary(self, epochs: int | None = None) -> str:
        """One human-readable line, e.g. for a log file."""
        of = f"/{epochs}" if epochs is not None else ""
        if self.metric != "acc" and self.metric in self.test_metrics:
            return (
                f"epoch {self.epoch + 1}{of}  train loss {self.train_loss:.4f}  "
                f"test {self.metric} {self.test_metrics[self.metric]:.4g}  lr {self.lr:.4g}  {self.seconds:.1f}s"
            )
        return (
            f"epoch {self.epoch + 1}{of}  train loss {self.train_loss:.4f} acc {self.train_acc:.2f}%  "
            f"test loss {self.test_loss:.4f} acc {self.test_acc:.2f}%  lr {self.lr:.4g}  {self.seconds:.1f}s"
        )


@dataclass
class TrainResult:
    """Per-epoch history and the final test metrics ({"acc": percent, "loss": mean CE}, or the task's)."""

    history: list[EpochStats] = field(default_factory=list)
    final: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- evaluation


def evaluate(model: nn.Module, loader, device: torch.device | str, amp: bool = False, task: Task | None = None) -> dict:
    """The task's metrics of `model` over `loader`; for classification (the default) top-1
    accuracy (percent) and mean cross-entropy, {"acc", "loss"}.

    Under torch.distributed every rank evaluates its shard and the sums are all-reduced,
    so all ranks return the same numbers. (A DistributedSampler pads the last shard with
    repeated samples, so those few count twice, as in torchvision.) A task whose dict lacks
    its own metric is a TaskError.
    """
    device = torch.device(device)
    model.eval()
    if is_classification(task):
        return (task or Classification()).evaluate(model, loader, device, amp=amp)  # type: ignore[call-arg]
    metrics = {k: float(v) for k, v in task.evaluate(model, loader, device).items()}  # type: ignore[union-attr]
    check_metrics(task, metrics)  # type: ignore[arg-type]
    return metrics


# --------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    # Stored as tensors and plain lists so torch.load(weights_only=True) can read it back.
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _state_mismatch(model: nn.Module, state: dict) -> str | None:
    """The first key whose presence or shape differs between `model` and `state`."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own:
            return f"unexpected key '{key}'"
        if own[key].shape != value.shape:
            return f"key '{key}' has shape {list(value.shape)} in the file but {list(own[key].shape)} in the model"
    for key in own:
        if key not in state:
            return f"missing key '{key}'"
    return None


def _save_checkpoint(path: Path, epoch: int, model: nn.Module, optimizer, scheduler, scaler,
                     history: list[EpochStats], cfg: TrainConfig) -> None:
    atomic_torch_save(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,  # the last completed epoch (0-based)
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "history": [asdict(h) for h in history],
            "rng": _rng_state(),
            "config": cfg.model_dump(),
        },
        path,
    )


def _load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, scaler) -> tuple[int, list[EpochStats]]:
    """Restore a checkpoint written by train; returns (next epoch, history)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable training checkpoint: {describe_load_error(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} training checkpoint")
    mismatch = _state_mismatch(model, ckpt["model"])
    if mismatch:
        raise CheckpointError(f"{path}: checkpoint does not fit the model: {mismatch}")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # A run saved without AMP has an empty scaler state, which GradScaler refuses.
        if scaler.is_enabled() and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        history = [EpochStats(**h) for h in ckpt["history"]]
        epoch = int(ckpt["epoch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: checkpoint does not fit this run ({_first_line(e)})") from None
    # Restoring the generators makes a resumed run repeat an uninterrupted one exactly
    # (DataLoader shuffling draws from torch's generator). Under DDP only rank 0's state is
    # saved, and giving it to every rank would make their random streams identical, so
    # ranks keep their own seeding there.
    if not is_distributed():
        _set_rng_state(ckpt["rng"])
    return epoch + 1, history


# --------------------------------------------------------------------------- checkpoints owned by a key


def claim_checkpoint(path: Path, key: str) -> Path:
    """`path` as the resumable checkpoint of the run identified by `key`: one left by a run
    with another key is removed (a stamp file beside it holds the key)."""
    stamp = path.with_name(path.name + ".json")
    if is_main_process():
        old = read_json(stamp)
        if path.exists() and (old is None or old.get("hash") != key):
            path.unlink()
        write_json(stamp, {"hash": key})
    barrier()  # other ranks look for the checkpoint only after a stale one is gone
    return path


def drop_checkpoint(path: Path) -> None:
    """Remove a finished run's checkpoint and its key stamp."""
    if is_main_process():
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)


# --------------------------------------------------------------------------- training


def _set_epoch(loader, epoch: int) -> None:
    # DistributedSampler reshuffles only when told the epoch; it may sit behind a batch sampler.
    seen = set()
    for obj in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if obj is not None and id(obj) not in seen and hasattr(obj, "set_epoch"):
            seen.add(id(obj))
            obj.set_epoch(epoch)


def _broadcast_buffers(model: nn.Module) -> None:
    # DDP syncs gradients, not BN running statistics: each rank updates them from its own
    # batches. Taking rank 0's makes evaluation and the checkpoint the same on every rank.
    for buf in model.buffers():
        if buf.is_contiguous():
            dist.broadcast(buf, src=0)
        else:
            tmp = buf.contiguous()
            dist.broadcast(tmp, src=0)
            buf.copy_(tmp)


def _train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, *, amp: bool,
                     channels_last: bool, grad_clip: float | None, desc: str, show: bool,
                     task: Task | None = None) -> tuple[float, float, float]:
    """One pass over `loader`; returns (mean loss, accuracy %, last LR), summed over ranks.

    With a task other than classification its `loss` is the criterion and the accuracy is NaN.
    """
    classify = is_classification(task)
    model.train()
    # Accumulate on the device: calling .item() every step would stall the GPU pipeline.
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(loader, desc=desc, disable=not show, leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=amp):
            if classify:
                logits = model(images)
                loss = criterion(logits, targets)
            else:
                loss = task.loss(model, images, targets)  # type: ignore[union-attr]

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

        with torch.no_grad():
            n = targets.size(0)
            totals[0] += loss.detach().double() * n
            if classify:
                totals[1] += (logits.argmax(dim=1) == targets).sum()
            totals[2] += n
        if show and step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.4g}")
    if is_distributed():
        dist.all_reduce(totals)
    loss_sum, correct, count = totals.tolist()
    count = max(count, 1.0)
    return loss_sum / count, (100.0 * correct / count) if classify else float("nan"), lr


def train(
    model: nn.Module,
    train_loader,
    test_loader,
    cfg: TrainConfig,
    device: torch.device | str,
    *,
    epoch_callbacks: Sequence[Callable[[int, nn.Module], None]] = (),
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[EpochStats], None] | None = None,
    task: Task | None = None,
) -> TrainResult:
    """Train `model` in place for cfg.epochs epochs and evaluate it after each one.

    After each epoch's optimizer steps, every epoch_callback gets (epoch, model) with the
    plain (unwrapped) model, before that epoch's evaluation. With `checkpoint_path`, rank 0
    atomically writes a resumable checkpoint after every epoch; `resume=True` continues
    from it when it exists. When torch.distributed runs with several processes, an
    unwrapped model is trained through DistributedDataParallel (the loaders, with their
    DistributedSamplers, are the caller's). Rank 0 logs one INFO line per epoch and then
    calls `on_epoch` (after that epoch's checkpoint is written). `progress`: a tqdm bar per
    epoch when stderr is a terminal. cfg.epochs == 0 only evaluates.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # DDP needs an explicit index
    use_amp = switch_enabled(cfg.amp, device)
    use_channels_last = switch_enabled(cfg.channels_last, device)
    raw = unwrap_model(model)
    raw.to(device)
    if use_channels_last:
        raw.to(memory_format=torch.channels_last)

    optimizer = build_optimizer(raw, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(train_loader))
    # fp16 needs loss scaling; CPU autocast runs in bfloat16, which does not.
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    start_epoch, history = 0, []
    if resume and ckpt_path is not None and ckpt_path.exists():
        start_epoch, history = _load_checkpoint(ckpt_path, raw, optimizer, scheduler, scaler)

    train_model = model
    if is_distributed() and not isinstance(model, DistributedDataParallel):
        # Wrapping broadcasts rank 0's weights, so ranks start identical whatever their seed.
        train_model = DistributedDataParallel(raw, device_ids=[device.index] if device.type == "cuda" else None)

    show_bar = progress and is_main_process() and sys.stderr.isatty()
    for epoch in range(start_epoch, cfg.epochs):
        _set_epoch(train_loader, epoch)
        start = time.perf_counter()
        train_loss, train_acc, lr = _train_one_epoch(
            train_model, train_loader, criterion, optimizer, scheduler, scaler, device,
            amp=use_amp, channels_last=use_channels_last, grad_clip=cfg.grad_clip,
            desc=f"epoch {epoch + 1}/{cfg.epochs}", show=show_bar, task=task,
        )
        if is_distributed():
            _broadcast_buffers(raw)
        for callback in epoch_callbacks:
            callback(epoch, raw)
        test = evaluate(raw, test_loader, device, amp=use_amp, task=task)
        stats = EpochStats(
            epoch=epoch, train_loss=train_loss, train_acc=train_acc, test_loss=test.get("loss", float("nan")),
            test_acc=test.get("acc", float("nan")) if is_classification(task) else float("nan"), lr=lr,
            seconds=time.perf_counter() - start, metric="acc" if task is None else task.metric, test_metrics=test,
        )
        history.append(stats)
        if ckpt_path is not None and is_main_process():
            _save_checkpoint(ckpt_path, epoch, raw, optimizer, scheduler, scaler, history, cfg)
        if is_main_process():
            log.info("%s", stats.summary(cfg.epochs))
            if on_epoch is not None:
                on_epoch(stats)

    if train_model is not model:
        del train_model  # drop DDP's hooks and buckets; the caller keeps the plain model
    if history and is_classification(task):
        final = {"acc": history[-1].test_acc, "loss": history[-1].test_loss}
    elif history and history[-1].test_metrics:
        final = dict(history[-1].test_metrics)
    else:
        final = evaluate(raw, test_loader, device, amp=use_amp, task=task)
    return TrainResult(history=history, final=final)
