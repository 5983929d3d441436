"""Measured damage of a channel budget: how far the network's outputs move on held-out points.

`OutputProbe.error(g, k)` keeps only the k best-scoring channels of group g (every other
group whole), refits the group's consumers on what is left (the same ridge least squares as
`pfp.reconstruct`, solved in closed form from each consumer's input Gram matrix, so a probe
costs one solve and one forward pass), and returns the divergence of the network's outputs
from the unpruned ones on held-out training images: the mean KL divergence of the softmax for
classifier logits, the relative squared error otherwise. The `holdout` allocator builds
per-group error curves from it. No labels are needed.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .groups import ChannelGroup
from .hooks import eval_mode

MAX_FEATURES = 2304  # consumers wider than this (per output unit) are probed without the refit


def divergence(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """KL(softmax(y) || softmax(y_hat)) per point for [N, classes] logits; else relative squared error."""
    if y.dim() == 2 and y.shape[1] > 1:
        return float(F.kl_div(F.log_softmax(y_hat, 1), F.log_softmax(y, 1), log_target=True, reduction="batchmean"))
    return float((y_hat - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-30))


class _Consumer:
    """One consumer's unfolded-input Gram matrix on the probe points, for closed-form refits."""

    def __init__(self, module: nn.Module, x: torch.Tensor, ridge: float):
        self.module = module
        self.conv = isinstance(module, nn.Conv2d)
        w = module.weight.detach()
        self.k = w[0, 0].numel() if self.conv else 1
        if self.conv:
            cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                            stride=module.stride)  # [N, C*K, P]
            X = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        else:
            X = x.reshape(-1, x.shape[-1])
        W = w.reshape(w.shape[0], -1)
        Y = X @ W.t()  # the unpruned pre-activation, without the bias (kept as it is)
        X = X.double()
        self.G = X.t() @ X
        self.B = X.t() @ Y.double()
        self.lam = ridge * float(self.G.diagonal().mean()) + 1e-12

    def refit(self, kept_inputs: torch.Tensor) -> torch.Tensor:
        """Weights of the same shape with dropped inputs zero and kept ones refit."""
        feats = (kept_inputs.view(-1, 1) * self.k + torch.arange(self.k).view(1, -1)).flatten()
        G = self.G[feats][:, feats]
        G = G + self.lam * torch.eye(len(feats), dtype=G.dtype)
        sol = torch.linalg.solve(G, self.B[feats])  # [kept features, out]
        w = self.module.weight.detach()
        flat = torch.zeros(w.shape[0], w[0].numel(), dtype=torch.float64)
        flat[:, feats] = sol.t()
        return flat.view_as(w).to(w.dtype)


class OutputProbe:
    def __init__(self, model: nn.Module, groups: list[ChannelGroup], scores: dict[int, torch.Tensor], loader,
                 device, max_points: int = 128, refit: bool = True, ridge: float = 1e-4):
        self.model, self.groups, self.device = model, groups, device
        self.order = {g.gid: torch.argsort(scores[g.gid].double(), descending=True) for g in groups}
        xs, n = [], 0
        for batch in loader:
            xs.append(batch[0][: max_points - n])
            n += xs[-1].shape[0]
            if n >= max_points:
                break
        self.x = torch.cat(xs).to(device)
        inputs: dict[str, torch.Tensor] = {}
        consumers = {c.name: c.module for g in groups for c in g.consumers}
        if refit:
            for name, m in list(consumers.items()):
                per_unit = m.weight[0].numel()
                if (isinstance(m, nn.Conv2d) and m.groups != 1) or per_unit > MAX_FEATURES:
                    del consumers[name]
        handles = [m.register_forward_pre_hook(lambda mod, i, n=name: inputs.__setitem__(n, i[0].detach()))
                   for name, m in consumers.items()] if refit else []
        with eval_mode(model, handles), torch.no_grad():
            self.y = model(self.x).double()
        self.fits = {name: _Consumer(consumers[name], a.cpu().float(), ridge) for name, a in inputs.items()}
        self.calls = 0

    def error(self, gi: int, k: int) -> float:
        """Output divergence with group gi reduced to its k best channels and its consumers refit."""
        g = self.groups[gi]
        if k >= g.size:
            return 0.0
        drop = torch.ones(g.size, dtype=torch.bool)
        drop[self.order[g.gid][:k]] = False
        saved: list[tuple[nn.Module, torch.Tensor]] = []
        masks: dict[str, tuple[nn.Module, torch.Tensor]] = {}
        for c in g.consumers:
            dim = c.module.in_channels if isinstance(c.module, nn.Conv2d) else c.module.in_features
            mod, m = masks.setdefault(c.name, (c.module, torch.ones(dim)))
            m[c.in_idxs[drop[c.root_idxs]]] = 0.0
        handles = []
        for name, (mod, mask) in masks.items():
            if name in self.fits:
                saved.append((mod, mod.weight.data))
                kept = torch.nonzero(mask > 0).flatten()
                mod.weight.data = self.fits[name].refit(kept).to(mod.weight.device)
            else:
                handles.append(mod.register_forward_pre_hook(_masking(mask, isinstance(mod, nn.Conv2d))))
        try:
            with eval_mode(self.model, handles), torch.no_grad():
                y = self.model(self.x).double()
        finally:
            for mod, w in saved:
                mod.weight.data = w
        self.calls += 1
        return divergence(self.y, y)


def _masking(mask: torch.Tensor, conv: bool):
    def fn(mod, inputs):
        a = inputs[0]
        shape = (1, -1) + (1,) * (a.dim() - 2) if conv else (1,) * (a.dim() - 1) + (-1,)
        return (a * mask.to(a.device, a.dtype).view(shape),) + tuple(inputs[1:])

    return fn
