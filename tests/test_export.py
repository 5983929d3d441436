"""ONNX export, parity and the model bundle, on real pruned and unpruned models run in
onnxruntime and PyTorch; and the clear errors for files that must not be used."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from export.backends import BackendError, BuildSpec, availability, get_backend
from export.bundle import export_bundle, load_bundle, read_meta
from export.onnx_export import ExportError, check_onnx, export_onnx
from export.parity import ParityError, compare_outputs, require_parity
from pfp.config import DataConfig, PruneConfig
from pfp.data import build_data, make_loader
from pfp.models import build_model
from pfp.prune import prune
from pfp.resources import count_flops
from pfp.serialization import CheckpointError, save_model

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {"name": "resnet20", "num_classes": 10, "in_channels": 1, "input_size": 28}


@pytest.fixture(scope="module")
def data():
    return build_data(DataConfig(name="synthetic", synthetic_channels=1, synthetic_size=28,
                                 synthetic_train=256, synthetic_test=256))


def batches(data, n=256):
    return [x for x, _ in make_loader(Subset(data.test, range(n)), 64, False)]


@pytest.fixture(scope="module")
def models(data, tmp_path_factory):
    """Unpruned and PFP-pruned (50% FLOPs) ResNet20 files, with non-trivial BN statistics."""
    torch.manual_seed(0)
    base = build_model(**SPEC).eval()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("models")
    save_model(folder / "base.pt", base, SPEC)
    calib = make_loader(Subset(data.train, range(32)), 32, False)
    cfg = PruneConfig(method="pfp", round_to=1)
    pruned, _, _ = prune(_copy(base), calib, cfg, 0.5,
                              example_input=torch.zeros(1, 1, 28, 28))
    save_model(folder / "pruned.pt", pruned, SPEC, meta={"acc": 12.5})
    return folder / "base.pt", folder / "pruned.pt", base, pruned


def _copy(m):
    import copy
    return copy.deepcopy(m)


@pytest.mark.parametrize("which", ["base", "pruned"])
def test_bundle_parity_on_real_inputs(models, data, tmp_path, which):
    ckpt = models[0] if which == "base" else models[1]
    model = models[2] if which == "base" else models[3]
    bundle, meta = export_bundle(ckpt, tmp_path / "b", batches(data), parity_samples=200)
    parity = meta["parity"][0]
    assert parity["passed"] and parity["samples"] == 200
    assert parity["max_rel_diff"] <= 1e-4 and parity["max_abs_diff"] <= 1e-3 and parity["top1_agreement"] >= 0.999
    assert meta["flops"] == count_flops(model, torch.zeros(1, 1, 28, 28))
    info = check_onnx(bundle.onnx)
    assert info.dynamic_batch and info.input_shape[1:] == (1, 28, 28)
    # The dynamic axis really is dynamic: batch 1 and an odd batch both run and agree.
    runner = get_backend("ort-cpu").load(bundle, BuildSpec())
    for n in (1, 7):
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(runner.run(x.numpy()), ref, atol=1e-4)
    assert load_bundle(tmp_path / "b") == bundle
    # Reference inputs and PyTorch's logits travel with the bundle, for devices to check against.
    ref = np.load(tmp_path / "b" / "reference.npz")
    assert ref["inputs"].shape == (64, 1, 28, 28) and meta["reference"]["samples"] == 64
    np.testing.assert_allclose(runner.run(ref["inputs"]), ref["outputs"], atol=1e-4)


def test_pruned_onnx_is_smaller(models, tmp_path):
    a = export_onnx(models[2], tmp_path / "a.onnx", (1, 28, 28), exporter="torchscript")
    b = export_onnx(models[3], tmp_path / "b.onnx", (1, 28, 28), exporter="torchscript")
    assert b.path.stat().st_size < 0.7 * a.path.stat().st_size


def test_simplify_keeps_a_valid_graph(models, tmp_path):
    info = export_onnx(models[3], tmp_path / "s.onnx", (1, 28, 28), exporter="torchscript", simplify=True)
    plain = export_onnx(models[3], tmp_path / "p.onnx", (1, 28, 28), exporter="torchscript")
    assert info.nodes <= plain.nodes and info.dynamic_batch


def test_torch_backend_agrees_with_onnxruntime(models, data, tmp_path):
    bundle, _ = export_bundle(models[1], tmp_path / "b", batches(data, 64), parity_samples=64)
    ort_runner = get_backend("ort-cpu").load(bundle, BuildSpec())
    torch_runner = get_backend("torch-cpu").load(bundle, BuildSpec())
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(torch_runner.run(x), ort_runner.run(x), atol=1e-4)
    for runner in (ort_runner, torch_runner):
        out = runner.timed_step(3)()
        assert out is not None
    with pytest.raises(BackendError, match="supports precision fp32, not fp16"):
        get_backend("torch-cpu").load(bundle, BuildSpec(precision="fp16"))


def test_parity_mismatch_is_an_error(models, data, tmp_path):
    bundle, _ = export_bundle(models[0], tmp_path / "b", batches(data, 64), parity_samples=64)
    runner = get_backend("ort-cpu").load(bundle, BuildSpec())
    other = _copy(models[2])
    with torch.no_grad():  # the ONNX file no longer matches this PyTorch model
        other.fc.weight.mul_(1.5)
    report = compare_outputs(other, runner.run, batches(data, 64), backend="ort-cpu")
    assert not report.passed
    with pytest.raises(ParityError, match=r"b/model.onnx: ort-cpu fp32 output differs .* max \|diff\| .* relative to the largest"):
        require_parity(report, bundle.onnx)


def test_failed_export_keeps_the_previous_bundle(models, data, tmp_path):
    out = tmp_path / "b"
    export_bundle(models[0], out, batches(data, 64), parity_samples=64)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ParityError):  # a tolerance nothing meets: the re-export must fail
        export_bundle(models[1], out, batches(data, 64), parity_samples=64, max_rel=0.0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no staging folder left behind


def test_tampered_bundle_is_refused(models, data, tmp_path):
    out = tmp_path / "b"
    export_bundle(models[1], out, batches(data, 64), parity_samples=64)
    raw = bytearray((out / "model.onnx").read_bytes())
    raw[-10] ^= 0xFF
    (out / "model.onnx").write_bytes(bytes(raw))
    with pytest.raises(ExportError, match=r"model.onnx: sha256 .* does not match export.json"):
        load_bundle(out)
    (out / "export.json").write_text("{not json")
    with pytest.raises(ExportError, match="export.json: not readable JSON"):
        read_meta(out)


def test_broken_onnx_files_are_named(tmp_path, models):
    info = export_onnx(models[3], tmp_path / "m.onnx", (1, 28, 28), exporter="torchscript")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(info.path.read_bytes()[:100])
    with pytest.raises(ExportError, match="truncated.onnx: not a readable ONNX file"):
        check_onnx(truncated)
    import onnx

    model = onnx.load(str(info.path))
    model.graph.node[0].input[0] = "no_such_tensor"
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ExportError, match="bad.onnx: fails onnx.checker"):
        check_onnx(bad)
    with pytest.raises(ExportError, match="missing.onnx: ONNX file not found"):
        check_onnx(tmp_path / "missing.onnx")


def test_checkpoint_that_does_not_fit_its_architecture(tmp_path, data):
    wrong = tmp_path / "wrong.pt"
    save_model(wrong, build_model(**SPEC), {**SPEC, "name": "lenet5"})
    with pytest.raises(CheckpointError, match="wrong.pt: module .bn1. is not in the architecture"):
        export_bundle(wrong, tmp_path / "b", batches(data, 8))
    assert not (tmp_path / "b").exists()


def test_backend_registry_and_availability():
    with pytest.raises(BackendError, match="unknown backend 'onnx'; known: ort-cpu"):
        get_backend("onnx")
    avail = availability()
    assert avail["ort-cpu"] is None and avail["torch-cpu"] is None
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in avail["torch-cuda"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "onnxruntime-gpu" in avail["ort-cuda"]


@pytest.mark.slow
def test_torch_compile_cpu_runs(models, data, tmp_path):
    bundle, _ = export_bundle(models[1], tmp_path / "b", batches(data, 32), parity_samples=32)
    runner = get_backend("torch-compile-cpu").load(bundle, BuildSpec())
    eager = get_backend("torch-cpu").load(bundle, BuildSpec())
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(runner.run(x), eager.run(x), atol=1e-4)
