"""Everything before pruning: data, loaders, the trained base model and the calibration sets.

`prepare` builds a `Setup`: the data set and its loaders, the trained unpruned model
(trained here, reused from an earlier run's base.pt, or loaded from a checkpoint), its
accuracy and resources, and the held-out calibration / guarantee / post-processing loaders.
The cascade (`pfp.cascade`), the comparison (`pfp.compare`) and the flows' steps all start
from one.

Files, under output_dir/<name>/:

    base.pt             trained unpruned model (pfp-model/1), meta holds the config hash
    train.ckpt          resumable training checkpoint of the base model (removed when done)
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from pfp.config import ConfigError, RunConfig
from pfp.data import DataBundle, build_data, data_fingerprint, infer_num_classes, make_loader, split_calibration
from pfp.distributed import barrier, get_rank, get_world_size, is_main_process
from pfp.errors import first_line
from pfp.files import stable_hash
from pfp.imports import is_import_path
from pfp.models import build_model
from pfp.prune import calibration_size
from pfp.resources import count_flops, count_params, format_count
from pfp.results import BaseInfo
from pfp.serialization import CheckpointError, load_model, load_model_or_state, save_model
from pfp.tasks import Task, check_metrics, check_output, is_classification, load_task
from pfp.train import (
    claim_checkpoint, drop_checkpoint, evaluate, resolve_device, seed_everything, switch_enabled, train,
)

__all__ = [
    "Calibration",
    "Setup",
    "base_config_hash",
    "cached_setup",
    "calibration_fingerprint",
    "calibration_loaders",
    "eval_view",
    "load_checkpoint_for",
    "load_data",
    "model_spec",
    "hash_view",
    "prepare",
    "refuse_distributed",
    "run_dir",
    "run_train",
    "split_training",
]

log = logging.getLogger(__name__)

# Fields of DataConfig that change where or how fast a model is made, not which model.
DATA_RUNTIME_FIELDS = {"eval_batch_size", "workers", "download", "root"}


# Fields added after configs were first hashed: left out of a hash while unset, so that the
# base models and rounds of configs that do not use them are still found on disk.
_LATE_FIELDS = ("kwargs", "weights")


def hash_view(section, exclude: set[str] = frozenset()) -> dict:  # type: ignore[assignment]
    """`section.model_dump(exclude=...)` without the late fields that are still unset."""
    d = section.model_dump(exclude=set(exclude))
    return {k: v for k, v in d.items() if not (k in _LATE_FIELDS and v in (None, {}))}


def base_config_hash(cfg: RunConfig) -> str:
    """Hash of everything that determines the trained unpruned model.

    Batch sizes for evaluation, loader workers, the data root and the device are left out:
    they change where or how fast the model is made, not which model.
    """
    view = {
        "data": hash_view(cfg.data, DATA_RUNTIME_FIELDS),
        "model": hash_view(cfg.model, {"pretrained_checkpoint"}),
        "train": cfg.train.model_dump(),
        "seed": cfg.seed,
        "calib_split": cfg.prune.calib_split,  # the images held out are never trained on
    }
    if not is_classification(load_task(cfg.task)):
        view["task"] = cfg.task
    return stable_hash(view)


def model_spec(cfg: RunConfig, data: DataBundle, num_classes: int | None) -> dict:
    """build_model's keyword arguments for the config's unpruned architecture (what a saved model
    records so that pfp.serialization.load_model rebuilds it). Published weights are left out:
    a saved model carries its own."""
    if is_import_path(cfg.model.name):
        return {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs)}
    if num_classes is None:
        raise ConfigError(
            f"model.name: {cfg.model.name!r} is a classifier, but task {cfg.task!r} has no classes; "
            "name your own model as 'package.module:callable'")
    spec = {"name": cfg.model.name, "num_classes": num_classes, "in_channels": data.in_channels,
            "input_size": data.input_size}
    if cfg.model.kwargs:
        spec["kwargs"] = dict(cfg.model.kwargs)
    return spec


def run_dir(cfg: RunConfig) -> Path:
    """output_dir/<name>: where every file of this config's runs goes."""
    return Path(cfg.output_dir) / cfg.name


def refuse_distributed(command: str) -> None:
    """ConfigError under torchrun: only training the base model runs on several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"{command} does not run under torchrun; train the base model with 'torchrun ... pfp train CONFIG', "
            f"then run '{command} CONFIG' in one process: it reuses output_dir/<name>/base.pt"
        )


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


def load_data(cfg: RunConfig) -> DataBundle:
    """The config's data set (train and test), logged with its size."""
    log.info("data %s%s", cfg.data.name, f" from {cfg.data.root}" if cfg.data.root else "")
    start = time.perf_counter()
    data = build_data(cfg.data)
    log.info(
        "%d train / %d test samples, %s, input %s (%.1fs)", len(data.train), len(data.test),
        f"{data.num_classes} classes" if data.num_classes is not None else "targets of the task's kind",
        "x".join(str(d) for d in data.example_shape), time.perf_counter() - start,
    )  # fmt: skip
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
                        pool: Dataset | None = None) -> Calibration:
    """S, the guarantee's held-out points and the post-processing images, without augmentation.

    They come from `pool` (the images prune.calib_split held out from training), else from the
    training set. The guarantee's points shrink (with a note) when the pool is too small.
    """
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
        log.warning("only %d held-out points fit next to |S|=%d", n_hold, n_calib)
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
    acc: float | None  # classification only (None for other tasks)
    loss: float | None
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
    task: Task = field(default_factory=lambda: load_task(None))
    metrics: dict[str, float] = field(default_factory=dict)  # the task's evaluation of the base model

    @property
    def metric(self) -> str:
        """The name of the task's metric (classification: "acc")."""
        return self.task.metric

    @property
    def score(self) -> float:
        """The base model's value of the task's metric."""
        return check_metrics(self.task, self.metrics)
    _base_state: dict | None = field(default=None, repr=False)

    def base_state(self) -> dict:
        """A copy of the trained weights, taken once: every comparison point starts from it."""
        if self._base_state is None:
            self._base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return self._base_state

    def base_info(self, seconds: float = 0.0) -> BaseInfo:
        """The base model and S as a typed result (hashes of the data and of S included)."""
        calib = getattr(self.calib_loader, "dataset", None)
        return BaseInfo(
            base_path=str(self.base_path) if self.base_path else "", run_dir=str(self.run_dir), acc=self.acc,
            loss=self.loss, task=self.cfg.task or "classification", metric=self.metric,
            higher_is_better=self.task.higher_is_better, score=self.score, metrics=self.metrics, params=self.params, flops=self.flops, trained_now=self.trained_now,
            data_hash=data_fingerprint(self.data.train),
            calib_hash=data_fingerprint(calib) if calib is not None else None,
            calib_size=self.calib_size or 0, holdout_size=self.holdout_size or 0, seconds=seconds,
        )  # fmt: skip


def load_checkpoint_for(path: str | Path, data: DataBundle, example_input: torch.Tensor, cfg: RunConfig | None = None,
                        task: Task | None = None) -> tuple[nn.Module, dict, str]:
    """A saved model checked against the data: (model on CPU, {"spec", "meta"}, identity key).

    `path` is a pfp model file, or (with `cfg`, whose model section builds the architecture)
    a plain state_dict or a file holding {"state_dict": ...}. CheckpointError, naming the file,
    when it is unreadable, its keys do not match, or it does not fit the data set's classes,
    channels or input shape.
    """
    path = Path(path)
    classify = is_classification(task)
    spec: dict | None = None

    def fresh() -> nn.Module:
        nonlocal spec
        if cfg is None:
            raise CheckpointError(f"{path}: a plain state_dict needs the config's model section to build the model")
        num_classes = (data.num_classes if data.num_classes is not None else infer_num_classes(data)) if (
            classify and not is_import_path(cfg.model.name)) else data.num_classes
        spec = model_spec(cfg, data, num_classes)
        return build_model(**spec)

    model, info = load_model_or_state(path, build_model, fresh)
    spec = info["spec"] or spec
    info = {"spec": spec, "meta": info["meta"]}
    num_classes = data.num_classes
    if classify and num_classes is None and "num_classes" in spec:
        num_classes = infer_num_classes(data)
    if num_classes is not None and spec.get("num_classes", num_classes) != num_classes:
        raise CheckpointError(
            f"{path}: the model has {spec['num_classes']} classes but data set {data.name} has {num_classes}"
        )
    if "in_channels" in spec and spec["in_channels"] != data.in_channels:
        raise CheckpointError(
            f"{path}: the model takes {spec['in_channels']}-channel images but data set {data.name} has {data.in_channels}"
        )
    shape = "x".join(str(d) for d in data.example_shape)
    try:
        model.eval()
        with torch.no_grad():
            out = model(example_input.cpu())
    except Exception as e:  # noqa: BLE001 - any failure means the model does not fit the data
        first = first_line(e)
        raise CheckpointError(
            f"{path}: the model does not accept {shape} inputs of data set {data.name} ({type(e).__name__}: {first})"
        ) from None
    if classify and num_classes is not None and isinstance(out, torch.Tensor) and (
            out.ndim != 2 or out.shape[1] != num_classes):
        raise CheckpointError(f"{path}: the model outputs shape {list(out.shape)}, expected [1, {num_classes}]")
    st = path.stat()
    key = stable_hash({"checkpoint": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns})
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
    progress: bool,
    task: Task | None = None,
) -> tuple[nn.Module, bool]:
    """The trained base model: base.pt when it matches the config, otherwise trained now."""
    base_path = out / "base.pt"
    if base_path.exists():
        model, info = load_model(base_path, build_model)
        meta = info["meta"]
        if meta.get("config_hash") == key:
            log.info("base: reusing %s (trained earlier with this config; delete it to retrain)", base_path)
            return model, False
        # Another config trained this one: keep it aside, never overwrite a trained model silently.
        aside = base_path.with_name(f"base-{meta.get('config_hash', 'unknown')}.pt")
        log.warning("base: %s was trained with another config; moving it to %s", base_path, aside.name)
        barrier()
        if is_main_process():
            os.replace(base_path, aside)
        barrier()

    seed_everything(cfg.seed + get_rank())
    model = build_model(**spec, weights=cfg.model.weights)
    ckpt = claim_checkpoint(out / "train.ckpt", key)
    world = get_world_size()
    log.info(
        "train %s: %d epochs, lr %s (%s), batch %d%s, on %s%s", cfg.model.name, cfg.train.epochs, cfg.train.lr,
        cfg.train.schedule, cfg.data.batch_size, f" x {world} processes" if world > 1 else "", device,
        "  (resuming from train.ckpt)" if ckpt.exists() else "",
    )  # fmt: skip
    start = time.perf_counter()
    try:
        result = train(model, train_loader, test_loader, cfg.train, device, checkpoint_path=ckpt, resume=True,
                       progress=progress, task=task)
    except CheckpointError as e:
        log.warning("%s; training from scratch", e)
        drop_checkpoint(ckpt)
        ckpt = claim_checkpoint(out / "train.ckpt", key)
        seed_everything(cfg.seed + get_rank())
        model = build_model(**spec, weights=cfg.model.weights)
        result = train(model, train_loader, test_loader, cfg.train, device, checkpoint_path=ckpt, resume=False,
                       progress=progress, task=task)
    seconds = time.perf_counter() - start
    if is_main_process():
        save_model(
            base_path, model, spec,
            meta={
                "config_hash": key,
                "acc": result.final.get("acc"),
                "loss": result.final.get("loss"),
                "metrics": dict(result.final),
                "input_shape": list(data.example_shape),  # export reads it for any model
                "epochs": cfg.train.epochs,
                "world_size": world,
                "train_seconds": seconds,
                "config": cfg.model_dump(),
            },
        )  # fmt: skip
    barrier()
    metric = task.metric if task is not None else "acc"
    log.info("saved %s (test %s %.4g, %.0fs)", base_path, metric, result.final.get(metric, float("nan")), seconds)
    return model, True


def prepare(
    cfg: RunConfig,
    *,
    progress: bool = True,
    calibration: bool = True,
    distributed: bool = False,
) -> Setup:
    """Data, loaders, the trained base model (train / reuse / load), its metrics, calibration sets.

    `progress`: training progress bars. With distributed=True (a torchrun launch) the loaders
    shard the data and only rank 0 writes files; calibration is then usually left off.
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    task = load_task(cfg.task)
    data = load_data(cfg)
    train_set, held_out = split_training(cfg, data.train)
    train_loader = make_loader(
        train_set, cfg.data.batch_size, shuffle=True, workers=cfg.data.workers, seed=cfg.seed,
        distributed=distributed, drop_last=distributed,
    )  # fmt: skip
    test_loader = make_loader(
        data.test, cfg.data.eval_batch_size, shuffle=False, workers=cfg.data.workers, seed=cfg.seed,
        distributed=distributed,
    )  # fmt: skip
    example_input = torch.zeros(1, *data.example_shape)
    out = run_dir(cfg)
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)

    if cfg.model.pretrained_checkpoint:
        model, info, key = load_checkpoint_for(cfg.model.pretrained_checkpoint, data, example_input, cfg, task)
        spec = info["spec"]
        check_output(task, model, example_input, f"model.pretrained_checkpoint {cfg.model.pretrained_checkpoint}")
        trained_now, base_path = False, Path(cfg.model.pretrained_checkpoint)
        log.info("base: loaded %s (%s)", base_path, spec.get("name", "?"))
    else:
        num_classes = data.num_classes
        if num_classes is None and is_classification(task) and not is_import_path(cfg.model.name):
            num_classes = infer_num_classes(data)  # our classifiers are built for a number of classes
        spec = model_spec(cfg, data, num_classes)
        arch = build_model(**spec)  # name and constructor errors first, before any training
        check_output(task, arch, example_input, f"model.name {cfg.model.name}")
        if calibration:
            check_calib_split(cfg, calib_count(cfg, arch, example_input), len(data.train))
        key = base_config_hash(cfg)
        model, trained_now = _train_base(cfg, data, train_loader, test_loader, device, spec, out, key, progress, task)
        base_path = out / "base.pt"

    model.to(device)
    example_input = example_input.to(device)
    metrics = evaluate(model, test_loader, device, amp=switch_enabled(cfg.train.amp, device), task=task)
    params, flops = count_params(model), count_flops(model, example_input)
    classify = is_classification(task)
    log.info("unpruned: test %s %.4g, %s params, %s FLOPs", task.metric, check_metrics(task, metrics),
             format_count(params), format_count(flops))
    setup = Setup(
        cfg=cfg, device=device, data=data, train_loader=train_loader, test_loader=test_loader, model=model,
        spec=spec, example_input=example_input, base_key=key, acc=metrics["acc"] if classify else None,
        loss=metrics["loss"] if classify else metrics.get("loss"), params=params, flops=flops,
        trained_now=trained_now, base_path=base_path, run_dir=out, held_out=held_out, task=task, metrics=metrics,
    )  # fmt: skip
    if calibration:
        cal = calibration_loaders(cfg, data, model, example_input, pool=held_out)
        setup.calib_loader, setup.holdout_loader, setup.postprocess_loader = cal.calib, cal.holdout, cal.postprocess
        setup.calib_size, setup.holdout_size = cal.calib_size, cal.holdout_size
        src = f"{len(held_out)} training images held out from training" if held_out is not None else "the training images"
        log.info("calibration from %s: |S| = %d, %d more for the guarantee report, %d for BN recalibration and "
                 "reconstruction", src, cal.calib_size, cal.holdout_size, cal.postprocess_size)
    return setup


def run_train(cfg: RunConfig, *, progress: bool = True, distributed: bool = False) -> Setup:
    """Only train (or reuse) and save the base model; under torchrun the data is sharded."""
    return prepare(cfg, progress=progress, calibration=False, distributed=distributed)


# --------------------------------------------------------------------------- one Setup per process

_SETUPS: dict[str, Setup] = {}


def cached_setup(cfg: RunConfig, *, progress: bool = True) -> Setup:
    """prepare(cfg), kept for this process: a flow's steps share one Setup when they run in
    the same process and rebuild it (reusing base.pt) when they run elsewhere."""
    key = stable_hash(cfg.model_dump())
    if key not in _SETUPS:
        _SETUPS.clear()  # one config at a time: a Setup holds the data set in memory
        _SETUPS[key] = prepare(cfg, progress=progress)
    return _SETUPS[key]


def calibration_fingerprint(setup: Setup) -> dict:
    """Hashes that identify the data and the calibration set S drawn from it."""
    info = setup.base_info()
    return {"data_hash": info.data_hash, "calib_hash": info.calib_hash, "calib_size": info.calib_size,
            "holdout_size": info.holdout_size}
