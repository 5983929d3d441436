"""PyTorch backends: eager and torch.compile, on CPU or CUDA, from the pfp model file.

These run the model the ONNX file was exported from, so the same bundle can be timed
side by side in PyTorch and in the ONNX runtimes.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from export.backends.base import Backend, BackendError, BuildSpec, ModelBundle, Runner
from pfp.models import build_model
from pfp.serialization import load_model


class TorchRunner(Runner):
    def __init__(self, model: torch.nn.Module, bundle: ModelBundle, device: str, precision: str,
                 threads: int | None, name: str) -> None:
        self.model = model
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.threads = threads
        self.backend = name
        self.artifact = bundle.checkpoint
        self.timer = "cuda_events" if device == "cuda" else "wall"
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.memory_format = torch.channels_last if device == "cuda" else torch.contiguous_format

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, dtype=self.dtype).contiguous(memory_format=self.memory_format)

    def run(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(self._to_device(torch.from_numpy(np.ascontiguousarray(x))))
        return out.float().cpu().numpy()

    def timed_step(self, batch: int) -> Callable[[], Any]:
        gen = torch.Generator().manual_seed(0)
        x = self._to_device(torch.randn(batch, *self.bundle.input_shape, generator=gen))

        def step() -> Any:
            with torch.inference_mode():
                return self.model(x)

        return step

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        self.model = None


class TorchBackend(Backend):
    """PyTorch eager (compile=False) or torch.compile (compile=True) on `device`."""

    def __init__(self, device: str = "cpu", compile: bool = False) -> None:
        if device not in ("cpu", "cuda"):
            raise BackendError(f"torch device {device!r} is not cpu or cuda")
        self.device = device
        self.compile = compile
        self.name = f"torch-{'compile-' if compile else ''}{device}"
        self.precisions = ("fp32", "fp16") if device == "cuda" else ("fp32",)

    def unavailable_reason(self) -> str | None:
        if self.device == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
        return None

    def load(self, bundle: ModelBundle, spec: BuildSpec) -> TorchRunner:
        self.check_available()
        self.check_precision(spec)
        if bundle.checkpoint is None:
            raise BackendError(f"{bundle.onnx}: backend {self.name} needs the PyTorch model file, and the bundle has none")
        model, _ = load_model(bundle.checkpoint, build_model)
        model = model.eval().to(self.device)
        if spec.precision == "fp16":
            model = model.half()
        if self.device == "cuda":
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            model = torch.compile(model, mode=spec.options.get("compile_mode"), dynamic=False)
        return TorchRunner(model, bundle, self.device, spec.precision, spec.threads, self.name)
