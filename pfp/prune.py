"""One pruning step: score, allocate, select, remove; plus the guarantee report.

    model --PruningGraph--> groups --importance--> scores --allocation--> k_g
          --selection--> kept channels --Torch-Pruning--> smaller dense model

`prune` never modifies the model it is given; it returns a physically smaller copy.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import allocation as alloc
from .config import PruneConfig
from .groups import ChannelGroup, PruningGraph
from .hooks import eval_mode
from .importance import (
    fpgm_scores,
    hrank_scores,
    norm_scores,
    pfp_sensitivity,
    random_scores,
    tp_scores,
)
from .resources import ResourceModel, count_flops, count_params

log = logging.getLogger(__name__)

UNIFORM = {"ft", "sfp", "fpgm", "hrank", "random"}
GLOBAL = {"tp_magnitude", "tp_taylor"}


class PruneError(ValueError):
    """A pruning request that cannot be met (names the limit)."""


@dataclass
class PruneReport:
    method: str
    target: str
    target_value: float
    original_params: int
    original_flops: int
    params: int
    flops: int
    eps: float | None
    delta: float | None
    layers: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    scoring_seconds: float = 0.0
    calib_points: int = 0

    @property
    def achieved(self) -> float:
        return self.flops if self.target == "flops" else self.params

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [list(s) for s in self.skipped]
        d["params_removed"] = 1 - self.params / self.original_params
        d["flops_removed"] = 1 - self.flops / self.original_flops
        d["budget_error"] = self.achieved / self.target_value - 1
        return d

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def print_table(self, console=None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        eps = f"{self.eps:.4g}" if self.eps is not None else "-"
        t = Table(title=f"{self.method}: per-layer budget (eps={eps}, delta={self.delta if self.delta else '-'})")
        for col in ("layer", "kept/total", "m", "S_g", "coverage"):
            t.add_column(col, justify="right" if col != "layer" else "left")
        for row in self.layers:
            t.add_row(
                row["name"],
                f"{row['kept']}/{row['size']}",
                "-" if row.get("m") is None else f"{row['m']:.3g}",
                "-" if row.get("S") is None else f"{row['S']:.3g}",
                "-" if row.get("coverage") is None else f"{100 * row['coverage']:.1f}%",
            )
        console.print(t)
        console.print(
            f"params {self.params:,} ({100 * (1 - self.params / self.original_params):.1f}% removed), "
            f"FLOPs {self.flops:,} ({100 * (1 - self.flops / self.original_flops):.1f}% removed), "
            f"target {self.target} {self.target_value:,.0f} (off by {100 * (self.achieved / self.target_value - 1):+.2f}%)"
        )
        for name, why in self.skipped:
            console.print(f"[yellow]not pruned: {name}: {why}[/yellow]")


def calibration_size(model: nn.Module, example_input: torch.Tensor, delta: float) -> int:
    """|S| from the spec's formula: eta = neurons (C x H x W outputs) over Conv/Linear layers."""
    counts = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: counts.append(o[0].numel()))
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    with eval_mode(model, hooks), torch.no_grad():
        model(example_input[:1])
    return alloc.calibration_size(sum(counts), max(counts), delta)


# ----------------------------------------------------------------------------- selection
def _randomized(s: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample m' channels with replacement from p so that E[#distinct] = k; keep the distinct.

    Returns kept channels and the weight scale count_j / (m' p_j) of each.
    """
    p = (s / s.sum()).double()
    n_pos = int((p > 0).sum())
    if k >= n_pos:
        # E[#distinct] only reaches n_pos as m' grows without bound; its limit keeps every
        # channel with mass, each scaled by count/(m' p) -> 1
        kept = torch.nonzero(p > 0).flatten()
        return kept, torch.ones(len(kept), dtype=torch.float64)
    lo, hi = 0.0, 1.0
    while alloc.expected_distinct(p, hi) < k - 1e-6 and hi < 1e12:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if alloc.expected_distinct(p, mid) < k:
            lo = mid
        else:
            hi = mid
    m = max(1, round(hi))
    draws = torch.multinomial(p, m, replacement=True, generator=gen)
    counts = torch.bincount(draws, minlength=len(p)).double()
    kept = torch.nonzero(counts > 0).flatten()
    scale = counts[kept] / (m * p[kept])
    return kept, scale


def _reweight(g: ChannelGroup, kept: torch.Tensor, scale: torch.Tensor) -> None:
    """Scale consumer weights of kept channel j by count_j / (m' p_j) (unbiased estimator)."""
    per_channel = torch.zeros(g.size, dtype=torch.float64)
    per_channel[kept] = scale
    with torch.no_grad():
        for c in g.consumers:
            w = c.module.weight
            factor = per_channel[c.root_idxs].to(w.dtype).to(w.device)
            shape = [1] * w.dim()
            shape[1] = -1
            w[:, c.in_idxs] *= factor.view(shape)


# ----------------------------------------------------------------------------- coverage
def _coverage(model: nn.Module, groups: list[ChannelGroup], keep: dict[int, torch.Tensor],
              scale: dict[int, torch.Tensor], eps: dict[int, float], loader, device) -> dict[int, float]:
    """Share of held-out (point, unit, position) pre-activations within (1 +/- eps), per group.

    Layer by layer, as the guarantee is stated: each consumer gets the unpruned network's
    input, once with every channel and once with only the kept (reweighted) ones.
    """
    masks: dict[str, torch.Tensor] = {}
    consumers: dict[str, nn.Module] = {}
    tol: dict[str, float] = {}
    for g in groups:
        if g.gid not in keep:
            continue
        per_channel = torch.zeros(g.size)
        per_channel[keep[g.gid]] = scale[g.gid].float() if g.gid in scale else 1.0
        for c in g.consumers:
            dim = c.module.in_channels if isinstance(c.module, nn.Conv2d) else c.module.in_features
            m = masks.setdefault(c.name, torch.ones(dim))
            m[c.in_idxs] = per_channel[c.root_idxs]
            consumers[c.name] = c.module
            # a consumer reading several groups is held to the tightest of their tolerances
            tol[c.name] = min(tol.get(c.name, float("inf")), eps[g.gid])
    hits: dict[str, list[float]] = {n: [0.0, 0.0] for n in consumers}

    def hook(name):
        def fn(mod, inputs):
            a = inputs[0].detach()
            mk = masks[name].to(a.device, a.dtype)
            if isinstance(mod, nn.Conv2d):
                kw = dict(stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
                z = F.conv2d(a, mod.weight, **kw)
                zh = F.conv2d(a * mk.view(1, -1, 1, 1), mod.weight, **kw)
            else:
                z = F.linear(a, mod.weight)
                zh = F.linear(a * mk, mod.weight)
            ok = (zh - z).abs() <= tol[name] * z.abs() + 1e-12
            hits[name][0] += float(ok.sum())
            hits[name][1] += ok.numel()

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in consumers.items()]
    with eval_mode(model, handles), torch.no_grad():
        for batch in loader:
            model(batch[0].to(device))
    out = {}
    for g in groups:
        vals = [hits[c.name][0] / hits[c.name][1] for c in g.consumers if c.name in hits and hits[c.name][1]]
        if vals:
            out[g.gid] = min(vals)
    return out


# ----------------------------------------------------------------------------- soft pruning (SFP)
class SoftPruner:
    """Soft Filter Pruning: zero the weakest filters (L2) every epoch, remove them at the end."""

    def __init__(self, graph: PruningGraph, counts: dict[int, int], report: PruneReport, example_input: torch.Tensor):
        self.graph = graph
        self.counts = counts
        self.report = report
        self.example_input = example_input
        self.zero(graph.model)

    def _keep(self) -> dict[int, torch.Tensor]:
        groups = [g for g in self.graph.groups if g.gid in self.counts]
        scores = norm_scores(groups, 2)
        return {g.gid: torch.topk(scores[g.gid], self.counts[g.gid]).indices.sort().values for g in groups}

    def zero(self, model: nn.Module) -> None:
        keep = self._keep()
        with torch.no_grad():
            for g in self.graph.groups:
                if g.gid not in keep:
                    continue
                drop = torch.ones(g.size, dtype=torch.bool)
                drop[keep[g.gid]] = False
                # zeroing the BatchNorm affine too makes the channel output exactly 0, as after
                # removal; zeroed conv filters alone would leave BN's shift -gamma*mean/std + beta
                for p in g.producers + g.norms:
                    rows = p.out_idxs[drop[p.root_idxs]].to(p.module.weight.device)
                    p.module.weight[rows] = 0
                    if p.module.bias is not None:
                        p.module.bias[rows] = 0

    def callback(self, epoch: int, model: nn.Module) -> None:
        """Epoch callback for pfp.train.train: filters stay trainable, the weakest are re-zeroed."""
        self.zero(self.graph.model)

    def finalize(self, model: nn.Module | None = None) -> tuple[nn.Module, PruneReport]:
        """Remove the zeroed filters physically; returns the smaller model and its report."""
        keep = self._keep()
        self.graph.prune(keep)
        model = self.graph.model
        self.report.params = count_params(model)
        self.report.flops = count_flops(model, self.example_input.to(next(model.parameters()).device))
        return model, self.report


# ----------------------------------------------------------------------------- the step
def prune(model: nn.Module, calib_loader, cfg: PruneConfig, keep_ratio: float, *, example_input: torch.Tensor,
          reference: tuple[int, int] | None = None, holdout_loader=None, device="cpu",
          seed: int = 0) -> tuple[nn.Module, PruneReport, SoftPruner | None]:
    """Prune a copy of `model` to keep_ratio of the reference resource (cfg.target).

    reference: (params, flops) of the unpruned network, so cascades stay relative to it;
    None means this model. For SFP the copy comes back with filters zeroed and a SoftPruner.
    """
    start = time.perf_counter()
    model = copy.deepcopy(model).to(device).eval()
    example_input = example_input[:1].to(device)
    try:
        graph = PruningGraph(model, example_input, cfg.ignore_layers)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - Torch-Pruning's tracer fails in many ways on unusual graphs
        raise PruneError(
            f"Torch-Pruning cannot build the dependency graph of this model "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it cannot be pruned"
        ) from e
    rm = ResourceModel(model, example_input, graph.groups)
    ref_params, ref_flops = reference or (rm.total_params, rm.total_flops)
    target_value = keep_ratio * (ref_flops if cfg.target == "flops" else ref_params)
    pick = 1 if cfg.target == "flops" else 0

    skipped = list(graph.skipped)
    groups = graph.groups
    stats: list[alloc.GroupStats] = []
    sens = None
    if cfg.method == "pfp":
        sens = pfp_sensitivity(model, groups, calib_loader, device, cfg.sensitivity)
        skipped += sens.unscored
        groups = [g for g in groups if g.gid in sens.scores]
        scores = {g.gid: sens.scores[g.gid] for g in groups}
        stats = [alloc.GroupStats(g.size, scores[g.gid], sens.kernel[g.gid], sens.positions[g.gid]) for g in groups]
    elif cfg.method in ("ft", "sfp"):
        scores = norm_scores(groups, 1 if cfg.method == "ft" else 2)
    elif cfg.method == "fpgm":
        scores = fpgm_scores(groups)
    elif cfg.method == "hrank":
        scores = hrank_scores(model, groups, calib_loader, device)
    elif cfg.method == "random":
        scores = random_scores(groups, seed)
    else:
        scores = tp_scores(model, groups, cfg.method, calib_loader, device)
    scoring_seconds = time.perf_counter() - start

    # groups outside `groups` (skipped) keep every channel
    all_kept = {g.gid: g.size for g in graph.groups}
    order = [g.gid for g in graph.groups]

    def resource(counts: list[int]) -> float:
        kept = dict(all_kept)
        kept.update({g.gid: k for g, k in zip(groups, counts)})
        return rm.predict([kept[gid] for gid in order])[pick]

    mult, mn = cfg.round_to, cfg.min_channels
    sizes = [g.size for g in groups]
    floor = resource([alloc.round_count(mn, n, mult, mn) for n in sizes])
    if target_value < floor * (1 - 1e-9):
        raise PruneError(
            f"target {cfg.target} {keep_ratio:.4g} x reference = {target_value:,.0f} is below the smallest reachable "
            f"{floor:,.0f} ({floor / (ref_flops if pick else ref_params):.2%} of the reference) with protected "
            f"layers, min_channels={mn} and round_to={mult}"
        )
    current = resource(sizes)
    eps = None
    scales = [1.0] * len(groups)
    if current <= target_value:  # already small enough: nothing to remove
        counts = sizes
    elif cfg.method == "pfp":
        full = resource(sizes)
        costs = [full - resource([n - 1 if h is g else n for h, n in zip(groups, sizes)]) for g in groups]
        scales = alloc.cost_scales(costs, cfg.cost_exponent)
        sol = alloc.solve(lambda e: alloc.pfp_counts(stats, e, cfg.delta, mult, mn, scales), resource, target_value,
                          1e-8, 1e12, log_scale=True, decreasing=True, iters=80)
        counts, eps = sol.counts, sol.knob
    elif cfg.method in UNIFORM:
        sol = alloc.solve(lambda r: alloc.uniform_counts(sizes, r, mult, mn), resource, target_value,
                          0.0, 1.0, log_scale=False, decreasing=False)
        counts = sol.counts
    else:
        ordered = [scores[g.gid].double() for g in groups]
        flat = torch.cat(ordered)
        sol = alloc.solve(lambda t: alloc.global_counts(ordered, t, mult, mn), resource, target_value,
                          float(flat.min()) - 1e-9, float(flat.max()) + 1e-9, log_scale=False, decreasing=True)
        counts = sol.counts

    if current > target_value:
        counts = alloc.top_up(counts, sizes, [scores[g.gid] for g in groups], resource, target_value, mult)

    gen = torch.Generator().manual_seed(seed)
    keep: dict[int, torch.Tensor] = {}
    weight_scale: dict[int, torch.Tensor] = {}
    layers = []
    eps_of = {g.gid: eps * sc for g, sc in zip(groups, scales)} if eps is not None else {}
    for g, k in zip(groups, counts):
        s = scores[g.gid].double()
        if cfg.method == "pfp" and cfg.selection == "randomized" and k < g.size and s.sum() > 0:
            kept, scl = _randomized(s, k, gen)
            keep[g.gid], weight_scale[g.gid] = kept, scl
        else:
            keep[g.gid] = torch.topk(s, k).indices.sort().values
        row = {"name": g.name, "size": g.size, "kept": int(len(keep[g.gid])), "eps": eps_of.get(g.gid),
               "delta": cfg.delta if cfg.method == "pfp" else None, "m": None, "S": None, "coverage": None}
        if cfg.method == "pfp":
            st = stats[groups.index(g)]
            row["S"] = st.mass
            row["m"] = int(alloc.sample_size(st, eps_of[g.gid], cfg.delta)) if eps else None
        layers.append(row)

    if cfg.method == "pfp" and eps is not None and holdout_loader is not None:
        cov = _coverage(model, groups, keep, weight_scale, eps_of, holdout_loader, device)
        for g, row in zip(groups, layers):
            row["coverage"] = cov.get(g.gid)

    report = PruneReport(
        method=cfg.method, target=cfg.target, target_value=target_value, original_params=ref_params,
        original_flops=ref_flops, params=0, flops=0, eps=eps, delta=cfg.delta if cfg.method == "pfp" else None,
        layers=layers, skipped=skipped, scoring_seconds=scoring_seconds,
        calib_points=sens.points if sens else 0,
    )
    if cfg.method == "sfp":
        soft = SoftPruner(graph, {g.gid: k for g, k in zip(groups, counts)}, report, example_input)
        planned = dict(all_kept)
        planned.update({g.gid: k for g, k in zip(groups, counts)})
        # predicted until finalize() removes the zeroed filters and measures
        report.params, report.flops = (int(v) for v in rm.predict([planned[gid] for gid in order]))
        report.seconds = time.perf_counter() - start
        return model, report, soft
    for gid, scl in weight_scale.items():
        _reweight(next(g for g in groups if g.gid == gid), keep[gid], scl)
    graph.prune(keep)
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as e:  # noqa: BLE001 - e.g. a reshape with a hard-coded width (ViT's hidden_dim)
        raise PruneError(f"the pruned model no longer runs ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"add the layer that hard-codes its width to prune.ignore_layers") from e
    report.params = count_params(model)
    report.flops = count_flops(model, example_input)
    report.seconds = time.perf_counter() - start
    return model, report, None
