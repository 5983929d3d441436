"""The prune-and-retrain cascade (spec section 6) and the setup it shares with `pfp compare`.

`prepare` does everything before pruning: data, loaders, the trained unpruned model (trained
here, reused from an earlier run, or loaded from a checkpoint), its accuracy and resources,
and the calibration / held-out loaders. `run_cascade` then prunes the last retrained network
to each keep ratio of the *original* resource in turn, retrains it, and picks the smallest
network whose test accuracy stays within the tolerance of the unpruned one.

Everything a run writes goes under output_dir/<name>/:

    base.pt             trained unpruned model (pfp-model/1), meta holds the config hash
    train.ckpt          resumable training checkpoint of the base model
    round_<i>/          model.pt (pruned + retrained), report.json (the PruneReport), round.json
    results.json        every round's row and the choice
    cascade.png         accuracy against FLOPs kept
    chosen.pt           copy of the chosen round's model (absent when no round qualifies)

A re-run with the same config reuses base.pt and every finished round; an interrupted
training or retraining resumes from its checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pfp.config import ConfigError, PruneConfig, RunConfig, TrainConfig
from pfp.data import DataBundle, build_data, make_loader, split_calibration
from pfp.distributed import barrier, get_rank, get_world_size, is_main_process
from pfp.plots import plot_accuracy_vs_flops
from pfp.models import build_model
from pfp.prune import PruneError, calibration_size, prune
from pfp.resources import count_flops, count_params
from pfp.serialization import CheckpointError, load_model, save_model
from pfp.train import EpochStats, evaluate, resolve_device, seed_everything, train

__all__ = [
    "Setup",
    "CascadeResult",
    "prepare",
    "load_checkpoint_for",
    "load_data",
    "calibration_loaders",
    "eval_view",
    "run_cascade",
    "prune_and_retrain",
    "base_config_hash",
    "run_dir",
]


# --------------------------------------------------------------------------- small helpers


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_config_hash(cfg: RunConfig) -> str:
    """Hash of everything that determines the trained unpruned model.

    Batch sizes for evaluation, loader workers, the data root and the device are left out:
    they change where or how fast the model is made, not which model.
    """
    return _hash(
        {
            "data": cfg.data.model_dump(exclude={"eval_batch_size", "workers", "download", "root"}),
            "model": cfg.model.model_dump(exclude={"pretrained_checkpoint"}),
            "train": cfg.train.model_dump(),
            "seed": cfg.seed,
            "calib_split": cfg.prune.calib_split,  # the images held out are never trained on
        }
    )


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def _amp(tc: TrainConfig, device: torch.device) -> bool:
    return tc.amp == "on" or (tc.amp == "auto" and device.type == "cuda")


def _say(console: Console, msg: str, style: str | None = None) -> None:
    console.print(msg, style=style, highlight=False, soft_wrap=True)


def _fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _checkpoint(path: Path, key: str) -> Path:
    """A resumable checkpoint path that belongs to `key`; a stale one from another config is removed."""
    stamp = path.with_name(path.name + ".json")
    if is_main_process():
        old = _read_json(stamp)
        if path.exists() and (old is None or old.get("hash") != key):
            path.unlink()
        _write_json(stamp, {"hash": key})
    barrier()  # other ranks look for the checkpoint only after a stale one is gone
    return path


def _drop_checkpoint(path: Path) -> None:
    if is_main_process():
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".json").unlink(missing_ok=True)


def _epoch_logger(console: Console, epochs: int, indent: str = "    ") -> Callable[[EpochStats], None]:
    def log(stats: EpochStats) -> None:
        _say(console, indent + stats.summary(epochs))

    return log


# --------------------------------------------------------------------------- data


def eval_view(ds: Dataset, test: Dataset | None = None) -> Dataset:
    """`ds` without training augmentation (for calibration and held-out points).

    In-memory sets get a shallow copy with augment off (the image tensor is shared);
    torchvision folders get the test set's transform; Subsets are unwrapped and rewrapped.
    """
    if isinstance(ds, Subset):
        inner_test = test.dataset if isinstance(test, Subset) else test
        return Subset(eval_view(ds.dataset, inner_test), ds.indices)
    if getattr(ds, "augment", False):
        view = copy.copy(ds)
        view.augment = False
        return view
    if hasattr(ds, "transform") and test is not None and hasattr(test, "transform"):
        view = copy.copy(ds)
        view.transform = test.transform
        return view
    return ds


def load_data(cfg: RunConfig, console: Console | None = None) -> DataBundle:
    console = console or Console()
    _say(console, f"[bold]data[/]  {cfg.data.name}" + (f" from {cfg.data.root}" if cfg.data.root else ""))
    start = time.perf_counter()
    data = build_data(cfg.data)
    _say(
        console,
        f"      {len(data.train)} train / {len(data.test)} test images, {data.num_classes} classes, "
        f"{data.in_channels}x{data.input_size}x{data.input_size}  ({time.perf_counter() - start:.1f}s)",
    )
    return data


@dataclass
class Calibration:
    """The held-out training images pruning uses, as loaders (none of them trained on when calib_split > 0).

    calib: S, for the scores. holdout: the guarantee report's points, disjoint from S.
    postprocess: BN recalibration and reconstruction (may overlap S, never the holdout).
    """

    calib: DataLoader
    holdout: DataLoader | None
    postprocess: DataLoader
    calib_size: int
    holdout_size: int
    postprocess_size: int


def held_out_count(cfg: RunConfig, n_train: int) -> int:
    """How many training images prune.calib_split holds out (0: none)."""
    split = cfg.prune.calib_split
    return int(round(split * n_train)) if split < 1 else min(int(split), n_train)


def split_training(cfg: RunConfig, train: Dataset) -> tuple[Dataset, Dataset | None]:
    """(images to train on, images held out for pruning), a fixed random split by cfg.seed."""
    n = len(train)  # type: ignore[arg-type]
    k = held_out_count(cfg, n)
    if k == 0:
        return train, None
    if k >= n:
        raise ConfigError(f"prune.calib_split: {cfg.prune.calib_split} holds out all {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 7919)).tolist()
    return Subset(train, sorted(perm[k:])), Subset(train, sorted(perm[:k]))


def calib_count(cfg: RunConfig, model: nn.Module, example_input: torch.Tensor) -> int:
    """|S|: prune.calib_size, or the spec's formula for this architecture."""
    return cfg.prune.calib_size or calibration_size(model, example_input, cfg.prune.delta)


def check_calib_split(cfg: RunConfig, n_calib: int, n_train: int) -> None:
    """One clear error, before any training, when the held-out split cannot hold S."""
    k = held_out_count(cfg, n_train)
    where = (f"prune.calib_split: {cfg.prune.calib_split} of the {n_train} training images holds out {k}"
             if k else f"the training set holds {n_train} images")
    if (k or n_train) < n_calib:
        raise ConfigError(
            f"{where}, fewer than the |S| = {n_calib} calibration points; raise prune.calib_split or lower "
            "prune.calib_size"
        )


def calibration_loaders(cfg: RunConfig, data: DataBundle, model: nn.Module, example_input: torch.Tensor,
                        console: Console | None = None, pool: Dataset | None = None) -> Calibration:
    """S, the guarantee's held-out points and the post-processing images, without augmentation.

    They come from `pool` (the images prune.calib_split held out from training), else from the
    training set. The guarantee's points shrink (with a note) when the pool is too small.
    """
    console = console or Console()
    n_calib = calib_count(cfg, model, example_input)
    source = pool if pool is not None else data.train
    view = eval_view(source, data.test)
    n = len(view)
    if n_calib > n:
        raise ConfigError(
            f"prune.calib_size: {n_calib} calibration points asked for but only {n} images are held out; "
            "lower prune.calib_size or raise prune.calib_split"
        )
    n_hold = min(cfg.prune.holdout_size, n - n_calib)
    if n_hold < cfg.prune.holdout_size:
        _say(console, f"      note: only {n_hold} held-out points fit next to |S|={n_calib}", style="yellow")
    calib, hold = split_calibration(view, n_calib, n_hold, cfg.seed)
    # post-processing: S and every other held-out image, except the guarantee's points
    hold_idx = set(hold.indices)
    rest = [i for i in range(n) if i not in hold_idx]
    pp_idx = calib.indices + [i for i in rest if i not in set(calib.indices)]
    post = Subset(view, pp_idx[: max(n_calib, cfg.prune.postprocess_points)])
    bs = cfg.data.eval_batch_size
    mk = lambda ds: make_loader(ds, bs, shuffle=False, workers=cfg.data.workers, seed=cfg.seed)  # noqa: E731
    return Calibration(mk(calib), mk(hold) if n_hold else None, mk(post), n_calib, n_hold, len(post))


# --------------------------------------------------------------------------- the trained base model


@dataclass
class Setup:
    """Everything that comes before pruning, shared by the cascade, compare and prune."""

    cfg: RunConfig
    device: torch.device
    data: DataBundle
    train_loader: DataLoader
    test_loader: DataLoader
    model: nn.Module  # the trained, unpruned network, on `device`
    spec: dict  # build_model kwargs of its architecture
    example_input: torch.Tensor  # [1, C, H, W] on `device`
    base_key: str  # identity of the base model, for resume keys
    acc: float
    loss: float
    params: int
    flops: int
    trained_now: bool  # False when base.pt or a pretrained checkpoint was reused
    base_path: Path | None
    run_dir: Path
    calib_loader: DataLoader | None = None
    holdout_loader: DataLoader | None = None
    postprocess_loader: DataLoader | None = None
    calib_size: int | None = None
    holdout_size: int | None = None
    held_out: Dataset | None = None  # the training images prune.calib_split kept out of training
    _base_state: dict | None = field(default=None, repr=False)

    def base_state(self) -> dict:
        """A copy of the trained weights, taken once: every comparison point starts from it."""
        if self._base_state is None:
            self._base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self._base_state

    def base_summary(self) -> dict:
        return {
            "acc": self.acc,
            "loss": self.loss,
            "params": self.params,
            "flops": self.flops,
            "spec": self.spec,
            "path": str(self.base_path) if self.base_path else None,
            "trained_now": self.trained_now,
            "calib_size": self.calib_size,
            "holdout_size": self.holdout_size,
        }


def load_checkpoint_for(path: str | Path, data: DataBundle, example_input: torch.Tensor) -> tuple[nn.Module, dict, str]:
    """A saved model checked against the data: (model on CPU, load_model's info, identity key).

    CheckpointError, naming the file, when it is unreadable or does not fit the data set's
    classes, channels or image size.
    """
    path = Path(path)
    model, info = load_model(path, build_model)
    spec = info["spec"]
    if spec.get("num_classes", data.num_classes) != data.num_classes:
        raise CheckpointError(
            f"{path}: the model has {spec['num_classes']} classes but data set {data.name} has {data.num_classes}"
        )
    if spec.get("in_channels", data.in_channels) != data.in_channels:
        raise CheckpointError(
            f"{path}: the model takes {spec['in_channels']}-channel images but data set {data.name} has {data.in_channels}"
        )
    try:
        model.eval()
        with torch.no_grad():
            out = model(example_input.cpu())
    except Exception as e:  # noqa: BLE001 - any failure means the model does not fit the data
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path}: the model does not accept {data.in_channels}x{data.input_size}x{data.input_size} inputs "
            f"of data set {data.name} ({type(e).__name__}: {first})"
        ) from None
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise CheckpointError(f"{path}: the model outputs shape {list(out.shape)}, expected [1, {data.num_classes}]")
    st = path.stat()
    key = _hash({"checkpoint": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns})
    return model, info, key


def _train_base(
    cfg: RunConfig,
    data: DataBundle,
    train_loader: DataLoader,
    test_loader: DataLoader,
    device: torch.device,
    spec: dict,
    out: Path,
    key: str,
    console: Console,
    progress: bool,
) -> tuple[nn.Module, bool]:
    """The trained base model: base.pt when it matches the config, otherwise trained now."""
    base_path = out / "base.pt"
    if base_path.exists():
        model, info = load_model(base_path, build_model)
        meta = info["meta"]
        if meta.get("config_hash") == key:
            _say(console, f"[bold]base[/]  reusing {base_path} (trained earlier with this config; delete it to retrain)")
            return model, False
        # Another config trained this one: keep it aside, never overwrite a trained model silently.
        aside = base_path.with_name(f"base-{meta.get('config_hash', 'unknown')}.pt")
        _say(console, f"[bold]base[/]  {base_path} was trained with another config; moving it to {aside.name}", style="yellow")
        barrier()
        if is_main_process():
            os.replace(base_path, aside)
        barrier()

    seed_everything(cfg.seed + get_rank())
    model = build_model(cfg.model.name, data.num_classes, data.in_channels, data.input_size)
    ckpt = _checkpoint(out / "train.ckpt", key)
    world = get_world_size()
    _say(
        console,
        f"[bold]train[/] {cfg.model.name}: {cfg.train.epochs} epochs, lr {cfg.train.lr} ({cfg.train.schedule}), "
        f"batch {cfg.data.batch_size}" + (f" x {world} processes" if world > 1 else "") + f", on {device}"
        + ("  (resuming from train.ckpt)" if ckpt.exists() else ""),
    )
    start = time.perf_counter()
    try:
        result = train(
            model, train_loader, test_loader, cfg.train, device, checkpoint_path=ckpt, resume=True,
            progress=progress, log=_epoch_logger(console, cfg.train.epochs),
        )
    except CheckpointError as e:
        _say(console, f"      note: {e}; training from scratch", style="yellow")
        _drop_checkpoint(ckpt)
        ckpt = _checkpoint(out / "train.ckpt", key)
        seed_everything(cfg.seed + get_rank())
        model = build_model(cfg.model.name, data.num_classes, data.in_channels, data.input_size)
        result = train(
            model, train_loader, test_loader, cfg.train, device, checkpoint_path=ckpt, resume=False,
            progress=progress, log=_epoch_logger(console, cfg.train.epochs),
        )
    seconds = time.perf_counter() - start
    if is_main_process():
        save_model(
            base_path, model, spec,
            meta={
                "config_hash": key,
                "acc": result.final.get("acc"),
                "loss": result.final.get("loss"),
                "epochs": cfg.train.epochs,
                "world_size": world,
                "train_seconds": seconds,
                "config": cfg.model_dump(),
            },
        )  # fmt: skip
    barrier()
    _say(console, f"      saved {base_path}  (test acc {result.final.get('acc', float('nan')):.2f}%, {seconds:.0f}s)")
    return model, True


def prepare(
    cfg: RunConfig,
    *,
    console: Console | None = None,
    progress: bool = True,
    calibration: bool = True,
    distributed: bool = False,
) -> Setup:
    """Data, loaders, the trained base model (train / reuse / load), its metrics, calibration sets.

    With distributed=True (a torchrun launch) the loaders shard the data and only rank 0
    writes files; calibration is then usually left off.
    """
    console = console or Console()
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = load_data(cfg, console)
    train_set, held_out = split_training(cfg, data.train)
    train_loader = make_loader(
        train_set, cfg.data.batch_size, shuffle=True, workers=cfg.data.workers, seed=cfg.seed,
        distributed=distributed, drop_last=distributed,
    )  # fmt: skip
    test_loader = make_loader(
        data.test, cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.workers, seed=cfg.seed,
        distributed=distributed,
    )  # fmt: skip
    example_input = torch.zeros(1, data.in_channels, data.input_size, data.input_size)
    out = run_dir(cfg)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)

    if cfg.model.pretrained_checkpoint:
        model, info, key = load_checkpoint_for(cfg.model.pretrained_checkpoint, data, example_input)
        spec = info["spec"]
        trained_now, base_path = False, Path(cfg.model.pretrained_checkpoint)
        _say(console, f"[bold]base[/]  loaded {base_path} ({spec.get('name', '?')})")
    else:
        arch = build_model(cfg.model.name, data.num_classes, data.in_channels, data.input_size)  # name errors first
        if calibration:
            check_calib_split(cfg, calib_count(cfg, arch, example_input), len(data.train))
        spec = {
            "name": cfg.model.name, "num_classes": data.num_classes,
            "in_channels": data.in_channels, "input_size": data.input_size,
        }  # fmt: skip
        key = base_config_hash(cfg)
        model, trained_now = _train_base(cfg, data, train_loader, test_loader, device, spec, out, key, console, progress)
        base_path = out / "base.pt"

    model.to(device)
    example_input = example_input.to(device)
    metrics = evaluate(model, test_loader, device, amp=_amp(cfg.train, device))
    params, flops = count_params(model), count_flops(model, example_input)
    _say(
        console,
        f"      unpruned: test acc [bold]{metrics['acc']:.2f}%[/], {_fmt_int(params)} params, {_fmt_int(flops)} FLOPs",
    )
    setup = Setup(
        cfg=cfg, device=device, data=data, train_loader=train_loader, test_loader=test_loader, model=model,
        spec=spec, example_input=example_input, base_key=key, acc=metrics["acc"], loss=metrics["loss"],
        params=params, flops=flops, trained_now=trained_now, base_path=base_path, run_dir=out, held_out=held_out,
    )  # fmt: skip
    if calibration:
        cal = calibration_loaders(cfg, data, model, example_input, console, pool=held_out)
        setup.calib_loader, setup.holdout_loader, setup.postprocess_loader = cal.calib, cal.holdout, cal.postprocess
        setup.calib_size, setup.holdout_size = cal.calib_size, cal.holdout_size
        src = f"{len(held_out)} training images held out from training" if held_out is not None else "the training images"
        _say(console, f"[bold]calibration[/]  from {src}: |S| = {cal.calib_size}, {cal.holdout_size} more for the "
                      f"guarantee report, {cal.postprocess_size} for BN recalibration and reconstruction")
    return setup


def _refuse_distributed(command: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{command} does not run under torchrun; train the base model with 'torchrun ... pfp train CONFIG', "
            f"then run '{command} CONFIG' in one process: it reuses output_dir/<name>/base.pt"
        )


# --------------------------------------------------------------------------- one prune + retrain step


def _pct_removed(value: float, original: float) -> float:
    return 100.0 * (1.0 - value / original) if original else 0.0


def prune_and_retrain(
    setup: Setup,
    model: nn.Module,
    prune_cfg: PruneConfig,
    keep_ratio: float,
    out: Path,
    key: str,
    *,
    seed: int,
    console: Console,
    progress: bool,
    label: str,
) -> tuple[nn.Module, dict, Any]:
    """Prune `model` to keep_ratio of the base's resource, retrain with cfg.retrain, save in `out`.

    Returns (retrained model, row, report). `key` identifies this step's inputs: a finished
    step with the same key in `out` is reused instead of recomputed. PruneError propagates.
    """
    cfg = setup.cfg
    device = setup.device
    model_path, report_path, done_path = out / "model.pt", out / "report.json", out / "done.json"
    done = _read_json(done_path)
    if done and done.get("hash") == key and model_path.exists():
        try:
            cached, _ = load_model(model_path, build_model)
        except CheckpointError as e:
            _say(console, f"      note: {e}; recomputing", style="yellow")
        else:
            _say(console, f"[bold]{label}[/]  done in an earlier run, reusing {model_path}")
            return cached.to(device), done["row"], None

    target_value = keep_ratio * (setup.flops if prune_cfg.target == "flops" else setup.params)
    _say(
        console,
        f"[bold]{label}[/]  {prune_cfg.method}: keep {keep_ratio:.0%} of the original {prune_cfg.target} "
        f"({_fmt_int(target_value)})",
    )
    seed_everything(seed)
    start = time.perf_counter()
    pruned, report, soft = prune(
        model, setup.calib_loader, prune_cfg, keep_ratio, example_input=setup.example_input,
        reference=(setup.params, setup.flops), holdout_loader=setup.holdout_loader,
        postprocess_loader=setup.postprocess_loader, device=device, seed=seed,
    )  # fmt: skip
    prune_seconds = time.perf_counter() - start
    pruned.to(device)
    amp = _amp(cfg.retrain, device)  # type: ignore[arg-type]
    before = evaluate(pruned, setup.test_loader, device, amp=amp)
    eps = getattr(report, "eps", None)
    _say(
        console,
        f"      pruned in {prune_seconds:.1f}s"
        + (f" (eps {eps:.3g})" if isinstance(eps, (int, float)) else "")
        + f": {_fmt_int(report.params)} params, {_fmt_int(report.flops)} FLOPs; test acc before retraining {before['acc']:.2f}%",
    )

    rcfg: TrainConfig = cfg.retrain  # type: ignore[assignment]
    # Same data order for every step with this seed, whatever ran before it in this process.
    gen = getattr(setup.train_loader, "generator", None)
    if gen is not None:
        gen.manual_seed(seed)
    seed_everything(seed)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _checkpoint(out / "retrain.ckpt", key)
    callbacks = [soft.callback] if soft is not None else []
    _say(console, f"      retraining {rcfg.epochs} epoch{'' if rcfg.epochs == 1 else 's'}" + ("  (resuming from retrain.ckpt)" if ckpt.exists() else ""))
    start = time.perf_counter()
    try:
        train(
            pruned, setup.train_loader, setup.test_loader, rcfg, device, epoch_callbacks=callbacks,
            checkpoint_path=ckpt, resume=True, progress=progress, log=_epoch_logger(console, rcfg.epochs),
        )  # fmt: skip
    except CheckpointError as e:  # e.g. the re-pruned network has other channel counts than the checkpoint
        _say(console, f"      note: {e}; retraining from the start", style="yellow")
        _drop_checkpoint(ckpt)
        ckpt = _checkpoint(out / "retrain.ckpt", key)
        train(
            pruned, setup.train_loader, setup.test_loader, rcfg, device, epoch_callbacks=callbacks,
            checkpoint_path=ckpt, resume=False, progress=progress, log=_epoch_logger(console, rcfg.epochs),
        )  # fmt: skip
    if soft is not None:
        pruned, report = soft.finalize(pruned)
        pruned.to(device)
    retrain_seconds = time.perf_counter() - start
    after = evaluate(pruned, setup.test_loader, device, amp=amp)

    params, flops = count_params(pruned), count_flops(pruned, setup.example_input)
    target_kind = prune_cfg.target
    achieved_keep = (flops / setup.flops) if target_kind == "flops" else (params / setup.params)
    row = {
        "method": prune_cfg.method,
        "target": target_kind,
        "keep_ratio": keep_ratio,
        "achieved_keep": achieved_keep,
        "params": params,
        "flops": flops,
        "params_removed_pct": _pct_removed(params, setup.params),
        "flops_removed_pct": _pct_removed(flops, setup.flops),
        "acc_before_retrain": before["acc"],
        "acc": after["acc"],
        "loss": after["loss"],
        "acc_change": after["acc"] - setup.acc,
        "eps": eps if isinstance(eps, (int, float)) else None,
        "prune_seconds": prune_seconds,
        "retrain_seconds": retrain_seconds,
        "seconds": prune_seconds + retrain_seconds,
        "model_path": str(model_path),
        "report_path": str(report_path),
        "error": None,
    }
    report_dict = report.to_dict()
    save_model(model_path, pruned, setup.spec, meta={"row": row, "report": report_dict, "hash": key})
    report.save_json(report_path)
    _drop_checkpoint(ckpt)
    _write_json(done_path, {"hash": key, "row": row})
    _say(
        console,
        f"      test acc after retraining [bold]{after['acc']:.2f}%[/] ({after['acc'] - setup.acc:+.2f}), "
        f"FLOPs -{row['flops_removed_pct']:.1f}%, params -{row['params_removed_pct']:.1f}%  ({row['seconds']:.0f}s)",
    )
    return pruned, row, report


def _error_row(method: str, target: str, keep_ratio: float, error: BaseException) -> dict:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return {
        "method": method, "target": target, "keep_ratio": keep_ratio, "achieved_keep": None,
        "params": None, "flops": None, "params_removed_pct": None, "flops_removed_pct": None,
        "acc_before_retrain": None, "acc": None, "loss": None, "acc_change": None, "eps": None,
        "prune_seconds": None, "retrain_seconds": None, "seconds": None, "model_path": None,
        "report_path": None, "error": f"{type(error).__name__}: {first}",
    }  # fmt: skip


def _step_key(setup: Setup, prune_cfg: PruneConfig, chain: list[float], seed: int) -> str:
    cfg = setup.cfg
    return _hash(
        {
            "base": setup.base_key,
            "prune": prune_cfg.model_dump(exclude={"keep_ratios", "tolerance"}),
            "retrain": cfg.retrain.model_dump() if cfg.retrain else None,
            "chain": chain,
            "seed": seed,
            "data": cfg.data.model_dump(exclude={"eval_batch_size", "workers", "download", "root"}),
        }
    )


# --------------------------------------------------------------------------- cascade


@dataclass
class CascadeResult:
    name: str
    run_dir: Path
    base: dict
    rounds: list[dict]
    chosen: int | None  # index into rounds, None when no pruned network is within tolerance
    tolerance: float
    trained_base: bool
    results_path: Path
    plot_path: Path | None
    seconds: float
    config: dict = field(default_factory=dict)

    @property
    def chosen_row(self) -> dict | None:
        return self.rounds[self.chosen] if self.chosen is not None else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        d["results_path"] = str(self.results_path)
        d["plot_path"] = str(self.plot_path) if self.plot_path else None
        d["chosen_row"] = self.chosen_row
        return d


def choose(base_acc: float, rows: list[dict], tolerance: float, target: str = "flops") -> int | None:
    """Index of the smallest network (by the target resource) within `tolerance` points of base_acc."""
    ok = [i for i, r in enumerate(rows) if r.get("error") is None and r["acc"] >= base_acc - tolerance - 1e-9]
    if not ok:
        return None
    return min(ok, key=lambda i: (rows[i][target], -rows[i]["acc"]))


def _cascade_table(result: CascadeResult, target: str) -> Table:
    t = Table(title=f"cascade {result.name}: prune to a share of the original {target}, then retrain")
    for col in ("round", "keep", "params", "FLOPs", "acc before retrain", "acc after", "change", "time"):
        t.add_column(col, justify="right")
    b = result.base
    t.add_row("base", "100%", _fmt_int(b["params"]), _fmt_int(b["flops"]), "", f"{b['acc']:.2f}%", "", "")
    for i, r in enumerate(result.rounds):
        mark = " *" if i == result.chosen else ""
        if r.get("error"):
            t.add_row(f"{i + 1}", f"{r['keep_ratio']:.0%}", "", "", "", Text("failed", style="red"), "", "")
            continue
        t.add_row(
            f"{i + 1}{mark}",
            f"{r['keep_ratio']:.0%}",
            f"{_fmt_int(r['params'])} (-{r['params_removed_pct']:.1f}%)",
            f"{_fmt_int(r['flops'])} (-{r['flops_removed_pct']:.1f}%)",
            f"{r['acc_before_retrain']:.2f}%",
            f"{r['acc']:.2f}%",
            Text(f"{r['acc_change']:+.2f}", style="green" if r["acc_change"] >= -result.tolerance else "red"),
            f"{r['seconds']:.0f}s",
            style="bold" if mark else None,
        )
    return t


def _plot_cascade(result: CascadeResult, path: Path) -> Path | None:
    return plot_accuracy_vs_flops(result.name, result.base["acc"], result.rounds, result.tolerance, result.chosen, path)


def run_cascade(cfg: RunConfig, *, console: Console | None = None, progress: bool = True) -> CascadeResult:
    """Spec section 6: prune the last retrained network to each keep ratio, retrain, choose."""
    _refuse_distributed("pfp run")
    console = console or Console()
    start = time.perf_counter()
    setup = prepare(cfg, console=console, progress=progress)
    pc = cfg.prune
    rows: list[dict] = []
    current = setup.model
    n = len(pc.keep_ratios)
    for i, ratio in enumerate(pc.keep_ratios):
        out = setup.run_dir / f"round_{i + 1}"
        seed = cfg.seed + i
        key = _step_key(setup, pc, pc.keep_ratios[: i + 1], seed)
        try:
            current, row, _ = prune_and_retrain(
                setup, current, pc, ratio, out, key, seed=seed, console=console, progress=progress,
                label=f"round {i + 1}/{n}",
            )  # fmt: skip
        except PruneError as e:
            _say(console, f"      cannot prune to {ratio:.0%}: {e}; stopping the cascade", style="red")
            rows.append(_error_row(pc.method, pc.target, ratio, e) | {"round": i + 1})
            break
        rows.append(row | {"round": i + 1})

    chosen = choose(setup.acc, rows, pc.tolerance, pc.target)
    out = setup.run_dir
    result = CascadeResult(
        name=cfg.name, run_dir=out, base=setup.base_summary(), rounds=rows, chosen=chosen, tolerance=pc.tolerance,
        trained_base=setup.trained_now, results_path=out / "results.json", plot_path=None,
        seconds=time.perf_counter() - start, config=cfg.model_dump(),
    )  # fmt: skip
    chosen_copy = out / "chosen.pt"
    if chosen is not None:
        shutil.copyfile(rows[chosen]["model_path"], chosen_copy)
    else:
        chosen_copy.unlink(missing_ok=True)
    result.plot_path = _plot_cascade(result, out / "cascade.png")
    _write_json(result.results_path, result.to_dict())

    console.print(_cascade_table(result, pc.target))
    for i, r in enumerate(rows):
        if r.get("error"):
            _say(console, f"failed: round {i + 1} (keep {r['keep_ratio']:.0%}): {r['error']}", style="red")
    if chosen is not None:
        r = rows[chosen]
        _say(
            console,
            f"[bold green]chosen[/]: round {chosen + 1} (keep {r['keep_ratio']:.0%}): test acc {r['acc']:.2f}% "
            f"({r['acc_change']:+.2f} vs unpruned {setup.acc:.2f}%), FLOPs -{r['flops_removed_pct']:.1f}%, "
            f"params -{r['params_removed_pct']:.1f}%  ->  {chosen_copy}",
        )
    else:
        _say(
            console,
            f"[bold yellow]no pruned network[/] stays within {pc.tolerance:g} points of the unpruned "
            f"{setup.acc:.2f}%; keep the unpruned model ({setup.base_path})",
        )
    _say(console, f"results: {result.results_path}, plot: {result.plot_path}  ({result.seconds:.0f}s in all)")
    return result


# --------------------------------------------------------------------------- one iteration at a time (flows)

_SETUPS: dict[str, Setup] = {}


def cached_setup(cfg: RunConfig, *, console: Console | None = None, progress: bool = True) -> Setup:
    """prepare(cfg), kept for this process: a flow's iterations share one Setup when they
    run in the same process and rebuild it (reusing base.pt) when they run elsewhere."""
    key = _hash(cfg.model_dump())
    if key not in _SETUPS:
        _SETUPS.clear()  # one config at a time: a Setup holds the data set in memory
        _SETUPS[key] = prepare(cfg, console=console, progress=progress)
    return _SETUPS[key]


def calibration_fingerprint(setup: Setup) -> dict:
    """Hashes that identify the data and the calibration set S drawn from it."""
    from pfp.data import data_fingerprint

    calib = getattr(setup.calib_loader, "dataset", None)
    return {
        "data_hash": data_fingerprint(setup.data.train),
        "calib_hash": data_fingerprint(calib) if calib is not None else None,
        "calib_size": setup.calib_size,
        "holdout_size": setup.holdout_size,
    }


def run_iteration(
    cfg: RunConfig, index: int, parent_model: str | Path | None, *, console: Console | None = None,
    progress: bool = True,
) -> dict:
    """Cascade round `index` (0-based): prune the model file `parent_model` (None: the base
    model) to keep_ratios[index], retrain, evaluate, save in run_dir/round_<index+1>.

    A round finished earlier with the same inputs is reused, not recomputed. Returns the row
    (with "round", "model_path", "report_path"); PruneError propagates.
    """
    console = console or Console()
    setup = cached_setup(cfg, console=console, progress=progress)
    pc = cfg.prune
    if not 0 <= index < len(pc.keep_ratios):
        raise ConfigError(f"prune.keep_ratios: no round {index + 1} (the schedule has {len(pc.keep_ratios)})")
    if parent_model is None:
        model = setup.model
    else:
        model, _ = load_model(parent_model, build_model)
        model.to(setup.device)
    seed = cfg.seed + index
    key = _step_key(setup, pc, pc.keep_ratios[: index + 1], seed)
    _, row, _ = prune_and_retrain(
        setup, model, pc, pc.keep_ratios[index], setup.run_dir / f"round_{index + 1}", key, seed=seed,
        console=console, progress=progress, label=f"round {index + 1}/{len(pc.keep_ratios)}",
    )  # fmt: skip
    return row | {"round": index + 1}


def run_train(cfg: RunConfig, *, console: Console | None = None, progress: bool = True, distributed: bool = False) -> Setup:
    """Only train (or reuse) and save the base model; under torchrun the data is sharded."""
    return prepare(cfg, console=console, progress=progress, calibration=False, distributed=distributed)

