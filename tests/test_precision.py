"""Graph-level precision conversion (export.precision) on a real, briefly trained LeNet-5.

The model is trained for a few epochs on pfp's synthetic data (class patterns plus unit
noise, 28x28x1), where it reaches ~100% test accuracy, so its FP32 predictions are
confident and FP16/INT8 copies should agree with them on nearly every input. All ONNX
files are real exports, conversions and ONNX Runtime (CPU) sessions.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import precision
from export.backends.base import BackendError
from export.precision import to_fp16_onnx, to_int8_qdq_onnx
from pfp.config import DataConfig
from pfp.data import build_data
from pfp.models import build_model


@dataclass
class LenetCase:
    """A trained LeNet-5, its FP32 ONNX export, and data to feed it."""

    model: torch.nn.Module
    onnx: Path
    x_calib: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def make_lenet_case(folder: Path, epochs: int = 3) -> LenetCase:
    """Train LeNet-5 on synthetic 28x28 data (~2 s on one core) and export it to
    `folder`/model.onnx (opset 17, dynamic batch, input "input", output "logits")."""
    data = build_data(DataConfig(
        name="synthetic", synthetic_channels=1, synthetic_size=28, synthetic_classes=10,
        synthetic_train=1024, synthetic_test=512, augment=False,
    ))
    xtr, ytr = data.train.images.float(), data.train.targets
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 28)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    path = folder / "model.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is chosen on purpose: it is quick
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, torch.zeros(1, 1, 28, 28), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )
    return LenetCase(model, path, xtr[:256].numpy(), data.test.images.float().numpy(), data.test.targets.numpy())


def ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def confident(logits: np.ndarray, margin: float = 2.0) -> np.ndarray:
    """Mask of inputs whose top-1 logit leads the runner-up by `margin`."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > margin


@pytest.fixture(scope="module")
def case(tmp_path_factory, one_thread) -> LenetCase:
    return make_lenet_case(tmp_path_factory.mktemp("lenet"))


@pytest.fixture(scope="module")
def fp32_logits(case) -> np.ndarray:
    logits = ort_run(case.onnx, case.x_test)
    with torch.no_grad():
        ref = case.model(torch.from_numpy(case.x_test)).numpy()
    assert np.allclose(logits, ref, atol=1e-3)  # the export itself is faithful
    assert (logits.argmax(1) == case.y_test).mean() > 0.95  # trained, not a coin toss
    assert confident(logits).sum() >= 200
    return logits


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_fp16_keeps_float32_io_and_runs_in_onnxruntime(case, fp32_logits, tmp_path):
    dst = to_fp16_onnx(case.onnx, tmp_path / "model.fp16.onnx")
    assert dst == tmp_path / "model.fp16.onnx"
    onnx.checker.check_model(str(dst), full_check=True)
    m = onnx.load(str(dst))
    f32 = onnx.TensorProto.FLOAT
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [f32]
    assert [o.type.tensor_type.elem_type for o in m.graph.output] == [f32]
    weights = _inits(m)
    assert weights["conv1.weight"].dtype == np.float16 and weights["fc3.weight"].dtype == np.float16

    out = ort_run(dst, case.x_test)
    assert out.dtype == np.float32
    scale = np.abs(fp32_logits).max()
    assert np.abs(out - fp32_logits).max() <= 1e-2 * scale
    mask = confident(fp32_logits)
    assert (out[mask].argmax(1) == fp32_logits[mask].argmax(1)).all()


def test_int8_is_symmetric_per_channel_qdq(case, tmp_path):
    dst = to_int8_qdq_onnx(case.onnx, tmp_path / "model.int8.onnx", case.x_calib, "input", batch_size=32)
    onnx.checker.check_model(str(dst), full_check=True)
    m = onnx.load(str(dst))
    inits = _inits(m)
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq
    # TensorRT: INT8 with zero point 0 everywhere ...
    zero_points = [inits[n.input[2]] for n in q + dq if len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    # ... quantized weights per output channel ...
    conv1 = next(n for n in dq if n.input[0].startswith("conv1.weight"))
    assert inits[conv1.input[0]].dtype == np.int8
    assert inits[conv1.input[1]].shape == (6,)
    # ... and no INT32 (bias) dequantization, which the ONNX-TensorRT parser does not take.
    assert all(inits[n.input[0]].dtype == np.int8 for n in dq if n.input[0] in inits)
    assert [i.type.tensor_type.elem_type for i in m.graph.input] == [onnx.TensorProto.FLOAT]


def test_int8_agrees_with_fp32_on_confident_inputs(case, fp32_logits, tmp_path):
    dst = to_int8_qdq_onnx(case.onnx, tmp_path / "model.int8.onnx", case.x_calib, "input")
    out = ort_run(dst, case.x_test)
    mask = confident(fp32_logits)
    agree = (out[mask].argmax(1) == fp32_logits[mask].argmax(1)).mean()
    assert agree >= 0.98, f"INT8 top-1 agrees with FP32 on only {agree:.1%} of confident inputs"
    assert (out.argmax(1) == case.y_test).mean() >= (fp32_logits.argmax(1) == case.y_test).mean() - 0.02


def test_int8_accepts_float64_calibration_and_odd_batches(case, tmp_path):
    calib = case.x_calib[:50].astype(np.float64)  # a batch of 32, then one of 18
    dst = to_int8_qdq_onnx(case.onnx, tmp_path / "m8.onnx", calib, "input", batch_size=32)
    assert ort_run(dst, case.x_test[:4]).shape == (4, 10)


@pytest.mark.parametrize("calibration", [np.zeros((0, 1, 28, 28), np.float32), np.array([], np.float32)])
def test_empty_calibration_is_refused_naming_the_file(case, tmp_path, calibration):
    dst = tmp_path / "out.onnx"
    with pytest.raises(BackendError) as ei:
        to_int8_qdq_onnx(case.onnx, dst, calibration, "input")
    msg = str(ei.value)
    assert "model.onnx" in msg and "empty" in msg and "\n" not in msg
    assert not dst.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(8, 3, 28, 28), (8, 1, 32, 32), (8, 28, 28)])
def test_wrong_calibration_shape_is_refused(case, tmp_path, shape):
    with pytest.raises(BackendError) as ei:
        to_int8_qdq_onnx(case.onnx, tmp_path / "out.onnx", np.zeros(shape, np.float32), "input")
    msg = str(ei.value)
    assert "model.onnx" in msg and str(shape) in msg and "Nx1x28x28" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []


def test_unknown_input_name_is_refused(case, tmp_path):
    with pytest.raises(BackendError, match=r"model\.onnx: has no input 'image' \(inputs: input\)"):
        to_int8_qdq_onnx(case.onnx, tmp_path / "out.onnx", case.x_calib, "image")


def test_missing_or_unreadable_source(tmp_path):
    with pytest.raises(BackendError, match=r"nope\.onnx: no such ONNX file"):
        to_fp16_onnx(tmp_path / "nope.onnx", tmp_path / "out.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model\xff" * 10)
    with pytest.raises(BackendError, match=r"junk\.onnx: not a readable ONNX model"):
        to_fp16_onnx(junk, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_a_failed_conversion_leaves_the_old_file_and_no_temporaries(case, tmp_path, monkeypatch):
    dst = tmp_path / "model.fp16.onnx"
    dst.write_bytes(b"previous contents")

    def broken_checker(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated failure after the file was written")

    monkeypatch.setattr(precision.onnx.checker, "check_model", broken_checker)
    with pytest.raises(BackendError, match="fails onnx.checker: simulated failure"):
        to_fp16_onnx(case.onnx, dst)
    assert dst.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.fp16.onnx"]


def test_written_files_get_ordinary_permissions(case, tmp_path):
    dst = to_fp16_onnx(case.onnx, tmp_path / "m16.onnx")
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    assert dst.stat().st_mode & 0o777 == probe.stat().st_mode & 0o777
