"""The one small interface every inference backend implements.

A backend turns an exported model bundle into a *runner* for one precision and a set of
batch sizes (building whatever artifact it needs on the way: nothing for ONNX Runtime, a
TensorRT engine plan, a compiled torch module), and a runner does two things:

* ``run(x)``: numpy in, numpy out, for parity checks against PyTorch;
* ``timed_step(batch)``: a zero-argument callable that runs one inference on an input
  already resident where the backend computes, so the latency harness times the model and
  not host/device copies. ``synchronize()`` waits for queued work; ``timer`` tells the
  harness whether CUDA events or the wall clock measure a step.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from export.errors import ExportPackageError

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8")


class BackendUnavailable(ExportPackageError, RuntimeError):
    """The backend cannot run on this machine (library missing, no GPU, ...); says why."""


class BackendError(ExportPackageError, ValueError):
    """A backend was asked for something it cannot do with this input; one line, naming it."""


@dataclass(frozen=True)
class ModelBundle:
    """What `pfp export` writes: the ONNX file, the PyTorch model file and what they take.

    ``input_shape`` is one sample's shape (C, H, W); the batch axis is dynamic.
    """

    onnx: Path
    checkpoint: Path | None
    input_shape: tuple[int, ...]
    input_name: str = "input"
    output_name: str = "logits"
    onnx_sha256: str | None = None


@dataclass
class BuildSpec:
    """How to build a runner: precision, the batch sizes it must serve, CPU threads, and
    (INT8 only) calibration inputs drawn from the calibration set."""

    precision: str = "fp32"
    batch_sizes: Sequence[int] = (1, 8, 32)
    threads: int | None = None
    calibration: np.ndarray | None = None
    workdir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BackendError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise BackendError(f"batch sizes {list(self.batch_sizes)} must be positive integers")
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)


class Runner(abc.ABC):
    """A loaded model that runs inference on one backend."""

    backend: str = ""
    device: str = "cpu"                     # "cpu" or "cuda"
    precision: str = "fp32"
    timer: Literal["wall", "cuda_events"] = "wall"
    threads: int | None = None              # CPU threads the runner was pinned to, if any
    artifact: Path | None = None            # what was built (engine plan, optimized ONNX, ...)

    @abc.abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 batch (N, C, H, W), as float32 numpy."""

    @abc.abstractmethod
    def timed_step(self, batch: int) -> Callable[[], Any]:
        """A callable that runs one inference of `batch` samples on resident input."""

    def synchronize(self) -> None:
        """Wait until queued work is done (a no-op for synchronous backends)."""

    def close(self) -> None:
        """Free what the runner holds."""

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "precision": self.precision,
            "timer": self.timer,
            "threads": self.threads,
            "artifact": str(self.artifact) if self.artifact else None,
        }


class Backend(abc.ABC):
    """A named way to run a model bundle (see export.backends.get_backend)."""

    name: str = ""
    device: str = "cpu"
    precisions: tuple[str, ...] = ("fp32",)

    @abc.abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else one line saying what is missing."""

    def check_available(self) -> None:
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailable(f"backend {self.name}: {reason}")

    def check_precision(self, spec: BuildSpec) -> None:
        if spec.precision not in self.precisions:
            raise BackendError(
                f"backend {self.name} supports precision {', '.join(self.precisions)}, not {spec.precision}"
            )

    @abc.abstractmethod
    def load(self, bundle: ModelBundle, spec: BuildSpec) -> Runner:
        """Build what the backend needs from `bundle` and return a ready runner."""


def random_input(batch: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A float32 batch for timing: values do not change the work a CNN does."""
    return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)
