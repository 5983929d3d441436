"""Methods as a registry, PFP's cost-aware per-layer budgets and untied group scores."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from pfp import allocation as alloc
from pfp.config import ConfigError, DataConfig, PruneConfig, config_from_dict
from pfp.data import build_data, make_loader
from pfp.groups import PruningGraph
from pfp.importance import norm_scores, pfp_sensitivity
from pfp.methods import METHODS, Method, register_method
from pfp.models import build_model
from pfp.prune import PruneError, prune

pytestmark = pytest.mark.usefixtures("one_thread")
X1 = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def calib():
    data = build_data(DataConfig(name="synthetic", synthetic_channels=1, synthetic_size=28, synthetic_train=64,
                                 synthetic_test=16))
    return make_loader(Subset(data.train, range(16)), 8, False)


# ----------------------------------------------------------------------------- the registry
def test_every_config_method_is_registered_and_unknown_names_list_them():
    assert {"pfp", "pfp_reference", "ft", "sfp", "fpgm", "hrank", "random", "tp_magnitude", "tp_taylor"} <= set(METHODS)
    with pytest.raises(ConfigError, match=r"prune.method.*unknown method 'pfpp'.*pfp_reference"):
        config_from_dict({"prune": {"method": "pfpp"}})


def test_a_new_method_is_one_registration(calib):
    register_method(Method("l1_global_test", lambda r: __import__("pfp.methods").methods.Scores(norm_scores(r.groups, 1)),
                           "global"))
    try:
        model = build_model("lenet5", 10, 1, 28)
        small, rep, _ = prune(model, calib, PruneConfig(method="l1_global_test", round_to=1), 0.5, example_input=X1)
        assert rep.method == "l1_global_test" and rep.allocation == "global"
        assert rep.flops <= 0.5 * rep.original_flops
    finally:
        del METHODS["l1_global_test"]


def test_bound_allocation_needs_pfp_scores(calib):
    with pytest.raises(PruneError, match="prune.allocation: mass_bound needs PFP's sensitivities"):
        prune(build_model("lenet5", 10, 1, 28), calib, PruneConfig(method="ft", allocation="mass_bound"), 0.5,
              example_input=X1)


# ----------------------------------------------------------------------------- per-layer eps
def test_eps_for_counts_inverts_the_bound():
    torch.manual_seed(0)
    for n, kernel, positions in ((16, 9, 100), (40, 1, 1)):
        st = alloc.GroupStats(n, torch.rand(n) ** 2, kernel, positions)
        ks = list(range(2, n + 1))
        eps = alloc.eps_for_counts(st, ks, 1e-12)
        assert float(eps[-1]) == 0.0  # keeping every channel: no error
        assert all(a >= b for a, b in zip(eps.tolist(), eps.tolist()[1:]))  # fewer channels, larger eps
        for k, e in zip(ks[:-1], eps.tolist()[:-1]):
            assert alloc.pfp_counts([st], e, 1e-12)[0] == k
            assert alloc.pfp_counts([st], e * 0.99, 1e-12)[0] > k  # and it is the smallest such eps


def test_bound_counts_meets_the_target_and_cuts_expensive_channels_first():
    torch.manual_seed(1)
    s = torch.rand(32)
    stats = [alloc.GroupStats(32, s.clone(), 9, 100), alloc.GroupStats(32, s.clone(), 9, 100)]
    cost = [4.0, 1.0]  # a channel of group 0 costs four of group 1's

    def resource(counts):
        return sum(c * k for c, k in zip(cost, counts))

    target = 0.5 * resource([32, 32])
    sol = alloc.bound_counts(stats, 1e-12, resource, target)
    assert resource(sol.counts) <= target
    assert resource(sol.counts) >= target - max(cost)  # the remainder was spent
    assert sol.counts[0] < sol.counts[1]
    assert sol.eps == [float(alloc.eps_for_counts(st, [k], 1e-12)[0]) for st, k in zip(stats, sol.counts)]
    # the paper's single eps ignores cost: the same count for both
    single = alloc.solve(lambda e: alloc.pfp_counts(stats, e, 1e-12), resource, target, 1e-8, 1e12,
                         log_scale=True, decreasing=True, iters=80)
    assert single.counts[0] == single.counts[1]
    # and the per-layer choice has the smaller composed bound at the same resource
    composed = lambda counts: sum(float(torch.log1p(alloc.eps_for_counts(st, [k], 1e-12)[0]))  # noqa: E731
                                  for st, k in zip(stats, counts))
    assert composed(sol.counts) <= composed(single.counts)


def test_bound_counts_respect_rounding_and_minimum():
    stats = [alloc.GroupStats(64, torch.rand(64), 9, 64), alloc.GroupStats(6, torch.rand(6), 25, 100)]
    sol = alloc.bound_counts(stats, 1e-12, lambda c: float(c[0] * 2 + c[1] * 5), 0.4 * (128 + 30), multiple=8,
                             minimum=2)
    assert sol.counts[0] % 8 == 0 and sol.counts[1] >= 2


# ----------------------------------------------------------------------------- group scores
def test_weighted_group_scores_do_not_saturate_where_the_max_does():
    data = build_data(DataConfig(name="synthetic", synthetic_channels=1, synthetic_size=28, synthetic_train=64,
                                 synthetic_test=16))
    loader = make_loader(Subset(data.train, range(32)), 16, False)
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1, 28).eval()
    graph = PruningGraph(model, X1)
    stem = next(g for g in graph.groups if g.name == "conv1")
    assert len(stem.consumers) >= 3  # the stem's channels feed every block of stage 1
    top = pfp_sensitivity(model, graph.groups, loader, "cpu", "max_offset", "max").scores[stem.gid]
    weighted = pfp_sensitivity(model, graph.groups, loader, "cpu", "max_offset", "weighted").scores[stem.gid]
    assert len(set(top.tolist())) < stem.size // 2  # most channels tie (at 1.0: a saturated consumer)
    assert len(set(weighted.tolist())) == stem.size  # every channel ranked


def test_pfp_default_is_the_improved_method():
    cfg = PruneConfig()
    assert cfg.method == "pfp" and METHODS["pfp"].allocation == "search" and METHODS["pfp"].reconstruct
    assert METHODS["pfp_sensitivity"].allocation == "mass_bound"
    assert METHODS["pfp_reference"].allocation == "single_eps" and not METHODS["pfp_reference"].top_up
    assert cfg.bn_recalibration and cfg.calib_split > 0


# ----------------------------------------------------------------------------- reconstruction-aware ranking
def _two_conv(dup: tuple[int, int]) -> torch.nn.Module:
    torch.manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(6, 5, 3, padding=1),
                            torch.nn.Flatten(), torch.nn.Linear(5 * 28 * 28, 10))
    with torch.no_grad():  # channel dup[1] repeats channel dup[0]: the refit can do without one of them
        m[0].weight[dup[1]] = m[0].weight[dup[0]]
        m[0].bias[dup[1]] = m[0].bias[dup[0]]
    return m.eval()


def test_elimination_rise_is_the_least_squares_residual_rise():
    from pfp.grams import Gram
    from pfp.selection import Elimination

    torch.manual_seed(0)
    X = torch.randn(400, 12, dtype=torch.float64)  # 4 channels x 3 kernel offsets
    W = torch.randn(12, 5, dtype=torch.float64)
    Y = X @ W + 0.1 * torch.randn(400, 5, dtype=torch.float64)
    gr = Gram(X.t() @ X, X.t() @ Y, float(Y.pow(2).sum()), 3, 400)
    st = Elimination(gr.G, gr.B, gr.yy, 3, torch.tensor([[i, i] for i in range(4)]), ridge=0.0)

    def residual(chans):
        cols = [c * 3 + o for c in chans for o in range(3)]
        sol = torch.linalg.lstsq(X[:, cols], Y).solution
        return float((X[:, cols] @ sol - Y).pow(2).sum())

    full = residual([0, 1, 2, 3])
    rises = st.rises([0, 1, 2, 3])
    for j in range(4):
        assert float(rises[j]) == pytest.approx((residual([c for c in range(4) if c != j]) - full) / gr.yy, rel=1e-6)
    st.remove(2)  # after a removal the rises are those of the smaller system
    base = residual([0, 1, 3])
    for j, r in zip([0, 1, 3], st.rises([0, 1, 3]).tolist()):
        assert r == pytest.approx((residual([c for c in (0, 1, 3) if c != j]) - base) / gr.yy, rel=1e-6)


def _duplicated_group(calib):
    """Group "0" of a two-conv net whose channels 1 and 4 are copies: (group, its Grams, sensitivities)."""
    from pfp.grams import consumer_grams

    model = _two_conv((1, 4))
    graph = PruningGraph(model, X1)
    g = next(g for g in graph.groups if g.name == "0")
    grams = consumer_grams(model, {c.name: c.module for c in g.consumers}, calib, "cpu")
    return g, grams, pfp_sensitivity(model, graph.groups, calib, "cpu", aggregate="weighted").scores


def test_pfp_drops_a_duplicated_channel_first(calib):
    from pfp.selection import refit_ranking

    g, grams, sens = _duplicated_group(calib)
    rank = refit_ranking([g], sens, grams, ridge=1e-9)[g.gid]
    assert int(torch.argmin(rank)) in (1, 4)  # either copy goes first: the other carries it
    assert sorted(rank.tolist()) == list(range(6))


def test_wide_groups_are_eliminated_in_steps_that_keep_the_order(calib):
    from pfp.selection import Elimination, refit_ranking

    g, grams, sens = _duplicated_group(calib)
    exact = refit_ranking([g], sens, grams, ridge=1e-9)[g.gid]
    stepped = refit_ranking([g], sens, grams, ridge=1e-9, exact_upto=2)[g.gid]  # 6 wide: 3 go in the first step
    assert sorted(stepped.tolist()) == list(range(6))
    assert torch.equal(refit_ranking([g], sens, grams, ridge=1e-9, exact_upto=4)[g.gid], exact)  # 6 // 4 = 1
    # the first step drops the three lowest rises of the unpruned state, lowest first
    (name,) = {c.name for c in g.consumers}
    pairs = torch.cat([torch.stack([c.in_idxs, c.root_idxs], 1) for c in g.consumers])
    gr = grams[name]
    rises = Elimination(gr.G, gr.B, gr.yy, gr.kernel, pairs, 1e-9).rises(list(range(6)))
    tie = sens[g.gid].double() / float(sens[g.gid].abs().max()) * 1e-9
    assert torch.argsort(stepped)[:3].tolist() == torch.argsort(rises - tie, stable=True)[:3].tolist()


def test_output_probe_and_search_meet_the_target(calib):
    from pfp.probe import OutputProbe
    from pfp.resources import ResourceModel

    model = build_model("lenet5", 10, 1, 28).eval()
    graph = PruningGraph(model, X1)
    scores = norm_scores(graph.groups, 1)
    probe = OutputProbe(model, graph.groups, scores, calib, "cpu", eval_points=8)
    full = [g.size for g in graph.groups]
    assert probe.joint(full) == 0.0
    assert probe.error(0, 1) > 0
    rm = ResourceModel(model, X1, graph.groups)
    small, rep, _ = prune(model, calib, PruneConfig(method="ft", allocation="search", round_to=1), 0.5,
                          example_input=X1, postprocess_loader=calib)
    # within the target; below it by at most about one channel of conv1 (6 channels: 14% of the FLOPs each),
    # which an untrained network's flat divergence makes the cheapest cut
    assert rep.allocation == "search" and 0.8 * 0.5 * rm.total_flops <= rep.flops <= 0.5 * rm.total_flops


def test_post_processing_keeps_the_candidate_closest_to_the_unpruned_outputs(calib):
    model = build_model("resnet20", 10, 1, 28).eval()
    _, rep, _ = prune(model, calib, PruneConfig(method="ft", round_to=8, reconstruct=True), 0.5, example_input=X1,
                      holdout_loader=calib)
    pp = rep.postprocess
    assert pp["reconstruct"] and pp["bn_recalibration"] and pp["refit_layers"]
    assert {"refit", "refit+bn"} <= set(pp["output_error"]) and pp["order"] == min(pp["output_error"],
                                                                                    key=pp["output_error"].get)
    # plain: neither, and the report says so
    _, plain, _ = prune(model, calib, PruneConfig(method="ft", round_to=8, reconstruct=False, bn_recalibration=False),
                        0.5, example_input=X1)
    assert plain.postprocess["order"] is None and not plain.postprocess["refit_layers"]


def test_lazy_round_measures_few_and_finds_the_best_steps_when_costs_only_rise():
    from pfp.budgets import _lazy_round

    costs = [5.0, 1.0, 4.0, 2.0, 9.0, 3.0, 8.0, 7.0]
    measured = []

    def step_of(i):
        measured.append(i)
        return costs[i], i, 0, 0.0

    stale: dict[int, float] = {}
    first = _lazy_round(len(costs), 2, stale, step_of)
    assert len(measured) == len(costs) and sorted(first)[:2] == [(1.0, 1, 0, 0.0), (2.0, 3, 0, 0.0)]
    # groups 1 and 3 stepped (their stale costs dropped); everything else got dearer by 0.5
    del stale[1], stale[3]
    costs = [c + 0.5 for c in costs]
    costs[1], costs[3] = 6.0, 10.0
    measured.clear()
    second = sorted(_lazy_round(len(costs), 2, stale, step_of))
    brute = sorted((c, i) for i, c in enumerate(costs))[:2]
    assert [(c, i) for c, i, _, _ in second[:2]] == brute  # the same two steps as measuring everything
    assert len(measured) < len(costs)  # 9.0, 8.0, 7.0 (now 9.5, 8.5, 7.5) were never re-measured


def test_elimination_rises_match_brute_force_least_squares_for_one_feature_channels():
    from pfp.selection import Elimination

    torch.manual_seed(0)
    X = torch.randn(200, 6, dtype=torch.float64)
    Y = X @ torch.randn(6, 3, dtype=torch.float64) + 0.1 * torch.randn(200, 3, dtype=torch.float64)
    G, B, yy = X.t() @ X, X.t() @ Y, float(Y.pow(2).sum())
    pairs = torch.stack([torch.arange(6), torch.arange(6)], 1)
    el = Elimination(G.clone(), B.clone(), yy, 1, pairs, 1e-12)

    def residual(cols):
        w = torch.linalg.lstsq(X[:, cols], Y).solution
        return float((Y - X[:, cols] @ w).pow(2).sum())

    for alive in ([0, 1, 2, 3, 4, 5], [0, 1, 3, 4, 5]):
        if len(alive) == 5:
            el.remove(2)
        got = el.rises(alive) * yy
        want = torch.tensor([residual([c for c in alive if c != j]) - residual(alive) for j in alive],
                            dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-8)


def test_every_registered_allocator_can_be_named_in_a_config():
    from pfp.budgets import ALLOCATORS
    from pfp.config import ALLOCATIONS

    assert set(ALLOCATORS) == set(ALLOCATIONS)


def test_lazy_search_meets_the_target_with_fewer_probes(calib):
    model = build_model("resnet56", 10, 1, 28).eval()  # 30 groups: rounds take 3 steps
    reps = {}
    for allocation in ("search", "search_lazy"):
        _, reps[allocation], _ = prune(model, calib, PruneConfig(method="ft", allocation=allocation, round_to=8),
                                       0.5, example_input=X1, postprocess_loader=calib)
    probes = {a: int(r.allocation_notes[-1].split(" after ")[1].split()[0]) for a, r in reps.items()}
    assert all(r.flops <= 0.5 * r.original_flops * 1.001 for r in reps.values())
    assert probes["search_lazy"] < probes["search"]


def test_output_probe_solves_each_refit_once_and_gives_the_same_divergence(calib):
    from pfp.probe import OutputProbe

    model = build_model("resnet20", 10, 1, 28).eval()
    graph = PruningGraph(model, X1)
    probe = OutputProbe(model, graph.groups, norm_scores(graph.groups, 1), calib, "cpu", eval_points=8)
    counts = [max(1, g.size // 2) for g in graph.groups]
    first = probe.joint(counts)
    solved = probe.solves
    assert solved > 0 and probe.joint(counts) == first and probe.solves == solved
    # one group changed: only its consumers are solved again
    counts[1] -= 1
    probe.joint(counts)
    assert 0 < probe.solves - solved < solved


def test_output_probe_refit_cache_is_bounded_by_bytes(calib, monkeypatch):
    import pfp.probe as probe_mod

    model = build_model("resnet20", 10, 1, 28).eval()
    graph = PruningGraph(model, X1)
    probe = probe_mod.OutputProbe(model, graph.groups, norm_scores(graph.groups, 1), calib, "cpu", eval_points=8)
    counts = [max(1, g.size // 2) for g in graph.groups]
    monkeypatch.setattr(probe_mod, "REFIT_CACHE_BYTES", 1)  # room for one refit: nothing is reused
    first = probe.joint(counts)
    solved = probe.solves
    assert probe.joint(counts) == first and probe.solves == 2 * solved and len(probe._refits) == 1
