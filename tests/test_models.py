"""Tests for pfp.models: shapes, parameter counts, torchvision models, pruner traceability."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from pfp.models import available_models, build_model

OURS = ["lenet5", "lenet300_100", "resnet20", "resnet56", "resnet110", "vgg16_bn"]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("in_channels,size", [(1, 28), (3, 32)])
def test_our_models_forward(name, in_channels, size):
    torch.manual_seed(0)
    m = build_model(name, num_classes=10, in_channels=in_channels, input_size=size)
    x = torch.randn(2, in_channels, size, size)
    y = m(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (2, 10)


@pytest.mark.parametrize("name", OURS)
def test_num_classes_and_backward(name):
    m = build_model(name, num_classes=7, in_channels=3, input_size=32)
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 7)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_available_models():
    names = available_models()
    for n in OURS + ["tv:resnet50", "tv:mobilenet_v2", "tv:resnet18"]:
        assert n in names
    assert not any("rcnn" in n or "deeplab" in n or "raft" in n for n in names), "non-classification models listed"
    assert len(names) == len(set(names))


def test_resnet_parameter_counts():
    # He et al.: resnet20 0.27M, resnet56 0.85M, resnet110 1.7M (option A); option B
    # adds two 1x1 projections (~2.7k params).
    assert 265_000 < n_params(build_model("resnet20")) < 280_000
    assert 845_000 < n_params(build_model("resnet56")) < 870_000
    assert 1_720_000 < n_params(build_model("resnet110")) < 1_750_000


def test_resnet_depth_and_option_b_shortcuts():
    m = build_model("resnet56")
    convs = [mod for name, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and "shortcut" not in name]
    assert len(convs) == 55  # 56 weighted layers = 55 convs + fc
    projections = [mod for name, mod in m.named_modules() if name.endswith("shortcut") and isinstance(mod, nn.Sequential)]
    assert len(projections) == 2
    assert all(isinstance(p[0], nn.Conv2d) and p[0].kernel_size == (1, 1) for p in projections)
    stages = [m.layer1[0].conv1.out_channels, m.layer2[0].conv1.out_channels, m.layer3[0].conv1.out_channels]
    assert stages == [16, 32, 64]


def test_lenet_params_and_sizes():
    assert n_params(build_model("lenet5", in_channels=1, input_size=28)) == 61706  # classic LeNet-5
    assert n_params(build_model("lenet300_100", in_channels=1, input_size=28)) == 266610
    for s in (16, 20, 64):
        assert build_model("lenet5", in_channels=1, input_size=s)(torch.randn(2, 1, s, s)).shape == (2, 10)
    with pytest.raises(ValueError, match="input_size"):
        build_model("lenet5", input_size=8)


def test_vgg_skips_pools_below_1x1():
    pools28 = [m for m in build_model("vgg16_bn", in_channels=1, input_size=28).modules() if isinstance(m, nn.MaxPool2d)]
    pools32 = [m for m in build_model("vgg16_bn", in_channels=3, input_size=32).modules() if isinstance(m, nn.MaxPool2d)]
    assert (len(pools28), len(pools32)) == (4, 5)
    m = build_model("vgg16_bn")
    assert sum(isinstance(x, nn.BatchNorm2d) for x in m.modules()) == 13
    assert [l.out_features for l in m.modules() if isinstance(l, nn.Linear)] == [512, 10]


def test_kaiming_init():
    torch.manual_seed(0)
    m = build_model("vgg16_bn")
    convs = [i for i, mod in enumerate(m.features) if isinstance(mod, nn.Conv2d)]
    conv = m.features[convs[-1]]  # last 3x3 conv, 512 -> 512
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
    bn = m.features[convs[-1] + 1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


@pytest.mark.parametrize("name", ["tv:resnet18", "tv:mobilenet_v2"])
def test_torchvision_models_small_input(name):
    m = build_model(name, num_classes=5, in_channels=3, input_size=64)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_torchvision_in_channels_1():
    m = build_model("tv:resnet18", num_classes=10, in_channels=1, input_size=64)
    assert m.conv1.in_channels == 1
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.padding, m.conv1.bias) == ((7, 7), (2, 2), (3, 3), None)
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    mb = build_model("tv:mobilenet_v2", in_channels=1, input_size=64)
    assert mb(torch.randn(2, 1, 64, 64)).shape == (2, 10)


def test_torchvision_aux_logits_off():
    m = build_model("tv:googlenet", num_classes=3, input_size=64)
    m.train()
    y = m(torch.randn(2, 3, 64, 64))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3)


def test_unknown_model_names():
    with pytest.raises(ValueError, match="resnet20"):
        build_model("resnet21")
    with pytest.raises(ValueError, match="tv:resnet50"):
        build_model("tv:resnet5")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("tv:fasterrcnn_resnet50_fpn")  # detection, not classification
    assert isinstance(build_model(" ResNet20 "), nn.Module)


@pytest.mark.parametrize("name", OURS)
def test_traceable_and_prunable(name):
    """torch_pruning can trace the model and physically remove a quarter of the channels."""
    torch.manual_seed(0)
    m = build_model(name, num_classes=10, in_channels=1, input_size=28).eval()
    x = torch.randn(2, 1, 28, 28)
    last = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    before = n_params(m)
    pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=0.25, ignored_layers=[last])  # fmt: skip
    pruner.step()
    assert n_params(m) < 0.8 * before
    assert m(x).shape == (2, 10)


def test_lenet5_flatten_coupling():
    m = build_model("lenet5", in_channels=1, input_size=28)
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 1, 28, 28))
    group = dg.get_pruning_group(m.conv2, tp.prune_conv_out_channels, idxs=[0, 3])
    group.prune()
    assert m.conv2.out_channels == 14
    assert m.fc1.in_features == 14 * 5 * 5
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet_residual_coupling():
    """Pruning a stage's output channel must also prune the shortcut projection and every block."""
    m = build_model("resnet20")
    dg = tp.DependencyGraph().build_dependency(m, example_inputs=torch.randn(1, 3, 32, 32))
    group = dg.get_pruning_group(m.layer2[0].shortcut[0], tp.prune_conv_out_channels, idxs=[1])
    group.prune()
    assert m.layer2[0].conv2.out_channels == 31
    assert m.layer2[2].conv2.out_channels == 31
    assert m.layer3[0].conv1.in_channels == 31
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------- import paths, weights, timm


def test_build_model_by_import_path_passes_only_kwargs():
    from examples.segmentation import TinySegNet

    m = build_model("examples.segmentation:TinySegNet", num_classes=99, kwargs={"classes": 5, "width": 8})
    assert isinstance(m, TinySegNet) and m.head.out_channels == 5 and m.head.in_channels == 8


def test_an_import_path_that_is_not_a_module_builder_is_one_line():
    from pfp.imports import ImportPathError

    with pytest.raises(ImportPathError, match=r"model.name: .*blobs.* returned a tuple, not a torch.nn.Module"):
        build_model("examples.regression:blobs", kwargs={"train": 2, "test": 2})


def test_check_model_name_accepts_import_paths_and_still_suggests_close_names():
    from pfp.models import check_model_name

    check_model_name("examples.regression:BlobRegressor")
    with pytest.raises(ValueError, match="did you mean"):
        check_model_name("lenet6")


def test_tv_weights_resolve_offline_and_unknown_names_list_the_known():
    from pfp.models import tv_weights

    assert tv_weights("resnet18", "DEFAULT").name == "IMAGENET1K_V1"
    assert tv_weights("resnet18", "IMAGENET1K_V1").name == "IMAGENET1K_V1"
    with pytest.raises(ValueError, match="model.weights: 'V9' is not a weights name of tv:resnet18.*IMAGENET1K_V1"):
        tv_weights("resnet18", "V9")


def test_weights_are_refused_for_our_models():
    with pytest.raises(ValueError, match="model.weights: only tv: models"):
        build_model("lenet5", weights="DEFAULT")
