"""Per-group channel budgets (spec sections 3 and 5).

The paper turns one global tolerance eps into a kept-channel count per group through the
Bernstein sample-size bound (`pfp_counts`, `solve`); the baselines use one keep ratio for all
groups (uniform) or one threshold on normalised scores (global). Each of those maps a scalar
knob to counts, monotonically, and `solve` bisects the knob until the predicted resource
meets the target.

`bound_counts` keeps the bound but drops the single eps: it inverts the bound per group
(eps_g(k), the tolerance at which k channels suffice) and chooses per-layer tolerances that
minimise the composed error bound sum_g log(1 + eps_g) at the target resource, with a
steepest-descent walk on the exact resource model (`greedy_counts`) and a greedy spend of
the remainder by gain per unit of cost.
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


# ----------------------------------------------------------------------------- per-layer eps
def eps_at_sample_size(g: GroupStats, m: torch.Tensor, delta: float) -> torch.Tensor:
    """The eps at which the bound asks for m samples: the root of m eps^2 = 3 alpha S (6 + 2 eps)."""
    a_s = alpha(g.kernel, g.positions, delta) * g.mass
    m = m.double()
    return (6 * a_s + torch.sqrt(36 * a_s**2 + 72 * m * a_s)) / (2 * m)


def eps_for_counts(g: GroupStats, counts: list[int], delta: float) -> torch.Tensor:
    """eps_g(k) for each k in counts: the smallest tolerance at which the bound keeps <= k channels.

    0 where k keeps every channel with mass (no error is introduced). Vectorised over k:
    M_k, the largest m whose expected number of distinct draws is <= k, is found by one
    bisection in log m for all k at once.
    """
    k = torch.tensor(counts, dtype=torch.float64)
    out = torch.zeros_like(k)
    if g.mass <= 0:
        return out
    p = (g.sensitivity.double() / g.mass).clamp(min=0)
    n_pos = int((p > 0).sum())
    todo = k < n_pos
    if not bool(todo.any()):
        return out
    logq = torch.log1p(-p[p > 0].clamp(max=1 - 1e-15))  # [n_pos]
    kt = k[todo]

    def distinct(m: torch.Tensor) -> torch.Tensor:  # [K] -> E[#distinct] [K]
        return (1 - torch.exp(m.unsqueeze(1) * logq.unsqueeze(0))).sum(1)

    lo = torch.zeros_like(kt)  # log m: E(1) = 1 <= k always
    hi = torch.full_like(kt, 1.0)
    while True:  # grow hi until E(e^hi) > k for every k (k < n_pos makes this finite)
        over = distinct(torch.exp(hi)) <= kt
        if not bool(over.any()) or float(hi.max()) > 80:
            break
        hi = torch.where(over, hi * 2, hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        ok = distinct(torch.exp(mid)) <= kt + 1e-9
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    # the bound's m is a whole number: the largest one that still keeps <= k, then an eps just
    # past it, so that pfp_counts(eps_g(k)) == k
    m = torch.floor(torch.exp(lo) * (1 + 1e-12)).clamp(min=1)
    out[todo] = eps_at_sample_size(g, m, delta) * (1 + 1e-7)
    return out


@dataclass
class BoundAllocation:
    counts: list[int]
    eps: list[float]  # eps_g at the kept counts
    multiplier: float  # the last step's bound rise per unit of resource (the walk's price)


def allowed_counts(size: int, multiple: int, minimum: int) -> list[int]:
    """Every count round_count can return for this group, ascending."""
    return sorted({round_count(k, size, multiple, minimum) for k in range(1, size + 1)})


def mass_eps(g: GroupStats, counts: list[int]) -> torch.Tensor:
    """The deterministic tolerance of keeping the k most sensitive channels: the dropped mass.

    Channel j's share of any unit's pre-activation (W+ and W- parts alike) is at most s_j on
    every point of S, so dropping the set D moves each pre-activation by at most
    sum_{j in D} s_j of itself: a (1 +/- eps) guarantee on S with eps = that sum.
    """
    ranked = torch.sort(g.sensitivity.double(), descending=True).values
    tail = torch.cat([ranked.flip(0).cumsum(0).flip(0), ranked.new_zeros(1)])  # tail[k] = sum of ranked[k:]
    return tail[torch.tensor(counts, dtype=torch.long)]


def bound_counts(stats: list[GroupStats], delta: float, resource_of: Callable[[list[int]], float], target: float,
                 multiple: int = 1, minimum: int = 1, kind: str = "sample",
                 cands: list[list[int]] | None = None) -> BoundAllocation:
    """Per-layer tolerances minimising sum_g log(1 + eps_g(k_g)) subject to resource(k) <= target.

    kind="sample": eps_g(k) from the Bernstein sample-size bound (eps_for_counts);
    kind="mass": eps_g(k) is the sensitivity mass of the dropped channels (mass_eps);
    kind="mass_sum": the same eps_g, minimising sum_g eps_g instead of its logarithms.
    The counts are chosen by greedy_counts on the exact resource model, among `cands` per group
    (e.g. a latency table's staircase counts) or else the multiples of `multiple`.
    """
    cands = cands or [allowed_counts(g.size, multiple, minimum) for g in stats]
    if kind in ("mass", "mass_sum"):
        eps = [mass_eps(g, c) for g, c in zip(stats, cands)]
    else:
        eps = [eps_for_counts(g, c, delta) for g, c in zip(stats, cands)]
    # kind "mass_sum" minimises sum eps_g itself (the first-order size of the composed bound)
    objective = eps if kind == "mass_sum" else [torch.log1p(e) for e in eps]
    counts, lam = greedy_counts(cands, objective, resource_of, target)
    return BoundAllocation(counts, [float(e[c.index(k)]) for e, c, k in zip(eps, cands, counts)], lam)


def greedy_counts(cands: list[list[int]], bound: list[torch.Tensor], resource_of: Callable[[list[int]], float],
                  target: float) -> tuple[list[int], float]:
    """min sum_g bound[g][k_g] over k_g in cands[g] s.t. resource_of(k) <= target: (counts, last ratio).

    Steepest descent on the exact resource: from every group whole, take the one-step cut
    with the least objective increase per unit of resource saved, until the target is met;
    then spend what is left on the steps with the most objective decrease per unit of cost.
    The resource is bilinear in the counts, so each step's saving is measured where the
    cut stands, not linearised once. A greedy walk, not a Lagrangian: the per-group curves
    can be far from convex (the first channel removed can cost more than the next five),
    and a multiplier then jumps a group from whole to its minimum in one go.
    """
    idx = [len(c) - 1 for c in cands]
    counts = [c[-1] for c in cands]
    current = resource_of(counts)
    ratio = 0.0
    while current > target:
        best, best_ratio, best_r = None, math.inf, current
        for i, c in enumerate(cands):
            if idx[i] == 0:
                continue
            trial = list(counts)
            trial[i] = c[idx[i] - 1]
            r = resource_of(trial)
            saved = current - r
            if saved <= 0:
                continue
            rise = float(bound[i][idx[i] - 1] - bound[i][idx[i]])
            q = max(rise, 0.0) / saved
            if q < best_ratio:
                best, best_ratio, best_r = i, q, r
        if best is None:  # nothing left to cut
            break
        idx[best] -= 1
        counts[best] = cands[best][idx[best]]
        current, ratio = best_r, best_ratio
    while True:  # spend the remainder
        best, best_ratio, best_r = None, -1.0, current
        for i, c in enumerate(cands):
            if idx[i] + 1 >= len(c):
                continue
            trial = list(counts)
            trial[i] = c[idx[i] + 1]
            r = resource_of(trial)
            if r > target:
                continue
            q = float(bound[i][idx[i]] - bound[i][idx[i] + 1]) / max(r - current, 1e-30)
            if q > best_ratio:
                best, best_ratio, best_r = i, q, r
        if best is None:
            return counts, ratio
        idx[best] += 1
        counts[best] = cands[best][idx[best]]
        current = best_r
