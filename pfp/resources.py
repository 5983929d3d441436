"""Parameters and FLOPs: measured with torch's own FLOP counter, predicted for a pruning plan.

Bisection over a global tolerance asks "what would the network cost with these kept
channel counts?" dozens of times; pruning a copy each time would be slow, so ResourceModel
predicts it from each Conv/Linear/norm layer's cost and the fraction of its input and output
channels each group keeps. The prediction is exact for the layers it models (tests check
it against the counter after real removal); everything else is carried as a constant.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .groups import ChannelGroup, is_depthwise
from .hooks import eval_mode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def format_count(n: float) -> str:
    """A parameter or FLOP count for people: 1.23M, 45.60K, 812."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """FLOPs of one forward pass on example_input (batch 1 expected), torch's counter."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example_input)
    return int(counter.get_total_flops())


def _layer_flops(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """FLOPs of each Conv2d/Linear (2 per multiply-add, as torch's counter)."""
    flops: dict[str, int] = defaultdict(int)

    def hook(name):
        def fn(mod, inp, out):
            if isinstance(mod, nn.Conv2d):
                positions = out.shape[0] * out.shape[2] * out.shape[3]
                per = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                flops[name] += 2 * positions * mod.out_channels * per
            else:
                positions = out.numel() // out.shape[-1]
                flops[name] += 2 * positions * mod.in_features * mod.out_features

        return fn

    hooks = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with eval_mode(model, hooks), torch.no_grad():
        model(example_input)
    return dict(flops)


def _dims(m: nn.Module) -> tuple[int, int] | None:
    if isinstance(m, nn.Conv2d):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.num_features, m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, m.num_channels
    return None


class ResourceModel:
    """Predicts params and FLOPs of the network after keeping k_g channels of each group."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, groups: list[ChannelGroup]):
        self.groups = groups
        self.total_flops = count_flops(model, example_input)
        self.total_params = count_params(model)
        layer_flops = _layer_flops(model, example_input)
        modules = dict(model.named_modules())
        touched = {name for g in groups for name, _, _ in g.members}
        # (module, dim) -> list of (group index, count)
        self._parts: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
        for gi, g in enumerate(groups):
            for name, dim, count in g.members:
                self._parts[(name, dim)].append((gi, count))
        self._layers = []  # (name, flops, weight params, out-only params, in_dim, out_dim, depthwise)
        fixed_flops = self.total_flops
        fixed_params = self.total_params
        for name in touched:
            m = modules[name]
            dims = _dims(m)
            if dims is None:
                continue
            in_dim, out_dim = dims
            f = layer_flops.get(name, 0)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight.numel()
                o = m.bias.numel() if m.bias is not None else 0
            else:  # norms: every parameter is per channel
                w, o = 0, sum(p.numel() for p in m.parameters(recurse=False))
            fixed_flops -= f
            fixed_params -= w + o
            self._layers.append((name, f, w, o, in_dim, out_dim, is_depthwise(m) or not isinstance(m, (nn.Conv2d, nn.Linear))))
        self.fixed_flops = fixed_flops
        self.fixed_params = fixed_params

    def _fraction(self, name: str, dim: str, size: int, kept: list[int]) -> float:
        parts = self._parts.get((name, dim))
        if not parts:
            return 1.0
        removed = sum(count * (1 - kept[gi] / self.groups[gi].size) for gi, count in parts)
        return max(0.0, (size - removed) / size)

    def predict(self, kept: list[int]) -> tuple[float, float]:
        """(params, flops) with kept[i] channels kept in groups[i]."""
        flops, params = float(self.fixed_flops), float(self.fixed_params)
        for name, f, w, o, in_dim, out_dim, single in self._layers:
            fo = self._fraction(name, "out", out_dim, kept)
            # a depthwise conv's cost scales with its channel count once, not squared
            fi = 1.0 if single else self._fraction(name, "in", in_dim, kept)
            flops += f * fo * fi
            params += w * fo * fi + o * fo
        return params, flops
