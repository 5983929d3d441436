"""Typed results of the export side that cross a step, task or process boundary: a bundle
made from a checkpoint, and one benchmark backend's side-by-side timings of several bundles.

Pydantic models, so a Prefect task can return them, persist them as results (and a cache
hit hands them back validated), and so callers read attributes instead of string keys.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from export.latency import LatencyResult


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleInfo(_Result):
    """A bundle folder (model.onnx, model.pt, export.json) and the figures callers need from it."""

    bundle: str = Field(description="the bundle folder")
    onnx_sha256: str
    flops: int
    params: int
    parity_max_rel_diff: float = Field(description="worst relative difference ONNX vs PyTorch on the test set")
    meta: dict[str, Any] = Field(description="export.json as written (the bundle's own file format)")
    seconds: float = 0.0

    @classmethod
    def from_meta(cls, bundle: str, meta: dict[str, Any], seconds: float = 0.0) -> "BundleInfo":
        """The typed view of a bundle's export.json."""
        return cls(bundle=bundle, onnx_sha256=meta["onnx"]["sha256"], flops=int(meta["flops"]),
                   params=int(meta["params"]), parity_max_rel_diff=float(meta["parity"][0]["max_rel_diff"]),
                   meta=meta, seconds=seconds)


class EfficiencyRow(_Result):
    """Measured speed-up of a model over the baseline against its ideal (FLOPs) speed-up."""

    model: str
    backend: str
    precision: str
    batch: int
    flops: int
    flops_removed: float
    p50_ms: float
    baseline_p50_ms: float
    speedup: float
    ideal_speedup: float
    efficiency: float


class BenchmarkResult(_Result):
    """Every bundle timed side by side on one benchmark backend (a pipeline `backends` entry).

    A backend that cannot run here (missing, no GPU, its deployment down) has `error` set
    and no rows: the gate's checks on it fail with that reason.
    """

    backend: str = Field(description="the name of the pipeline's backend entry, e.g. 'cpu'")
    results: list[LatencyResult] = Field(default_factory=list)  # the harness's own rows
    efficiency: list[EfficiencyRow] = Field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def rows_for(self, model: str) -> list[LatencyResult]:
        """The timings of one bundle (by its label, e.g. 'unpruned', 'round_1')."""
        return [r for r in self.results if r.model == model]

    def efficiency_for(self, model: str) -> list[EfficiencyRow]:
        return [e for e in self.efficiency if e.model == model]


__all__ = ["BenchmarkResult", "BundleInfo", "EfficiencyRow"]
