"""Channel budgets: a small registry of allocators, each turning scores into kept counts.

An allocator gets the groups' scores (and PFP's bound statistics where the method has them),
the exact resource model as a function of the kept counts, and the target; it returns a
count per group and, where it has one, the per-group tolerance eps_g. A new allocator is one
`register_allocator` call; `pfp.methods` names each method's default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from . import allocation as alloc
from .errors import CoreError

if TYPE_CHECKING:
    from .probe import OutputProbe


class BudgetError(CoreError, ValueError):
    """An allocator that cannot serve the method it was asked for."""


@dataclass
class BudgetRequest:
    sizes: list[int]
    scores: list[torch.Tensor]
    stats: list[alloc.GroupStats] | None  # PFP's bound statistics; None for the baselines
    resource_of: Callable[[list[int]], float]
    target: float
    multiple: int
    minimum: int
    delta: float
    probe: "OutputProbe | None" = None  # measured output error of a budget, for the search allocators
    # per group, the counts worth keeping (a latency table's staircases); None: multiples of `multiple`
    candidates: list[list[int]] | None = None

    def allowed(self, i: int) -> list[int]:
        """The counts group i may keep, ascending."""
        if self.candidates is not None:
            return self.candidates[i]
        return alloc.allowed_counts(self.sizes[i], self.multiple, self.minimum)


@dataclass
class Budget:
    counts: list[int]
    eps: list[float] | None = None  # per group, where the allocator works with the bound
    knob: float | None = None  # the solved scalar: the global eps, a ratio, a threshold, a measured divergence
    global_eps: float | None = None  # one tolerance for every layer (the paper's rule)
    notes: list[str] = field(default_factory=list)


Allocator = Callable[[BudgetRequest], Budget]
ALLOCATORS: dict[str, Allocator] = {}
MEASURING: set[str] = set()  # allocators that judge budgets on held-out images (they need a probe)


def register_allocator(name: str, measures: bool = False) -> Callable[[Allocator], Allocator]:
    def deco(fn: Allocator) -> Allocator:
        ALLOCATORS[name] = fn
        if measures:
            MEASURING.add(name)
        return fn

    return deco


def allocate(name: str, req: BudgetRequest) -> Budget:
    """Run allocator `name`; a resource already at or under the target keeps every channel."""
    if name not in ALLOCATORS:
        raise BudgetError(f"prune.allocation: unknown allocator {name!r}; known: {', '.join(ALLOCATORS)}")
    if req.resource_of(req.sizes) <= req.target:
        return Budget(list(req.sizes))
    return ALLOCATORS[name](req)


def _need_stats(req: BudgetRequest, name: str) -> list[alloc.GroupStats]:
    if req.stats is None:
        raise BudgetError(f"prune.allocation: {name} needs PFP's sensitivities; use it with method pfp or pfp_reference")
    return req.stats


@register_allocator("single_eps")
def single_eps(req: BudgetRequest) -> Budget:
    """The paper's rule: one global eps through the sample-size bound, bisected to the target."""
    stats = _need_stats(req, "single_eps")
    sol = alloc.solve(lambda e: alloc.pfp_counts(stats, e, req.delta, req.multiple, req.minimum), req.resource_of,
                      req.target, 1e-8, 1e12, log_scale=True, decreasing=True, iters=80)
    return Budget(sol.counts, [sol.knob] * len(stats), sol.knob, global_eps=sol.knob)


def _bound(name: str, kind: str, doc: str) -> Allocator:
    """An allocator on the exact resource model with per-layer eps_g of `kind` (pfp.allocation.bound_counts)."""
    def allocator(req: BudgetRequest) -> Budget:
        sol = alloc.bound_counts(_need_stats(req, name), req.delta, req.resource_of, req.target, req.multiple,
                                 req.minimum, kind=kind, cands=req.candidates)
        return Budget(sol.counts, sol.eps, sol.multiplier)
    allocator.__name__, allocator.__doc__ = name, doc
    return register_allocator(name)(allocator)


mass_bound = _bound("mass_bound", "mass",
                    "Per-layer eps_g = sensitivity mass dropped, minimising sum log(1 + eps_g) at the target.")
mass_sum = _bound("mass_sum", "mass_sum",
                  "Per-layer eps_g = sensitivity mass dropped, minimising sum eps_g at the target.")
sample_bound = _bound("sample_bound", "sample",
                      "Per-layer eps_g from the sample-size bound, minimising sum log(1 + eps_g) at the target.")


@register_allocator("holdout", measures=True)
def holdout(req: BudgetRequest, points: int = 8) -> Budget:
    """Per-group output-error curves measured on held-out images, summed and minimised at the target.

    Each group's error at `points` counts (the others whole) is measured, interpolated in
    between and made non-increasing in k; allocation.greedy_counts then
    trades measured error against exact cost.
    """
    if req.probe is None:
        raise BudgetError("prune.allocation: holdout needs held-out images (a post-processing loader)")
    curves, cands = [], []
    for gi, n in enumerate(req.sizes):
        c = req.allowed(gi)
        picks = sorted({c[round(i * (len(c) - 1) / max(1, points - 1))] for i in range(points)})
        measured = torch.tensor([req.probe.error(gi, k) for k in picks], dtype=torch.float64)
        curve = torch.from_numpy(np.interp(c, picks, measured.numpy()))
        curve = torch.flip(torch.cummax(torch.flip(curve, [0]), 0).values, [0])  # fewer channels, never less error
        curves.append(curve)
        cands.append(c)
    counts, _ = alloc.greedy_counts(cands, curves, req.resource_of, req.target)
    total = sum(float(cv[c.index(k)]) for cv, c, k in zip(curves, cands, counts))
    return Budget(counts, None, total, notes=[f"summed per-group divergence {total:.4g}, {req.probe.calls} probes"])


@register_allocator("search", measures=True)
def search(req: BudgetRequest, steps: int = 8, groups_per_step: int = 8, lazy: bool = False) -> Budget:
    """Greedy search on the measured output error of the whole budget (all cuts at once).

    From every group whole, each round tries one more step down in every group (a step is
    about 1/`steps` of the group, a multiple of round_to), measures the output divergence on
    held-out images with all cuts applied and their consumers refit, and takes the step with
    the least divergence added per unit of resource saved, until the target is met. Cuts
    interact (two halved layers hurt more than the sum of each alone), which per-group curves
    cannot see; here every step is judged where the budget stands.

    A network of many groups takes the best 1 in `groups_per_step` of the round's steps at
    once, so the number of probes grows with the groups, not with their square. With `lazy`
    (the `search_lazy` allocator) it also probes lazily (`_lazy_round`): a step is re-measured
    in stale-cost order only until the steps taken are known to be the round's best. About 3x
    fewer probes, at some cost: ResNet56 at 30% of FLOPs ended 50% further from the unpruned
    outputs (docs/method.md), so it is not the default.
    """
    if req.probe is None:
        raise BudgetError("prune.allocation: search needs held-out images (a post-processing loader)")
    cands = [req.allowed(i) for i in range(len(req.sizes))]
    stride = [max(1, len(c) // steps) for c in cands]
    idx = [len(c) - 1 for c in cands]
    counts = [c[-1] for c in cands]
    take = max(1, len(cands) // groups_per_step)
    current, err = req.resource_of(counts), 0.0
    stale: dict[int, float] = {}  # group -> its next step's cost per saving when last measured

    def step_of(i: int) -> tuple[float, int, int, float] | None:
        """Group i's next step from where the budget stands, measured: (cost per saving, i, j, error)."""
        c = cands[i]
        if idx[i] == 0:
            return None
        j = max(0, idx[i] - stride[i])
        trial = list(counts)
        trial[i] = c[j]
        r = req.resource_of(trial)
        if r >= current:
            return None
        if r < req.target:  # the last step: go no lower than needed
            while j + 1 < idx[i] and req.resource_of(trial[:i] + [c[j + 1]] + trial[i + 1:]) <= req.target:
                j += 1
            trial[i] = c[j]
            r = req.resource_of(trial)
        e = req.probe.joint(trial)
        # a step past the target is credited only with the saving the target needed
        return (e - err) / (current - max(r, req.target)), i, j, e

    while current > req.target:
        tried = _lazy_round(len(cands), take, stale, step_of) if lazy and take > 1 \
            else [t for i in range(len(cands)) if (t := step_of(i)) is not None]
        if not tried:
            break
        tried.sort()
        _, i, j, err = tried[0]
        idx[i], counts[i] = j, cands[i][j]
        stale.pop(i, None)
        current = req.resource_of(counts)
        for _, i, j, _ in tried[1:take]:  # many groups: the next best steps of this round too
            if current <= req.target:
                break
            idx[i], counts[i] = j, cands[i][j]
            stale.pop(i, None)
            current = req.resource_of(counts)
        if take > 1:
            err = req.probe.joint(counts)
    while True:  # spend what the last step left: the add-back that lowers the divergence most per cost
        best = None
        for i, c in enumerate(cands):
            j = idx[i]  # the largest add-back of at most one stride that still fits
            while j + 1 < len(c) and j + 1 <= idx[i] + stride[i] and \
                    req.resource_of(counts[:i] + [c[j + 1]] + counts[i + 1:]) <= req.target:
                j += 1
            if j == idx[i]:
                continue
            trial = counts[:i] + [c[j]] + counts[i + 1:]
            r = req.resource_of(trial)
            e = req.probe.joint(trial)
            q = (err - e) / max(r - current, 1e-30)
            if best is None or q > best[0]:
                best = (q, i, j, r, e)
        if best is None:
            break
        _, i, j, current, err = best
        idx[i], counts[i] = j, cands[i][j]
    return Budget(counts, None, err, notes=[f"output divergence {err:.4g} after {req.probe.calls} probes"])


@register_allocator("search_lazy", measures=True)
def search_lazy(req: BudgetRequest) -> Budget:
    """`search` with lazy rounds on networks of 16 groups or more: fewer probes, a little worse budgets."""
    return search(req, lazy=True)


def _lazy_round(n: int, take: int, stale: dict[int, float], step_of) -> list[tuple[float, int, int, float]]:
    """One round's `take` best steps, measuring as few as it can (lazy greedy).

    Groups are measured in the order of their stale cost (never measured, or just stepped:
    first); the round stops once `take` fresh costs are no higher than the next stale one.
    A stale cost stands in for a fresh one on the assumption that cutting elsewhere does not
    make a step cheaper; the refits break it often enough that lazy budgets come out worse,
    which is why `search_lazy` is opt-in. `stale` is updated.
    """
    order = sorted(range(n), key=lambda i: stale.get(i, float("-inf")))
    fresh: list[tuple[float, int, int, float]] = []
    for i in order:
        if len(fresh) >= take and sorted(fresh)[take - 1][0] <= stale.get(i, float("-inf")):
            break
        t = step_of(i)
        if t is None:
            stale.pop(i, None)
            continue
        stale[i] = t[0]
        fresh.append(t)
    return fresh


@register_allocator("uniform")
def uniform(req: BudgetRequest) -> Budget:
    """The same keep ratio in every group (FT, SFP, FPGM, HRank, random)."""
    sol = alloc.solve(lambda r: alloc.uniform_counts(req.sizes, r, req.multiple, req.minimum), req.resource_of,
                      req.target, 0.0, 1.0, log_scale=False, decreasing=False)
    return Budget(sol.counts, knob=sol.knob)


@register_allocator("global")
def global_threshold(req: BudgetRequest) -> Budget:
    """One threshold on scores normalised by their group's mean (Torch-Pruning's global pruning)."""
    ordered = [s.double() / max(float(s.double().mean()), 1e-30) for s in req.scores]
    flat = torch.cat(ordered)
    sol = alloc.solve(lambda t: alloc.global_counts(ordered, t, req.multiple, req.minimum), req.resource_of,
                      req.target, float(flat.min()) - 1e-9, float(flat.max()) + 1e-9, log_scale=False,
                      decreasing=True)
    return Budget(sol.counts, knob=sol.knob)


def top_up(req: BudgetRequest, budget: Budget) -> Budget:
    """Spend what an allocator left below the target on the best-scoring next channels."""
    budget.counts = alloc.top_up(budget.counts, req.sizes, req.scores, req.resource_of, req.target, req.multiple)
    return budget
