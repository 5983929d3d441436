"""Channel importance per group: PFP's empirical sensitivity and the baselines' criteria.

Every scorer returns one tensor per group (higher = more important); allocation and
removal are shared, so methods differ only here (spec section 7).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from .groups import ChannelGroup
from .hooks import eval_mode
from .sensitivity import conv_sensitivity, kernel_positions, linear_sensitivity

log = logging.getLogger(__name__)


def _batches(loader: Iterable, device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    for batch in loader:
        x, y = batch[0], batch[1]
        yield x.to(device), y.to(device)


# ----------------------------------------------------------------------------- PFP
@dataclass
class SensitivityResult:
    scores: dict[int, torch.Tensor]  # gid -> s_j
    kernel: dict[int, int] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    unscored: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    points: int = 0


class _ConsumerPlan:
    """Which group channel each input unit of one consumer carries."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.keys: list[tuple[int, int]] = []  # (gid, root channel) per unit
        self.features: list[list[int]] = []  # input indices per unit
        self._index: dict[tuple[int, int], int] = {}
        self.best: torch.Tensor | None = None
        self.contrib: torch.Tensor | None = None  # sum over points of each unit's mean |input| x |weight|
        self.points = 0
        self.kp: tuple[int, int] = (1, 1)

    def add(self, gid: int, in_idxs: torch.Tensor, root_idxs: torch.Tensor) -> None:
        for i, r in zip(in_idxs.tolist(), root_idxs.tolist()):
            key = (gid, r)
            if key not in self._index:
                self._index[key] = len(self.keys)
                self.keys.append(key)
                self.features.append([])
            self.features[self._index[key]].append(i)

    def units(self) -> torch.Tensor:
        width = max(len(f) for f in self.features)
        return torch.tensor([f + [-1] * (width - len(f)) for f in self.features], dtype=torch.long)

    def hook(self, mode: str):
        conv = isinstance(self.module, nn.Conv2d)
        units = None if conv else self.units().to(self.module.weight.device)
        channel_of_unit = torch.tensor([f[0] for f in self.features], dtype=torch.long)

        def fn(mod, inputs):
            a = inputs[0]
            w = mod.weight.detach().abs()
            if conv:
                s = conv_sensitivity(a, mod, mode)[channel_of_unit.to(a.device)]
                # a grouped conv's weight has in_channels / groups columns: index within the group
                cols = channel_of_unit.to(a.device) % w.shape[1]
                per_in = a.detach().abs().mean(dim=(2, 3)).sum(0)[channel_of_unit.to(a.device)]
                contrib = per_in * w.sum(dim=(0, 2, 3))[cols]
            else:
                s = linear_sensitivity(a, mod, units, mode)
                feat = a.detach().abs().reshape(-1, a.shape[-1])
                per_feat = feat.mean(0) * w.sum(0) * (feat.shape[0] / a.shape[0])
                padded = torch.cat([per_feat, per_feat.new_zeros(1)])
                contrib = padded[units.masked_fill(units < 0, per_feat.numel())].sum(1) * a.shape[0]
            self.best = s if self.best is None else torch.maximum(self.best, s)
            contrib = contrib.double().cpu()
            self.contrib = contrib if self.contrib is None else self.contrib + contrib
            self.points += a.shape[0]
            k, p = kernel_positions(mod, a)
            self.kp = (k if conv else units.shape[1], p)

        return fn


def pfp_sensitivity(model: nn.Module, groups: list[ChannelGroup], calib_loader, device, mode: str = "sum",
                    aggregate: str = "max") -> SensitivityResult:
    """Empirical sensitivity s_j of every channel of every scorable group over S.

    A channel read by several consumers has one sensitivity per consumer. aggregate="max"
    takes the largest (spec section 1); one saturated consumer (a 1x1 shortcut scores every
    channel 1.0) then erases the ranking. aggregate="weighted" averages them, weighting each
    consumer by its share of the group's output (sum over the group's channels of
    mean |input| x |weight|), and breaks remaining ties by that contribution, never by index.
    """
    plans: dict[str, _ConsumerPlan] = {}
    result = SensitivityResult(scores={})
    scorable = []
    for g in groups:
        if not g.consumers or g.unscorable:
            why = f"consumers PFP cannot score: {', '.join(g.unscorable)}" if g.unscorable else "no Conv2d/Linear reads it"
            log.warning("PFP skips the channels of %s (%s)", g.name, why)
            result.unscored.append((g.name, why))
            continue
        scorable.append(g)
        for c in g.consumers:
            plans.setdefault(c.name, _ConsumerPlan(c.module)).add(g.gid, c.in_idxs, c.root_idxs)
    handles = [p.module.register_forward_pre_hook(p.hook(mode)) for p in plans.values()]
    start = time.perf_counter()
    with eval_mode(model, handles), torch.no_grad():
        for x, _ in _batches(calib_loader, device):
            model(x)
            result.points += x.shape[0]
    result.seconds = time.perf_counter() - start
    for g in scorable:
        per_consumer: list[tuple[torch.Tensor, torch.Tensor]] = []  # (s_c, contribution_c) per group channel
        kp = (1, 1)
        for c in dict.fromkeys(c.name for c in g.consumers):
            plan = plans[c]
            if plan.best is None:
                continue
            s_c = torch.zeros(g.size, dtype=torch.float64)
            t_c = torch.zeros(g.size, dtype=torch.float64)
            best = plan.best.double().cpu()
            for u, (gid, root) in enumerate(plan.keys):
                if gid == g.gid:
                    s_c[root] = max(float(s_c[root]), float(best[u]))
                    t_c[root] += float(plan.contrib[u]) / max(1, plan.points)
            per_consumer.append((s_c, t_c))
            kp = max(kp, plan.kp, key=lambda t: (t[1] + 1) * t[0])
        if not per_consumer:
            s = torch.zeros(g.size, dtype=torch.float64)
        elif aggregate == "max":
            s = torch.stack([sc for sc, _ in per_consumer]).amax(0)
        else:
            weights = torch.tensor([float(tc.sum()) for _, tc in per_consumer], dtype=torch.float64)
            weights = weights / weights.sum() if float(weights.sum()) > 0 else torch.full_like(weights, 1 / len(weights))
            s = sum(w * sc for w, (sc, _) in zip(weights, per_consumer))
            contribution = sum(tc for _, tc in per_consumer)
            # ties (equal s to float precision) go to the channel that carries more of the output
            scale = max(float(s.max()), 1e-30) * 1e-9
            s = s + scale * contribution / max(float(contribution.max()), 1e-30)
        result.scores[g.gid] = s
        result.kernel[g.gid], result.positions[g.gid] = kp
    return result


# ----------------------------------------------------------------------------- baselines
def _producer_weights(g: ChannelGroup) -> list[torch.Tensor]:
    """Each producer's filters as rows [n_g, -1], ordered by group channel."""
    rows = []
    for p in g.producers:
        w = p.module.weight.detach()
        order = torch.argsort(p.root_idxs)
        rows.append(w[p.out_idxs[order]].flatten(1).float())
    return rows


def norm_scores(groups: list[ChannelGroup], p: int) -> dict[int, torch.Tensor]:
    """FT (p=1, Li et al.) and SFP (p=2, He et al.): the producers' filter norms."""
    return {g.gid: torch.stack([w.norm(p=p, dim=1) for w in _producer_weights(g)]).mean(0) for g in groups}


def fpgm_scores(groups: list[ChannelGroup]) -> dict[int, torch.Tensor]:
    """FPGM: total distance of each filter to the others; near the geometric median = redundant."""
    return {g.gid: torch.stack([torch.cdist(w, w).sum(1) for w in _producer_weights(g)]).mean(0) for g in groups}


def random_scores(groups: list[ChannelGroup], seed: int) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {g.gid: torch.rand(g.size, generator=gen) for g in groups}


def hrank_scores(model: nn.Module, groups: list[ChannelGroup], calib_loader, device) -> dict[int, torch.Tensor]:
    """HRank: mean rank of each channel's feature map over S, at the group's root producer."""
    sums: dict[int, torch.Tensor] = {}
    count = [0]
    handles = []
    for g in groups:
        root = next((p for p in g.producers if p.name == g.root_name), g.producers[0])

        def fn(mod, inp, out, gid=g.gid, root=root):
            if out.dim() != 4:
                return
            r = torch.linalg.matrix_rank(out.float()).sum(0).double().cpu()  # [C]
            order = torch.argsort(root.root_idxs)
            r = r[root.out_idxs[order].cpu()]
            sums[gid] = r if gid not in sums else sums[gid] + r

        handles.append(root.module.register_forward_hook(fn))
    with eval_mode(model, handles), torch.no_grad():
        for x, _ in _batches(calib_loader, device):
            model(x)
            count[0] += x.shape[0]
    l1 = norm_scores(groups, 1)
    out = {}
    for g in groups:
        if g.gid in sums:
            # ties in rank (common in small maps) are broken by the filter norm
            out[g.gid] = sums[g.gid] / max(1, count[0]) + 1e-6 * l1[g.gid].double() / (l1[g.gid].max() + 1e-12)
        else:  # Linear producers have no feature map to rank
            out[g.gid] = l1[g.gid].double()
    return out


def tp_scores(model: nn.Module, groups: list[ChannelGroup], kind: str, calib_loader, device) -> dict[int, torch.Tensor]:
    """Torch-Pruning's own group importances: global magnitude (L2) or first-order Taylor."""
    if kind == "tp_magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")
    else:
        imp = tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")
        model.zero_grad(set_to_none=True)
        with eval_mode(model):
            for x, y in _batches(calib_loader, device):
                F.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        out = {g.gid: imp(g.tp_group).detach().double().cpu() for g in groups}
    model.zero_grad(set_to_none=True)
    return out
