"""Inference backends behind one interface (see export.backends.base).

    ort-cpu, ort-cuda                       ONNX Runtime
    torch-cpu, torch-cuda                   PyTorch eager
    torch-compile-cpu, torch-compile-cuda   torch.compile
    tensorrt                                TensorRT engine (optional extra)
"""
from __future__ import annotations

from typing import Callable

from export.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    BuildSpec,
    ModelBundle,
    Runner,
)


def _tensorrt() -> Backend:
    from export.backends.tensorrt import TensorRTBackend

    return TensorRTBackend()


def _ort(device: str) -> Callable[[], Backend]:
    def make() -> Backend:
        from export.backends.ort import OrtBackend

        return OrtBackend(device)

    return make


def _torch(device: str, compile: bool) -> Callable[[], Backend]:
    def make() -> Backend:
        from export.backends.torch_runtime import TorchBackend

        return TorchBackend(device, compile=compile)

    return make


BACKENDS: dict[str, Callable[[], Backend]] = {
    "ort-cpu": _ort("cpu"),
    "ort-cuda": _ort("cuda"),
    "torch-cpu": _torch("cpu", False),
    "torch-cuda": _torch("cuda", False),
    "torch-compile-cpu": _torch("cpu", True),
    "torch-compile-cuda": _torch("cuda", True),
    "tensorrt": _tensorrt,
}


def get_backend(name: str) -> Backend:
    """The backend called `name`; BackendError listing the known names otherwise."""
    try:
        return BACKENDS[name]()
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known: {', '.join(BACKENDS)}") from None


def availability() -> dict[str, str | None]:
    """Every backend name -> None when it can run here, else why not."""
    return {name: make().unavailable_reason() for name, make in BACKENDS.items()}


__all__ = [
    "BACKENDS", "Backend", "BackendError", "BackendUnavailable", "BuildSpec", "ModelBundle", "Runner",
    "availability", "get_backend",
]
