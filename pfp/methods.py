"""Pruning methods as a small registry of strategies: score, allocate, post-process.

A method is a scorer (one importance tensor per group, `pfp.importance`), the name of its
default allocator (`pfp.budgets`) and its post-processing defaults. Adding a method is one
`register_method(Method(...))`; `pfp.prune.prune` runs whichever is named, with no
per-method branches.

| method | score | allocation | top-up | reconstruct by default |
|---|---|---|---|---|
| pfp | reconstruction-aware elimination over S, ties by empirical sensitivity | search (measured output error per unit of cost) | in the allocator | yes |
| pfp_sensitivity | empirical sensitivity, consumers weighted by their share of the output | mass_bound (per-layer eps_l) | in the allocator | yes |
| pfp_reference | the reference code's max-offset sensitivity, max over consumers | single_eps | no | no |
| ft, sfp, fpgm, hrank, random | L1, L2, geometric median, feature-map rank, random | uniform | by score | no |
| tp_magnitude, tp_taylor | Torch-Pruning's group importances | global | by score | no |
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from . import allocation as alloc
from .config import ConfigError, PruneConfig
from .groups import ChannelGroup
from .importance import fpgm_scores, hrank_scores, norm_scores, pfp_sensitivity, random_scores, tp_scores


@dataclass
class ScoreRequest:
    model: nn.Module
    groups: list[ChannelGroup]
    calib_loader: object
    device: object
    cfg: PruneConfig
    seed: int
    postprocess_loader: object = None  # held-out training images beyond S


@dataclass
class Scores:
    scores: dict[int, torch.Tensor]  # gid -> one score per channel (higher = more important)
    stats: dict[int, alloc.GroupStats] | None = None  # the bound's statistics (PFP only)
    unscored: list[tuple[str, str]] = field(default_factory=list)  # groups left whole, with the reason
    points: int = 0
    grams: dict | None = None  # consumers' least-squares statistics, when the scorer computed them


Scorer = Callable[[ScoreRequest], Scores]


@dataclass(frozen=True)
class Method:
    name: str
    score: Scorer
    allocation: str
    top_up: bool = True
    reconstruct: bool = False  # default of prune.reconstruct
    soft: bool = False  # SFP: filters zeroed during retraining, removed at the end
    randomized_ok: bool = False  # prune.selection: randomized applies (it needs the bound's p)
    description: str = ""


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"prune.method: unknown method {name!r}; known: {', '.join(METHODS)}") from None


# ----------------------------------------------------------------------------- scorers
def _pfp(mode: str | None, aggregate: str) -> Scorer:
    def score(req: ScoreRequest) -> Scores:
        sens = pfp_sensitivity(req.model, req.groups, req.calib_loader, req.device, mode or req.cfg.sensitivity,
                               req.cfg.group_score or aggregate)
        stats = {gid: alloc.GroupStats(next(g.size for g in req.groups if g.gid == gid), s, sens.kernel[gid],
                                       sens.positions[gid]) for gid, s in sens.scores.items()}
        return Scores(sens.scores, stats, sens.unscored, sens.points)

    return score


def _plain(fn: Callable[[ScoreRequest], dict[int, torch.Tensor]]) -> Scorer:
    return lambda req: Scores(fn(req))


def _pfp_refit(req: ScoreRequest) -> Scores:
    """PFP's sensitivities, then the ranking of reconstruction-aware elimination (ties by sensitivity)."""
    from .grams import consumer_grams
    from .probe import EVAL_POINTS
    from .selection import refit_ranking

    sc = _pfp(None, "weighted")(req)
    groups = [g for g in req.groups if g.gid in sc.scores]
    consumers = {c.name: c.module for g in groups for c in g.consumers}
    # the points after the probe's judged ones (a loader of S alone is used whole)
    loader = req.postprocess_loader or req.calib_loader
    skip = EVAL_POINTS if req.postprocess_loader is not None else 0
    sc.grams = consumer_grams(req.model, consumers, loader, req.device, skip=skip)
    sc.scores = refit_ranking(groups, sc.scores, sc.grams)
    return sc


register_method(Method(
    "pfp", _pfp_refit, "search", top_up=False, reconstruct=True,
    description="PFP's objective made the criterion: channels ranked by how well the refit keeps the consumers' "
    "pre-activations without them (ties by empirical sensitivity), budgets by a search on measured output error, "
    "then refit and BN recalibration",
))
register_method(Method(
    "pfp_sensitivity", _pfp(None, "weighted"), "mass_bound", top_up=False, reconstruct=True, randomized_ok=True,
    description="PFP's empirical sensitivities (consumers weighted by their share) with per-layer tolerances "
    "eps_l from the dropped sensitivity mass, minimising sum log(1 + eps_l) at the target",
))
register_method(Method(
    "pfp_reference", _pfp("max_offset", "max"), "single_eps", top_up=False, randomized_ok=True,
    description="the paper's method as its reference code runs it: max-offset sensitivity, one global eps",
))
register_method(Method("ft", _plain(lambda r: norm_scores(r.groups, 1)), "uniform",
                       description="L1 norm of the filters, same ratio per layer (Li et al. 2017)"))
register_method(Method("sfp", _plain(lambda r: norm_scores(r.groups, 2)), "uniform", soft=True,
                       description="L2 norm, zeroed but trainable during retraining (He et al. 2018)"))
register_method(Method("fpgm", _plain(lambda r: fpgm_scores(r.groups)), "uniform",
                       description="distance to the geometric median (He et al. 2019)"))
register_method(Method("hrank", _plain(lambda r: hrank_scores(r.model, r.groups, r.calib_loader, r.device)),
                       "uniform", description="mean feature-map rank over S (Lin et al. 2020)"))
register_method(Method("random", _plain(lambda r: random_scores(r.groups, r.seed)), "uniform",
                       description="uniformly random channels"))
for _kind in ("tp_magnitude", "tp_taylor"):
    register_method(Method(
        _kind, _plain(lambda r, k=_kind: tp_scores(r.model, r.groups, k, r.calib_loader, r.device)), "global",
        description=f"Torch-Pruning's group {_kind[3:]} importance, one global threshold",
    ))
