"""Deployment targets: the edge devices a promoted model goes to, read from a YAML file.

    targets:
      - name: orin-gate-01          # one folder name: it names the device's model repository
        work_pool: jetson-orin      # the Prefect work pool whose worker runs on the device
        work_queue: orin-gate-01    # default: the name, so each device takes only its own work
        role: gate                  # gate (measured before promotion), canary (first to get it), fleet
        latency_budget_ms: 5.0      # optional
        batch_sizes: [1]
        backend_preference: [tensorrt, ort-cuda, ort-cpu]   # first one the device can run wins

Validation is strict (unknown keys are errors) and happens in full before anything is
deployed; an error is one line naming the file and the field, as pfp.config's ConfigError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deploy.repository import validate_name
from pfp.config import ConfigError, format_validation_error

# The backends a device's repository can serve (deploy.repository: ONNX via ONNX Runtime, or an engine).
DEPLOY_BACKENDS = ("tensorrt", "ort-cuda", "ort-cpu")


class Target(BaseModel):
    """One device: where its deploy work runs and what it must serve."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="device name: letters, digits, '.', '_', '-'; it names a folder")
    work_pool: str = Field(min_length=1)
    work_queue: str | None = Field(None, min_length=1, description="default: the target's name")
    role: Literal["gate", "canary", "fleet"]
    latency_budget_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1)
    backend_preference: list[str] = Field(default_factory=lambda: list(DEPLOY_BACKENDS), min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v, "target name")

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"batch sizes {v} must be positive")
        if len(set(v)) != len(v):
            raise ValueError(f"batch sizes {v} repeat a value")
        return v

    @field_validator("backend_preference")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        for b in v:
            if b not in DEPLOY_BACKENDS:
                raise ValueError(f"backend {b!r} cannot be deployed; choose from {', '.join(DEPLOY_BACKENDS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"backend_preference {v} repeats a backend")
        return v

    @model_validator(mode="after")
    def _default_queue(self) -> "Target":
        # A queue per device, so a worker on one device never picks up another device's deploy.
        if self.work_queue is None:
            self.work_queue = self.name
        return self


class TargetsFile(BaseModel):
    """A targets YAML file: a list of targets with unique names."""

    model_config = ConfigDict(extra="forbid")

    targets: list[Target] = Field(min_length=1)

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[Target]) -> list[Target]:
        seen: dict[str, int] = {}
        for i, t in enumerate(v):
            if t.name in seen:
                raise ValueError(f"duplicate target name {t.name!r} (targets.{seen[t.name]}.name and "
                                 f"targets.{i}.name)")
            seen[t.name] = i
        return v


def load_targets(path: str | Path) -> list[Target]:
    """The targets in the YAML file `path`; ConfigError (one line, naming file and field) otherwise."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{source}: targets file not found")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {str(e).splitlines()[0]}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'targets' list")
    try:
        return TargetsFile.model_validate(raw).targets
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


__all__ = ["DEPLOY_BACKENDS", "Target", "TargetsFile", "load_targets"]
