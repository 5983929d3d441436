"""The pipeline's config: a pfp RunConfig plus export, targets, gate, tracking and dispatch.

One YAML file describes a whole scheduled compression job. It is validated in full before
any work starts; an error names the file and the field (pfp.config's ConfigError).
"""
from __future__ import annotations

import copy
import re
from importlib.resources import files
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from deploy.gate import GateConfig, LatencyCheck
from pfp.config import ConfigError, RunConfig, _Strict, config_from_dict, load_config

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ExportSettings(_Strict):
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    opset: int = Field(18, ge=13, le=23)
    simplify: bool = False
    parity_samples: int = Field(1000, ge=1)


class TargetConfig(_Strict):
    """Where a model is benchmarked: a backend here, or (deployment set) on a Prefect work pool."""

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


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite under output_dir"
    )
    experiment: str | None = Field(None, description="MLflow experiment; None: the config's name")
    registered_model: str | None = Field(None, description="registry name; None: the config's name")


class DispatchConfig(_Strict):
    """Heavy steps sent to Prefect work pools as deployments (FLOW/DEPLOYMENT) instead of
    running in the flow's own process. Files move through output_dir, which every worker
    must see (shared storage), and models through MLflow's artifact store."""

    iteration: str | None = Field(None, description="prune + retrain + evaluate, e.g. pfp-iteration/gpu")
    export: str | None = Field(None, description="ONNX export and parity, e.g. pfp-export/cpu")
    # Benchmarks go to a target's own pool: targets[].deployment (e.g. pfp-benchmark/jetson-01).


class EdgeConfig(_Strict):
    """Edge devices in the promotion gate: the targets file's `gate` devices build, check and
    time each registered candidate on the device (flows.device_flows, mode benchmark) before the
    gate decides; their figures join the gate's latency checks under the device's name, and
    a device's `latency_budget_ms` becomes a check of its own (p50 at its smallest batch)."""

    targets_file: str | None = Field(None, description="deploy targets YAML; its role: gate devices are measured")
    pickup_timeout_s: float = Field(120.0, gt=0, description="a gate device that takes no job by then is offline")
    run_timeout_s: float = Field(1800.0, gt=0)
    max_time_s: float = Field(5.0, gt=0, le=600, description="timing budget per batch size on the device")

    def gate_targets(self) -> list:
        """The gate devices of the targets file (validated; [] without a file)."""
        if not self.targets_file:
            return []
        from deploy.targets import load_targets

        return [t for t in load_targets(self.targets_file) if t.role == "gate"]


class ScheduleConfig(_Strict):
    cron: str | None = Field(None, description="cron string for `pfp serve`, e.g. '0 2 * * *'")
    timezone: str = "UTC"


class PipelineConfig(RunConfig):
    export: ExportSettings = Field(default_factory=ExportSettings)
    targets: list[TargetConfig] = Field(default_factory=lambda: [TargetConfig(name="local-cpu")])
    gate: GateConfig = Field(default_factory=GateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    edge: EdgeConfig = Field(default_factory=EdgeConfig)

    @model_validator(mode="after")
    def _gate_targets_exist(self) -> "PipelineConfig":
        names = [t.name for t in self.targets]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"targets: duplicate name {sorted(dup)[0]!r}")
        try:
            edge = {t.name: t for t in self.edge.gate_targets()}
        except ConfigError as e:
            raise ValueError(f"edge.targets_file: {e}") from None
        clash = sorted(set(edge) & set(names))
        if clash:
            raise ValueError(f"edge.targets_file: gate device {clash[0]!r} has the name of a pipeline target")
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
                raise ValueError(f"gate.latency.{i}.target: {check.target!r} is not one of targets {names}"
                                 + (f" or gate devices {sorted(edge)}" if edge else ""))
            target = next(t for t in self.targets if t.name == check.target)
            if check.batch not in target.batch_sizes:
                raise ValueError(
                    f"gate.latency.{i}.batch: {check.batch} is not measured on target {check.target!r} "
                    f"(batch_sizes {target.batch_sizes})"
                )
        return self

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def model_name(self) -> str:
        return self.tracking.registered_model or self.name


def pipeline_quickstart_text() -> str:
    """The pipeline's quickstart config as shipped (package data flows/pipeline_quickstart.yaml)."""
    return files("flows").joinpath("pipeline_quickstart.yaml").read_text(encoding="utf-8")


def load_pipeline_config(path: str | Path | None = None, overrides: dict | None = None) -> PipelineConfig:
    """The pipeline config at `path` (None: the shipped quickstart) with dotted overrides."""
    if path is None:
        return config_from_dict(yaml.safe_load(pipeline_quickstart_text()), "<quickstart defaults>", overrides,
                                PipelineConfig)
    return load_config(path, overrides, PipelineConfig)


def config_from_json(raw: dict, source: str = "<flow parameter>") -> PipelineConfig:
    """Re-validate a config that travelled as a flow parameter (already a plain dict)."""
    return config_from_dict(copy.deepcopy(raw), source, None, PipelineConfig)


__all__ = [
    "ConfigError", "DispatchConfig", "EdgeConfig", "ExportSettings", "GateConfig", "LatencyCheck",
    "PipelineConfig", "ScheduleConfig", "TargetConfig", "TrackingConfig", "config_from_json",
    "load_pipeline_config", "pipeline_quickstart_text",
]
