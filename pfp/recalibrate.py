"""BatchNorm recalibration: re-estimate running statistics after the network changed.

Pruning (and the refit) changes what reaches each BatchNorm, so the statistics of the
unpruned network no longer normalise it. One pass over held-out points in train mode for
the BatchNorms only (dropout and the rest stay in eval mode) re-estimates them as a
cumulative average over the whole pass, not an exponential one that would forget the
first batches.
"""
from __future__ import annotations

import logging
from collections.abc import Collection

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

__all__ = ["recalibrate_batchnorm"]


def recalibrate_batchnorm(model: nn.Module, loader, device="cpu", *, max_points: int = 1024,
                          only: Collection[str] | None = None) -> int:
    """Re-estimate BatchNorm running statistics on up to max_points inputs; returns points used.

    Only BatchNorms tracking running stats are touched (all, or those named in `only`;
    a name there that is not a BatchNorm raises ValueError). Every module's training flag
    and each BatchNorm's momentum are restored afterwards. Returns 0 and changes nothing
    when there is nothing to recalibrate.
    """
    mods = dict(model.named_modules())
    if only is not None:
        wrong = sorted(n for n in only if not isinstance(mods.get(n), _BatchNorm))
        if wrong:
            raise ValueError(f"recalibrate_batchnorm: not BatchNorm modules of the model: {', '.join(wrong)}")
    bns = [m for n, m in mods.items()
           if isinstance(m, _BatchNorm) and m.track_running_stats and (only is None or n in only)]
    if not bns or max_points <= 0:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in bns]
    used = 0
    try:
        model.eval()
        for m in bns:
            m.train()
        with torch.no_grad():
            for batch in loader:
                if used >= max_points:
                    break
                x = batch if isinstance(batch, torch.Tensor) else batch[0]
                x = x[: max_points - used].to(device)
                n = x.shape[0]
                if n == 0:
                    continue
                if used == 0:  # not before: an empty loader leaves the statistics alone
                    for m in bns:
                        m.reset_running_stats()
                # momentum n/seen: the cumulative average of momentum=None, but weighted by
                # points, so a short last batch does not count as much as a full one
                for m in bns:
                    m.momentum = n / (used + n)
                model(x)
                used += n
    finally:
        for m, mom in momenta:
            m.momentum = mom
        for m, was in flags:
            m.training = was
    log.info("recalibrate_batchnorm: %d BatchNorm layers on %d points", len(bns), used)
    return used
