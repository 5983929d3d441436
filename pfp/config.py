"""Pydantic models for the YAML configs in configs/.

Every model forbids unknown keys, so a typo in a config fails before any work starts,
with the dotted path of the offending field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pfp.errors import CoreError


class ConfigError(CoreError, ValueError):
    """A config file that cannot be read or does not validate."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)




BUILTIN_DATA = ("fashion_mnist", "cifar10", "imagefolder", "imagenet", "synthetic")


def _check_import_path(value: str, field: str) -> str:
    """`value` itself when it is not an import path, or when it resolves (one line naming `field` if not)."""
    from pfp.imports import ImportPathError, is_import_path, resolve

    if is_import_path(value):
        try:
            resolve(value, field)
        except ImportPathError as e:  # pydantic names the field already
            raise ValueError(str(e).removeprefix(f"{field}: ")) from None
    return value


class DataConfig(StrictModel):
    name: str = Field(
        "fashion_mnist",
        description=f"{', '.join(BUILTIN_DATA)}, or 'package.module:callable' returning (train, test) datasets or "
        "loaders, called with data.kwargs",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of an import-path data.name")
    root: str | None = Field(None, description="folder holding the data set; None looks in the usual places")
    input_size: int | None = Field(None, ge=8, description="resize images to this side; None keeps the native size")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(512, ge=1)
    workers: int = Field(0, ge=0)
    download: bool = Field(False, description="let torchvision download the data set where the machine is online")
    augment: bool = True
    # synthetic data (tests and smoke runs)
    synthetic_train: int = Field(512, ge=1)
    synthetic_test: int = Field(256, ge=1)
    synthetic_classes: int = Field(10, ge=2)
    synthetic_channels: int = Field(3, ge=1)
    synthetic_size: int = Field(32, ge=8)
    limit_train: int | None = Field(None, ge=1, description="use only the first N training images (quick runs)")
    limit_test: int | None = Field(None, ge=1, description="use only the first N test images (quick runs)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        from pfp.imports import is_import_path

        if v not in BUILTIN_DATA and not is_import_path(v):
            raise ValueError(f"unknown data set {v!r}; use one of {', '.join(BUILTIN_DATA)} or 'package.module:callable'")
        return _check_import_path(v, "data.name")

    @model_validator(mode="after")
    def _kwargs_only_for_imports(self) -> "DataConfig":
        if self.kwargs and self.name in BUILTIN_DATA:
            raise ValueError(f"data.kwargs: only an import-path data.name takes kwargs, not {self.name!r}")
        return self


class ModelConfig(StrictModel):
    name: str = Field(
        "lenet5", description="one of ours (pfp models), tv:<torchvision name>, timm:<timm name> (optional extra), "
        "or 'package.module:callable' returning an nn.Module, called with model.kwargs"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of an import-path or timm: model.name"
    )
    weights: str | None = Field(
        None, description="tv: models only: torchvision weights to start from (DEFAULT or an enum name such as "
        "IMAGENET1K_V1); downloaded by torchvision, so the machine must be online"
    )
    pretrained_checkpoint: str | None = Field(
        None, description="start from this trained checkpoint instead of training from scratch: a pfp model file, "
        "a state_dict, or a file holding {'state_dict': ...}"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_import_path(v, "model.name")

    @model_validator(mode="after")
    def _weights_and_kwargs(self) -> "ModelConfig":
        from pfp.imports import is_import_path

        key = self.name.strip().lower()
        if self.weights is not None and not key.startswith("tv:"):
            raise ValueError(f"model.weights: only tv: models have published weights, not {self.name!r}; "
                             "use model.pretrained_checkpoint for your own")
        if self.kwargs and not (is_import_path(self.name) or key.startswith("timm:")):
            raise ValueError(f"model.kwargs: only an import-path or timm: model.name takes kwargs, not {self.name!r}")
        if key.startswith("timm:"):
            from pfp.models import require_timm

            require_timm(self.name)
        if self.weights is not None:
            from pfp.models import tv_weights

            tv_weights(self.name.strip()[3:], self.weights)  # an unknown enum name fails here, before any work
        return self


class TrainConfig(StrictModel):
    epochs: int = Field(10, ge=0)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    schedule: Literal["step", "cosine", "constant"] = "cosine"
    milestones: list[float] = Field(
        default_factory=lambda: [0.5, 0.75],
        description="step schedule: fractions of the epochs (<1) or absolute epochs (>=1)",
    )
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: Literal["auto", "on", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    grad_clip: float | None = Field(None, gt=0)


ALLOCATIONS = ("mass_bound", "mass_sum", "sample_bound", "holdout", "search", "search_lazy", "single_eps", "uniform",
               "global")


def known_methods() -> list[str]:
    """The names in pfp.methods' registry (imported late: it imports this module)."""
    from pfp.methods import METHODS

    return list(METHODS)


def _check_method(name: str) -> str:
    if name not in known_methods():
        raise ValueError(f"unknown method {name!r}; known: {', '.join(known_methods())}")
    return name


LATENCY_PRECISIONS = ("fp32", "fp16", "int8")


class LatencyTargetConfig(StrictModel):
    """Where `prune.target: latency` measures: the backend (a name of export.backends), batch, threads, precision."""

    backend: str = Field("ort-cpu", description="ort-cpu, ort-cuda, torch-cpu, torch-cuda, torch-compile-cpu, "
                         "torch-compile-cuda or tensorrt")
    batch: int = Field(1, ge=1)
    threads: int | None = Field(1, ge=1, description="CPU threads for CPU backends; None leaves them")
    precision: Literal[LATENCY_PRECISIONS] = "fp32"  # type: ignore[valid-type]
    tries: int = Field(3, ge=1, description="prune-export-measure rounds at most, each correcting the target")
    tolerance: float = Field(0.05, gt=0, lt=1, description="measured/target ratio within 1 +- this is met")
    flops_fallback: float | None = Field(
        None, gt=0, description="when the table's first prediction misses the measured ratio by more than this "
        "share, chase the target with FLOPs budgets too and keep the met model closest to the unpruned one; "
        "None: the table only")
    cache_dir: str | None = Field(None, description="latency table cache; None: ~/.cache/pfp/latency_tables")
    context_s: float = Field(300.0, ge=0, description="seconds at most per table build (then cached) spent timing "
                             "each group's staircase tops inside the whole model; 0: the blocks alone")
    calibration: list[Annotated[float, Field(gt=0, lt=1)]] = Field(
        default_factory=lambda: [0.6, 0.35], description="uniform widths at which the whole model is pruned and timed "
        "to learn the share of the blocks' predicted savings it realizes; []: none, the blocks' sum as it is")


class PruneConfig(StrictModel):
    method: str = Field("pfp", description="a name in pfp.methods' registry (pfp compare lists them)")
    target: Literal["flops", "params", "latency"] = Field(
        "flops", description="the resource keep_ratios are fractions of; latency: measured on prune.latency's backend"
    )
    latency: LatencyTargetConfig | None = Field(
        None, description="target latency: where it is measured; None with target latency uses the defaults"
    )
    keep_ratios: list[float] = Field(
        default_factory=lambda: [0.5, 0.3, 0.15],
        description="cascade: fraction of the original resource kept after each round",
    )
    delta: float = Field(1e-12, gt=0, lt=1, description="failure probability of the guarantee")
    selection: Literal["deterministic", "randomized"] = "deterministic"
    sensitivity: Literal["sum", "max_offset"] = Field(
        "sum", description="sum: channel's share over the kernel (paper Fig. 1); max_offset: reference code"
    )
    allocation: Literal[ALLOCATIONS] | None = Field(  # type: ignore[valid-type]
        None,
        description="channel budgets: mass_bound / sample_bound (per-layer eps_l minimising sum log(1+eps_l) at "
        "the target; eps_l the dropped sensitivity mass, or from the sample-size bound), single_eps (the paper's "
        "one eps), uniform (same ratio), global (one score threshold); None is the method's own",
    )
    group_score: Literal["weighted", "max"] | None = Field(
        None,
        description="PFP: how a channel's per-consumer sensitivities combine: weighted by each consumer's share "
        "of the group's output (ties broken by data), or the max (the spec's section 1); None is the method's own",
    )
    round_to: int = Field(8, ge=1, description="round kept channels to a multiple of this (1: off)")
    min_channels: int = Field(1, ge=1)
    calib_split: float = Field(
        0.05, ge=0,
        description="training images held out from training for S, BN recalibration, reconstruction and the "
        "guarantee report: a fraction (< 1) or a count (>= 1); 0 draws them from the training images",
    )
    calib_size: int | None = Field(None, ge=1, description="|S|; None uses the spec's formula")
    holdout_size: int = Field(256, ge=1, description="held-out points (not in S) for the guarantee report")
    bn_recalibration: bool = Field(True, description="re-estimate BatchNorm statistics after pruning (every method)")
    reconstruct: bool | None = Field(
        None, description="ridge least-squares refit of every consumer whose inputs shrank; None: on for pfp only"
    )
    postprocess_points: int = Field(
        512, ge=1, description="held-out training images for BN recalibration and reconstruction"
    )
    ridge: float = Field(1e-4, ge=0, description="reconstruction: ridge lambda relative to the mean diagonal of X^T X")
    tolerance: float = Field(0.5, ge=0, description="accuracy points allowed below the unpruned model")
    ignore_layers: list[str] = Field(default_factory=list, description="module names never pruned")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        return _check_method(v)

    @model_validator(mode="after")
    def _latency_default(self) -> "PruneConfig":
        if self.target == "latency" and self.latency is None:
            object.__setattr__(self, "latency", LatencyTargetConfig())
        return self

    @field_validator("calib_split")
    @classmethod
    def _split(cls, v: float) -> float:
        if v >= 1 and v != int(v):
            raise ValueError(f"{v} is neither a fraction below 1 nor a whole number of images")
        return v

    @field_validator("keep_ratios")
    @classmethod
    def _ratios(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs at least one keep ratio")
        for r in v:
            if not 0 < r < 1:
                raise ValueError(f"keep ratio {r} is not in (0, 1)")
        if any(b >= a for a, b in zip(v, v[1:])):
            raise ValueError("keep ratios must be strictly decreasing")
        return v


class CompareConfig(StrictModel):
    methods: list[str] = Field(
        default_factory=known_methods
    )
    postprocess: Literal["both", "plain", "shared"] = Field(
        "both",
        description="plain: each method as published (no BN recalibration, no reconstruction); shared: every "
        "method with BN recalibration and reconstruction; both: each method both ways",
    )
    reductions: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.85])
    target: Literal["flops", "params"] = Field("flops", description="the resource the reductions remove")

    @field_validator("reductions")
    @classmethod
    def _reductions(cls, v: list[float]) -> list[float]:
        for r in v:
            if not 0 < r < 1:
                raise ValueError(f"reduction {r} is not in (0, 1)")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for m in v:
            _check_method(m)
        return v


class RunConfig(StrictModel):
    name: str = "run"
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    retrain: TrainConfig | None = Field(None, description="retraining after each prune; None reuses train")
    prune: PruneConfig = Field(default_factory=PruneConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    task: str | None = Field(
        None, description="what the model is trained for and judged by: None or 'classification' (the default), "
        "or 'package.module:Task' (a pfp.tasks.Task: its loss, evaluation and metric)"
    )

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | None) -> str | None:
        from pfp.imports import is_import_path

        if v is None or v.strip().lower() == "classification":
            return v
        if not is_import_path(v):
            raise ValueError(f"task: {v!r} is neither 'classification' nor an import path 'package.module:Task'")
        return _check_import_path(v, "task")

    @model_validator(mode="after")
    def _retrain_default(self) -> "RunConfig":
        if self.retrain is None:
            object.__setattr__(self, "retrain", self.train.model_copy())
        return self


C = TypeVar("C", bound=RunConfig)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line for a pydantic error: `source: field 'a.b': message` (plus how many more)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: field '{loc}': {msg}{more}"


def load_config(path: str | Path | None = None, overrides: dict | None = None, model: type[C] = RunConfig) -> C:
    """Read and validate a YAML config (None: the embedded defaults), then apply overrides.

    overrides maps dotted keys to values, e.g. {"train.epochs": 1}; `model` is the pydantic
    class to validate with (RunConfig, or a subclass with more sections).
    """
    raw: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping")
    return config_from_dict(raw, source, overrides, model)


def config_from_dict(raw: dict, source: str = "<dict>", overrides: dict | None = None, model: type[C] = RunConfig) -> C:
    """Validate a config given as a mapping (changed in place by the overrides)."""
    for key, value in (overrides or {}).items():
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: '{part}' is not a section")
        node[parts[-1]] = value
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


