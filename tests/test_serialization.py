"""Tests for pfp.serialization: pruned models round-trip without pickled classes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from pfp.serialization import FORMAT, CheckpointError, atomic_torch_save, load_model, save_model

REPO = Path(__file__).resolve().parents[1]


class ResNetish(nn.Module):
    """conv-bn, a two-conv residual branch added back, pooling, flatten, linear."""

    def __init__(self, num_classes: int = 5, in_channels: int = 3, width: int = 8, kernel_size: int = 3,
                 extra: bool = False, head: bool = True):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 12, kernel_size, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, width, kernel_size, padding=pad, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        if head:
            self.fc = nn.Linear(width * 4, num_classes)
        if extra:
            self.extra = nn.Linear(num_classes, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        return self.fc(torch.flatten(self.pool(x), 1))


class DWNet(nn.Module):
    """conv, depthwise conv (groups == channels), pointwise conv, global pool, linear."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 6, 1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.dw(x)))
        x = F.relu(self.pw(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(name: str, **kwargs) -> nn.Module:
    """Stands in for pfp.models.build_model in these tests."""
    return {"resnetish": ResNetish, "dwnet": DWNet}[name](**kwargs)


def _warm_bn(model: nn.Module, x: torch.Tensor) -> None:
    # non-trivial running statistics, so loading them wrongly would show in eval outputs
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x + torch.randn_like(x))
    model.eval()


def pruned_resnetish() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    spec = {"name": "resnetish", "num_classes": 5, "in_channels": 3}
    model = build(**spec)
    x = torch.randn(8, 3, 16, 16)
    _warm_bn(model, x)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1], verbose=False)
    # conv1's output is added to conv3's: one group prunes both, the BNs, conv2's and fc's inputs
    dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 2, 5]).prune()
    dg.get_pruning_group(model.conv2, tp.prune_conv_out_channels, idxs=[1, 4, 7, 9]).prune()
    assert (model.conv1.out_channels, model.conv3.out_channels, model.fc.in_features) == (5, 5, 20)
    assert (model.conv2.out_channels, model.bn2.num_features, model.conv3.in_channels) == (8, 8, 8)
    model.eval()
    return model, spec


def pruned_dwnet() -> tuple[nn.Module, dict]:
    torch.manual_seed(1)
    spec = {"name": "dwnet", "num_classes": 4}
    model = build(**spec)
    x = torch.randn(8, 3, 12, 12)
    _warm_bn(model, x)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1], verbose=False)
    dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[1, 3, 6]).prune()
    assert (model.dw.in_channels, model.dw.out_channels, model.dw.groups, model.pw.in_channels) == (5, 5, 5, 5)
    model.eval()
    return model, spec


LOAD_IN_FRESH_PROCESS = """
import sys, torch
from pfp.serialization import load_model
from tests.test_serialization import build
model, info = load_model(sys.argv[1], build)
model.eval()
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    out = model(x)
groups = {n: m.groups for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
torch.save({"out": out, "info": info, "groups": groups}, sys.argv[3])
"""


def _load_elsewhere(model_file: Path, x: torch.Tensor, tmp_path: Path) -> dict:
    torch.save(x, tmp_path / "x.pt")
    args = [str(model_file), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_IN_FRESH_PROCESS, *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt", weights_only=True)


@pytest.mark.parametrize("make, size", [(pruned_resnetish, 16), (pruned_dwnet, 12)])
def test_pruned_model_round_trips_in_fresh_process(tmp_path, make, size):
    model, spec = make()
    path = tmp_path / "model.pt"
    save_model(path, model, spec, meta={"acc": 91.5, "keep_ratio": 0.5, "note": "pruned"})

    payload = torch.load(path, weights_only=True)  # plain data and tensors only
    assert payload["format"] == FORMAT and payload["spec"] == spec
    assert payload["modules"]["conv1"]["out_channels"] == 5

    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    result = _load_elsewhere(path, x, tmp_path)
    torch.testing.assert_close(result["out"], expected, rtol=1e-5, atol=1e-6)
    assert result["info"] == {"spec": spec, "meta": {"acc": 91.5, "keep_ratio": 0.5, "note": "pruned"}}
    if make is pruned_dwnet:
        assert result["groups"]["dw"] == 5


def test_loaded_model_is_trainable_and_keeps_parameter_flags(tmp_path):
    model, spec = pruned_resnetish()
    path = tmp_path / "model.pt"
    save_model(path, model, spec)

    def frozen_stem_builder(**kw):
        m = build(**kw)
        m.conv1.weight.requires_grad_(False)
        return m

    loaded, info = load_model(path, frozen_stem_builder)
    assert info["meta"] == {}
    assert all(isinstance(p, nn.Parameter) for p in loaded.parameters())
    assert not loaded.conv1.weight.requires_grad and loaded.conv2.weight.requires_grad
    assert loaded.conv1.weight.shape == (5, 3, 3, 3) and loaded.bn1.running_mean.shape == (5,)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded.train()
    loaded(torch.randn(2, 3, 16, 16)).sum().backward()
    assert loaded.conv2.weight.grad.shape == loaded.conv2.weight.shape


def test_groupnorm_layernorm_resized(tmp_path):
    def builder(width: int = 6):
        return nn.Sequential(nn.Conv2d(2, width, 3), nn.GroupNorm(2, width), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.LayerNorm(width), nn.Linear(width, 3))

    torch.manual_seed(0)
    model = builder(4)  # stands in for a width-6 model pruned to 4 channels
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "m.pt"
    save_model(path, model, {"width": 6})
    loaded, _ = load_model(path, builder)
    assert loaded[1].num_channels == 4 and loaded[4].normalized_shape == (4,) and loaded[5].in_features == 4
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(loaded(x), model(x))


# --------------------------------------------------------------------------- errors


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt: model file not found"):
        load_model(tmp_path / "nope.pt", build)
    model, spec = pruned_resnetish()
    path = tmp_path / "model.pt"
    save_model(path, model, spec)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(path, build)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "\n" not in msg


def test_wrong_format(tmp_path):
    model, spec = pruned_resnetish()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)  # a bare state_dict is not our format
    with pytest.raises(CheckpointError, match=r"sd\.pt: not a pfp-model/1 file"):
        load_model(path, build)
    torch.save({"format": "pfp-model/999", "spec": spec, "modules": {}, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"sd\.pt: format 'pfp-model/999'"):
        load_model(path, build)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "spec": {}, "modules": {}, "state_dict": {}, "meta": nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError, match=r"pickled\.pt: not a readable model file: it holds pickled"):
        load_model(path, build)


def test_spec_whose_architecture_does_not_fit(tmp_path):
    model, spec = pruned_resnetish()
    path = tmp_path / "model.pt"
    save_model(path, model, spec)

    with pytest.raises(CheckpointError, match=r"model\.pt: key 'conv1\.weight' has shape \[5, 3, 3, 3\]"):
        load_model(path, lambda **kw: build(**kw, kernel_size=5))
    with pytest.raises(CheckpointError, match=r"model\.pt: key 'extra\.weight' is missing"):
        load_model(path, lambda **kw: build(**kw, extra=True))
    with pytest.raises(CheckpointError, match=r"model\.pt: module 'fc' is not in the architecture"):
        load_model(path, lambda **kw: build(**kw, head=False))
    with pytest.raises(CheckpointError, match=r"model\.pt: cannot build the architecture"):
        load_model(path, lambda **kw: build(**{**kw, "name": "no_such_model"}))
    # a different layer type under the same name
    def conv_as_linear(**kw):
        m = build(**kw)
        m.conv2 = nn.Linear(5, 8, bias=False)
        return m
    with pytest.raises(CheckpointError, match=r"model\.pt: .*conv2"):
        load_model(path, conv_as_linear)


def test_save_rejects_non_plain_spec_and_accepts_numpy_numbers(tmp_path):
    import numpy as np

    model, spec = pruned_dwnet()
    with pytest.raises(TypeError, match=r"spec\.bad"):
        save_model(tmp_path / "m.pt", model, {**spec, "bad": object()})
    assert not (tmp_path / "m.pt").exists()
    save_model(tmp_path / "m.pt", model, spec, meta={"acc": np.float32(0.5), "n": np.int64(3), "p": tmp_path})
    meta = torch.load(tmp_path / "m.pt", weights_only=True)["meta"]
    assert meta == {"acc": 0.5, "n": 3, "p": str(tmp_path)}


def test_save_unwraps_data_parallel(tmp_path):
    model, spec = pruned_dwnet()
    save_model(tmp_path / "m.pt", nn.DataParallel(model), spec)
    loaded, _ = load_model(tmp_path / "m.pt", build)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(loaded.eval()(x), model(x))


# --------------------------------------------------------------------------- atomic writes


def test_atomic_torch_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "obj.pt"
    atomic_torch_save({"v": torch.arange(3)}, path)
    good = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": torch.arange(5)}, path)
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        atomic_torch_save({"v": torch.arange(5)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(path.parent) == ["obj.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(3))
    atomic_torch_save({"v": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(5))
