"""Per-group budgets (spec sections 3 and 5): the formulas by hand, and the solver's contract."""
from __future__ import annotations

import math

import pytest
import torch

from pfp import allocation as alloc
from pfp.allocation import GroupStats
from pfp.models import build_model
from pfp.prune import calibration_size


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- |S| (section 5)
def test_calibration_size_by_hand():
    # ceil(3 ln(8 * 4 / (0.1 / 10))) = ceil(3 ln 3200) = ceil(24.21...) = 25
    assert alloc.calibration_size(10, 4, 0.1) == 25
    # C is a parameter: ceil(2 ln 3200) = ceil(16.14) = 17
    assert alloc.calibration_size(10, 4, 0.1, c=2.0) == 17
    # eta = eta_max = 1, delta = e^-10: ceil(3 (ln 8 + 10)) = ceil(36.24) = 37
    assert alloc.calibration_size(1, 1, math.exp(-10)) == 37
    # more neurons or a smaller delta never asks for fewer points
    assert alloc.calibration_size(1000, 4, 0.1) > alloc.calibration_size(10, 4, 0.1)
    assert alloc.calibration_size(10, 4, 1e-6) > alloc.calibration_size(10, 4, 0.1)


def _resnet20_eta() -> tuple[int, int]:
    # CIFAR ResNet20 at 32px, option-B shortcuts: outputs C x H x W of every Conv/Linear
    stem = 16 * 32 * 32
    stage1 = 6 * 16 * 32 * 32  # 3 blocks x 2 convs
    stage2 = 7 * 32 * 16 * 16  # 6 convs + the projection shortcut
    stage3 = 7 * 64 * 8 * 8
    fc = 10
    return stem + stage1 + stage2 + stage3 + fc, stem


def test_calibration_size_resnet20():
    model = build_model("resnet20", 10, 3, 32)
    x = torch.randn(1, 3, 32, 32)
    eta, eta_max = _resnet20_eta()
    for delta in (1e-12, 1e-16, 0.01):
        want = math.ceil(3 * math.log(8 * eta_max * eta / delta))
        assert calibration_size(model, x, delta) == want
    # the spec's "about 183 points" for CIFAR ResNet20 is delta = 1e-16
    assert calibration_size(model, x, 1e-16) == 183
    assert 120 <= calibration_size(model, x, 1e-12) <= 200
    # only the first point of a batch is looked at
    assert calibration_size(model, torch.randn(4, 3, 32, 32), 1e-12) == calibration_size(model, x, 1e-12)


# ----------------------------------------------------------------------------- m_g (section 3)
def test_alpha_and_sample_size_by_hand():
    g = GroupStats(size=4, sensitivity=torch.tensor([0.5, 0.25, 0.25, 0.0]), kernel=9, positions=99)
    assert g.mass == pytest.approx(1.0)
    a = 2 * 3 * math.log(8 * 100 * 9 / 0.01)  # 2 C ln(8 (P + 1) K / delta)
    assert alloc.alpha(9, 99, 0.01) == pytest.approx(a)
    assert a == pytest.approx(80.923, abs=1e-3)
    # ceil(3 (6 + 2 * 0.5) alpha S / 0.25) = ceil(84 alpha) = ceil(6797.5...)
    assert alloc.sample_size(g, 0.5, 0.01) == math.ceil(3 * 7 * a * 1.0 / 0.25) == 6798
    g2 = GroupStats(size=4, sensitivity=torch.tensor([1.0, 1.0, 0.5, 0.5]), kernel=1, positions=1)
    a2 = 6 * math.log(8 * 2 * 1 / 1e-3)
    assert alloc.sample_size(g2, 2.0, 1e-3) == math.ceil(3 * 10 * a2 * 3.0 / 4.0)
    # m grows with S and shrinks with eps
    assert alloc.sample_size(g2, 1.0, 1e-3) > alloc.sample_size(g2, 2.0, 1e-3)
    assert alloc.sample_size(g2, 2.0, 1e-3) > alloc.sample_size(
        GroupStats(4, torch.tensor([1.0, 0.5, 0.0, 0.0]), 1, 1), 2.0, 1e-3)


def test_expected_distinct_formula_and_monte_carlo():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    for m in (1, 3, 7, 20):
        exact = float(sum(1 - (1 - pj) ** m for pj in p.tolist()))
        assert alloc.expected_distinct(p, m) == pytest.approx(exact, rel=1e-9)
        gen = torch.Generator().manual_seed(m)
        trials = 20000
        draws = torch.multinomial(p.expand(trials, -1), m, replacement=True, generator=gen)
        hit = torch.zeros(trials, len(p), dtype=torch.bool).scatter_(1, draws, True)
        mc = float(hit.sum(1).double().mean())
        assert mc == pytest.approx(exact, abs=0.03), (m, mc, exact)
    assert alloc.expected_distinct(p, 0) == 0.0
    assert alloc.expected_distinct(p, 1) == pytest.approx(1.0)
    # a channel holding all the mass is one distinct channel however many draws
    assert alloc.expected_distinct(torch.tensor([1.0, 0.0, 0.0]), 1e6) == pytest.approx(1.0)
    # never more than the number of channels with p > 0
    assert alloc.expected_distinct(p, 1e9) == pytest.approx(4.0)


# ----------------------------------------------------------------------------- k_g(eps)
def _stats(s, size=None, kernel=9, positions=64):
    s = torch.as_tensor(s, dtype=torch.float64)
    return GroupStats(size or len(s), s, kernel, positions)


def test_pfp_counts_monotone_and_clipped():
    gen = torch.Generator().manual_seed(0)
    stats = [
        _stats(torch.rand(64, generator=gen)),
        _stats(torch.rand(16, generator=gen) ** 4),
        _stats(torch.tensor([0.9, 0.1, 0.05, 0.0, 0.0, 0.3])),
        _stats(torch.zeros(8)),  # no mass: the minimum
    ]
    prev = None
    seen = set()
    for eps in torch.logspace(-2, 6, 60).tolist():
        for mn in (1, 3):
            counts = alloc.pfp_counts(stats, eps, 1e-12, minimum=mn)
            for k, st in zip(counts, stats):
                assert min(mn, st.size) <= k <= st.size
            assert counts[3] == mn
        counts = alloc.pfp_counts(stats, eps, 1e-12)
        seen.add(tuple(counts))
        if prev is not None:
            assert all(a <= b for a, b in zip(counts, prev)), (eps, counts, prev)
        prev = counts
    # small eps keeps (almost) everything with mass, large eps the minimum
    assert alloc.pfp_counts(stats, 1e-2, 1e-12) == [64, 16, 4, 1]
    assert alloc.pfp_counts(stats, 1e6, 1e-12) == [1, 1, 1, 1]
    assert len(seen) > 10  # the knob really moves the counts


def test_pfp_counts_matches_formula():
    st = _stats([0.8, 0.4, 0.2, 0.1, 0.1, 0.0, 0.05, 0.3], kernel=9, positions=100)
    for eps in (5.0, 20.0, 80.0, 300.0):
        m = alloc.sample_size(st, eps, 1e-6)
        p = st.sensitivity / st.mass
        k = math.ceil(sum(1 - (1 - pj) ** m for pj in p.tolist()) - 1e-9)
        assert alloc.pfp_counts([st], eps, 1e-6) == [max(1, min(8, k))]


def test_concentrated_sensitivity_keeps_fewer_channels():
    n = 32
    spread = _stats(torch.full((n,), 0.5))
    conc = torch.full((n,), 0.01)
    conc[0] = 1.0
    concentrated = _stats(conc)
    strict = 0
    for eps in torch.logspace(-1, 4, 40).tolist():
        kc, ks = alloc.pfp_counts([concentrated, spread], eps, 1e-12)
        assert kc <= ks, (eps, kc, ks)
        strict += kc < ks
    assert strict >= 10
    # at a middle eps the spread layer keeps nearly all, the concentrated one few
    eps = next(e for e in torch.logspace(-1, 4, 200).tolist() if alloc.pfp_counts([spread], e, 1e-12)[0] < n)
    kc, ks = alloc.pfp_counts([concentrated, spread], eps, 1e-12)
    assert kc < ks / 2


def test_round_count():
    assert alloc.round_count(33, 64, 8, 1) == 40
    assert alloc.round_count(40, 64, 8, 1) == 40
    assert alloc.round_count(1, 64, 8, 1) == 8
    assert alloc.round_count(0, 64, 8, 1) == 8
    assert alloc.round_count(63, 64, 8, 1) == 64
    assert alloc.round_count(100, 64, 8, 1) == 64
    assert alloc.round_count(1, 64, 8, 12) == 16  # the minimum, then rounded up
    assert alloc.round_count(3, 6, 8, 1) == 3  # narrow layer: left free
    assert alloc.round_count(5, 12, 8, 1) == 5  # not a multiple of 8: left free
    assert alloc.round_count(3, 8, 8, 1) == 3  # rounding an 8-wide layer would never prune it
    assert alloc.round_count(5, 16, 8, 1) == 8
    assert alloc.round_count(0, 6, 1, 1) == 1
    assert alloc.round_count(2, 6, 1, 10) == 6  # minimum above the width: the width
    assert alloc.round_count(33, 64, 1, 1) == 33
    assert alloc.round_count(17, 64, 16, 1) == 32


def test_pfp_counts_round_to_multiple():
    gen = torch.Generator().manual_seed(1)
    stats = [_stats(torch.rand(64, generator=gen)), _stats(torch.rand(6, generator=gen))]
    for eps in torch.logspace(0, 4, 25).tolist():
        k64, k6 = alloc.pfp_counts(stats, eps, 1e-12, multiple=8)
        assert k64 % 8 == 0
        free64, free6 = alloc.pfp_counts(stats, eps, 1e-12, multiple=1)
        assert k64 == min(64, max(8, math.ceil(free64 / 8) * 8))
        assert k6 == free6


def test_uniform_and_global_counts():
    assert alloc.uniform_counts([64, 16, 6], 0.5) == [32, 8, 3]
    assert alloc.uniform_counts([64, 16, 6], 0.3, multiple=8) == [24, 8, 2]
    assert alloc.uniform_counts([64, 16, 6], 0.0) == [1, 1, 1]
    assert alloc.uniform_counts([64, 16, 6], 1.0) == [64, 16, 6]
    scores = [torch.tensor([0.1, 0.5, 0.9, 0.3]), torch.tensor([0.2, 0.8])]
    assert alloc.global_counts(scores, 0.25) == [3, 1]
    assert alloc.global_counts(scores, 0.95) == [1, 1]
    assert alloc.global_counts(scores, 0.0) == [4, 2]


# ----------------------------------------------------------------------------- solve + top_up
SIZES = [64, 32, 16, 6, 120]
COSTS = [9.0, 25.0, 4.0, 70.0, 3.0]  # resource per kept channel of each group


def _resource(counts):
    return 200.0 + sum(c * k for c, k in zip(COSTS, counts))


def _check_within_one_step(counts, target, multiple):
    r = _resource(counts)
    assert r <= target
    for i, (k, n) in enumerate(zip(counts, SIZES)):
        if k >= n:
            continue
        step = multiple if multiple > 1 and n % multiple == 0 and n > multiple else 1
        bigger = list(counts)
        bigger[i] = min(n, k + step)
        assert _resource(bigger) > target, f"group {i} could still grow by {step}"
    return r


@pytest.mark.parametrize("multiple", [1, 8])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77])
def test_solve_uniform_then_top_up(ratio, multiple):
    target = ratio * _resource(SIZES)
    sol = alloc.solve(lambda r: alloc.uniform_counts(SIZES, r, multiple), _resource, target, 0.0, 1.0,
                      log_scale=False, decreasing=False)
    assert sol.resource == _resource(sol.counts) <= target
    assert sol.counts == alloc.uniform_counts(SIZES, sol.knob, multiple)
    # bisection alone: the next uniform step would overshoot
    counts = alloc.top_up(sol.counts, SIZES, [torch.ones(n) for n in SIZES], _resource, target, multiple)
    r = _check_within_one_step(counts, target, multiple)
    assert r >= sol.resource
    assert target - r <= max(COSTS) * multiple
    assert (target - r) / target < 0.05


@pytest.mark.parametrize("multiple", [1, 8])
def test_solve_pfp_then_top_up(multiple):
    gen = torch.Generator().manual_seed(2)
    stats = [_stats(torch.rand(n, generator=gen) ** 3, kernel=9, positions=100) for n in SIZES]
    target = 0.45 * _resource(SIZES)
    sol = alloc.solve(lambda e: alloc.pfp_counts(stats, e, 1e-12, multiple), _resource, target, 1e-3, 1e12,
                      log_scale=True, decreasing=True, iters=80)
    assert sol.resource <= target
    assert sol.counts == alloc.pfp_counts(stats, sol.knob, 1e-12, multiple)
    # a slightly smaller eps (more channels) goes over the target, unless nothing changes
    tighter = alloc.pfp_counts(stats, sol.knob * 0.999, 1e-12, multiple)
    assert tighter == sol.counts or _resource(tighter) > target
    counts = alloc.top_up(sol.counts, SIZES, [s.sensitivity for s in stats], _resource, target, multiple)
    _check_within_one_step(counts, target, multiple)
    assert all(a >= b for a, b in zip(counts, sol.counts))


def test_top_up_prefers_higher_scores():
    sizes = [4, 4]
    scores = [torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])]
    # each channel costs 1: one more channel allowed; group 0's next (2/2.5 = 0.8) < group 1's (1/1 = 1)
    counts = alloc.top_up([2, 2], sizes, scores, lambda c: float(sum(c)), 5.0)
    assert counts == [2, 3]
    counts = alloc.top_up([2, 2], sizes, scores, lambda c: float(sum(c)), 100.0)
    assert counts == [4, 4]


def test_solve_returns_smallest_over_when_target_unreachable():
    sol = alloc.solve(lambda r: alloc.uniform_counts(SIZES, r), _resource, 1.0, 0.0, 1.0,
                      log_scale=False, decreasing=False)
    assert sol.counts == [1] * len(SIZES)
    assert sol.resource > 1.0


def test_pfp_counts_tiny_eps_does_not_overflow():
    # solve() bisects eps down to lo=1e-8 whenever the target is met at every eps (e.g. layers
    # whose sensitivity sits on a few channels); m = ceil(... / eps^2) is then ~4e19 > 2^63.
    st = GroupStats(4, torch.tensor([1.0, 0.0, 0.0, 0.0]), 9, 100)
    assert alloc.sample_size(st, 1e-8, 1e-12) > 2**63
    assert alloc.pfp_counts([st], 1e-8, 1e-12) == [1]
