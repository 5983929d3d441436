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

from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn

from .grams import Gram, consumer_grams
from .groups import ChannelGroup
from .hooks import eval_mode
from .tasks import relative_squared_error, softmax_kl

REFIT_CACHE_BYTES = 1 << 30  # refit weights kept across probes, least recently used dropped first
EVAL_POINTS = 96  # judged points; the Gram statistics come from the held-out points after them


Divergence = Callable[[torch.Tensor, torch.Tensor], float]


def divergence(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """The default without a task: KL(softmax(y) || softmax(y_hat)) per point for [N, classes] logits,
    else relative squared error. A task's own (`pfp.tasks.Task.divergence`) replaces it."""
    if y.dim() == 2 and y.shape[1] > 1:
        return softmax_kl(y, y_hat)
    return relative_squared_error(y, y_hat)


_default_divergence = divergence  # OutputProbe's parameter of the same name shadows it


def refit_weights(module: nn.Module, gram: Gram, kept_inputs: torch.Tensor, ridge: float) -> torch.Tensor:
    """The consumer's weights with only kept_inputs, refit by ridge least squares (bias unchanged)."""
    k = gram.kernel
    feats = (kept_inputs.view(-1, 1) * k + torch.arange(k).view(1, -1)).flatten()
    G = gram.G[feats][:, feats]
    lam = ridge * float(gram.G.diagonal().mean()) + 1e-12
    sol = torch.linalg.solve(G + lam * torch.eye(len(feats), dtype=G.dtype), gram.B[feats])  # [kept features, out]
    w = module.weight.detach()
    flat = torch.zeros(w.shape[0], w[0].numel(), dtype=torch.float64)
    flat[:, feats] = sol.t()
    return flat.view_as(w).to(w.dtype)


class OutputProbe:
    """Held-out images split in two: refits are fitted on one part and judged on the other.

    Judging a refit on the points it was fitted to would reward it for overfitting (a Linear
    consumer with more inputs than points fits anything), so the divergence is measured on
    `eval_points` images that no refit saw.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], scores: dict[int, torch.Tensor], loader,
                 device, grams: dict[str, Gram] | None = None, eval_points: int = EVAL_POINTS, ridge: float = 1e-4,
                 divergence: Divergence | None = None):
        self.model, self.groups, self.device, self.ridge = model, groups, device, ridge
        self.divergence: Divergence = divergence or _default_divergence
        self.order = {g.gid: torch.argsort(scores[g.gid].double(), descending=True) for g in groups}
        xs, n = [], 0
        for batch in loader:
            xs.append(batch[0][: eval_points - n])
            n += xs[-1].shape[0]
            if n >= eval_points:
                break
        self.x = torch.cat(xs).to(device)
        if grams is None:  # fitted on the points after the judged ones
            consumers = {c.name: c.module for g in groups for c in g.consumers}
            grams = consumer_grams(model, consumers, loader, device, skip=eval_points)
        self.grams = grams
        with eval_mode(model), torch.no_grad():
            self.y = model(self.x).double()
        self.calls = 0
        self.solves = 0  # refits solved; the others came from `_refits`
        # refits by (consumer, kept inputs): a search round changes one group's consumers per
        # probe and keeps the rest as they stand, and a group's next step stays the same until
        # it is taken, so most refits repeat (VGG's 2304-feature solves were the cost). A
        # DenseNet consumer reads many groups, one trial each: the cache is bounded by bytes,
        # not by entries per consumer.
        self._refits: OrderedDict[tuple[str, bytes], torch.Tensor] = OrderedDict()
        self._refit_bytes = 0

    def _refit(self, name: str, mod: nn.Module, kept: torch.Tensor) -> torch.Tensor:
        """The consumer's refit weights for `kept` inputs, solved once while it stays in the cache."""
        key = (name, kept.numpy().tobytes())
        w = self._refits.get(key)
        if w is not None:
            self._refits.move_to_end(key)
            return w
        w = refit_weights(mod, self.grams[name], kept, self.ridge).to(mod.weight.device)
        self.solves += 1
        self._refits[key] = w
        self._refit_bytes += w.numel() * w.element_size()
        while self._refit_bytes > REFIT_CACHE_BYTES and len(self._refits) > 1:
            _, old = self._refits.popitem(last=False)
            self._refit_bytes -= old.numel() * old.element_size()
        return w

    def error(self, gi: int, k: int) -> float:
        """Output divergence with group gi reduced to its k best channels and its consumers refit."""
        counts = [g.size for g in self.groups]
        counts[gi] = k
        return self.joint(counts)

    def joint(self, counts: list[int]) -> float:
        """Output divergence with every group i reduced to its counts[i] best channels, consumers refit."""
        masks: dict[str, tuple[nn.Module, torch.Tensor]] = {}
        for g, k in zip(self.groups, counts):
            if k >= g.size:
                continue
            drop = torch.ones(g.size, dtype=torch.bool)
            drop[self.order[g.gid][:k]] = False
            for c in g.consumers:
                dim = c.module.in_channels if isinstance(c.module, nn.Conv2d) else c.module.in_features
                mod, m = masks.setdefault(c.name, (c.module, torch.ones(dim)))
                m[c.in_idxs[drop[c.root_idxs]]] = 0.0
        if not masks:
            return 0.0
        saved: list[tuple[nn.Module, torch.Tensor]] = []
        handles = []
        try:
            for name, (mod, mask) in masks.items():
                if name in self.grams:
                    saved.append((mod, mod.weight.data))
                    mod.weight.data = self._refit(name, mod, torch.nonzero(mask > 0).flatten())
                else:
                    handles.append(mod.register_forward_pre_hook(_masking(mask, isinstance(mod, nn.Conv2d))))
            with eval_mode(self.model, handles), torch.no_grad():
                y = self.model(self.x).double()
        finally:
            for mod, w in saved:
                mod.weight.data = w
        self.calls += 1
        return self.divergence(self.y, y)


def _masking(mask: torch.Tensor, conv: bool):
    def fn(mod, inputs):
        a = inputs[0]
        shape = (1, -1) + (1,) * (a.dim() - 2) if conv else (1,) * (a.dim() - 1) + (-1,)
        return (a * mask.to(a.device, a.dtype).view(shape),) + tuple(inputs[1:])

    return fn
