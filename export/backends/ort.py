"""ONNX Runtime backends: CPU, and CUDA where onnxruntime-gpu provides it.

FP16 and INT8 run the graph-level conversions of export.precision (the same files a
TensorRT 11 build uses), so every precision is an ONNX file ONNX Runtime can load.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from export.backends.base import Backend, BackendError, BuildSpec, ModelBundle, Runner, random_input
from pfp.errors import first_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def precision_graph(bundle: ModelBundle, spec: BuildSpec) -> Path:
    """The ONNX file to run at spec.precision: the export itself, or a converted copy."""
    if spec.precision == "fp32":
        return bundle.onnx
    from export import precision as prec

    workdir = Path(spec.workdir or bundle.onnx.parent)
    dst = workdir / f"{bundle.onnx.stem}.{spec.precision}.onnx"
    if spec.precision == "fp16":
        return prec.to_fp16_onnx(bundle.onnx, dst)
    if spec.calibration is None:
        raise BackendError(f"{bundle.onnx}: int8 needs calibration inputs (the calibration set)")
    return prec.to_int8_qdq_onnx(bundle.onnx, dst, spec.calibration, bundle.input_name)


class OrtRunner(Runner):
    def __init__(self, session: Any, bundle: ModelBundle, device: str, precision: str, artifact: Path,
                 threads: int | None, name: str) -> None:
        self.session = session
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.artifact = artifact
        self.threads = threads
        self.backend = name
        self.timer = "wall"

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run([self.bundle.output_name], {self.bundle.input_name: x.astype(np.float32)})[0]

    def timed_step(self, batch: int) -> Callable[[], Any]:
        x = random_input(batch, self.bundle.input_shape)
        if self.device == "cpu":
            feeds = {self.bundle.input_name: x}
            outputs = [self.bundle.output_name]
            return lambda: self.session.run(outputs, feeds)
        import onnxruntime as ort

        # Keep input and output on the GPU so a step times the model, not PCIe copies.
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.bundle.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(self.bundle.output_name, "cuda", 0)

        def step() -> None:
            self.session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        return step

    def close(self) -> None:
        self.session = None


class OrtBackend(Backend):
    """ONNX Runtime on one execution provider."""

    precisions = ("fp32", "fp16", "int8")

    def __init__(self, device: str = "cpu") -> None:
        if device not in PROVIDERS:
            raise BackendError(f"onnxruntime device {device!r} is not one of {', '.join(PROVIDERS)}")
        self.device = device
        self.name = f"ort-{device}"

    def unavailable_reason(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
        if PROVIDERS[self.device] not in ort.get_available_providers():
            return (
                f"this onnxruntime has no {PROVIDERS[self.device]} (has {', '.join(ort.get_available_providers())}); "
                "install onnxruntime-gpu"
            )
        return None

    def load(self, bundle: ModelBundle, spec: BuildSpec) -> OrtRunner:
        self.check_available()
        self.check_precision(spec)
        import onnxruntime as ort

        graph = precision_graph(bundle, spec)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        if spec.threads:
            opts.intra_op_num_threads = int(spec.threads)
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(graph), sess_options=opts, providers=[PROVIDERS[self.device]])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            first = first_line(e)
            raise BackendError(f"{graph}: onnxruntime cannot load it ({first})") from None
        return OrtRunner(session, bundle, self.device, spec.precision, graph, spec.threads, self.name)
