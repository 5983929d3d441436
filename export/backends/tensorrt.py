"""TensorRT backend: builds (or reuses) an engine plan for one precision and runs it.

Written against the TensorRT Python API of both 10.x and 11.x (the major version is read
from ``tensorrt.__version__``):

* FP32: the exported ONNX as is.
* FP16/INT8 on TensorRT 10: ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` with an
  ``IInt8EntropyCalibrator2`` fed from ``spec.calibration`` ("builder_flags").
* FP16/INT8 on TensorRT 11, which removed those flags and the calibrator: precision is
  put in the graph by `export.precision` (FP16 ONNX, or a Q/DQ ONNX calibrated on
  ``spec.calibration``) and built as a strongly typed network ("graph"). TensorRT 10 takes
  this route too when ``spec.options["precision_mode"] == "graph"``.

Engines are saved as ``model.<precision>.plan`` in ``spec.workdir`` with a JSON record
(`export.engine_record`) and reused only when the record matches the ONNX, precision,
batch sizes, profiles and this machine. The builder keeps a timing cache in the same folder.
Options (``spec.options``): ``profile`` ("per_batch", default: one min=opt=max profile per
batch size; "range": one profile from the smallest to the largest batch), ``opt_batch``
(range profile's opt), ``workspace_mib`` (default 1024), ``calibration_batch`` (default 32),
``precision_mode``, ``rebuild`` (ignore an existing engine).

tensorrt is imported lazily: this module imports on machines without it.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export.backends.base import Backend, BackendError, BuildSpec, ModelBundle, Runner, random_input
from export.engine_record import (
    EngineRecord,
    check_batch,
    check_engine,
    current_binding,
    load_record,
    save_record,
    sha256_file,
    stale_fields,
    write_bytes_atomic,
)

__all__ = ["TensorRTBackend", "TensorRTRunner", "build_engine", "TRT_MISSING"]

log = logging.getLogger(__name__)

TRT_MISSING = (
    "TensorRT is not installed (pip install tensorrt-cu12 or tensorrt-cu13 from NVIDIA's index; see README)"
)


def _trt() -> Any:
    import tensorrt  # noqa: PLC0415 - optional GPU-only dependency, imported on use

    return tensorrt


_LOGGER: Any = None


def _logger(trt: Any) -> Any:
    """One trt.Logger for the process: TensorRT keeps the first logger it is given and
    warns when a builder or runtime is handed another."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _precision_mode(trt: Any, spec: BuildSpec) -> str:
    if spec.precision == "fp32":
        return "none"
    if _major(trt) >= 11:
        return "graph"  # 11.x has no precision builder flags
    mode = spec.options.get("precision_mode", "builder_flags")
    if mode not in ("builder_flags", "graph"):
        raise BackendError(f"precision_mode {mode!r} is not 'builder_flags' or 'graph'")
    return mode


def optimization_profiles(spec: BuildSpec) -> list[dict[str, int]]:
    sizes = sorted(set(spec.batch_sizes))
    kind = spec.options.get("profile", "per_batch")
    if kind == "per_batch":
        return [{"min": b, "opt": b, "max": b} for b in sizes]
    if kind == "range":
        opt = int(spec.options.get("opt_batch", sizes[-1]))
        if not sizes[0] <= opt <= sizes[-1]:
            raise BackendError(f"opt_batch {opt} is outside the batch range {sizes[0]}..{sizes[-1]}")
        return [{"min": sizes[0], "opt": opt, "max": sizes[-1]}]
    raise BackendError(f"profile option {kind!r} is not 'per_batch' or 'range'")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _parsed_onnx(onnx_path: Path, input_name: str, spec: BuildSpec, mode: str, workdir: Path,
                 calib: np.ndarray | None) -> Path:
    """The ONNX file TensorRT parses: the export itself, or its FP16 / Q/DQ version."""
    if mode != "graph":
        return onnx_path
    from export import precision  # noqa: PLC0415 - onnxruntime is only needed on this path

    if spec.precision == "fp16":
        return precision.to_fp16_onnx(onnx_path, workdir / "model.fp16.onnx")
    return precision.to_int8_qdq_onnx(
        onnx_path, workdir / "model.int8.qdq.onnx", calib, input_name,
        batch_size=int(spec.options.get("calibration_batch", 32)),
    )


def _make_calibrator(trt: Any, data: np.ndarray, batch: int, cache: Path) -> Any:
    """An IInt8EntropyCalibrator2 (TensorRT 10) that feeds `data` in batches of `batch`
    from one torch CUDA buffer and keeps its cache in `cache`."""
    import torch  # noqa: PLC0415

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind classes need the explicit call
            self._buf = torch.empty((batch, *data.shape[1:]), dtype=torch.float32, device="cuda")
            self._starts = iter(range(0, len(data) - batch + 1, batch))  # full batches only

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            start = next(self._starts, None)
            if start is None:
                return None
            self._buf.copy_(torch.from_numpy(data[start:start + batch]))
            torch.cuda.current_stream().synchronize()  # TensorRT reads it on its own stream
            return [int(self._buf.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, blob: Any) -> None:
            write_bytes_atomic(cache, bytes(blob))

    return _Calibrator()


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path, strongly_typed: bool) -> tuple[Any, Any]:
    """(network, parser) for `onnx_path`; the parser is returned so the caller keeps it
    alive as long as the network (the network refers to weights the parser holds)."""
    if strongly_typed and _major(trt) < 11:
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    else:
        network = builder.create_network()  # explicit batch always; 11.x is always strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = f"{errors[0].desc()} (node {errors[0].node()})" if errors else "no parser error reported"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise BackendError(f"{onnx_path.name}: TensorRT cannot parse it: {first}{more}")
    return network, parser


def build_engine(bundle: ModelBundle, spec: BuildSpec) -> tuple[Path, EngineRecord]:
    """Build `model.<precision>.plan` for `bundle` in spec.workdir (default: beside the
    ONNX), or reuse the one there when its record matches. Returns (plan, record)."""
    trt = _trt()
    binding = current_binding()
    if not binding["gpu_name"]:
        raise BackendError("TensorRT needs a CUDA GPU and this machine has none")
    onnx_path = Path(bundle.onnx)
    workdir = Path(spec.workdir) if spec.workdir else onnx_path.parent
    workdir.mkdir(parents=True, exist_ok=True)
    plan = workdir / f"model.{spec.precision}.plan"
    mode = _precision_mode(trt, spec)
    profiles = optimization_profiles(spec)
    onnx_sha = bundle.onnx_sha256 or sha256_file(onnx_path)

    if plan.is_file() and not spec.options.get("rebuild"):
        try:
            old = load_record(plan)
            stale = stale_fields(old, onnx_sha256=onnx_sha, precision=spec.precision,
                                 batch_sizes=spec.batch_sizes, profiles=profiles,
                                 precision_mode=mode, binding=binding)
            if not stale:
                check_engine(plan, old, binding)
                log.info("%s: reusing the engine (its record matches)", plan.name)
                return plan, old
            log.info("%s: rebuilding (record differs in %s)", plan.name, ", ".join(stale))
        except BackendError as e:
            log.info("rebuilding: %s", e)

    calib = None
    options: dict[str, Any] = {k: v for k, v in spec.options.items() if k != "rebuild"}
    if spec.precision == "int8":
        if spec.calibration is None or len(spec.calibration) == 0:
            raise BackendError(f"{onnx_path.name}: INT8 needs calibration inputs (BuildSpec.calibration)")
        calib = np.ascontiguousarray(spec.calibration, dtype=np.float32)
        # Provenance of the INT8 scales (and the key of the TensorRT 10 calibration cache).
        options.update(calibration_samples=len(calib),
                       calibration_sha256=hashlib.sha256(calib.tobytes()).hexdigest())

    parsed = _parsed_onnx(onnx_path, bundle.input_name, spec, mode, workdir, calib)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, parsed, strongly_typed=(mode == "graph"))
    config = builder.create_builder_config()
    options["workspace_mib"] = int(spec.options.get("workspace_mib", 1024))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options["workspace_mib"] << 20)

    shape = tuple(int(d) for d in bundle.input_shape)
    for p in profiles:
        profile = builder.create_optimization_profile()
        profile.set_shape(bundle.input_name, (p["min"], *shape), (p["opt"], *shape), (p["max"], *shape))
        config.add_optimization_profile(profile)

    if mode == "builder_flags":
        if spec.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif spec.precision == "int8":
            cb = min(int(spec.options.get("calibration_batch", 32)), len(calib))
            config.set_flag(trt.BuilderFlag.INT8)
            # Calibration runs at one fixed shape: a profile of exactly the calibration batch.
            cal_profile = builder.create_optimization_profile()
            cal_profile.set_shape(bundle.input_name, (cb, *shape), (cb, *shape), (cb, *shape))
            config.set_calibration_profile(cal_profile)
            cache_name = f"calibration.{onnx_sha[:12]}.{options['calibration_sha256'][:12]}.b{cb}.cache"
            config.int8_calibrator = _make_calibrator(trt, calib, cb, workdir / cache_name)

    # The timing cache only holds tactic timings, keyed to this GPU and TensorRT version.
    cache_path = workdir / f"timing.{_safe(binding['gpu_name'] or 'gpu')}.trt{trt.__version__}.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise BackendError(
            f"{parsed.name}: TensorRT could not build a {spec.precision} engine (see TensorRT's log above)"
        )
    write_bytes_atomic(plan, memoryview(serialized))
    write_bytes_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))

    record = EngineRecord(
        tensorrt_version=str(trt.__version__),
        gpu_name=str(binding["gpu_name"]),
        compute_capability=str(binding["compute_capability"]),
        input_name=bundle.input_name,
        input_shape=list(shape),
        profiles=profiles,
        batch_sizes=sorted(set(spec.batch_sizes)),
        precision=spec.precision,
        precision_mode=mode,
        onnx_sha256=onnx_sha,
        engine_sha256=sha256_file(plan),
        output_name=bundle.output_name,
        parsed_onnx_sha256=sha256_file(parsed) if parsed != onnx_path else None,
        cuda_runtime=binding.get("cuda_runtime"),
        timing_cache=cache_path.name,
        build_seconds=round(seconds, 3),
        built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        options=options,
    )
    save_record(plan, record)
    log.info("%s: built in %.1f s", plan.name, seconds)
    return plan, record


class TensorRTRunner(Runner):
    """Runs one engine plan on the current CUDA stream, with torch CUDA tensors as I/O."""

    backend = "tensorrt"
    device = "cuda"
    timer = "cuda_events"

    def __init__(self, plan: Path, record: EngineRecord) -> None:
        import torch  # noqa: PLC0415

        trt = _trt()
        # Refuse a plan built elsewhere before TensorRT sees its bytes.
        check_engine(plan, record, current_binding())
        self._torch, self._trt = torch, trt
        self.artifact, self.record, self.precision = Path(plan), record, record.precision
        self._runtime = trt.Runtime(_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self._engine is None:
            raise BackendError(f"{Path(plan).name}: TensorRT could not deserialize it (see TensorRT's log above)")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [record.input_name] or len(outputs) != 1:
            raise BackendError(f"{Path(plan).name}: expected input {record.input_name!r} and one output, "
                               f"the engine has inputs {inputs} and outputs {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._dtypes = {n: torch.from_numpy(np.empty(0, dtype=trt.nptype(self._engine.get_tensor_dtype(n)))).dtype
                        for n in (self._input, self._output)}
        self._profile: int | None = None
        self._active: int | None = None  # batch the context's shapes and addresses are set for
        self._buffers: dict[int, tuple[Any, Any]] = {}

    def _stream(self) -> int:
        return self._torch.cuda.current_stream().cuda_stream

    def _prepare(self, batch: int) -> tuple[Any, Any]:
        """Select the profile serving `batch`, set the input shape and tensor addresses."""
        if self._active == batch:
            return self._buffers[batch]
        profile = check_batch(self.artifact, self.record, batch)
        if profile != self._profile:
            self._context.set_optimization_profile_async(profile, self._stream())
            self._profile = profile
        shape = (batch, *self.record.input_shape)
        if not self._context.set_input_shape(self._input, shape):
            raise BackendError(f"{self.artifact.name}: TensorRT rejected input shape {shape}")
        if batch not in self._buffers:
            out_shape = tuple(self._context.get_tensor_shape(self._output))
            torch = self._torch
            self._buffers[batch] = (torch.empty(shape, dtype=self._dtypes[self._input], device="cuda"),
                                    torch.empty(out_shape, dtype=self._dtypes[self._output], device="cuda"))
        inp, out = self._buffers[batch]
        self._context.set_tensor_address(self._input, inp.data_ptr())
        self._context.set_tensor_address(self._output, out.data_ptr())
        self._active = batch
        return inp, out

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream()):
            raise BackendError(f"{self.artifact.name}: TensorRT execute_async_v3 failed (see its log)")

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 1 + len(self.record.input_shape) or list(x.shape[1:]) != self.record.input_shape:
            raise BackendError(f"{self.artifact.name}: input shape {x.shape}, the engine takes "
                               f"(N, {', '.join(map(str, self.record.input_shape))})")
        inp, out = self._prepare(len(x))
        inp.copy_(self._torch.from_numpy(x))
        self._execute()
        return out.float().cpu().numpy()  # .cpu() waits for the stream

    def timed_step(self, batch: int) -> Callable[[], Any]:
        inp, _ = self._prepare(batch)
        inp.copy_(self._torch.from_numpy(random_input(batch, self.record.input_shape)))

        def step() -> None:
            self._prepare(batch)  # no-op unless run() switched shapes in between
            self._execute()

        return step

    def synchronize(self) -> None:
        self._torch.cuda.synchronize()

    def close(self) -> None:
        self._buffers.clear()
        self._context = self._engine = self._runtime = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tensorrt_version": self.record.tensorrt_version,
                "precision_mode": self.record.precision_mode, "profiles": self.record.profiles}


class TensorRTBackend(Backend):
    """TensorRT engines on a CUDA GPU, FP32/FP16/INT8 (see the module docstring)."""

    name = "tensorrt"
    device = "cuda"
    precisions = ("fp32", "fp16", "int8")

    def unavailable_reason(self) -> str | None:
        try:
            _trt()
        except ImportError:
            return TRT_MISSING
        except Exception as e:  # installed but its libraries do not load
            return f"TensorRT is installed but does not load ({type(e).__name__}: {e})".splitlines()[0]
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            return "no CUDA GPU"
        return None

    def load(self, bundle: ModelBundle, spec: BuildSpec) -> TensorRTRunner:
        self.check_available()
        self.check_precision(spec)
        plan, record = build_engine(bundle, spec)
        return TensorRTRunner(plan, record)
