"""The pipeline's config: a pfp RunConfig plus export, benchmark backends, gate, tracking,
dispatch and the edge devices of the promotion gate.

One YAML file describes a whole scheduled compression job. It is validated in full before
any work starts; an error names the file and the field (pfp.config's ConfigError). The
validated PipelineConfig is what the flows take as their parameter (Prefect validates it
once, on the way in) and carries everything read from other files (the edge devices of
the targets file), so no task reads or validates a file again.
"""
from __future__ import annotations

import hashlib
import json
import re
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from deploy.gate import GateConfig, LatencyCheck
from deploy.targets import Target
from pfp.config import ConfigError, RunConfig, StrictModel, config_from_dict, load_config

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ExportSettings(StrictModel):
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    opset: int = Field(18, ge=13, le=23)
    simplify: bool = False
    parity_samples: int = Field(1000, ge=1)


class BackendConfig(StrictModel):
    """Where the bundles are benchmarked side by side: a backend here, or (deployment set) on
    a Prefect work pool. Not an edge device: those are in the targets file (EdgeConfig)."""

    name: str = Field(description="letters, digits, '.', '_', '-'; it names folders and metrics")
    backend: str = "ort-cpu"
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32], min_length=1)
    threads: int | None = Field(None, ge=1)
    max_time_s: float = Field(10.0, gt=0, description="timing budget per model and batch size")
    role: Literal["gate", "canary", "fleet"] = "gate"
    deployment: str | None = Field(
        None, description="run the benchmark as this Prefect deployment (FLOW/DEPLOYMENT) on its work pool"
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"{v!r} must match {NAME_RE.pattern} (no paths, no spaces)")
        return v

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        from export.backends import BACKENDS

        if v not in BACKENDS:
            raise ValueError(f"unknown backend {v!r}; known: {', '.join(BACKENDS)}")
        return v

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive")
        return v


class TrackingConfig(StrictModel):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite under output_dir"
    )
    experiment: str | None = Field(None, description="MLflow experiment; None: the config's name")
    registered_model: str | None = Field(None, description="registry name; None: the config's name")


class DispatchConfig(StrictModel):
    """Heavy steps sent to Prefect work pools as deployments (FLOW/DEPLOYMENT) instead of
    running in the flow's own process. Files move through output_dir, which every worker
    must see (shared storage), and models through MLflow's artifact store."""

    iteration: str | None = Field(None, description="prune + retrain + evaluate, e.g. pfp-iteration/gpu")
    export: str | None = Field(None, description="ONNX export and parity, e.g. pfp-export/cpu")
    # Benchmarks go to a backend's own pool: backends[].deployment (e.g. pfp-benchmark/jetson-01).


class EdgeConfig(StrictModel):
    """Edge devices in the promotion gate: the targets file's `gate` devices build, check and
    time each registered candidate on the device (flows.device_flows, mode benchmark) before the
    gate decides; their figures join the gate's latency checks under the device's name, and
    a device's `latency_budget_ms` becomes a check of its own (p50 at its smallest batch)."""

    targets_file: str | None = Field(None, description="deploy targets YAML; its role: gate devices are measured")
    devices: list[Target] | None = Field(
        None, description="the targets file's devices, read once when the config is loaded and carried from then on"
    )
    pickup_timeout_s: float = Field(120.0, gt=0, description="a gate device that takes no job by then is offline")
    run_timeout_s: float = Field(1800.0, gt=0)
    max_time_s: float = Field(5.0, gt=0, le=600, description="timing budget per batch size on the device")

    @model_validator(mode="after")
    def _read_targets_file(self) -> "EdgeConfig":
        # Only a config validated from a file or a fresh dict reads the targets file; a
        # config that travelled as a flow parameter carries `devices` and is not re-read.
        if self.targets_file and self.devices is None:
            from deploy.targets import load_targets

            try:
                devices = load_targets(self.targets_file)
            except ConfigError as e:
                raise ValueError(f"edge.targets_file: {e}") from None
            object.__setattr__(self, "devices", devices)  # no validate_assignment loop inside a validator
        elif not self.targets_file and self.devices:
            raise ValueError("devices: set only together with targets_file (they are read from it)")
        return self

    def gate_targets(self) -> list[Target]:
        """The gate devices of the targets file ([] without a file)."""
        return [t for t in self.devices or [] if t.role == "gate"]


class ScheduleConfig(StrictModel):
    cron: str | None = Field(None, description="cron string for `pfp serve`, e.g. '0 2 * * *'")
    timezone: str = "UTC"


class PipelineConfig(RunConfig):
    export: ExportSettings = Field(default_factory=ExportSettings)
    backends: list[BackendConfig] = Field(default_factory=lambda: [BackendConfig(name="local-cpu")])
    gate: GateConfig = Field(default_factory=GateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)

    @model_validator(mode="before")
    @classmethod
    def _renamed_targets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "targets" in data:
            raise ValueError(RENAMED_TARGETS)
        return data

    @model_validator(mode="after")
    def _gate_targets_exist(self) -> "PipelineConfig":
        names = [t.name for t in self.backends]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"backends: duplicate name {sorted(dup)[0]!r}")
        edge = {t.name: t for t in self.edge.gate_targets()}
        clash = sorted(set(edge) & set(names))
        if clash:
            raise ValueError(f"edge.targets_file: gate device {clash[0]!r} has the name of a pipeline backend")
        for i, check in enumerate(self.gate.latency):
            if check.target in edge:
                if check.batch not in edge[check.target].batch_sizes:
                    raise ValueError(f"gate.latency.{i}.batch: {check.batch} is not measured on gate device "
                                     f"{check.target!r} (batch_sizes {edge[check.target].batch_sizes})")
                if check.min_speedup is not None:
                    raise ValueError(f"gate.latency.{i}.min_speedup: gate device {check.target!r} times only the "
                                     "candidate; use max_ms")
                continue
            if check.target not in names:
                raise ValueError(f"gate.latency.{i}.target: {check.target!r} is not one of backends {names}"
                                 + (f" or gate devices {sorted(edge)}" if edge else ""))
            backend = self.backend(check.target)
            if check.batch not in backend.batch_sizes:
                raise ValueError(
                    f"gate.latency.{i}.batch: {check.batch} is not measured on backend {check.target!r} "
                    f"(batch_sizes {backend.batch_sizes})"
                )
        return self

    def latency_target_mismatches(self) -> list[str]:
        """One line per gate latency check timed otherwise than prune.latency pruned for.

        Pruned for 1 thread, a model can gain 2.4x there and 1.4x on 2 threads (the quickstart,
        measured): a gate on other settings judges a target the rounds did not aim at.
        """
        spec = self.prune.latency
        if self.prune.target != "latency" or spec is None:
            return []
        lines = []
        for i, check in enumerate(self.gate.latency):
            if check.target not in {b.name for b in self.backends}:
                continue  # a gate device: its own hardware, by design
            b = self.backend(check.target)
            theirs = (b.backend, b.threads, b.precision, check.batch)
            ours = (spec.backend, spec.threads, spec.precision, spec.batch)
            if theirs != ours:
                lines.append(f"gate.latency.{i}: backend {b.name!r} times {b.backend} threads={b.threads} "
                             f"{b.precision} batch {check.batch}, but prune.latency pruned for {spec.backend} "
                             f"threads={spec.threads} {spec.precision} batch {spec.batch}")
        return lines

    def backend(self, name: str) -> BackendConfig:
        """The benchmark backend called `name` (KeyError naming it if there is none)."""
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"no backend {name!r} in backends {[b.name for b in self.backends]}")

    def run_config_hash(self) -> str:
        """Hash of the pfp part (data, model, training, pruning, seed): what a round's result
        depends on; the export, backends, gate and tracking sections are left out."""
        return stable_hash(self.model_dump(mode="json", include=set(RunConfig.model_fields)))

    def config_hash(self) -> str:
        """Hash of the whole config (MLflow's pfp.config_hash tag)."""
        return stable_hash(self.model_dump(mode="json"))

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def model_name(self) -> str:
        return self.tracking.registered_model or self.name


def pipeline_quickstart_text() -> str:
    """The pipeline's quickstart config as shipped (package data flows/pipeline_quickstart.yaml)."""
    return files("flows").joinpath("pipeline_quickstart.yaml").read_text(encoding="utf-8")


RENAMED_TARGETS = ("'targets' is now 'backends' (the benchmark backends): rename the key; "
                   "edge devices stay in the targets file (edge.targets_file)")


def stable_hash(obj: Any) -> str:
    """16 hex digits of sha256 over canonical JSON: the same value in every process."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_pipeline_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """The pipeline config at `path` (None: the shipped quickstart) with dotted overrides.

    The edge targets file is read here, once; the config carries its devices from then on.
    """
    if path is None:
        return config_from_dict(yaml.safe_load(pipeline_quickstart_text()), "<quickstart defaults>", overrides,
                                PipelineConfig)
    try:
        raw = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    except yaml.YAMLError:
        raw = None  # load_config reports it, in one line
    if isinstance(raw, dict) and "targets" in raw:
        raise ConfigError(f"{path}: field 'targets': {RENAMED_TARGETS}")
    return load_config(path, overrides, PipelineConfig)


__all__ = [
    "BackendConfig", "ConfigError", "DispatchConfig", "EdgeConfig", "ExportSettings", "GateConfig", "LatencyCheck",
    "PipelineConfig", "RENAMED_TARGETS", "ScheduleConfig", "TrackingConfig",
    "load_pipeline_config", "pipeline_quickstart_text", "stable_hash",
]
