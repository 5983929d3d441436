"""Each consumer's least-squares statistics on held-out images, computed once per prune.

For a Conv2d/Linear consumer with unfolded input X (rows: points x positions; columns:
input channels x kernel offsets) and its unpruned pre-activation Y = X W^T, the Gram matrix
G = X^T X, B = X^T Y and ||Y||^2 answer every least-squares question about keeping a subset
of its inputs in closed form: the refit weights, their residual, and the residual's rise when
one more channel goes. Reconstruction-aware selection (`pfp.selection`) and the output probe
(`pfp.probe`) both read them. Tiles are float32, the sums float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import eval_mode

MAX_FEATURES = 2304  # per output unit; wider consumers are left to the scores (a Gram of 2304^2 is 42 MiB)
ROW_TILE = 1 << 16


@dataclass
class Gram:
    G: torch.Tensor  # [F, F] float64
    B: torch.Tensor  # [F, O] float64
    yy: float
    kernel: int  # features per input index (kh * kw for a conv, 1 for a Linear)
    points: int


def modelled(m: nn.Module) -> bool:
    """Consumers whose least squares this module keeps: ungrouped convs and Linears, not too wide."""
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        return False
    return isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight[0].numel() <= MAX_FEATURES


def unfold(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The consumer's input as least-squares rows [points x positions, features]."""
    if isinstance(module, nn.Conv2d):
        cols = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return a.reshape(-1, a.shape[-1])


def consumer_grams(model: nn.Module, consumers: dict[str, nn.Module], loader, device, *, skip: int = 0,
                   max_points: int = 512) -> dict[str, Gram]:
    """Gram statistics of every modelled consumer over the loader's points skip .. skip + max_points."""
    consumers = {n: m for n, m in consumers.items() if modelled(m)}
    acc: dict[str, list] = {}

    def hook(name: str):
        def fn(mod, inputs):
            X = unfold(mod, inputs[0].detach().float())
            W = mod.weight.detach().reshape(mod.weight.shape[0], -1).float()
            st = acc.setdefault(name, [0, 0, 0.0])
            for r0 in range(0, X.shape[0], ROW_TILE):
                x = X[r0:r0 + ROW_TILE]
                y = x @ W.t()
                st[0] = st[0] + (x.t() @ x).double()
                st[1] = st[1] + (x.t() @ y).double()
                st[2] += float(y.double().pow(2).sum())

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in consumers.items()]
    seen = used = 0
    with eval_mode(model, handles), torch.no_grad():
        for batch in loader:
            x = batch[0]
            lo = max(0, skip - seen)
            seen += x.shape[0]
            x = x[lo: lo + max_points - used]
            if len(x):
                model(x.to(device))
                used += len(x)
            if used >= max_points:
                break
    out = {}
    for n, (G, B, yy) in acc.items():
        m = consumers[n]
        k = m.weight[0, 0].numel() if isinstance(m, nn.Conv2d) else 1
        out[n] = Gram(G.cpu(), B.cpu(), yy, k, used)
    return out
