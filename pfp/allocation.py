"""Per-group channel budgets (spec sections 3 and 5).

PFP turns one global tolerance eps into a kept-channel count per group through the
Bernstein sample-size bound; the baselines use one keep ratio for all groups (uniform) or
one threshold on normalised scores (global). Each allocator maps a scalar knob to counts,
monotonically, and `solve` bisects the knob until the predicted resource meets the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

C_CONST = 3.0


@dataclass
class GroupStats:
    """What the PFP bound needs of a group."""

    size: int
    sensitivity: torch.Tensor  # s_j, one per channel
    kernel: int  # K_g
    positions: int  # P_g

    @property
    def mass(self) -> float:  # S_g
        return float(self.sensitivity.sum())


def calibration_size(eta_total: int, eta_max: int, delta: float, c: float = C_CONST) -> int:
    """|S| = ceil(C ln(8 eta_max / delta')), delta' = delta / eta (spec section 5)."""
    delta_prime = delta / max(1, eta_total)
    return math.ceil(c * math.log(8 * max(1, eta_max) / delta_prime))


def alpha(kernel: int, positions: int, delta: float, c: float = C_CONST) -> float:
    return 2 * c * math.log(8 * (positions + 1) * kernel / delta)


def sample_size(g: GroupStats, eps: float, delta: float) -> float:
    """m_g(eps) = ceil(3 (6 + 2 eps) alpha_g S_g / eps^2)."""
    # a float: at tiny eps m exceeds 2**63, which torch cannot take as an integer scalar
    return float(math.ceil(3 * (6 + 2 * eps) * alpha(g.kernel, g.positions, delta) * g.mass / eps**2))


def expected_distinct(p: torch.Tensor, m: float) -> float:
    """E[#distinct channels] after m i.i.d. draws from p: sum_j 1 - (1 - p_j)^m."""
    if m <= 0:
        return 0.0
    m = float(m)
    p = p.double()
    return float((1 - torch.exp(m * torch.log1p(-p.clamp(max=1 - 1e-15)))).sum())


def round_count(k: int, size: int, multiple: int, minimum: int) -> int:
    """Clip to [minimum, size]; round up to `multiple` where the layer is a multiple of it.

    Narrow layers (6 channels in LeNet5) are left free: rounding them to 8 would not prune.
    """
    k = max(min(k, size), min(minimum, size))
    if multiple > 1 and size % multiple == 0 and size > multiple:
        k = min(size, math.ceil(k / multiple) * multiple)
    return k


def pfp_counts(stats: list[GroupStats], eps: float, delta: float, multiple: int = 1, minimum: int = 1,
               eps_scale: list[float] | None = None) -> list[int]:
    """k_g(eps * eps_scale[g]) for every group (eps_scale: all ones is the paper's one eps)."""
    out = []
    for gi, g in enumerate(stats):
        eps_g = eps * (eps_scale[gi] if eps_scale else 1.0)
        S = g.mass
        if S <= 0:  # no measured mass at all: nothing to protect, keep the minimum
            out.append(round_count(minimum, g.size, multiple, minimum))
            continue
        m = sample_size(g, eps_g, delta)
        k = math.ceil(expected_distinct(g.sensitivity / S, m) - 1e-9)
        out.append(round_count(k, g.size, multiple, minimum))
    return out


def cost_scales(costs: list[float], exponent: float) -> list[float]:
    """eps_g / eps = (cost per channel of g / geometric mean cost) ** exponent.

    exponent 0 is the paper's single tolerance; > 0 gives layers whose channels cost more of
    the budgeted resource a looser tolerance, so cheap layers are not cut for nothing.
    """
    if exponent == 0 or not costs:
        return [1.0] * len(costs)
    logs = [math.log(max(c, 1e-12)) for c in costs]
    mean = sum(logs) / len(logs)
    return [math.exp(exponent * (l - mean)) for l in logs]


def uniform_counts(sizes: list[int], ratio: float, multiple: int = 1, minimum: int = 1) -> list[int]:
    return [round_count(math.ceil(ratio * n - 1e-9), n, multiple, minimum) for n in sizes]


def global_counts(scores: list[torch.Tensor], threshold: float, multiple: int = 1, minimum: int = 1) -> list[int]:
    return [round_count(int((s > threshold).sum()), len(s), multiple, minimum) for s in scores]


@dataclass
class Solution:
    knob: float
    counts: list[int]
    resource: float


def solve(counts_at: Callable[[float], list[int]], resource_of: Callable[[list[int]], float], target: float,
          lo: float, hi: float, *, log_scale: bool, decreasing: bool, iters: int = 60) -> Solution:
    """Bisect the knob for the largest resource not above target.

    decreasing: resource falls as the knob grows (PFP's eps, a global threshold).
    Counts are integers, so the resource is a step function: the result may sit below the
    target by a step; `top_up` spends the rest.
    """
    f = (lambda t: math.log(t)) if log_scale else (lambda t: t)
    finv = (lambda t: math.exp(t)) if log_scale else (lambda t: t)
    a, b = f(lo), f(hi)
    best_under: Solution | None = None
    best_over: Solution | None = None
    for _ in range(iters):
        mid = (a + b) / 2
        counts = counts_at(finv(mid))
        r = resource_of(counts)
        sol = Solution(finv(mid), counts, r)
        if r <= target:
            if best_under is None or r > best_under.resource:
                best_under = sol
            if decreasing:
                b = mid
            else:
                a = mid
        else:
            if best_over is None or r < best_over.resource:
                best_over = sol
            if decreasing:
                a = mid
            else:
                b = mid
    if best_under is not None:
        return best_under
    return best_over  # type: ignore[return-value]


def top_up(counts: list[int], sizes: list[int], scores: list[torch.Tensor], resource_of: Callable[[list[int]], float],
           target: float, multiple: int = 1) -> list[int]:
    """Spend what the bisection left below target: add channels where the next one scores best.

    Counts are integers and many groups cross a step at the same knob value, so the best
    knob can leave a few percent unused; this closes the gap to within one channel step.
    Scores are compared after dividing by their group's mean, as global pruning does.
    """
    counts = list(counts)
    ranked = [torch.sort(s.double(), descending=True).values / max(float(s.double().mean()), 1e-30) for s in scores]
    steps = [multiple if multiple > 1 and n % multiple == 0 and n > multiple else 1 for n in sizes]
    blocked: set[int] = set()
    while True:
        best, best_score = None, -math.inf
        for i, (k, n) in enumerate(zip(counts, sizes)):
            if i in blocked or k >= n:
                continue
            nxt = float(ranked[i][k]) if k < len(ranked[i]) else -math.inf
            if nxt > best_score:
                best, best_score = i, nxt
        if best is None:
            return counts
        trial = list(counts)
        trial[best] = min(sizes[best], counts[best] + steps[best])
        if resource_of(trial) <= target:
            counts = trial
        else:
            blocked.add(best)
