"""Precision in the graph: FP16 and INT8 (Q/DQ) ONNX files made from an FP32 ONNX file.

TensorRT 11 removed the FP16/INT8 builder flags and the INT8 calibrator: every network is
strongly typed, so reduced precision has to be written into the ONNX graph (FP16 tensors
and casts, or explicit QuantizeLinear/DequantizeLinear pairs). The same files run on
ONNX Runtime, so one conversion serves both backends.

* `to_fp16_onnx`: weights and compute in FP16, float32 inputs and outputs kept
  (onnxruntime.transformers.float16 with keep_io_types=True, then topologically sorted:
  the converter appends its input casts at the end of the node list, which ONNX Runtime
  accepts but onnx.checker rejects).
* `to_int8_qdq_onnx`: static post-training quantization calibrated on given inputs, in
  the form TensorRT requires: QDQ format, symmetric INT8 with zero points 0, per-channel
  weights, and biases left in float (the ONNX-TensorRT parser dequantizes INT8 only).

Both write through a temporary file in the destination folder and os.replace, so a crash
never leaves half a model, and both run onnx.checker on the result.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx

from export.backends.base import BackendError
from pfp.files import atomic_path

__all__ = ["to_fp16_onnx", "to_int8_qdq_onnx", "onnx_input_shape"]

log = logging.getLogger(__name__)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _load(src: Path) -> onnx.ModelProto:
    if not src.is_file():
        raise BackendError(f"{src.name}: no such ONNX file ({src})")
    try:
        return onnx.load(str(src))
    except Exception as e:  # protobuf DecodeError and friends
        raise BackendError(f"{src.name}: not a readable ONNX model ({_first_line(e)})") from None


def _check(path: Path, what: str) -> None:
    # Checked by path so models with external data (>2 GB) are checked too.
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendError(f"{what}: the converted model fails onnx.checker: {first}") from None


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder graph.node so every node follows the producers of its inputs (Kahn's order,
    stable: nodes keep their relative order where the data flow allows)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in known})
            raise BackendError(f"graph {graph.name!r}: nodes read tensors nothing produces: {', '.join(missing[:5])}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def to_fp16_onnx(src: str | Path, dst: str | Path) -> Path:
    """Write an FP16 copy of the FP32 model `src` to `dst`: initializers and compute in
    FP16, graph inputs and outputs still float32 (casts at the edges). Returns `dst`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16  # noqa: PLC0415 - heavy import

    src, dst = Path(src), Path(dst)
    model = _load(src)
    try:
        fp16 = convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:
        raise BackendError(f"{src.name}: FP16 conversion failed ({_first_line(e)})") from None
    _toposort(fp16.graph)
    with atomic_path(dst, suffix=".tmp.onnx") as tmp:
        onnx.save_model(fp16, str(tmp))
        _check(tmp, f"{src.name} -> {dst.name}")
    return dst


def onnx_input_shape(model: onnx.ModelProto, input_name: str, source: str) -> list[int | None]:
    """Dimensions of graph input `input_name` (None where symbolic, e.g. the batch axis);
    BackendError naming `source` when there is no such input."""
    for inp in model.graph.input:
        if inp.name == input_name:
            dims = inp.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else None for d in dims]
    names = ", ".join(i.name for i in model.graph.input) or "none"
    raise BackendError(f"{source}: has no input {input_name!r} (inputs: {names})")


def _check_calibration(calibration: np.ndarray, dims: list[int | None], source: str) -> np.ndarray:
    calibration = np.asarray(calibration)
    if calibration.size == 0 or calibration.ndim == 0 or len(calibration) == 0:
        raise BackendError(f"{source}: the calibration set is empty; INT8 needs calibration inputs")
    expected = "x".join("N" if d is None else str(d) for d in dims)
    if calibration.ndim != len(dims) or any(d is not None and d != c for d, c in zip(dims[1:], calibration.shape[1:])):
        raise BackendError(
            f"{source}: calibration inputs have shape {tuple(calibration.shape)}, the model takes {expected}"
        )
    if not np.issubdtype(calibration.dtype, np.number):
        raise BackendError(f"{source}: calibration inputs are {calibration.dtype}, not numbers")
    return np.ascontiguousarray(calibration, dtype=np.float32)


def _reader(calibration: np.ndarray, input_name: str, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader  # noqa: PLC0415

    class _Batches(CalibrationDataReader):
        """Feeds the calibration array to ONNX Runtime in batches of `batch_size`."""

        def __init__(self) -> None:
            self._starts = iter(range(0, len(calibration), batch_size))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._starts, None)
            return None if start is None else {input_name: calibration[start:start + batch_size]}

    return _Batches()


def to_int8_qdq_onnx(
    src: str | Path,
    dst: str | Path,
    calibration: np.ndarray,
    input_name: str,
    batch_size: int = 32,
) -> Path:
    """Write an INT8 Q/DQ copy of `src` to `dst`, calibrated (min/max) on `calibration`
    ((N, C, H, W) float inputs, fed in batches of `batch_size`). Returns `dst`.

    Symmetric INT8 with zero points 0 for activations and per-channel weights, biases in
    float: the explicit-quantization form TensorRT builds and ONNX Runtime also runs.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static  # noqa: PLC0415
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    src, dst = Path(src), Path(dst)
    if batch_size < 1:
        raise BackendError(f"{src.name}: calibration batch size must be positive, got {batch_size}")
    model = _load(src)
    data = _check_calibration(calibration, onnx_input_shape(model, input_name, src.name), src.name)
    del model

    with atomic_path(dst, suffix=".tmp.onnx") as tmp, tempfile.TemporaryDirectory(dir=dst.parent) as work:
        # Shape inference + ORT's basic graph optimisations first, as ONNX Runtime advises
        # for static quantization: the quantizer needs every tensor's type and shape.
        prepped = Path(work) / "prepped.onnx"
        try:
            quant_pre_process(str(src), str(prepped))
        except Exception as e:
            log.warning("%s: quantization pre-processing failed (%s); quantizing the model as is", src.name, e)
            prepped = src
        try:
            quantize_static(
                str(prepped),
                str(tmp),
                _reader(data, input_name, batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                extra_options={
                    # TensorRT: symmetric INT8, zero point 0 ...
                    "ActivationSymmetric": True,
                    "WeightSymmetric": True,
                    # ... and DequantizeLinear of INT8 only, so no INT32 bias nodes.
                    "QuantizeBias": False,
                },
            )
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"{src.name}: INT8 quantization failed ({_first_line(e)})") from None
        _check(tmp, f"{src.name} -> {dst.name}")
    return dst
