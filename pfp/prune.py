"""One pruning step: score, allocate, select, remove, post-process; plus the guarantee report.

    model --PruningGraph--> groups --method's scorer--> scores --allocator--> k_g
          --selection--> kept channels --Torch-Pruning--> smaller dense model
          --BN recalibration / reconstruction--> the one-shot model

The method (`pfp.methods`) names its scorer, its allocator (`pfp.budgets`) and its
post-processing defaults; this module runs them and has no per-method branches.
`prune` never modifies the model it is given; it returns a physically smaller copy.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn as nn

from . import allocation as alloc
from . import guarantee
from .budgets import MEASURING, BudgetError, BudgetRequest, allocate, top_up
from .config import PruneConfig
from .errors import CoreError
from .groups import ChannelGroup, PruningGraph, kept_indices
from .hooks import eval_mode
from .importance import norm_scores
from .latency_model import LatencyModel
from .methods import ScoreRequest, get_method
from .postprocess import postprocess
from .probe import OutputProbe
from .resources import ResourceModel, count_flops, count_params

if TYPE_CHECKING:
    from rich.console import Group

log = logging.getLogger(__name__)

class PruneError(CoreError, ValueError):
    """A pruning request that cannot be met (names the limit).

    `floor` is the smallest reachable share of the reference when the target was below it
    (None for other limits), so a caller correcting its target can ask for the floor instead.
    """

    def __init__(self, message: str, floor: float | None = None) -> None:
        super().__init__(message)
        self.floor = floor


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
    allocation: str | None = None
    allocation_notes: list[str] = field(default_factory=list)
    guarantee: list[dict] = field(default_factory=list)  # per consumer: measured error next to eps_l
    postprocess: dict | None = None
    latency_ms: float | None = None  # target latency: the table's prediction for the kept counts
    reference_latency_ms: float | None = None  # target latency: the table's unpruned model, measured
    measured_latency_ratio: float | None = None  # target latency: this model / the unpruned one, timed side by side

    @property
    def achieved(self) -> float:
        if self.target == "latency":
            return self.latency_ms if self.latency_ms is not None else float("nan")
        return self.flops if self.target == "flops" else self.params

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [list(s) for s in self.skipped]
        d["params_removed"] = 1 - self.params / self.original_params
        d["flops_removed"] = 1 - self.flops / self.original_flops
        d["budget_error"] = self.achieved / self.target_value - 1
        return d

    def save_json(self, path: str | Path) -> None:
        """Written whole or not at all (a temporary file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2))
        os.replace(tmp, path)

    def summary(self) -> "Group":
        """The report for people: the per-layer budget, the measured guarantee, the totals (rich renderables)."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list = []
        t = Table(title=f"{self.method}: per-layer budget ({self.allocation or '-'} allocation)")
        for col in ("layer", "kept/total", "eps_l", "m", "S_g"):
            t.add_column(col, justify="right" if col != "layer" else "left")
        for row in self.layers:
            t.add_row(
                row["name"],
                f"{row['kept']}/{row['size']}",
                "-" if row.get("eps") is None else f"{row['eps']:.3g}",
                "-" if row.get("m") is None else f"{row['m']:.3g}",
                "-" if row.get("S") is None else f"{row['S']:.3g}",
            )
        parts.append(t)
        if self.guarantee:
            g = Table(title=f"measured on held-out points: relative pre-activation error per consumer "
                            f"(delta={self.delta if self.delta else '-'})")
            for col in ("consumer", "p50", "p95", "max", "eps for 95%", "eps for 99%", "eps_l", "inside eps_l"):
                g.add_column(col, justify="right" if col != "consumer" else "left")
            for r in self.guarantee:
                g.add_row(r["name"], f"{r['rel_p50']:.3g}", f"{r['rel_p95']:.3g}", f"{r['rel_max']:.3g}",
                          f"{r['eps95']:.3g}", f"{r['eps99']:.3g}", "-" if r["eps"] is None else f"{r['eps']:.3g}",
                          "-" if r["inside_eps"] is None else f"{100 * r['inside_eps']:.1f}%")
            parts.append(g)
        if self.postprocess and self.postprocess.get("order"):
            pp = self.postprocess
            errs = ", ".join(f"{k} {v:.3g}" for k, v in pp.get("output_error", {}).items())
            parts.append(Text(f"post-processing: {pp['order']}" + (f" (relative output error: {errs})" if errs else "")))
        parts.append(Text(
            f"params {self.params:,} ({100 * (1 - self.params / self.original_params):.1f}% removed), "
            f"FLOPs {self.flops:,} ({100 * (1 - self.flops / self.original_flops):.1f}% removed), "
            + (f"predicted latency {self.latency_ms:.4g} ms of {self.reference_latency_ms:.4g} ms, "
               if self.latency_ms is not None and self.reference_latency_ms is not None else "")
            + f"target {self.target} "
            + (f"{self.target_value:.4g} ms" if self.target == "latency" else f"{self.target_value:,.0f}")
            + f" (off by {100 * (self.achieved / self.target_value - 1):+.2f}%)"
        ))
        for name, why in self.skipped:
            parts.append(Text(f"not pruned: {name}: {why}", style="yellow"))
        return Group(*parts)


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
def sample_randomized(s: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


def reweight_consumers(g: ChannelGroup, kept: torch.Tensor, scale: torch.Tensor) -> None:
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
def _graph(model: nn.Module, example_input: torch.Tensor, ignore: list[str]) -> PruningGraph:
    try:
        return PruningGraph(model, example_input, ignore)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - Torch-Pruning's tracer fails in many ways on unusual graphs
        raise PruneError(
            f"Torch-Pruning cannot build the dependency graph of this model "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it cannot be pruned"
        ) from e


def _select(groups: list[ChannelGroup], counts: list[int], scores: dict[int, torch.Tensor], randomized: bool,
            seed: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Kept channels per group (top-k, or the randomized draw) and the reweighting scales."""
    gen = torch.Generator().manual_seed(seed)
    keep: dict[int, torch.Tensor] = {}
    weight_scale: dict[int, torch.Tensor] = {}
    for g, k in zip(groups, counts):
        s = scores[g.gid].double()
        if randomized and k < g.size and s.sum() > 0:
            keep[g.gid], weight_scale[g.gid] = sample_randomized(s, k, gen)
        else:
            keep[g.gid] = torch.topk(s, k).indices.sort().values
    return keep, weight_scale


def prune(model: nn.Module, calib_loader, cfg: PruneConfig, keep_ratio: float, *, example_input: torch.Tensor,
          reference: tuple[int, int] | None = None, holdout_loader=None, postprocess_loader=None, device="cpu",
          seed: int = 0, divergence=None,
          latency_model: LatencyModel | None = None) -> tuple[nn.Module, PruneReport, SoftPruner | None]:
    """Prune a copy of `model` to keep_ratio of the reference resource (cfg.target); the one-shot result.

    calib_loader holds S (scores); postprocess_loader the held-out training images for BN
    recalibration and reconstruction (calib_loader when None); holdout_loader the points of
    the guarantee report (distinct from S). reference: (params, flops) of the unpruned
    network, so cascades stay relative to it; None means this model. For SFP the copy comes
    back with filters zeroed and a SoftPruner. divergence: the task's output divergence for the
    measuring allocators (pfp.tasks.Task.divergence); None picks one from the output's shape.
    cfg.target "latency" needs `latency_model`, the table of the unpruned network
    (export.latency_table builds it): keep_ratio is then the fraction of its measured latency
    to keep, and counts follow its staircases, not round_to.
    """
    start = time.perf_counter()
    if cfg.target == "latency" and latency_model is None:
        raise PruneError("prune.target latency needs a latency table of the model (prune(..., latency_model=...); "
                         "export.latency_table.build_latency_table measures one)")
    method = get_method(cfg.method)
    model = copy.deepcopy(model).to(device).eval()
    original = copy.deepcopy(model)  # the unpruned network, on `device`: reconstruction's target
    example_input = example_input[:1].to(device)
    graph = _graph(model, example_input, cfg.ignore_layers)
    rm = ResourceModel(model, example_input, graph.groups)
    ref_params, ref_flops = reference or (rm.total_params, rm.total_flops)
    on_latency = cfg.target == "latency"
    if on_latency:
        # the table is of the unpruned network, in absolute counts: a cascade stays relative to it
        ref_value = latency_model.full_ms
    else:
        ref_value = ref_flops if cfg.target == "flops" else ref_params
    target_value = keep_ratio * ref_value
    pick = 1 if cfg.target == "flops" else 0

    scored = method.score(ScoreRequest(model, graph.groups, calib_loader, device, cfg, seed, postprocess_loader))
    skipped = list(graph.skipped) + scored.unscored
    groups = [g for g in graph.groups if g.gid in scored.scores]
    scores = scored.scores
    scoring_seconds = time.perf_counter() - start

    # groups outside `groups` (skipped) keep every channel
    all_kept = {g.gid: g.size for g in graph.groups}
    order = [g.gid for g in graph.groups]

    resource = _resource_of(groups, graph.groups, rm, pick, latency_model if on_latency else None)

    # on latency, channel rounding comes from the table's staircases (after allocation), not a multiple
    mult, mn = (1 if on_latency else cfg.round_to), cfg.min_channels
    sizes = [g.size for g in groups]
    floor = resource([alloc.round_count(mn, n, mult, mn) for n in sizes])
    if target_value < floor * (1 - 1e-9):
        def fmt(v: float) -> str:
            return f"{v:.4g} ms" if on_latency else f"{v:,.0f}"

        raise PruneError(
            f"target {cfg.target} {keep_ratio:.4g} x reference = {fmt(target_value)} is below the smallest "
            f"reachable {fmt(floor)} (floor {floor / ref_value:.2%} of the reference) with protected "
            f"layers, min_channels={mn}" + ("" if on_latency else f" and round_to={mult}"),
            floor=floor / ref_value,
        )
    allocation = cfg.allocation or method.allocation
    probe = None
    if allocation in MEASURING:
        probe = OutputProbe(model, groups, scores, postprocess_loader or calib_loader, device,
                            grams=scored.grams if postprocess_loader is not None else None, divergence=divergence)
    candidates = None
    if on_latency:  # the largest count of each latency level: a count below it costs the same
        candidates = [sorted({k for k in latency_model.staircase_counts(g.name) if mn <= k < g.size}
                             | {g.size, min(g.size, latency_model.round_up(g.name, mn))}) for g in groups]
    req = BudgetRequest(sizes, [scores[g.gid] for g in groups],
                        [scored.stats[g.gid] for g in groups] if scored.stats is not None else None,
                        resource, target_value, mult, mn, cfg.delta, probe, candidates)
    try:
        budget = allocate(allocation, req)
    except BudgetError as e:
        raise PruneError(str(e)) from None
    if method.top_up and resource(budget.counts) < target_value:
        budget = top_up(req, budget)
    counts = budget.counts
    if on_latency:
        # a count inside a latency level costs what the level's largest count costs: keep that many
        stepped = [min(g.size, max(k, latency_model.round_up(g.name, k))) for g, k in zip(groups, counts)]
        added = sum(stepped) - sum(counts)
        if added:
            budget.notes.append(f"{added} channels added along the latency staircases at no predicted cost")
        counts = budget.counts = stepped

    randomized = cfg.selection == "randomized" and method.randomized_ok
    keep, weight_scale = _select(groups, counts, scores, randomized, seed)
    bounded = scored.stats is not None
    if budget.eps is not None:
        eps_of = {g.gid: e for g, e in zip(groups, budget.eps)}
    elif bounded:  # budgets not set by the bound: report the tolerance the bound gives the chosen counts
        eps_of = {g.gid: float(alloc.eps_for_counts(scored.stats[g.gid], [k], cfg.delta)[0])
                  for g, k in zip(groups, counts)}
    else:
        eps_of = {}
    layers = _layer_rows(groups, keep, eps_of, scored.stats if bounded else None, cfg.delta)

    report = PruneReport(
        method=cfg.method, target=cfg.target, target_value=target_value, original_params=ref_params,
        original_flops=ref_flops, params=0, flops=0, eps=budget.global_eps, delta=cfg.delta if bounded else None,
        layers=layers, skipped=skipped, scoring_seconds=scoring_seconds, calib_points=scored.points,
        allocation=allocation, allocation_notes=budget.notes,
        latency_ms=resource(counts) if on_latency else None,
        reference_latency_ms=ref_value if on_latency else None,
    )
    if method.soft:
        soft = SoftPruner(graph, {g.gid: k for g, k in zip(groups, counts)}, report, example_input)
        planned = dict(all_kept)
        planned.update({g.gid: k for g, k in zip(groups, counts)})
        # predicted until finalize() removes the zeroed filters and measures
        report.params, report.flops = (int(v) for v in rm.predict([planned[gid] for gid in order]))
        # BN only: the zeroed channels are exact zeros, as after removal, but nothing is removed to refit
        _, pp = postprocess(original, model, [], postprocess_loader or calib_loader, holdout_loader, device,
                            reconstruct_on=False, bn_on=cfg.bn_recalibration, ridge=cfg.ridge,
                            points=cfg.postprocess_points)
        report.postprocess = asdict(pp)
        report.seconds = time.perf_counter() - start
        _network_order(report.layers, model)
        return model, report, soft
    kept_in, kept_out = kept_indices(groups, keep)
    for gid, scl in weight_scale.items():
        reweight_consumers(next(g for g in groups if g.gid == gid), keep[gid], scl)
    graph.prune(keep)
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as e:  # noqa: BLE001 - e.g. a reshape with a hard-coded width (ViT's hidden_dim)
        raise PruneError(f"the pruned model no longer runs ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"add the layer that hard-codes its width to prune.ignore_layers") from e

    reconstruct_on = method.reconstruct if cfg.reconstruct is None else cfg.reconstruct
    model, pp = postprocess(original, model, list(kept_in), postprocess_loader or calib_loader, holdout_loader,
                            device, reconstruct_on=reconstruct_on, bn_on=cfg.bn_recalibration, ridge=cfg.ridge,
                            points=cfg.postprocess_points, kept_out=kept_out)
    report.postprocess = asdict(pp)
    if holdout_loader is not None and kept_in:
        _measure_guarantee(report, layers, groups, eps_of, original, model, kept_in, kept_out, holdout_loader,
                           device, cfg.delta if bounded else None)
    _network_order(report.layers, model)
    report.params = count_params(model)
    report.flops = count_flops(model, example_input)
    report.seconds = time.perf_counter() - start
    return model, report, None


def _resource_of(groups: list[ChannelGroup], all_groups: list[ChannelGroup], rm: ResourceModel, pick: int,
                 latency_model: LatencyModel | None) -> Callable[[list[int]], float]:
    """The allocators' cost of kept counts for `groups` (the others keep every channel):
    predicted latency from the table, else FLOPs (pick 1) or params (pick 0)."""
    all_kept = {g.gid: g.size for g in all_groups}
    order = [g.gid for g in all_groups]
    if latency_model is not None:
        missing = latency_model.missing([g.name for g in groups])
        if missing:
            raise PruneError(f"the latency table has no block for group {missing[0]!r} ({len(missing)} missing); "
                             f"build it from this model with the same prune.ignore_layers")
        timed = [g for g in all_groups if g.name in latency_model.blocks]

        def latency(counts: list[int]) -> float:
            kept = dict(all_kept)
            kept.update({g.gid: k for g, k in zip(groups, counts)})
            return latency_model.predict({g.name: kept[g.gid] for g in timed})
        return latency

    def counted(counts: list[int]) -> float:
        kept = dict(all_kept)
        kept.update({g.gid: k for g, k in zip(groups, counts)})
        return rm.predict([kept[gid] for gid in order])[pick]
    return counted


def _layer_rows(groups: list[ChannelGroup], keep: dict, eps_of: dict, stats: dict | None, delta: float) -> list[dict]:
    """The report's row per pruned group: widths, eps_l and, under the bound, m and S_g."""
    layers = []
    for g in groups:
        row = {"name": g.name, "size": g.size, "kept": int(len(keep[g.gid])), "eps": eps_of.get(g.gid),
               "delta": delta if stats is not None else None, "m": None, "S": None, "coverage": None}
        if stats is not None:
            st = stats[g.gid]
            row["S"] = st.mass
            e = eps_of.get(g.gid)
            row["m"] = int(alloc.sample_size(st, e, delta)) if e else None
        layers.append(row)
    return layers


def _measure_guarantee(report: PruneReport, layers: list[dict], groups: list[ChannelGroup], eps_of: dict,
                       original: nn.Module, model: nn.Module, kept_in, kept_out, holdout_loader, device,
                       delta: float | None) -> None:
    """Each consumer's measured pre-activation error on held-out points, next to its eps_l."""
    eps_layer: dict[str, float] = {}
    for g in groups:
        for c in g.consumers:
            if g.gid in eps_of:  # a consumer reading several groups is held to the tightest tolerance
                eps_layer[c.name] = min(eps_layer.get(c.name, float("inf")), eps_of[g.gid])
    measured = guarantee.measure(original, model, kept_in, kept_out, holdout_loader, device, eps_layer, delta)
    report.guarantee = [m.to_dict() for m in measured]
    by_name = {m.name: m for m in measured}
    for g, row in zip(groups, layers):  # rows are still in the groups' order here
        inside = [by_name[c.name].inside_eps for c in g.consumers
                  if c.name in by_name and by_name[c.name].inside_eps is not None]
        row["coverage"] = min(inside) if inside else None
        e95 = [by_name[c.name].eps95 for c in g.consumers if c.name in by_name]
        row["eps95"] = max(e95) if e95 else None


def _network_order(layers: list[dict], model: nn.Module) -> None:
    """Sort report rows in network order (the dependency graph lists groups from the output back)."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers.sort(key=lambda r: position.get(r["name"], len(position)))


# `pfp.prune(model, ...)` calls the API; see _CallableModule in pfp/__init__.py.
sys.modules[__name__].__class__ = __import__("pfp")._CallableModule
