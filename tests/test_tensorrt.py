"""TensorRT backend (export.backends.tensorrt).

The build-and-run tests need TensorRT and a CUDA GPU and are skipped elsewhere; nothing
here stands in for TensorRT. Where TensorRT is not installed, the backend must say so in
one line and refuse to load.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export.backends.base import BackendError, BackendUnavailable, BuildSpec, ModelBundle
from export.backends.tensorrt import TRT_MISSING, TensorRTBackend, TensorRTRunner, optimization_profiles
from export.engine_record import EngineMismatch, load_record, record_path, save_record

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_backend_says_so():
    assert "tensorrt" not in sys.modules  # importing the backend did not try to load it
    backend = TensorRTBackend()
    assert backend.unavailable_reason() == TRT_MISSING
    assert TRT_MISSING.startswith("TensorRT is not installed (pip install tensorrt-cu12 or tensorrt-cu13")
    with pytest.raises(BackendUnavailable) as ei:
        backend.check_available()
    assert str(ei.value) == f"backend tensorrt: {TRT_MISSING}"
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        backend.load(ModelBundle(onnx=Path("model.onnx"), checkpoint=None, input_shape=(1, 28, 28)), BuildSpec())


def test_backend_identity():
    b = TensorRTBackend()
    assert (b.name, b.device, b.precisions) == ("tensorrt", "cuda", ("fp32", "fp16", "int8"))
    assert TensorRTRunner.timer == "cuda_events" and TensorRTRunner.device == "cuda"


def test_profiles_from_spec():
    assert optimization_profiles(BuildSpec(batch_sizes=(8, 1, 32))) == [
        {"min": 1, "opt": 1, "max": 1}, {"min": 8, "opt": 8, "max": 8}, {"min": 32, "opt": 32, "max": 32}]
    assert optimization_profiles(BuildSpec(batch_sizes=(1, 8, 32), options={"profile": "range"})) == [
        {"min": 1, "opt": 32, "max": 32}]
    assert optimization_profiles(BuildSpec(batch_sizes=(1, 32), options={"profile": "range", "opt_batch": 8})) == [
        {"min": 1, "opt": 8, "max": 32}]
    with pytest.raises(BackendError, match="opt_batch 64 is outside the batch range 1..32"):
        optimization_profiles(BuildSpec(batch_sizes=(1, 32), options={"profile": "range", "opt_batch": 64}))
    with pytest.raises(BackendError, match="profile option 'dynamic'"):
        optimization_profiles(BuildSpec(options={"profile": "dynamic"}))


# --------------------------------------------------------------------------- GPU + TensorRT


@pytest.fixture(scope="module")
def trt_case(tmp_path_factory):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT is installed but there is no CUDA GPU")
    from tests.test_precision import make_lenet_case

    case = make_lenet_case(tmp_path_factory.mktemp("trt"))
    bundle = ModelBundle(onnx=case.onnx, checkpoint=None, input_shape=(1, 28, 28))
    with torch.no_grad():
        ref = case.model(torch.from_numpy(case.x_test)).numpy()
    return case, bundle, ref


def _spec(precision, workdir, case, **options):
    return BuildSpec(precision=precision, batch_sizes=(1, 8, 32), workdir=workdir,
                     calibration=case.x_calib if precision == "int8" else None, options=options)


def test_fp32_engine_matches_pytorch_and_is_reused(trt_case, tmp_path):
    case, bundle, ref = trt_case
    runner = TensorRTBackend().load(bundle, _spec("fp32", tmp_path, case))
    plan = tmp_path / "model.fp32.plan"
    assert runner.artifact == plan and record_path(plan).is_file()
    for batch in (1, 8, 32):
        out = runner.run(case.x_test[:batch])
        assert out.shape == (batch, 10)
        np.testing.assert_allclose(out, ref[:batch], rtol=1e-3, atol=1e-3)
    step = runner.timed_step(8)
    step()
    runner.synchronize()
    with pytest.raises(BackendError, match=r"model\.fp32\.plan: batch 3 is outside the engine's optimisation "
                                           r"profiles \(1, 8, 32\)"):
        runner.run(case.x_test[:3])
    record = load_record(plan)
    assert record.precision == "fp32" and record.profiles[1] == {"min": 8, "opt": 8, "max": 8}
    runner.close()

    mtime = plan.stat().st_mtime_ns
    again = TensorRTBackend().load(bundle, _spec("fp32", tmp_path, case))
    assert plan.stat().st_mtime_ns == mtime  # reused, not rebuilt
    np.testing.assert_allclose(again.run(case.x_test[:8]), ref[:8], rtol=1e-3, atol=1e-3)


def test_fp16_engine_is_close_to_pytorch(trt_case, tmp_path):
    case, bundle, ref = trt_case
    runner = TensorRTBackend().load(bundle, _spec("fp16", tmp_path, case))
    out = runner.run(case.x_test[:32])
    assert np.abs(out - ref[:32]).max() <= 1e-2 * np.abs(ref).max()
    assert (out.argmax(1) == ref[:32].argmax(1)).mean() >= 0.97
    mode = load_record(runner.artifact).precision_mode
    import tensorrt

    major = int(tensorrt.__version__.split(".")[0])
    assert mode == ("graph" if major >= 11 else "builder_flags")


def test_int8_engine_agrees_with_pytorch(trt_case, tmp_path):
    case, bundle, ref = trt_case
    runner = TensorRTBackend().load(bundle, _spec("int8", tmp_path, case))
    out = np.concatenate([runner.run(case.x_test[i:i + 32]) for i in range(0, 256, 32)])
    assert (out.argmax(1) == ref[:256].argmax(1)).mean() >= 0.95


def test_int8_graph_mode_on_any_version(trt_case, tmp_path):
    case, bundle, ref = trt_case
    runner = TensorRTBackend().load(bundle, _spec("int8", tmp_path, case, precision_mode="graph"))
    assert load_record(runner.artifact).precision_mode == "graph"
    assert (tmp_path / "model.int8.qdq.onnx").is_file()
    out = runner.run(case.x_test[:32])
    assert (out.argmax(1) == ref[:32].argmax(1)).mean() >= 0.95


def test_engine_from_another_machine_or_tampered_is_refused(trt_case, tmp_path):
    case, bundle, _ = trt_case
    runner = TensorRTBackend().load(bundle, _spec("fp32", tmp_path, case))
    plan = runner.artifact
    runner.close()
    record = load_record(plan)

    foreign = json.loads(record_path(plan).read_text())
    foreign.update(gpu_name="NVIDIA A10", compute_capability="8.6")
    record_path(plan).write_text(json.dumps(foreign))
    with pytest.raises(EngineMismatch, match=r"^model\.fp32\.plan: built for NVIDIA A10 \(compute 8\.6\)"):
        TensorRTRunner(plan, load_record(plan))

    save_record(plan, record)
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(EngineMismatch, match=r"^model\.fp32\.plan: engine_sha256"):
        TensorRTRunner(plan, record)
    # load() notices the tampered file and rebuilds instead of using it.
    rebuilt = TensorRTBackend().load(bundle, _spec("fp32", tmp_path, case))
    assert rebuilt.run(case.x_test[:1]).shape == (1, 10)


def test_int8_without_calibration_is_refused(trt_case, tmp_path):
    case, bundle, _ = trt_case
    spec = BuildSpec(precision="int8", batch_sizes=(1,), workdir=tmp_path)
    with pytest.raises(BackendError, match=r"model\.onnx: INT8 needs calibration inputs"):
        TensorRTBackend().load(bundle, spec)
