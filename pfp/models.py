"""Model zoo: the networks of the PFP paper, any torchvision classifier (prefix "tv:"), any timm
model (prefix "timm:", where timm is installed) and your own ("package.module:callable").

All models are plain module graphs (no in-place ops on shared tensors, residual
shortcuts as real modules) so torch_pruning's DependencyGraph can trace them and
physically remove channels.
"""
from __future__ import annotations

import difflib
import importlib.util
from typing import Any

import torch
import torch.nn as nn

from pfp.config import ConfigError
from pfp.imports import ImportPathError, call, is_import_path
from pfp.errors import first_line

__all__ = ["build_model", "available_models", "check_model_name", "require_timm", "tv_weights",
           "unknown_model_error", "OUR_MODELS", "LeNet5", "LeNet300100", "CifarResNet", "BasicBlock", "VGG"]

TV_PREFIX = "tv:"
TIMM_PREFIX = "timm:"


def _kaiming_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class LeNet5(nn.Module):
    """LeNet-5: conv(6,5x5) -> pool -> conv(16,5x5) -> pool -> fc 120 -> fc 84 -> fc classes.

    conv1 pads by 2 so a 28px image follows the classic 32px geometry (16x5x5 = 400
    features); other sizes get their flatten size computed.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        s = (input_size // 2 - 4) // 2  # conv1 keeps the size, pool, conv2 (-4), pool
        if s < 1:
            raise ConfigError(f"lenet5 needs input_size >= 12, got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * s * s, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        x = self.relu4(self.fc2(x))
        return self.fc3(x)


class LeNet300100(nn.Module):
    """LeNet-300-100: an MLP with hidden layers of 300 and 100 units on the flattened image."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU-3x3 conv-BN plus shortcut; 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_planes != planes:
            # "option B" of He et al.: a projection, so the residual is a module graph
            # the pruner can follow (option A's zero-padding slice is not prunable).
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32px images (He et al. 2016, Sec. 4.2): depth = 6n + 2, stages of 16/32/64."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """CIFAR-style VGG with BatchNorm; max-pools that would go below 1x1 are left out."""

    def __init__(
        self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3, input_size: int = 32
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c, size = in_channels, input_size
        for v in cfg:
            if v == "M":
                if size > 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(c, 512), nn.ReLU(), nn.Linear(512, num_classes))
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


VGG_SMALL_CFG: list[int | str] = [32, 32, "M", 64, 64, "M", 128, 128, "M"]  # VGG-style, CPU-sized
# The quickstart's model: small enough to train in seconds on 2 cores, wide enough that its
# convolutions, not per-operator overheads, set its latency (so pruning can pay).
VGG_TINY_CFG: list[int | str] = [16, 16, "M", 32, 32, "M", 64, 64, "M"]

# Our architectures by config name: (num_classes, in_channels, input_size) -> model.
OUR_MODELS = {
    "lenet5": lambda k, c, s: LeNet5(k, c, s),
    "lenet300_100": lambda k, c, s: LeNet300100(k, c, s),
    "resnet20": lambda k, c, s: CifarResNet(20, k, c),
    "resnet56": lambda k, c, s: CifarResNet(56, k, c),
    "resnet110": lambda k, c, s: CifarResNet(110, k, c),
    "vgg16_bn": lambda k, c, s: VGG(VGG16_CFG, k, c, s),
    "vgg_small": lambda k, c, s: VGG(VGG_SMALL_CFG, k, c, s),
    "vgg_tiny": lambda k, c, s: VGG(VGG_TINY_CFG, k, c, s),
}


def _tv_names() -> list[str]:
    import torchvision.models as tvm

    # module=torchvision.models lists the classification models only (not detection etc.)
    return sorted(tvm.list_models(module=tvm))


def available_models() -> list[str]:
    """Names build_model accepts: ours, then "tv:" + every torchvision classification model."""
    return list(OUR_MODELS) + [TV_PREFIX + n for n in _tv_names()]


def unknown_model_error(name: str) -> ConfigError:
    """The error for a model name build_model does not know, with the closest names."""
    close = difflib.get_close_matches(name, available_models(), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown model {name!r}{hint} (ours: {', '.join(OUR_MODELS)}; or tv:<torchvision name>, "
                       "timm:<timm name>, 'package.module:callable')")


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.groups != 1:
                    raise ConfigError(f"first conv of the model is grouped ({child.groups}); cannot change in_channels")
                new = nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, stride=child.stride, padding=child.padding,
                    dilation=child.dilation, groups=1, bias=child.bias is not None, padding_mode=child.padding_mode,
                )  # fmt: skip
                setattr(parent, child_name, new)
                return
    raise ConfigError("model has no Conv2d whose input channels could be changed")


def tv_weights(name: str, weights: str) -> Any:
    """torchvision's weights enum member `weights` ("DEFAULT" or e.g. "IMAGENET1K_V1") of model `name`."""
    import torchvision.models as tvm

    if name not in _tv_names():
        raise unknown_model_error(TV_PREFIX + name)
    enum = tvm.get_model_weights(name)
    try:
        return enum[weights.strip()]
    except KeyError:
        known = ", ".join(["DEFAULT"] + [w.name for w in enum])
        raise ConfigError(f"model.weights: {weights!r} is not a weights name of tv:{name} (known: {known})") from None


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    last = None
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                last = (parent, child_name, child)
    if last is None:
        raise ConfigError(f"model.weights: the model has no Linear classifier to resize to {num_classes} classes")
    parent, child_name, child = last
    setattr(parent, child_name, nn.Linear(child.in_features, num_classes, bias=child.bias is not None))


def _build_tv_pretrained(name: str, weights: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision.models as tvm

    enum = tv_weights(name, weights)
    try:
        model = tvm.get_model(name, weights=enum)
    except Exception as e:  # a download that fails offline, a corrupt cache
        first = first_line(e)
        raise ConfigError(f"model.weights: cannot get {enum} for tv:{name} ({type(e).__name__}: {first}); "
                          "torchvision downloads weights, so the machine must be online") from None
    # A new head for another number of classes: fine-tuning starts from the pretrained features.
    if len(enum.meta.get("categories") or []) != num_classes:
        _replace_last_linear(model, num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def require_timm(name: str) -> None:
    """ConfigError naming `name` when the optional timm package is not installed."""
    if importlib.util.find_spec("timm") is None:
        raise ConfigError(f"model.name: {name!r} needs the optional package timm (pip install timm)")


def _build_timm(name: str, num_classes: int, in_channels: int, kwargs: dict) -> nn.Module:
    require_timm(TIMM_PREFIX + name)
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown model {TIMM_PREFIX + name!r}{hint}")
    return timm.create_model(name, pretrained=False, **({"num_classes": num_classes, "in_chans": in_channels}
                                                         | kwargs))


def _build_import(path: str, kwargs: dict) -> nn.Module:
    model = call(path, "model.name", **kwargs)
    if not isinstance(model, nn.Module):
        raise ImportPathError(f"model.name: {path}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_tv(name: str, num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    import torchvision.models as tvm

    if name not in _tv_names():
        raise unknown_model_error(TV_PREFIX + name)
    kwargs: dict = {"weights": None, "num_classes": num_classes}
    # Families whose constructor needs to know the input, or returns aux outputs in train mode.
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    elif name.startswith("vit_"):
        kwargs["image_size"] = input_size
    elif name.startswith("maxvit"):
        kwargs["input_size"] = (input_size, input_size)
    model = tvm.get_model(name, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def check_model_name(name: str) -> None:
    """ConfigError with the closest names when `name` is not a model `build_model` knows.

    Import paths were resolved when the config loaded; timm: names need timm installed.
    """
    key = name.strip()
    if is_import_path(key):
        return
    if key.lower().startswith(TIMM_PREFIX):
        require_timm(key)
        return
    names = available_models()
    ok = (TV_PREFIX + key[len(TV_PREFIX):]) in names if key.lower().startswith(TV_PREFIX) else key.lower() in names
    if not ok:
        raise unknown_model_error(key)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                kwargs: dict | None = None, weights: str | None = None) -> nn.Module:
    """Build a model by name (see available_models()), freshly initialised unless `weights` says otherwise.

    Our models take any num_classes / in_channels; lenet5, lenet300_100 and vgg16_bn
    size their layers for input_size. "tv:<name>" builds torchvision's model without
    weights (or with `weights`, "DEFAULT" or an enum name, downloaded by torchvision), with its
    first conv swapped for one taking in_channels when that is not 3. "timm:<name>" calls
    timm.create_model (an optional extra). "package.module:callable" calls it with `kwargs`
    only (num_classes, in_channels and input_size are the callable's business). Unknown names
    raise ConfigError (a ValueError) with the closest matches.
    """
    key = name.strip()
    kwargs = dict(kwargs or {})
    if is_import_path(key):
        return _build_import(key, kwargs)
    if weights is not None and not key.lower().startswith(TV_PREFIX):
        raise ConfigError(f"model.weights: only tv: models have published weights, not {key!r}")
    if key.lower().startswith(TIMM_PREFIX):
        return _build_timm(key[len(TIMM_PREFIX):], num_classes, in_channels, kwargs)
    if kwargs:
        raise ConfigError(f"model.kwargs: only an import-path or timm: model takes kwargs, not {key!r}")
    if key.lower().startswith(TV_PREFIX):
        if weights is not None:
            return _build_tv_pretrained(key[len(TV_PREFIX):], weights, num_classes, in_channels)
        return _build_tv(key[len(TV_PREFIX) :], num_classes, in_channels, input_size)
    if key.lower() in OUR_MODELS:
        return OUR_MODELS[key.lower()](num_classes, in_channels, input_size)
    raise unknown_model_error(key)
