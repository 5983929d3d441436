"""The guarantee, measured: how far each consumer's pre-activations move, on held-out points.

PFP's statement is layer-local: with probability 1 - delta, each consumer's pre-activation
on a point stays within (1 +/- eps_l) of the unpruned network's. This module feeds every
consumer the unpruned network's own input, once to the original layer and once (only the
kept channels) to the final pruned layer, and reports the relative error
|z_hat - z| / |z| over all (point, unit, position) values: its p50, p95 and max, the
smallest eps inside which 95% and 99% of the values stay, and the share inside the
theoretical eps_l. Measured figures first: at useful compression eps_l is in the hundreds,
and a 100% coverage there says nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hooks import eval_mode

MAX_VALUES = 1 << 21  # values kept per layer for the quantiles; the max is exact


@dataclass
class LayerMeasurement:
    name: str
    eps: float | None  # theoretical eps_l (the tightest of the groups the layer reads)
    delta: float | None
    values: int  # (point, unit, position) values measured
    rel_p50: float
    rel_p95: float
    rel_max: float
    eps95: float  # smallest eps holding 95% of the values inside (1 +/- eps)
    eps99: float
    inside_eps: float | None  # share of values inside the theoretical eps_l

    def to_dict(self) -> dict:
        return asdict(self)


def _apply(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return F.conv2d(a, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(a, module.weight, module.bias)


def measure(original: nn.Module, pruned: nn.Module, kept_in: dict[str, torch.Tensor],
            kept_out: dict[str, torch.Tensor], loader, device="cpu", eps: dict[str, float] | None = None,
            delta: float | None = None) -> list[LayerMeasurement]:
    """Relative pre-activation error of each consumer in kept_in (original input index kept, in order).

    kept_out gives the output units a layer kept (all when absent): only those are compared.
    """
    eps = eps or {}
    pruned_mods = dict(pruned.named_modules())
    orig_mods = dict(original.named_modules())
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in kept_in}
    stats = {n: {"values": 0, "max": 0.0, "inside": 0} for n in kept_in}
    budget = {n: MAX_VALUES for n in kept_in}

    def hook(name: str):
        small = pruned_mods[name]

        def fn(mod, inputs, output):
            a = inputs[0].detach()
            idx = kept_in[name].to(a.device)
            a_kept = a.index_select(1 if isinstance(mod, nn.Conv2d) else a.dim() - 1, idx)
            z_hat = _apply(small, a_kept.to(small.weight.dtype))
            z = output.detach()
            if name in kept_out:
                z = z.index_select(1 if isinstance(mod, nn.Conv2d) else z.dim() - 1, kept_out[name].to(z.device))
            rel = ((z_hat - z).abs() / z.abs().clamp(min=1e-12)).flatten().double().cpu()
            st = stats[name]
            st["values"] += rel.numel()
            st["max"] = max(st["max"], float(rel.max())) if rel.numel() else st["max"]
            if name in eps:
                st["inside"] += int((rel <= eps[name]).sum())
            take = min(rel.numel(), budget[name])
            if take:
                step = max(1, rel.numel() // take)
                samples[name].append(rel[::step][:take])
                budget[name] -= take

        return fn

    handles = [orig_mods[n].register_forward_hook(hook(n)) for n in kept_in]
    with eval_mode(original, handles), eval_mode(pruned), torch.no_grad():
        for batch in loader:
            original(batch[0].to(device))
    out = []
    for name in kept_in:
        st = stats[name]
        if not st["values"]:
            continue
        vals = torch.cat(samples[name])
        q = torch.quantile(vals, torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64)).tolist()
        e = eps.get(name)
        out.append(LayerMeasurement(name=name, eps=e, delta=delta if e is not None else None, values=st["values"],
                              rel_p50=q[0], rel_p95=q[1], rel_max=st["max"], eps95=q[1], eps99=q[2],
                              inside_eps=st["inside"] / st["values"] if e is not None else None))
    return out
