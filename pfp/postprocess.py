"""What every method may do after removal: BatchNorm recalibration and reconstruction.

Both run on held-out training images (never the test set). Their order matters: the refit
restores each consumer's unpruned pre-activations, for which the original BatchNorm
statistics are already right, and recalibrating those afterwards can undo the refit. So
when both are on, three candidates are measured on held-out points by how far the network's
outputs move from the unpruned network's (no labels needed, any task): the refit alone,
the refit then every BN recalibrated, and the refit then only the BNs it did not restore.
The best one is kept and named in the report.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .hooks import eval_mode
from .reconstruct import reconstruct
from .recalibrate import recalibrate_batchnorm

log = logging.getLogger(__name__)


@dataclass
class PostprocessReport:
    reconstruct: bool
    bn_recalibration: bool
    order: str | None = None  # the candidate kept: refit, refit+bn, refit+bn_unrestored, bn
    output_error: dict[str, float] = field(default_factory=dict)  # candidate -> relative output error
    refit_layers: list[dict] = field(default_factory=list)
    bn_points: int = 0
    seconds: float = 0.0
    reconstruct_seconds: float = 0.0
    reconstruct_peak_bytes: int = 0


def output_error(original: nn.Module, pruned: nn.Module, loader, device) -> float:
    """||f_pruned(x) - f(x)||^2 / ||f(x)||^2 over the loader's points."""
    num = den = 0.0
    with eval_mode(original), eval_mode(pruned), torch.no_grad():
        for batch in loader:
            x = batch[0].to(device)
            y, y_hat = original(x), pruned(x)
            num += float((y_hat - y).double().pow(2).sum())
            den += float(y.double().pow(2).sum())
    return num / max(den, 1e-30)


def _bns_after(model: nn.Module, layers: set[str], example: torch.Tensor) -> set[str]:
    """BatchNorms whose input is the output of one of `layers` (those the refit restores)."""
    produced: dict[int, str] = {}
    follows: set[str] = set()
    names = {m: n for n, m in model.named_modules()}

    def out_hook(mod, inp, out):
        produced[id(out)] = names[mod]

    def bn_hook(mod, inp):
        if produced.get(id(inp[0])) in layers:
            follows.add(names[mod])

    handles = [m.register_forward_hook(out_hook) for n, m in model.named_modules() if n in layers]
    handles += [m.register_forward_pre_hook(bn_hook) for m in model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with eval_mode(model, handles), torch.no_grad():
        model(example)
    return follows


def postprocess(original: nn.Module, pruned: nn.Module, shrunk: list[str], loader, holdout_loader, device="cpu", *,
                reconstruct_on: bool, bn_on: bool, ridge: float, points: int,
                kept_out: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, PostprocessReport]:
    """Apply the post-processing switched on; returns the (possibly replaced) model and what was done.

    shrunk: the Conv2d/Linear layers whose inputs lost channels; kept_out: the original output
    units each layer kept (for those that lost outputs too). holdout_loader decides the order
    when both are on (the loader itself when there is none).
    """
    start = time.perf_counter()
    rep = PostprocessReport(reconstruct=reconstruct_on and bool(shrunk), bn_recalibration=bn_on)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in pruned.modules())
    if rep.reconstruct:
        fit = reconstruct(original, pruned, shrunk, loader, device, ridge=ridge, max_points=points, kept_out=kept_out)
        rep.refit_layers = [vars(f).copy() for f in fit.layers]
        rep.reconstruct_seconds, rep.reconstruct_peak_bytes = fit.seconds, fit.peak_bytes
    if not (bn_on and has_bn):
        rep.order = "refit" if rep.reconstruct else None
        rep.seconds = time.perf_counter() - start
        return pruned, rep
    if not rep.reconstruct:
        rep.bn_points = recalibrate_batchnorm(pruned, loader, device, max_points=points)
        rep.order = "bn"
        rep.seconds = time.perf_counter() - start
        return pruned, rep

    judge = holdout_loader if holdout_loader is not None else loader
    example = next(iter(loader))[0][:1].to(device)
    applied = {f["name"] for f in rep.refit_layers if f["applied"]}
    all_bns = {n for n, m in pruned.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    unrestored = all_bns - _bns_after(pruned, applied, example)
    candidates: dict[str, nn.Module] = {"refit": pruned}
    for label, only in (("refit+bn", None), ("refit+bn_unrestored", unrestored)):
        if only is not None and (not only or only == all_bns):  # nothing, or the same as refit+bn
            continue
        model = copy.deepcopy(pruned)
        n = recalibrate_batchnorm(model, loader, device, max_points=points, only=only)
        rep.bn_points = max(rep.bn_points, n)
        candidates[label] = model
    for label, model in candidates.items():
        rep.output_error[label] = output_error(original, model, judge, device)
    rep.order = min(rep.output_error, key=rep.output_error.get)
    log.info("post-processing: kept %s (relative output error %s)", rep.order,
             ", ".join(f"{k} {v:.4g}" for k, v in rep.output_error.items()))
    rep.seconds = time.perf_counter() - start
    return candidates[rep.order], rep
